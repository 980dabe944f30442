"""Task data for the harness from pudding's data folder, so that lm-eval needs no Hugging Face hub.

The task configs in tasks/ name `local_dataset` as their `custom_dataset`. It returns the rows that `pudding eval`
scores (same files, same order, same clean-ups), so document i of a harness task is document i of the pudding task
and `--limit N` picks the same documents in both.
"""

from __future__ import annotations

from pathlib import Path

TASKS_DIR = Path(__file__).with_name("tasks")  # pass as lm-eval's --include_path


def local_dataset(pudding_task: str, pudding_data_dir: str | None = None, **_metadata):
    """A DatasetDict with every split pudding has for the task. lm-eval calls it with the task's metadata and
    dataset_kwargs (and, from simple_evaluate, the model_args) as keywords: only the pudding_* ones are ours.
    The data folder is pudding's: $PUDDING_DATA_DIR unless `--metadata '{"pudding_data_dir": DIR}'` says otherwise."""
    import datasets

    from ..tasks import get_task, resolve_data_dir

    task = get_task(pudding_task)
    data_dir = resolve_data_dir(pudding_data_dir)
    return datasets.DatasetDict(
        {split: datasets.Dataset.from_list(task.rows(split, data_dir)) for split in task.splits}
    )
