"""Sparse fine-tuning: training data, masked LoRA, trainer, merge and validation."""
