"""Pruning: importance scores, pruners, masks and sparsity measurement."""
