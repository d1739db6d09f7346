from conure_dist.model.conure import ConureModel, TaskSpec

__all__ = ["ConureModel", "TaskSpec"]
