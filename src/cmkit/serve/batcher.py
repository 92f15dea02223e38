"""Micro-batching: requests that arrive within a few milliseconds of each other share one network
call, and at most one model computation runs at a time.

Jobs wait in a bounded queue (full: `Busy`, which the API turns into 503). A single worker takes
the first waiting job, collects more for ``window`` seconds (or until ``max_batch`` samples),
groups those that can share a call (same levels, same guidance) and runs each group in a thread,
so the event loop keeps answering while torch computes.
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
                 max_queue: int = 64):
        self.run_group, self.window, self.max_batch = run_group, window, max_batch
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

    async def submit(self, key, size: int, payload) -> Any:
        job = Job(key, size, payload, asyncio.get_running_loop().create_future())
        try:
            self.queue.put_nowait(job)
        except asyncio.QueueFull:
            raise Busy(f"the server is busy ({self.max_queue} requests waiting); retry shortly") from None
        return await job.future

    async def _collect(self) -> list[Job]:
        jobs = [await self.queue.get()]
        deadline = time.monotonic() + self.window
        while sum(j.size for j in jobs) < self.max_batch:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                jobs.append(await asyncio.wait_for(self.queue.get(), left))
            except asyncio.TimeoutError:
                break
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
