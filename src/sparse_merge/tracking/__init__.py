"""Run tracking: console/JSONL/W&B logging, atomic files, checkpoints and lineage."""
