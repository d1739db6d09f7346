"""Dataset converters: raw files and synthetic generators -> WebDataset shards plus manifest."""
