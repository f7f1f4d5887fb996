"""Tests for the dynamic batcher: ``collect`` and ``DynamicBatcher``.

Every test runs its coroutine with ``asyncio.run`` under a hard timeout, so a bug that makes a
caller hang fails quickly instead of stalling the suite. Batch composition is made
deterministic with a "blocker": the model function blocks (on a ``threading.Event``) while
computing a first batch, the test queues the items it wants, then releases it.
"""

from __future__ import annotations

import asyncio
import gc
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

import pytest

from service.inference.batcher import (
    BatcherStoppedError,
    BatchOutputError,
    DynamicBatcher,
    QueueFullError,
    collect,
)

BLOCK = "block"


def run(coro: Coroutine[Any, Any, Any], timeout: float = 4.0) -> Any:
    """Run ``coro`` in a fresh event loop, failing (not hanging) after ``timeout`` seconds."""

    async def guarded() -> Any:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(guarded())


@dataclass
class Stamped:
    value: int
    enqueued_at: float


class Model:
    """``fn`` for the batcher: doubles numbers, records batches, blocks on ``BLOCK`` items.

    Also fails batches containing ``"poison"`` and returns one output too few for batches
    containing ``"short"``.
    """

    def __init__(self) -> None:
        self.batches: list[list[Any]] = []
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, items: list[Any]) -> list[Any]:
        self.batches.append(list(items))
        if BLOCK in items:
            self.entered.set()
            assert self.release.wait(10.0), "test never released the model"
        if "poison" in items:
            raise ValueError("poisoned batch")
        outputs = [item * 2 for item in items]
        return outputs[:-1] if "short" in items else outputs

    @property
    def seen(self) -> list[Any]:
        return [item for batch in self.batches for item in batch]

    @property
    def sizes(self) -> list[int]:
        return [len(batch) for batch in self.batches]

    async def wait_entered(self) -> None:
        assert await asyncio.to_thread(self.entered.wait, 3.0), "model never started the blocker"


async def wait_depth(batcher: DynamicBatcher[Any, Any], depth: int) -> None:
    while batcher.queue_depth < depth:
        await asyncio.sleep(0)


async def blocked(batcher: DynamicBatcher[Any, Any], model: Model) -> asyncio.Task[Any]:
    """Submit the blocker and return once the model is computing it (queue empty)."""
    task = asyncio.create_task(batcher.submit(BLOCK))
    await model.wait_entered()
    return task


def spawn(batcher: DynamicBatcher[Any, Any], items: list[Any]) -> list[asyncio.Task[Any]]:
    return [asyncio.create_task(batcher.submit(item)) for item in items]


@dataclass
class RecordingObserver:
    batches: list[tuple[str, int, list[float], float]] = field(default_factory=list)
    depths: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def on_batch(self, name: str, size: int, queue_wait_s: list[float], compute_s: float) -> None:
        self.batches.append((name, size, queue_wait_s, compute_s))

    def on_queue_depth(self, name: str, depth: int) -> None:
        self.depths.append(depth)

    def on_error(self, name: str, kind: str) -> None:
        self.errors.append(kind)


class BrokenObserver:
    def on_batch(self, name: str, size: int, queue_wait_s: list[float], compute_s: float) -> None:
        raise RuntimeError("observer bug")

    def on_queue_depth(self, name: str, depth: int) -> None:
        raise RuntimeError("observer bug")

    def on_error(self, name: str, kind: str) -> None:
        raise RuntimeError("observer bug")


# --------------------------------------------------------------------------------- collect
def test_collect_cuts_at_max_batch_size() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Stamped] = asyncio.Queue()
        for i in range(10):
            queue.put_nowait(Stamped(i, loop.time()))
        started = loop.time()
        batch = await collect(queue, 4, 30.0)  # a full batch never waits for the deadline
        assert [item.value for item in batch] == [0, 1, 2, 3]
        assert loop.time() - started < 2.0
        assert queue.qsize() == 6

    run(main())


def test_collect_deadline_starts_at_first_item_enqueue_time() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Stamped] = asyncio.Queue()
        # enqueued 60 s ago with a 30 s max_wait: the deadline passed long before collect began,
        # so collect returns at once with what is queued (it would time out the test otherwise)
        queue.put_nowait(Stamped(0, loop.time() - 60.0))
        queue.put_nowait(Stamped(1, loop.time() - 1.0))
        batch = await collect(queue, 8, 30.0)
        assert [item.value for item in batch] == [0, 1]
        assert queue.empty()

    run(main())


def test_collect_stale_first_item_small_waits() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Stamped] = asyncio.Queue()
        queue.put_nowait(Stamped(0, loop.time() - 0.050))  # 50 ms old, max_wait 40 ms
        started = loop.time()
        batch = await collect(queue, 8, 0.040)
        assert [item.value for item in batch] == [0]
        assert loop.time() - started < 0.040 + 1.0  # no fresh 40 ms wait (generous margin)

    run(main())


def test_collect_waits_for_first_item_then_returns_a_lone_item_at_once() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Stamped] = asyncio.Queue()
        task = asyncio.create_task(collect(queue, 8, 30.0))
        await asyncio.sleep(0.1)  # an empty queue has no deadline
        assert not task.done()
        queue.put_nowait(Stamped(0, loop.time()))
        batch = await task
        assert [item.value for item in batch] == [0]
        # nobody else queued: no wait for company, although max_wait is 30 s
        assert loop.time() - batch[0].enqueued_at < 1.0

    run(main())


def test_collect_with_company_waits_until_deadline() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Stamped] = asyncio.Queue()
        queue.put_nowait(Stamped(0, loop.time()))
        queue.put_nowait(Stamped(1, loop.time()))  # a second caller: more are likely on their way
        batch = await collect(queue, 8, 0.05)
        assert [item.value for item in batch] == [0, 1]
        assert loop.time() - batch[0].enqueued_at >= 0.045  # waited (about) max_wait for more

    run(main())


def test_collect_one_callers_items_are_alone() -> None:
    """Several items of one caller (e.g. the faces of one image) are not company."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Stamped] = asyncio.Queue()
        for i in range(3):
            queue.put_nowait(Stamped(i, loop.time()))
        batch = await collect(queue, 8, 30.0, caller=lambda item: "one caller")
        assert [item.value for item in batch] == [0, 1, 2]
        assert loop.time() - batch[0].enqueued_at < 1.0

        for i in range(3):
            queue.put_nowait(Stamped(i, loop.time()))
        task = asyncio.create_task(collect(queue, 4, 30.0, caller=lambda item: "aab"[item.value]))
        await asyncio.sleep(0.05)
        assert not task.done()  # two callers: it waits for a fourth item
        queue.put_nowait(Stamped(3, loop.time()))
        assert [item.value for item in await task] == [0, 1, 2, 3]

    run(main())


def test_collect_gathers_items_arriving_before_deadline() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Stamped] = asyncio.Queue()
        queue.put_nowait(Stamped(0, loop.time()))
        queue.put_nowait(Stamped(1, loop.time()))  # two callers: it waits for more
        task = asyncio.create_task(collect(queue, 3, 30.0))
        await asyncio.sleep(0.01)
        assert not task.done()
        queue.put_nowait(Stamped(2, loop.time()))  # completes the batch long before the deadline
        assert [item.value for item in await task] == [0, 1, 2]

    run(main())


def test_collect_rejects_bad_batch_size() -> None:
    with pytest.raises(ValueError, match="max_batch_size"):
        run(collect(asyncio.Queue(), 0, 1.0))


# --------------------------------------------------------------------------------- batching
def test_concurrent_submits_share_batches() -> None:
    async def main() -> None:
        model = Model()
        async with DynamicBatcher(model, name="t", max_batch_size=4, max_wait_ms=20) as batcher:
            blocker = await blocked(batcher, model)
            tasks = spawn(batcher, list(range(10)))
            await wait_depth(batcher, 10)
            model.release.set()
            assert await blocker == BLOCK * 2
            assert [await task for task in tasks] == [2 * i for i in range(10)]
        assert model.sizes == [1, 4, 4, 2]
        assert model.seen[1:] == list(range(10))

    run(main())


def test_lone_request_does_not_wait_for_company() -> None:
    """max_wait 200 ms: a lone submission, and a lone submit_many, run at once."""

    async def main() -> None:
        model = Model()
        loop = asyncio.get_running_loop()
        async with DynamicBatcher(model, name="t", max_batch_size=8, max_wait_ms=200) as batcher:
            await batcher.submit(0)  # the executor thread's first start is not measured
            took = []
            for x in range(5):
                started = loop.time()
                assert await batcher.submit(x) == 2 * x
                took.append(loop.time() - started)
            started = loop.time()
            assert await batcher.submit_many([1, 2, 3]) == [2, 4, 6]
            took.append(loop.time() - started)
        assert max(took) < 0.1, took  # waiting for company would take 200 ms each
        assert model.sizes == [1] * 6 + [3]

    run(main())


def test_concurrent_requests_are_still_batched() -> None:
    """Clients that submit again as soon as answered: batches form while the model computes."""

    async def main() -> None:
        model = Model()
        slow = lambda items: (time.sleep(0.005), model(items))[1]  # noqa: E731
        async with DynamicBatcher(slow, name="t", max_batch_size=32, max_wait_ms=0) as batcher:

            async def client(x: int) -> None:
                for k in range(10):
                    assert await batcher.submit(x + k) == 2 * (x + k)

            await asyncio.gather(*(client(100 * c) for c in range(8)))
        assert sum(model.sizes) == 80
        assert sum(model.sizes) / len(model.sizes) > 3  # about 8 once the clients are in step

    run(main())


def test_results_go_back_to_their_own_callers() -> None:
    async def main() -> None:
        model = Model()
        async with DynamicBatcher(model, name="t", max_batch_size=8, max_wait_ms=2) as batcher:

            async def caller(x: int) -> None:
                await asyncio.sleep(0.001 * (x % 5))  # spread the arrivals over several batches
                assert await batcher.submit(x) == 2 * x

            await asyncio.gather(*(caller(x) for x in range(40)))
        assert sorted(model.seen) == list(range(40))
        assert max(model.sizes) <= 8

    run(main())


def test_max_batch_size_one_gives_single_item_batches() -> None:
    async def main() -> None:
        model = Model()
        async with DynamicBatcher(model, name="t", max_batch_size=1, max_wait_ms=50) as batcher:
            results = await asyncio.gather(*(batcher.submit(x) for x in range(6)))
        assert results == [2 * x for x in range(6)]
        assert model.sizes == [1] * 6

    run(main())


def test_submit_many_returns_outputs_in_order_across_batches() -> None:
    async def main() -> None:
        model = Model()
        async with DynamicBatcher(model, name="t", max_batch_size=2, max_wait_ms=1) as batcher:
            assert await batcher.submit_many([3, 1, 4, 1, 5]) == [6, 2, 8, 2, 10]
            assert await batcher.submit_many([]) == []
        assert model.sizes == [2, 2, 1]

    run(main())


# ------------------------------------------------------------------------------ queue bound
def test_full_queue_rejects_and_submit_many_is_all_or_nothing() -> None:
    async def main() -> None:
        model = Model()
        observer = RecordingObserver()
        batcher = DynamicBatcher(
            model, name="t", max_batch_size=8, max_wait_ms=1, max_queue=4, observer=observer
        )
        await batcher.start()
        try:
            blocker = await blocked(batcher, model)
            tasks = spawn(batcher, [1, 2, 3])
            await wait_depth(batcher, 3)
            with pytest.raises(QueueFullError) as info:
                await batcher.submit_many([10, 11])  # one free slot for two items
            assert info.value.retry_after > 0
            assert batcher.queue_depth == 3  # nothing of it was enqueued
            tasks += spawn(batcher, [4])
            await wait_depth(batcher, 4)
            with pytest.raises(QueueFullError):
                await batcher.submit(5)
            assert batcher.queue_depth == 4
            with pytest.raises(ValueError, match="never fit"):
                await batcher.submit_many(list(range(5)))
            model.release.set()
            assert await blocker == BLOCK * 2
            assert [await task for task in tasks] == [2, 4, 6, 8]
        finally:
            model.release.set()
            await batcher.stop()
        assert model.seen == [BLOCK, 1, 2, 3, 4]
        assert observer.errors.count("queue_full") == 2

    run(main())


# --------------------------------------------------------------------------- error isolation
def test_failing_batch_fails_only_its_callers() -> None:
    async def main() -> None:
        model = Model()
        async with DynamicBatcher(model, name="t", max_batch_size=2, max_wait_ms=1) as batcher:
            blocker = await blocked(batcher, model)
            bad_a, poison, good_b, good_c = spawn(batcher, [1, "poison", 2, 3])
            await wait_depth(batcher, 4)
            model.release.set()
            await blocker
            for task in (bad_a, poison):
                with pytest.raises(ValueError, match="poisoned batch"):
                    await task
            assert (await good_b, await good_c) == (4, 6)
            assert batcher.running
            assert await batcher.submit(7) == 14  # the worker survived
        assert model.batches[1:] == [[1, "poison"], [2, 3], [7]]

    run(main())


def test_output_count_mismatch_fails_only_that_batch() -> None:
    async def main() -> None:
        model = Model()
        observer = RecordingObserver()
        batcher = DynamicBatcher(model, name="t", max_batch_size=2, max_wait_ms=1, observer=observer)
        async with batcher:
            blocker = await blocked(batcher, model)
            bad_a, short, good_b, good_c = spawn(batcher, [1, "short", 2, 3])
            await wait_depth(batcher, 4)
            model.release.set()
            await blocker
            for task in (bad_a, short):
                with pytest.raises(BatchOutputError, match="1 outputs for 2 inputs"):
                    await task
            assert (await good_b, await good_c) == (4, 6)
            assert await batcher.submit(5) == 10
        assert observer.errors == ["output_mismatch"]

    run(main())


def test_fn_returning_unsized_output_is_a_batch_output_error() -> None:
    async def main() -> None:
        async with DynamicBatcher(lambda items: (x for x in items), name="t", max_batch_size=4) as batcher:
            with pytest.raises(BatchOutputError, match="sized sequence"):
                await batcher.submit(1)

    run(main())


# ----------------------------------------------------------------------------- cancellation
def test_caller_cancelled_while_queued_is_dropped_before_the_model_call() -> None:
    async def main() -> None:
        model = Model()
        async with DynamicBatcher(model, name="t", max_batch_size=8, max_wait_ms=1) as batcher:
            blocker = await blocked(batcher, model)
            keep_a, gone, keep_b = spawn(batcher, [1, 2, 3])
            await wait_depth(batcher, 3)
            gone.cancel()
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(batcher.submit(4), 0.01)  # times out while queued
            model.release.set()
            await blocker
            assert (await keep_a, await keep_b) == (2, 6)
            assert gone.cancelled()
        assert model.batches[1:] == [[1, 3]]

    run(main())


def test_caller_cancelled_during_compute_loses_only_its_result() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        leaked: list[dict[str, Any]] = []
        loop.set_exception_handler(lambda _loop, context: leaked.append(context))
        model = Model()
        async with DynamicBatcher(model, name="t", max_batch_size=3, max_wait_ms=1000) as batcher:
            gone, kept, blocker = spawn(batcher, [1, 2, BLOCK])  # one batch, cut at 3 items
            await model.wait_entered()
            gone.cancel()
            await asyncio.sleep(0)
            model.release.set()
            assert await kept == 4
            assert await blocker == BLOCK * 2
            assert gone.cancelled()
            assert await batcher.submit_many([5, 6, 7]) == [10, 12, 14]  # the worker carries on
        assert model.batches == [[1, 2, BLOCK], [5, 6, 7]]
        gc.collect()
        await asyncio.sleep(0)
        assert leaked == []

    run(main())


# ---------------------------------------------------------------------------------- stopping
def test_stop_fails_queued_callers_and_lets_the_computing_batch_finish() -> None:
    async def main() -> None:
        model = Model()
        batcher = DynamicBatcher(model, name="t", max_batch_size=8, max_wait_ms=1)
        await batcher.start()
        try:
            computing = await blocked(batcher, model)
            queued = spawn(batcher, [1, 2])
            await wait_depth(batcher, 2)
            stopping = asyncio.create_task(batcher.stop())
            for task in queued:
                with pytest.raises(BatcherStoppedError, match="stopped"):
                    await task
            assert not computing.done()
            model.release.set()
            assert await computing == BLOCK * 2
            await stopping
        finally:
            model.release.set()
        assert not batcher.running
        assert batcher.queue_depth == 0
        with pytest.raises(BatcherStoppedError, match="not running"):
            await batcher.submit(3)
        assert model.seen == [BLOCK]

    run(main())


def test_stop_timeout_fails_the_computing_batch_too() -> None:
    async def main() -> None:
        model = Model()
        batcher = DynamicBatcher(model, name="t", max_batch_size=8, max_wait_ms=1)
        await batcher.start()
        try:
            computing = await blocked(batcher, model)
            await batcher.stop(timeout=0.05)
            with pytest.raises(BatcherStoppedError):
                await computing
        finally:
            model.release.set()

    run(main())


def test_stop_with_drain_answers_queued_callers() -> None:
    async def main() -> None:
        model = Model()
        batcher = DynamicBatcher(model, name="t", max_batch_size=1, max_wait_ms=1)
        await batcher.start()
        try:
            computing = await blocked(batcher, model)
            queued = spawn(batcher, [1, 2])
            await wait_depth(batcher, 2)
            stopping = asyncio.create_task(batcher.stop(drain=True))
            await asyncio.sleep(0)
            with pytest.raises(BatcherStoppedError):
                await batcher.submit(3)  # no new work while draining
            model.release.set()
            await stopping
            assert [await task for task in (computing, *queued)] == [BLOCK * 2, 2, 4]
        finally:
            model.release.set()
        assert not batcher.running

    run(main())


def test_lifecycle_and_validation() -> None:
    with pytest.raises(ValueError, match="max_batch_size"):
        DynamicBatcher(Model(), name="t", max_batch_size=0)
    with pytest.raises(ValueError, match="max_queue"):
        DynamicBatcher(Model(), name="t", max_batch_size=4, max_queue=0)

    async def main() -> None:
        batcher = DynamicBatcher(Model(), name="t", max_batch_size=4)
        assert not batcher.running
        assert batcher.queue_depth == 0
        with pytest.raises(BatcherStoppedError):
            await batcher.submit(1)
        await batcher.stop()  # stopping a batcher that never started is fine
        await batcher.start()
        await batcher.start()  # idempotent
        assert batcher.running
        assert await batcher.submit(1) == 2
        await batcher.stop()
        await batcher.stop()
        await batcher.start()  # restartable
        assert await batcher.submit(2) == 4
        await batcher.stop()

    run(main())


# ---------------------------------------------------------------------------------- observer
def test_observer_receives_batches_depths_and_errors() -> None:
    async def main() -> None:
        model = Model()
        observer = RecordingObserver()
        batcher = DynamicBatcher(model, name="clf", max_batch_size=3, max_wait_ms=1, observer=observer)
        async with batcher:
            blocker = await blocked(batcher, model)
            tasks = spawn(batcher, [1, 2, 3, 4, "poison"])
            await wait_depth(batcher, 5)
            model.release.set()
            await blocker
            results = await asyncio.gather(*tasks, return_exceptions=True)
        assert results[:3] == [2, 4, 6]
        assert all(isinstance(result, ValueError) for result in results[3:])
        assert [(name, size) for name, size, _, _ in observer.batches] == [("clf", 1), ("clf", 3)]
        for _, size, waits, compute_s in observer.batches:
            assert len(waits) == size
            assert all(wait >= 0 for wait in waits)
            assert compute_s >= 0
        assert observer.errors == ["model_error"]
        assert 5 in observer.depths
        assert observer.depths[-1] == 0

    run(main())


def test_raising_observer_never_breaks_the_worker() -> None:
    async def main() -> None:
        model = Model()
        b = DynamicBatcher(model, name="t", max_batch_size=2, max_wait_ms=1, observer=BrokenObserver())
        async with b:
            assert await asyncio.gather(*(b.submit(x) for x in range(5))) == [0, 2, 4, 6, 8]
            with pytest.raises(ValueError):
                await b.submit("poison")
            assert await b.submit(9) == 18
            assert b.running

    run(main())


def test_default_null_observer_keeps_the_batcher_serving() -> None:
    """Without an observer (the default NullObserver) batches, a failing batch and queue-depth
    updates all go through, and callers still get their answers."""

    async def main() -> None:
        model = Model()
        async with DynamicBatcher(model, name="t", max_batch_size=2, max_wait_ms=1) as b:
            assert await asyncio.gather(*(b.submit(x) for x in range(3))) == [0, 2, 4]
            with pytest.raises(ValueError):
                await b.submit("poison")
            assert await b.submit(7) == 14

    run(main())
