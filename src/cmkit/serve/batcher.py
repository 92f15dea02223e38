"""Micro-batching that drops work nobody waits for.

Requests that arrive within a few milliseconds of each other share one model call, and one lane
runs at most one model computation at a time. Jobs wait in a bounded list (full: `Busy`, which the
API turns into 503). The worker takes every job already waiting (up to ``max_batch`` samples), and
if that is not a full batch waits up to ``window`` seconds for more; it groups those that can share
a call (same levels, same guidance) and runs each group in a thread, so the event loop keeps
answering while torch computes.

A waiting job is removed, never computed, when
- its client disconnects (`submit`'s ``gone()``: an awaitable that finishes when the client is gone),
- a newer job of the same live ``session`` arrives (real-time clients send a request per
  keystroke or stroke; only the newest matters): the older one's caller gets `Superseded`.
A job already running is not restarted: it finishes, and its answer is dropped if nobody waits.
So the newest request of a session waits at most for the one computation in progress.
"""

from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable


class Busy(Exception):
    """The queue is full."""


class Superseded(Exception):
    """A newer request of the same session replaced this one before it ran."""


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


@dataclass(eq=False)
class Job:
    """One request's work. ``key`` (None: runs alone) says which jobs may share a call; ``size``
    is its number of samples; ``payload`` is what the group function receives."""

    key: Any
    size: int
    payload: Any
    future: asyncio.Future = field(default=None, repr=False)
    session: str | None = None


class MicroBatcher:
    """``run_group(payloads) -> results`` computes a list of compatible jobs in one go (a thread).
    ``on_drop(reason)`` counts dropped jobs ("disconnected", "superseded")."""

    def __init__(self, run_group: Callable[[list], list], *, window: float = 0.005, max_batch: int = 64,
                 max_queue: int = 64, on_batch: Callable[[int], None] | None = None,
                 on_drop: Callable[[str], None] | None = None):
        self.run_group, self.window, self.max_batch = run_group, window, max_batch
        self.on_batch, self.on_drop = on_batch, on_drop
        self.max_queue = max_queue
        self.waiting: collections.deque[Job] = collections.deque()
        self.collecting: list[Job] = []  # taken from the list, not yet running
        self.arrived: asyncio.Event | None = None
        self.task: asyncio.Task | None = None
        self.calls = 0  # network batches run: fewer than jobs when batching works
        self.computed = 0  # jobs computed

    async def start(self) -> None:
        self.arrived = asyncio.Event()
        self.task = asyncio.get_running_loop().create_task(self._worker())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.wait({self.task}, timeout=2)

    def depth(self) -> int:
        """Jobs waiting."""
        return len(self.waiting)

    def _drop(self, job: Job, reason: str, error: Exception | None = None) -> None:
        """Take a job out before it runs: from the waiting list, or from the batch being collected
        (its future done, `_run` skips it). A running or finished job is not dropped."""
        if job in self.waiting:
            self.waiting.remove(job)
        elif job not in self.collecting or job.future.done():
            return
        if error is not None:
            job.future.set_exception(error)
            job.future.exception()  # retrieved: nobody else may await it
        else:
            job.future.cancel()
        if self.on_drop is not None:
            self.on_drop(reason)

    async def submit(self, key, size: int, payload, *, session: str | None = None,
                     gone: Callable[[], Awaitable] | None = None) -> Any:
        """The job's result. ``session``: a newer job of the same session drops this one while it
        waits; ``gone()``: finishes when the client disconnected (the job is dropped, or its result
        discarded if it runs, and `ClientGone` is raised)."""
        job = Job(key, size, payload, asyncio.get_running_loop().create_future(), session)
        if session is not None:
            for old in [j for j in (*self.waiting, *self.collecting) if j.session == session]:
                self._drop(old, "superseded", Superseded("superseded by a newer request of this session"))
        if len(self.waiting) >= self.max_queue:
            raise Busy(f"the server is busy ({self.max_queue} requests waiting); retry shortly")
        self.waiting.append(job)
        self.arrived.set()
        if gone is None:
            try:
                return await job.future
            except asyncio.CancelledError:  # the caller stopped waiting (a live connection closed)
                self._drop(job, "disconnected")
                raise
        watcher = asyncio.ensure_future(gone())
        try:
            await asyncio.wait({job.future, watcher}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            self._drop(job, "disconnected")
            raise
        finally:
            watcher.cancel()
        if not job.future.done():
            self._drop(job, "disconnected")
            if not job.future.done():
                job.future.cancel()  # running: its result is discarded
            raise ClientGone("the client disconnected")
        return job.future.result()

    def _take(self, size: int) -> list[Job]:
        jobs = []
        while self.waiting and size < self.max_batch:
            jobs.append(self.waiting.popleft())
            size += jobs[-1].size
        return jobs

    async def _collect(self) -> list[Job]:
        while not self.waiting:
            self.arrived.clear()
            await self.arrived.wait()
        jobs = self.collecting = self._take(0)  # what waited while the last batch ran
        deadline = time.monotonic() + self.window
        while sum(j.size for j in jobs) < self.max_batch:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self.arrived.clear()
            try:
                await asyncio.wait_for(self.arrived.wait(), left)
            except asyncio.TimeoutError:
                break
            jobs += self._take(sum(j.size for j in jobs))
        self.collecting = []
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
        group = [j for j in group if not j.future.done()]  # cancelled since it was taken
        if not group:
            return
        self.calls += 1
        self.computed += len(group)
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
