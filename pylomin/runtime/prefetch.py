"""The prefetch queue: a reader thread makes the next units resident while the current one computes."""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from pylomin.errors import PylominError
from pylomin.format.manifest import Range
from pylomin.runtime.store import Store

if TYPE_CHECKING:
    from pylomin.runtime.experts import Chosen

logger = logging.getLogger(__name__)


class Recorder(Protocol):
    """What the hooks and the reader report to while profiling (`pylomin.tools.profile.Profile`)."""

    nbytes: list[int]

    def add(self, target: int, kind: str, start_ns: int, end_ns: int, *, nbytes: int = 0) -> None: ...

    def begin_compute(self, target: int, now_ns: int) -> None: ...

    def end_compute(self, target: int, now_ns: int) -> None: ...

    def experts(self, target: int, start_ns: int, end_ns: int, chosen: Chosen) -> None: ...


@dataclass(eq=False)
class _Job:
    target: int  # the index of a hooked module
    ranges: list[Range]
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


class Prefetcher:
    """Reads the units that come next, at most `max_units` units and `max_bytes` bytes ahead.

    The order is the order targets were entered during the last forward of the root module that
    ran alone (recorded again whenever it changes); before the first forward, `initial_order`.
    A target entered while its read is still in flight waits for that read only; a failed read is
    raised in the calling thread, before anything touches the pages.
    """

    def __init__(
        self,
        store: Store,
        ranges: dict[int, list[Range]],
        initial_order: list[int],
        *,
        max_units: int,
        max_bytes: int,
        skip: set[int] | None = None,
        stage: Callable[[int], None] | None = None,
        whole_layers: dict[int, list[Range]] | None = None,
    ):
        self.store = store
        self.ranges = ranges
        # Targets with fused experts: their ranges with every expert, read ahead in passes whose
        # tokens choose most experts anyway (a prompt), instead of the router's choice on demand.
        self.whole_layers = whole_layers or {}  # per unit with fused experts: its ranges, every expert included
        self._all_experts = False
        self.stage = stage  # after the pages are in: e.g. copy the unit to the GPU
        self.recorder: Recorder | None = None  # while profiling
        self.max_units = max_units
        self.max_bytes = max_bytes
        self.skip = set(skip or ())
        self._nbytes = {t: sum(n for _, _, n in r) for t, r in ranges.items()}
        self._set_order(list(initial_order))
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._queue: collections.deque[_Job] = collections.deque()
        self._pending: dict[int, _Job] = {}
        self._done: list[Range] = []  # ranges released by compute, dropped by the reader
        self._open: set[object] = set()  # the passes running now, by token
        self._recording: list[int] | None = None
        self._seen: set[int] = set()
        self._closed = False
        self._running: _Job | None = None  # the job the reader works on now
        self._ended = False  # the reader thread has ended (closed, or failed: logged)
        self._thread = threading.Thread(target=self._run, name="pylomin-prefetch", daemon=True)
        self._thread.start()

    def _set_order(self, order: list[int]) -> None:
        self.order = order
        self._index = {t: i for i, t in enumerate(order)}

    # --- called from the hooks (any thread) ---------------------------------------------------

    def begin_pass(self, token: object, *, all_experts: bool = False) -> None:
        """The root module starts a forward (`token`: its thread's): record the order if it runs alone.

        `all_experts`: its tokens will choose most experts; read them ahead whole with their units.
        """
        with self._lock:
            self._open.add(token)
            alone = len(self._open) == 1
            self._recording = [] if alone else None
            self._seen = set()
            self._all_experts = all_experts if alone else self._all_experts or all_experts

    def end_pass(self, token: object, *, interrupted: bool = False) -> None:
        """The forward of `token` ended: keep the recorded order if it changed. Twice: nothing more.

        `interrupted`: it never finished (a `KeyboardInterrupt`): its order is partial and is not
        kept, and when no other pass runs, reads queued for it that have not started are cancelled.
        """
        with self._lock:
            if token not in self._open:
                return
            self._open.discard(token)
            rec, self._recording = self._recording, None
            if self._open:
                return
            self._all_experts = False
            if interrupted:
                self._cancel_queued()
            elif rec is not None and rec != self.order:
                logger.debug("prefetch order recorded: %d targets", len(rec))
                self._set_order(rec)

    @property
    def passes(self) -> int:
        """Root forwards running now (`begin_pass` without its `end_pass`)."""
        return len(self._open)

    def _cancel_queued(self) -> None:
        # Under the lock. A read in flight finishes; its pages go when that unit is next released.
        for job in self._queue:
            self._pending.pop(job.target, None)
            job.done.set()
        self._queue.clear()

    def enter(self, target: int) -> None:
        """`target` is about to run: wait for its own read, then queue the reads of those that follow."""
        with self._lock:
            job = self._pending.pop(target, None)
            if self._recording is not None and target not in self._seen:
                self._seen.add(target)
                self._recording.append(target)
            self._schedule_after(target)
        if job is not None:
            # Set by the reader, by `close`, or when the reader ends for any reason. A job neither
            # queued nor being read (its queueing cut short by an interrupt) is not waited for.
            while not job.done.wait(0.5):
                with self._lock:
                    if job is not self._running and job not in self._queue:
                        break
            if job.error is not None:
                file = job.ranges[0][0] if job.ranges else "?"
                raise PylominError(
                    f"reading unit file `{self.store.folder / file}` failed ({job.error}); it may have been "
                    "truncated or removed while the model was loaded: run `pylomin verify` on the folder"
                ) from job.error

    def _schedule_after(self, target: int) -> None:
        i = self._index.get(target)
        if i is None or self.max_units <= 0 or self._closed or self._ended:
            return  # a closed or ended reader runs no more jobs: the unit is paged in on demand
        all_experts = self._all_experts
        units, nbytes = 0, sum(self._nbytes.get(t, 0) for t in self._pending)
        for step in range(1, len(self.order)):
            nxt = self.order[(i + step) % len(self.order)]
            whole = (
                all_experts and nxt in self.whole_layers and i + step < len(self.order)
            )  # the next pass may be narrow
            if nxt in self.skip and not whole or nxt == target:
                continue
            units += 1
            if units > self.max_units:
                break
            if nxt in self._pending:
                continue
            size = sum(r.length for r in self.whole_layers[nxt]) if whole else self._nbytes[nxt]
            if nbytes + size > self.max_bytes:
                break
            nbytes += size
            job = _Job(nxt, self.whole_layers[nxt] if whole else self.ranges[nxt])
            # In this order, a Ctrl-C between two of these statements never leaves a job waited for
            # that the reader does not know of (the reader wakes once the lock is released).
            self._wake.notify()
            self._queue.append(job)
            self._pending[nxt] = job

    def resize(self, *, max_units: int, max_bytes: int, skip: set[int], whole_layers: dict[int, list[Range]]) -> None:
        """A new read-ahead window, set of targets never read ahead and experts read whole (a re-plan)."""
        with self._lock:
            self.max_units, self.max_bytes, self.skip = max_units, max_bytes, set(skip)
            self.whole_layers = whole_layers

    @property
    def reads_all_experts(self) -> bool:
        """Whether the running forward reads fused experts ahead whole (`begin_pass(all_experts=True)`)."""
        return self._all_experts

    @property
    def bytes_in_flight(self) -> int:
        """Bytes of the units read ahead and not yet entered."""
        with self._lock:
            return sum(self._nbytes.get(t, 0) for t in self._pending)

    # --- the reader thread ----------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def release_later(self, where: Range) -> None:
        """Let the reader release a range's pages (before its next read): off the compute thread's path."""
        with self._lock:
            self._done.append(where)
            self._wake.notify()

    def _run(self) -> None:
        error: BaseException | None = None
        try:
            self._loop()
        except BaseException as e:  # never expected: the jobs waited for are failed below, never left hanging
            error = e
            logger.exception("the prefetch reader stopped")
        finally:
            # Closed: whoever waits pages its unit in on demand. Failed: the waiting forward says why.
            with self._lock:
                self._ended = True
                jobs = [*self._queue, *self._pending.values()]
                self._queue.clear()
                self._pending.clear()
            for job in jobs:
                if not job.done.is_set():
                    job.error = job.error or error
                    job.done.set()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._done and not self._closed:
                    self._wake.wait()
                if self._closed:
                    return
                done, self._done = self._done, []
                job: _Job | None = self._queue.popleft() if self._queue else None
                self._running = job
            for r in done:  # a unit released and entered again since is refaulted, never wrong
                try:
                    self.store.release(r)
                except OSError as e:  # a hint: a file gone or out of descriptors changes no result
                    logger.debug("dropping pages of `%s` failed: %s", r[0], e)
            if job is None:
                continue
            t0 = time.perf_counter_ns()
            try:
                for file, offset, length in job.ranges:
                    self.store.prefetch(Range(file, offset, length))
                if self.stage is not None:
                    self.stage(job.target)
            except BaseException as e:  # surfaced in the thread that enters the target
                job.error = e
            finally:
                rec = self.recorder
                if rec is not None:
                    rec.add(job.target, "read", t0, time.perf_counter_ns(), nbytes=sum(n for _, _, n in job.ranges))
                job.done.set()

    def close(self) -> None:
        """Stop the reader thread and wait for it.

        Called on the reader thread itself (a finalizer run by a garbage collection there), it only
        asks the thread to stop: waiting for itself, or taking a lock that thread may hold, would
        never return.
        """
        self._closed = True  # read by the reader under its lock; an assignment needs none
        if self._thread is threading.current_thread():
            return
        with self._lock:
            self._wake.notify_all()
        self._thread.join()  # its last act sets every job still waited for
        with self._lock:
            done, self._done = self._done, []
        for r in done:
            try:
                self.store.release(r)
            except OSError as e:
                logger.debug("dropping pages of `%s` failed: %s", r[0], e)
