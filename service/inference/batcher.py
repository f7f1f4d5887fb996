"""Dynamic batching of synchronous model calls (classifier, frontaliser, ...).

Usage::

    batcher = DynamicBatcher(model_fn, name="classifier", max_batch_size=settings.max_batch_size,
                             max_wait_ms=settings.max_wait_ms)
    await batcher.start()                       # in the app lifespan
    probs = await batcher.submit(face)          # one face
    many = await batcher.submit_many(faces)     # several faces of one request, all or nothing
    await batcher.stop()

Requests from concurrent callers wait in one bounded queue. A single worker task cuts the
queue into batches with :func:`collect` and runs ``fn(batch)`` in a thread executor, so the event
loop never blocks on the model. Each output goes back to the future of the caller that
submitted the matching input.

Batches form while the model is busy: whatever queued during one call of ``fn`` (up to
``max_batch_size``) is the next batch, taken the moment the call returns. A caller that finds the
model idle and nobody else queued runs at once, so a lone request never waits for company.
Only a batch that already holds items of several callers (concurrent load) waits for more, at
most ``max_wait_ms`` after its first item was enqueued.

Failure model:

* a full queue rejects the submission at once with :class:`QueueFullError` (the service
  answers 503 with ``Retry-After``); :meth:`DynamicBatcher.submit_many` enqueues all of its
  items or none of them;
* an exception from ``fn``, or an output count different from the input count
  (:class:`BatchOutputError`), fails only the callers of that batch; the worker carries on;
* a caller that is cancelled (or times out through :func:`asyncio.wait_for`) while queued is
  dropped before the model call; one cancelled while its batch computes just has its output
  discarded;
* :meth:`DynamicBatcher.stop` fails whatever is still pending with
  :class:`BatcherStoppedError` instead of leaving callers hanging.

The module is pure asyncio: metrics are reported through a :class:`BatchObserver`, whose
exceptions are logged and never reach the worker.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Generic, Protocol, TypeVar

__all__ = [
    "BatchObserver",
    "BatchOutputError",
    "BatcherStoppedError",
    "DynamicBatcher",
    "NullObserver",
    "QueueFullError",
    "QueuedItem",
    "Timestamped",
    "collect",
]

logger = logging.getLogger(__name__)

In = TypeVar("In")
Out = TypeVar("Out")

MIN_RETRY_AFTER_S = 1.0
"""Smallest ``retry_after`` a :class:`QueueFullError` suggests."""


class QueueFullError(Exception):
    """The batcher's queue has no room for the submitted item(s).

    Attributes:
        retry_after: Suggested wait in seconds before retrying (for a ``Retry-After`` header;
            round it up to whole seconds there).
    """

    def __init__(self, message: str, *, retry_after: float = MIN_RETRY_AFTER_S) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class BatchOutputError(RuntimeError):
    """The model function returned a number of outputs different from its number of inputs."""


class BatcherStoppedError(RuntimeError):
    """The batcher is not running (never started, stopping or stopped)."""


class BatchObserver(Protocol):
    """Receives batching measurements, e.g. to feed Prometheus metrics.

    ``on_error`` kinds: ``"queue_full"`` (per rejected submission), ``"model_error"`` and
    ``"output_mismatch"`` (per failed batch) and ``"stopped"`` (per :meth:`DynamicBatcher.stop`
    that failed pending requests).
    """

    def on_batch(self, name: str, size: int, queue_wait_s: list[float], compute_s: float) -> None:
        """A batch of ``size`` items ran in ``compute_s``; each item waited ``queue_wait_s[i]``."""

    def on_queue_depth(self, name: str, depth: int) -> None:
        """The number of queued items changed to ``depth``."""

    def on_error(self, name: str, kind: str) -> None:
        """Something of ``kind`` went wrong (see the class docstring)."""


class NullObserver:
    """A :class:`BatchObserver` that ignores everything."""

    def on_batch(self, name: str, size: int, queue_wait_s: list[float], compute_s: float) -> None:
        """Ignore a batch."""

    def on_queue_depth(self, name: str, depth: int) -> None:
        """Ignore a queue depth."""

    def on_error(self, name: str, kind: str) -> None:
        """Ignore an error."""


class Timestamped(Protocol):
    """Anything :func:`collect` can batch: it knows when it was enqueued (``loop.time()``)."""

    enqueued_at: float


T = TypeVar("T", bound=Timestamped)


@dataclass(slots=True, eq=False)
class QueuedItem(Generic[In, Out]):
    """One submitted input, the future its caller awaits, its enqueue time (``loop.time()``) and
    the submission it came in (all the items of one :meth:`DynamicBatcher.submit_many` share it)."""

    value: In
    future: asyncio.Future[Out]
    enqueued_at: float
    submission: int = 0


def _submission(item: QueuedItem[Any, Any]) -> int:
    return item.submission


async def collect(
    queue: asyncio.Queue[T],
    max_batch_size: int,
    max_wait: float,
    *,
    caller: Callable[[T], Hashable] | None = None,
) -> list[T]:
    """Take the next batch off ``queue``.

    Waits without a deadline for the first item, then takes every item already queued, up to
    ``max_batch_size``. If those items all come from one caller, that batch is returned at once:
    nobody else is in flight, so a lone caller never waits for company. Otherwise (concurrent
    callers, so more are likely on their way) it waits for more until ``max_batch_size`` items
    are collected or the deadline passes. The deadline is the first item's ``enqueued_at`` plus
    ``max_wait``, on the running loop's monotonic clock (``loop.time()``), so an item that already
    waited (e.g. while the previous batch was computing) is not kept waiting a second time; items
    already queued are always taken, up to ``max_batch_size``, even after the deadline.

    Args:
        queue: Items with an ``enqueued_at`` attribute stamped with ``loop.time()``.
        max_batch_size: Most items in one batch (at least 1).
        max_wait: Seconds a batch of several callers' items may wait for more, counted from its
            first item's enqueue time.
        caller: Which caller (submission) an item belongs to; ``None``: each item is its own.

    Returns:
        Between 1 and ``max_batch_size`` items, in queue order.
    """
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    loop = asyncio.get_running_loop()
    first = await queue.get()
    batch = [first]
    while len(batch) < max_batch_size and not queue.empty():
        batch.append(queue.get_nowait())
    key = caller if caller is not None else id
    alone = all(key(item) == key(first) for item in batch)
    deadline = first.enqueued_at + max_wait
    while not alone and len(batch) < max_batch_size:
        try:
            batch.append(queue.get_nowait())
            continue
        except asyncio.QueueEmpty:
            pass
        remaining = deadline - loop.time()
        if remaining <= 0:
            break
        try:
            batch.append(await asyncio.wait_for(queue.get(), remaining))
        except TimeoutError:
            break
    return batch


class DynamicBatcher(Generic[In, Out]):
    """Batch concurrent single-item calls into calls of ``fn`` on lists.

    Args:
        fn: Synchronous ``list[In] -> list[Out]`` (e.g. a torch model call) returning exactly
            one output per input, in order. It runs in ``executor``, off the event loop.
        name: Label for logs and the observer (e.g. ``"classifier"``).
        max_batch_size: Most items per call of ``fn``.
        max_wait_ms: Longest a batch that holds several callers' items waits for more, from its
            first item's enqueue time (see :func:`collect`; a lone caller never waits).
        max_queue: Most items waiting (not yet taken into a batch); more raise
            :class:`QueueFullError`.
        observer: Receives batch, queue-depth and error measurements.
        executor: Where ``fn`` runs. By default a private one-thread executor, created by
            :meth:`start` and shut down by :meth:`stop`; one passed in is never shut down.
    """

    def __init__(
        self,
        fn: Callable[[list[In]], Sequence[Out]],
        *,
        name: str,
        max_batch_size: int,
        max_wait_ms: float = 0.0,
        max_queue: int = 1024,
        observer: BatchObserver | None = None,
        executor: Executor | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self._fn = fn
        self.name = name
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue = max_queue
        self._observer: BatchObserver = observer if observer is not None else NullObserver()
        self._owns_executor = executor is None
        self._executor = executor
        self._queue: asyncio.Queue[QueuedItem[In, Out]] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._inflight: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Future[Any]] = set()
        self._accepting = False
        self._compute_ema_s: float | None = None
        self._submissions = 0

    # ----------------------------------------------------------------- lifecycle
    @property
    def running(self) -> bool:
        """Whether the worker runs and submissions are accepted."""
        return self._accepting and self._worker is not None and not self._worker.done()

    @property
    def queue_depth(self) -> int:
        """Items waiting in the queue (not yet taken into a batch)."""
        return self._queue.qsize() if self._queue is not None else 0

    async def start(self) -> None:
        """Start the worker on the running loop (no-op when already running)."""
        if self.running:
            return
        if self._worker is not None:  # a crashed worker: clean up before restarting
            await self.stop()
        loop = asyncio.get_running_loop()
        if self._owns_executor:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"batcher-{self.name}")
        self._queue = asyncio.Queue(maxsize=self.max_queue)
        self._accepting = True
        self._worker = loop.create_task(self._run(self._queue), name=f"batcher-{self.name}")
        self._worker.add_done_callback(self._on_worker_done)
        logger.info(
            "batcher %r started (max_batch_size=%d, max_wait=%.1f ms, max_queue=%d)",
            self.name, self.max_batch_size, self.max_wait * 1000, self.max_queue,
        )

    async def stop(self, *, drain: bool = False, timeout: float | None = 5.0) -> None:
        """Stop accepting work, stop the worker and fail what is left (no-op when stopped).

        Args:
            drain: Process the items already queued before stopping (up to ``timeout``)
                instead of failing them at once.
            timeout: Seconds to wait for draining and, separately, for the batch that is
                computing; ``None`` waits indefinitely. Requests still unanswered after it fail
                with :class:`BatcherStoppedError` (a running ``fn`` call cannot be interrupted;
                its results are then discarded).
        """
        worker, queue = self._worker, self._queue
        if worker is None or queue is None:
            return
        self._worker = None  # a concurrent stop() returns at once
        self._accepting = False
        if drain and not worker.done():
            try:
                await asyncio.wait_for(queue.join(), timeout)
            except TimeoutError:
                logger.warning("batcher %r: drain timed out after %s s", self.name, timeout)
        error = BatcherStoppedError(f"batcher {self.name!r} stopped before answering this request")
        failed = self._fail_queued(queue, error)
        worker.cancel()
        await asyncio.wait({worker})
        inflight = self._inflight
        if inflight is not None and not inflight.done():
            done, _ = await asyncio.wait({inflight}, timeout=timeout)
            if not done:
                logger.warning(
                    "batcher %r: batch still computing after %s s; abandoning it", self.name, timeout
                )
                inflight.cancel()
                await asyncio.wait({inflight})
        failed += self._fail_pending(error)
        self._inflight = None
        if self._owns_executor and self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        self._notify("on_queue_depth", self.name, 0)
        if failed:
            self._notify("on_error", self.name, "stopped")
        logger.info("batcher %r stopped (%d pending request(s) failed)", self.name, failed)

    async def __aenter__(self) -> DynamicBatcher[In, Out]:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # ------------------------------------------------------------------ submitting
    async def submit(self, item: In) -> Out:
        """Run ``fn`` on ``item`` as part of a batch and return its output.

        Raises:
            QueueFullError: The queue is full (nothing was enqueued).
            BatcherStoppedError: The batcher is not running, or stopped before answering.
            BatchOutputError: ``fn`` returned the wrong number of outputs for this batch.
            Exception: Whatever ``fn`` raised for this batch.
        """
        (future,) = self._enqueue([item])
        return await future

    async def submit_many(self, items: Sequence[In]) -> list[Out]:
        """Submit several items at once (e.g. all faces of one request): all or nothing.

        Either every item is enqueued or, when the queue lacks room for all of them,
        :class:`QueueFullError` is raised and none is. The items may be split across batches;
        the outputs come back in input order. If any item fails, the call raises its error and
        the request's remaining items are cancelled.

        Raises:
            ValueError: More items than ``max_queue``, which could never fit.
            QueueFullError, BatcherStoppedError, BatchOutputError, Exception: As :meth:`submit`.
        """
        if not items:
            return []
        futures = self._enqueue(list(items))
        try:
            return list(await asyncio.gather(*futures))
        except BaseException:
            for future in futures:
                if not future.done():
                    future.cancel()
                elif not future.cancelled():
                    future.exception()  # mark retrieved: only the first error propagates
            raise

    def _enqueue(self, values: list[In]) -> list[asyncio.Future[Out]]:
        queue = self._queue
        if not self.running or queue is None:
            raise BatcherStoppedError(f"batcher {self.name!r} is not running")
        if len(values) > self.max_queue:
            raise ValueError(
                f"{len(values)} items can never fit batcher {self.name!r} (max_queue={self.max_queue})"
            )
        depth = queue.qsize()
        if len(values) > self.max_queue - depth:
            retry_after = self._retry_after(depth)
            self._notify("on_error", self.name, "queue_full")
            raise QueueFullError(
                f"batcher {self.name!r} queue is full ({depth}/{self.max_queue} queued, "
                f"{len(values)} requested)",
                retry_after=retry_after,
            )
        loop = asyncio.get_running_loop()
        now = loop.time()
        self._submissions += 1
        futures: list[asyncio.Future[Out]] = []
        for value in values:
            future: asyncio.Future[Out] = loop.create_future()
            self._pending.add(future)
            future.add_done_callback(self._pending.discard)
            queue.put_nowait(QueuedItem(value, future, now, self._submissions))
            futures.append(future)
        self._notify("on_queue_depth", self.name, queue.qsize())
        return futures

    def _retry_after(self, depth: int) -> float:
        """Rough time to work off ``depth`` queued items, from the recent compute time."""
        if self._compute_ema_s is None:
            return MIN_RETRY_AFTER_S
        batches = math.ceil(depth / self.max_batch_size)
        return max(MIN_RETRY_AFTER_S, batches * self._compute_ema_s)

    # ---------------------------------------------------------------------- worker
    async def _run(self, queue: asyncio.Queue[QueuedItem[In, Out]]) -> None:
        while True:
            batch = await collect(queue, self.max_batch_size, self.max_wait, caller=_submission)
            self._notify("on_queue_depth", self.name, queue.qsize())
            # A separate, shielded task: cancelling the worker (stop) lets the batch finish.
            self._inflight = asyncio.ensure_future(self._process(queue, batch))
            await asyncio.shield(self._inflight)

    async def _process(
        self, queue: asyncio.Queue[QueuedItem[In, Out]], batch: list[QueuedItem[In, Out]]
    ) -> None:
        try:
            live = [item for item in batch if not item.future.done()]
            if len(live) < len(batch):
                logger.debug("batcher %r: dropped %d cancelled item(s)", self.name, len(batch) - len(live))
            if live:
                await self._compute(live)
        except Exception:  # a bug here must not kill the worker or leave callers hanging
            logger.exception("batcher %r: unexpected error while processing a batch", self.name)
            self._fail(batch, BatcherStoppedError(f"batcher {self.name!r} failed internally"))
        finally:
            for _ in batch:
                queue.task_done()

    async def _compute(self, live: list[QueuedItem[In, Out]]) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        queue_wait_s = [max(0.0, started - item.enqueued_at) for item in live]
        values = [item.value for item in live]
        try:
            outputs, compute_s = await loop.run_in_executor(self._executor, self._call, values)
        except BatchOutputError as exc:
            logger.error("batcher %r: %s", self.name, exc)
            self._fail(live, exc)
            self._notify("on_error", self.name, "output_mismatch")
            return
        except Exception as exc:
            logger.error("batcher %r: model call failed on a batch of %d", self.name, len(live), exc_info=exc)
            self._fail(live, exc)
            self._notify("on_error", self.name, "model_error")
            return
        for item, output in zip(live, outputs, strict=True):
            if not item.future.done():  # its caller may have been cancelled meanwhile
                item.future.set_result(output)
        ema = self._compute_ema_s
        self._compute_ema_s = compute_s if ema is None else 0.8 * ema + 0.2 * compute_s
        self._notify("on_batch", self.name, len(live), queue_wait_s, compute_s)

    def _call(self, values: list[In]) -> tuple[Sequence[Out], float]:
        """Run ``fn`` (in the executor thread) and check its output count."""
        started = time.perf_counter()
        outputs = self._fn(values)
        compute_s = time.perf_counter() - started
        try:
            n_outputs = len(outputs)
        except TypeError as exc:
            raise BatchOutputError(
                f"{self.name}: fn must return a sized sequence, got {type(outputs).__name__}"
            ) from exc
        if n_outputs != len(values):
            raise BatchOutputError(f"{self.name}: fn returned {n_outputs} outputs for {len(values)} inputs")
        return outputs, compute_s

    # ---------------------------------------------------------------------- helpers
    @staticmethod
    def _fail(items: list[QueuedItem[In, Out]], error: BaseException) -> None:
        for item in items:
            if not item.future.done():
                item.future.set_exception(error)

    def _fail_queued(self, queue: asyncio.Queue[QueuedItem[In, Out]], error: BaseException) -> int:
        """Empty the queue, failing every item's future; returns how many were failed."""
        failed = 0
        while True:
            try:
                item = queue.get_nowait()
            except asyncio.QueueEmpty:
                return failed
            if not item.future.done():
                item.future.set_exception(error)
                failed += 1
            queue.task_done()

    def _fail_pending(self, error: BaseException) -> int:
        """Fail every unanswered future, wherever its item is; returns how many."""
        failed = 0
        for future in list(self._pending):
            if not future.done():
                future.set_exception(error)
                failed += 1
        return failed

    def _on_worker_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        logger.error("batcher %r: worker died", self.name, exc_info=task.exception())
        self._accepting = False
        self._fail_pending(BatcherStoppedError(f"batcher {self.name!r} worker died"))

    def _notify(self, method: str, *args: Any) -> None:
        """Call an observer method; its exceptions are logged, never raised."""
        try:
            getattr(self._observer, method)(*args)
        except Exception:
            logger.warning("batcher %r: observer %s failed", self.name, method, exc_info=True)
