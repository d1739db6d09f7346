"""Command-line entry points (``python -m data_tools.X``); the converters live in ``conure_dist.data.sources``."""
