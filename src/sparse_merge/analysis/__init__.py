"""Sweep analysis: collect every run of a sweep into CSV tables and PNG plots.

``python -m sparse_merge.analysis <sweep dir>`` (``make analyze``).
"""
