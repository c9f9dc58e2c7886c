"""Tasks: fixed, ordered datapoints scored one value each (see ``base.Task``)."""

from sparse_merge.tasks.base import Benchmark, Example, Task
from sparse_merge.tasks.suite import TaskSuite

__all__ = ["Benchmark", "Example", "Task", "TaskSuite"]
