"""Tasks and their data: a registry of tasks (tasks.yaml), readers for the raw files, documents to score, and the
paper's task lists."""

from .registry import (
    CALIBRATION_TASKS, DATA_DIR_ENV, PAPER_TASKS, UNSEEN_TASKS, Doc, DocSet, Task, data_versions, get_task,
    parse_task_list, resolve_data_dir, task_names,
)

__all__ = ["CALIBRATION_TASKS", "DATA_DIR_ENV", "PAPER_TASKS", "UNSEEN_TASKS", "Doc", "DocSet", "Task", "data_versions",
           "get_task", "parse_task_list", "resolve_data_dir", "task_names"]
