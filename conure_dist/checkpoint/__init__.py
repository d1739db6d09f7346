"""The checkpoint format and the one checkpointer that writes it (atomic, any fsspec filesystem)."""
