"""Requests wait while the model is busy, and go to it together once it is free.

Ray Serve's @serve.batch forms the next batch as soon as its first request has waited
batch_wait_timeout_s, whether or not the model is free, and queues the batches themselves (its
max_concurrent_batches semaphore comes after batch forming). On a replica whose forward pass takes
100 ms or more, requests arriving during one pass each formed a batch of their own behind it: at
8 clients 95 of 99 forward passes ran a single slice, each request waiting for the others' passes.
Here a batch is formed only when the model is free, from everything that arrived meanwhile (up to
max_batch_size), so under load each pass takes as many slices as have queued.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Any


class Batcher:
    def __init__(self, run_batch: Callable[[list], Sequence], executor: Executor, max_batch_size: int,
                 wait_s: float = 0.0):
        """`run_batch(items) -> results` (one per item, in order) runs in `executor`. A request
        that finds the model idle and alone waits `wait_s` for company before it starts."""
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self.run_batch, self.executor = run_batch, executor
        self.max_batch_size, self.wait_s = max_batch_size, wait_s
        self._queue: deque[tuple[Any, asyncio.Future]] = deque()
        self._arrived: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None

    async def submit(self, item) -> Any:
        """`item`'s result, computed in some batch."""
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done():
            self._arrived = asyncio.Event()
            self._worker = loop.create_task(self._serve())
        future = loop.create_future()
        self._queue.append((item, future))
        self._arrived.set()
        return await future

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
            if len(self._queue) == 1 and self.wait_s > 0:
                await asyncio.sleep(self.wait_s)
            batch = [self._queue.popleft() for _ in range(min(len(self._queue), self.max_batch_size))]
            batch = [(item, future) for item, future in batch if not future.done()]  # callers gone
            if not batch:
                continue
            try:
                results = await loop.run_in_executor(self.executor, self.run_batch, [item for item, _ in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"run_batch returned {len(results)} results for {len(batch)} items")
            except Exception as exc:  # every caller of this batch gets the error; later batches go on
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), result in zip(batch, results):
                if not future.done():
                    future.set_result(result)
