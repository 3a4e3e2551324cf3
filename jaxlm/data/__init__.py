"""Synthetic retrieval tasks (generated, never stored) and their Grain pipelines."""
from jaxlm.data.common import Example, TaskConfigError
from jaxlm.data.tasks import TASKS, make_task

__all__ = ['Example', 'TaskConfigError', 'TASKS', 'make_task']
