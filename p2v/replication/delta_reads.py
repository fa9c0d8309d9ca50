"""Reading old blocks from the layer in parallel, to answer CHANGED blocks (DR side).

Each CHANGED block costs the DR side one read of the block it holds (through the layer's
backing chain), then sixteen 4 KiB digests. On a cold cache those reads are random I/O;
several in flight (each worker has its own NBD connection when the layer offers them)
measured 2x faster than one at a time here, and the hashing runs outside the GIL.

Only blocks that no write of the running sync has touched are read this way (every block
is CHANGED at most once per sync, and its new pieces are written only after the answer),
so a reader on another connection never races a queued write.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from typing import Any

from p2v.replication.delta import sub_digests
from p2v.replication.model import DIGEST_SIZE, LayerTarget

Pread = Callable[[int, int], bytes]
DEFAULT_READERS = 8


def _mask(new_subs: bytes, old_block: bytes) -> int:
    """Bit j set where the new digest of piece j differs from the old block's."""
    mask = 0
    for j, old in enumerate(sub_digests(old_block)):
        if new_subs[j * DIGEST_SIZE : (j + 1) * DIGEST_SIZE] != old:
            mask |= 1 << j
    return mask


class OldBlockReader:
    """Worker threads that read old blocks and compute which 4 KiB pieces differ.

    :meth:`submit` queues a block; :meth:`done` returns the finished ``(index, mask)``
    pairs without waiting; :meth:`wait_all` waits for every queued one. Use as a context
    manager (the workers and any extra connections are closed on exit).
    """

    def __init__(self, target: LayerTarget, workers: int = DEFAULT_READERS) -> None:
        self._owned: list[Any] = []
        connect = getattr(target, "connect_readers", None)
        preads: Sequence[Pread]
        if callable(connect) and workers > 1:
            self._owned = list(connect(workers))
            preads = [d.pread for d in self._owned]
        else:
            preads = [target.pread]
        self._jobs: queue.SimpleQueue[tuple[int, int, int, bytes] | None] = queue.SimpleQueue()
        self._results: queue.SimpleQueue[tuple[int, int] | BaseException] = queue.SimpleQueue()
        self.pending = 0
        self._threads = [
            threading.Thread(target=self._work, args=(p,), name=f"p2v-old-blocks-{i}", daemon=True)
            for i, p in enumerate(preads)
        ]
        for t in self._threads:
            t.start()

    def __enter__(self) -> OldBlockReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _work(self, pread: Pread) -> None:
        while (job := self._jobs.get()) is not None:
            index, offset, length, new_subs = job
            try:
                self._results.put((index, _mask(new_subs, pread(length, offset))))
            except BaseException as exc:  # handed to the caller
                self._results.put(exc)

    def submit(self, index: int, offset: int, length: int, new_subs: bytes) -> None:
        self.pending += 1
        self._jobs.put((index, offset, length, new_subs))

    def _take(self, block: bool) -> tuple[int, int] | None:
        try:
            item = self._results.get(block)
        except queue.Empty:
            return None
        self.pending -= 1
        if isinstance(item, BaseException):
            raise item
        return item

    def done(self) -> list[tuple[int, int]]:
        out = []
        while self.pending and (item := self._take(False)) is not None:
            out.append(item)
        return out

    def wait_some(self, timeout: float) -> list[tuple[int, int]]:
        """What finishes within ``timeout`` seconds (at least the first one), then what is done."""
        out: list[tuple[int, int]] = []
        if not self.pending:
            return out
        try:
            item = self._results.get(True, timeout)
        except queue.Empty:
            return out
        self.pending -= 1
        if isinstance(item, BaseException):
            raise item
        out.append(item)
        return out + self.done()

    def wait_all(self) -> list[tuple[int, int]]:
        out = []
        while self.pending:
            item = self._take(True)
            assert item is not None
            out.append(item)
        return out

    def close(self) -> None:
        for _ in self._threads:
            self._jobs.put(None)
        for t in self._threads:
            t.join()
        for d in self._owned:
            d.close()
        self._owned = []
