"""The Serve replica's Batcher: requests that arrive while the model runs share its next pass."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from brainseg_ray.serve.batcher import Batcher


def _recording(batches: list[list], seconds: float = 0.05, fail_on=None):
    def run_batch(items: list) -> list:
        batches.append(list(items))
        if fail_on is not None and fail_on in items:
            raise ValueError(f"bad item {fail_on}")
        time.sleep(seconds)  # a forward pass
        return [item * 10 for item in items]
    return run_batch


async def _staggered(batcher: Batcher, n: int, gap_s: float) -> list:
    async def one(i):
        await asyncio.sleep(i * gap_s)
        return await batcher.submit(i)
    return await asyncio.gather(*(one(i) for i in range(n)), return_exceptions=True)


def test_requests_arriving_during_a_pass_share_the_next_one():
    batches: list[list] = []
    with ThreadPoolExecutor(1) as pool:
        batcher = Batcher(_recording(batches), pool, max_batch_size=8)
        results = asyncio.run(_staggered(batcher, 9, gap_s=0.004))  # all 9 arrive within one pass
    assert results == [i * 10 for i in range(9)]  # each caller gets its own answer
    assert batches[0] == [0] and batches[1] == list(range(1, 9))  # the first ran alone, at once


def test_batches_never_exceed_max_batch_size_and_keep_arrival_order():
    batches: list[list] = []
    with ThreadPoolExecutor(1) as pool:
        batcher = Batcher(_recording(batches), pool, max_batch_size=3)
        results = asyncio.run(_staggered(batcher, 10, gap_s=0.001))
    assert results == [i * 10 for i in range(10)]
    assert max(len(b) for b in batches) == 3 and [i for b in batches for i in b] == list(range(10))


@pytest.mark.parametrize("wait_s, expected", [(0.0, [[0], [1]]), (0.05, [[0, 1]])])
def test_a_request_finding_the_model_idle_waits_wait_s_for_company(wait_s, expected):
    batches: list[list] = []
    with ThreadPoolExecutor(1) as pool:
        batcher = Batcher(_recording(batches, seconds=0.0), pool, max_batch_size=8, wait_s=wait_s)
        asyncio.run(_staggered(batcher, 2, gap_s=0.02))
    assert batches == expected


def test_an_error_reaches_only_its_batchs_callers_and_later_batches_go_on():
    batches: list[list] = []
    with ThreadPoolExecutor(1) as pool:
        batcher = Batcher(_recording(batches, fail_on=1), pool, max_batch_size=2)
        results = asyncio.run(_staggered(batcher, 5, gap_s=0.0))
    failed = [i for i, r in enumerate(results) if isinstance(r, ValueError)]
    batch_of_1 = next(b for b in batches if 1 in b)
    assert failed == batch_of_1 and all(results[i] == i * 10 for i in range(5) if i not in failed)


def test_passes_run_one_at_a_time_on_the_executor():
    running, most = [0], [0]
    lock = threading.Lock()

    def run_batch(items):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.01)
        with lock:
            running[0] -= 1
        return items

    with ThreadPoolExecutor(4) as pool:  # even with threads to spare, one pass at a time
        batcher = Batcher(run_batch, pool, max_batch_size=2)
        asyncio.run(_staggered(batcher, 12, gap_s=0.002))
    assert most[0] == 1


def test_max_batch_size_must_be_positive():
    with pytest.raises(ValueError, match="max_batch_size"):
        Batcher(lambda items: items, None, max_batch_size=0)
