"""sparse_merge: sparsity-aware evolutionary model merging and sparse fine-tuning for LLMs."""

__version__ = "0.1.0"
