"""Merge methods in the style of mergekit (0.1.5): one file per method family, variants as
settings (``conf/merge/*.yaml``).

- ``base``: ``MergeMethod``, the shared driver that merges flat genomes tensor by tensor
  (``merge_``), and ``tensor_segments`` (where each tensor lies in a genome).
- ``linear``: ``Linear``, the weighted (normalised) average.
- ``slerp``: ``Slerp``, spherical interpolation of two genomes, one angle per tensor
  (mergekit) or per genome (M2N2).
- ``task_arithmetic``: ``TaskArithmetic``, mergekit's generalized task arithmetic: task
  arithmetic, TIES, DARE, Model Breadcrumbs and DELLA are its settings.
"""
