"""Work planned on the driver as a list of tasks, run by Ray Data one task per call.

The ingest and segment jobs cut their input into tasks on the driver (so the same input always
gives the same tasks) and hand them to Ray Data this way: each task pickled into a row of its own
block, so each is one call of the mapped function, scheduled, retried and finished on its own.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence

TASK_COLUMN = "task"


def map_tasks(tasks: Sequence, fn, **map_batches_kwargs):
    """A lazy Ray Dataset of `fn` over `tasks`, one task per block and per call (numpy batches of
    one row); `fn` takes its tasks back with `tasks_in(batch)`. Other map_batches arguments
    (fn_kwargs, compute, num_cpus, ...) pass through."""
    import ray

    items = [{TASK_COLUMN: pickle.dumps(task)} for task in tasks]
    return ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        fn, batch_size=1, batch_format="numpy", **map_batches_kwargs)


def tasks_in(batch: dict) -> list:
    """The tasks of one map_tasks batch, unpickled."""
    return [pickle.loads(blob) for blob in batch[TASK_COLUMN]]
