"""Serving trained runs: inference, multi-task scoring, export, user embeddings and the HTTP server."""
