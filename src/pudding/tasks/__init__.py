"""Tasks and their data: a registry of tasks (tasks.yaml), readers for the raw files, documents to score."""

from .registry import (
    DATA_DIR_ENV, Doc, DocSet, Task, data_versions, get_task, parse_task_list, resolve_data_dir, task_names,
)

__all__ = ["DATA_DIR_ENV", "Doc", "DocSet", "Task", "data_versions", "get_task", "parse_task_list", "resolve_data_dir",
           "task_names"]
