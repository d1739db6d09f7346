from conure_dist.model.conure_model import ConureModel, TaskSpec

__all__ = ["ConureModel", "TaskSpec"]
