"""Dynamic batching: concurrent requests to one model version are coalesced into one
onnxruntime batch (up to ``max_batch_size`` tiles, waiting at most ``max_delay`` for more
after the first), run in a worker thread, and the rows split back to each request.

The wait is adaptive: a request that arrives alone after a batch of one (a lone client) runs
at once instead of waiting ``max_delay`` for company that is not coming (measured on the
tiny model: 1 client, 2 ms delay, 3.9 ms p50 waiting always vs 1.1 ms not waiting);
under concurrent load the requests that queue while a batch runs form the next one, and the
delay lets a partial batch fill."""

from __future__ import annotations

import asyncio
import time

import numpy as np

__all__ = ["Batcher"]


class Batcher:
    def __init__(self, model, executor, metrics, *, enabled: bool = True):
        self.model, self.executor, self.metrics, self.enabled = model, executor, metrics, enabled
        self.max_batch = model.max_batch_size if enabled else 1
        self.max_delay = model.max_delay_us / 1e6 if enabled else 0.0
        self.queue: asyncio.Queue = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self._loop())
        self.inflight = 0
        self.last_requests = 0  # requests in the previous batch: 1 means a lone client

    async def submit(self, tiles: np.ndarray) -> dict[str, np.ndarray]:
        fut = asyncio.get_running_loop().create_future()
        self.inflight += 1
        try:
            await self.queue.put((tiles, fut))
            return await fut
        finally:
            self.inflight -= 1

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first = await self.queue.get()
            batch, n = [first], len(first[0])
            lone = self.last_requests <= 1 and self.queue.empty()
            deadline = time.monotonic() + (0.0 if lone else self.max_delay)
            while n < self.max_batch:
                try:
                    item = self.queue.get_nowait()
                except asyncio.QueueEmpty:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    try:
                        item = await asyncio.wait_for(self.queue.get(), left)
                    except asyncio.TimeoutError:
                        break
                if n + len(item[0]) > self.max_batch:
                    # keep the batch within max_batch_size: this one starts the next batch
                    self.queue._queue.appendleft(item)  # noqa: SLF001 - asyncio.Queue has no push-front
                    break
                batch.append(item)
                n += len(item[0])
            self.last_requests = len(batch)
            batch = [(t, f) for t, f in batch if not f.done()]  # a cancelled client's rows are not run
            if not batch:
                continue
            tiles = batch[0][0] if len(batch) == 1 else np.concatenate([t for t, _ in batch])
            try:
                out = await loop.run_in_executor(self.executor, self.model.run, tiles)
            except Exception as e:  # noqa: BLE001 - every waiting request gets the error
                for _, f in batch:
                    if not f.done():
                        f.set_exception(e)
                continue
            self.metrics.batch_run(self.model.name, self.model.version, len(tiles))
            start = 0
            for t, f in batch:
                if not f.done():
                    f.set_result({k: v[start:start + len(t)] for k, v in out.items()})
                start += len(t)

    async def drain(self, timeout: float = 30.0) -> None:
        """Wait until every queued request is answered (graceful shutdown), then stop."""
        end = time.monotonic() + timeout
        while (self.inflight or not self.queue.empty()) and time.monotonic() < end:
            await asyncio.sleep(0.01)
        self.task.cancel()
