"""Pipelines: plain functions over built parts; ``app`` picks one and builds its parts."""
