"""Micro-batching: requests that arrive within a few milliseconds of each other share one model
call, and one lane runs at most one model computation at a time.

Jobs wait in a bounded queue (full: `Busy`, which the API turns into 503). A single worker takes
every job already waiting (up to ``max_batch`` samples), and if that is not a full batch waits up
to ``window`` seconds for more; it groups those that can share a call (same levels, same guidance)
and runs each group in a thread, so the event loop keeps answering while torch computes.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Callable


class Busy(Exception):
    """The queue is full."""


@dataclass
class Job:
    """One request's work. ``key`` (None: runs alone) says which jobs may share a call; ``size``
    is its number of samples; ``payload`` is what the group function receives."""

    key: Any
    size: int
    payload: Any
    future: asyncio.Future = field(default=None, repr=False)


class MicroBatcher:
    """``run_group(payloads) -> results`` computes a list of compatible jobs in one go (a thread)."""

    def __init__(self, run_group: Callable[[list], list], *, window: float = 0.005, max_batch: int = 64,
                 max_queue: int = 64, on_batch: Callable[[int], None] | None = None):
        self.run_group, self.window, self.max_batch = run_group, window, max_batch
        self.on_batch = on_batch  # called with the samples of each model call (metrics)
        self.queue: asyncio.Queue | None = None
        self.max_queue = max_queue
        self.task: asyncio.Task | None = None
        self.calls = 0  # network batches run: fewer than jobs when batching works

    async def start(self) -> None:
        self.queue = asyncio.Queue(self.max_queue)
        self.task = asyncio.get_running_loop().create_task(self._worker())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            # Python 3.11's wait_for can swallow a cancellation that races a queue item: do not
            # wait on the worker forever (the event loop is closing anyway).
            await asyncio.wait({self.task}, timeout=2)

    def depth(self) -> int:
        """Jobs waiting."""
        return 0 if self.queue is None else self.queue.qsize()

    async def submit(self, key, size: int, payload) -> Any:
        job = Job(key, size, payload, asyncio.get_running_loop().create_future())
        try:
            self.queue.put_nowait(job)
        except asyncio.QueueFull:
            raise Busy(f"the server is busy ({self.max_queue} requests waiting); retry shortly") from None
        return await job.future

    async def _collect(self) -> list[Job]:
        jobs = [await self.queue.get()]
        size = jobs[0].size
        while size < self.max_batch and not self.queue.empty():  # what waited while the last batch ran
            jobs.append(self.queue.get_nowait())
            size += jobs[-1].size
        deadline = time.monotonic() + self.window
        while size < self.max_batch:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                jobs.append(await asyncio.wait_for(self.queue.get(), left))
            except asyncio.TimeoutError:
                break
            size += jobs[-1].size
        return jobs

    async def _worker(self) -> None:
        while True:
            jobs = await self._collect()
            groups: dict = {}
            for job in jobs:
                groups.setdefault(job.key if job.key is not None else id(job), []).append(job)
            for group in groups.values():
                await self._run(group)

    async def _run(self, group: list[Job]) -> None:
        self.calls += 1
        if self.on_batch is not None:
            self.on_batch(sum(j.size for j in group))
        try:
            results = await asyncio.to_thread(self.run_group, [j.payload for j in group])
        except Exception as e:  # every job of the group gets the error; the worker goes on
            for job in group:
                if not job.future.done():
                    job.future.set_exception(e)
            return
        for job, result in zip(group, results):
            if not job.future.done():
                job.future.set_result(result)
