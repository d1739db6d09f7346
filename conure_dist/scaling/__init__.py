"""Scaling: the communication model of a training step and ``conure scale``'s runs over world sizes."""
