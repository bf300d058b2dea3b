"""Write planned shards: builder threads make each chunk and ``pwrite`` it at its planned offset,
and per shard one thread feeds the chunks to sha256 strictly in file order, so bytes and hashes are
the same whatever ``jobs`` is.  Several shards are written at once.

Why this shape (measured; ``scripts/bench.py``):

* sha256 is serial within a file (about 1.1-1.5 GiB/s per stream), so the shards of a model are
  hashed concurrently, one stream each, instead of one after another;
* the builder writes the chunk it just made while the bytes are still in its core's cache: a
  write from a buffer that left the cache costs two to three times the CPU;
* one ``pwrite`` of many MiB costs several times the CPU of the same bytes in 1 MiB pieces (larger
  page-cache folios to allocate), so writes go in pieces of :data:`WRITE_PIECE`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path

from ..errors import io_error
from ..interrupts import POLL_S, signals_to_the_main_thread
from ..plan import Plan, ShardPlan
from ..read import Checkpoint
from .chunks import BufferPool, Chunk, ShardSource
from .documents import open_temp

#: Largest single ``pwrite``: bigger calls cost more CPU per byte, not less.
WRITE_PIECE = 1 << 20
#: Chunks built ahead per builder thread (all shards together): keeps the builders busy while the
#: hashers drain, and bounds memory to a few chunks per thread whatever the model size.
AHEAD_PER_JOB = 3


def _write_all(fd: int, data: memoryview, path, offset: int) -> None:
    view = data.cast("B") if data.format != "B" else data
    while len(view):
        try:
            n = os.pwrite(fd, view[:WRITE_PIECE], offset)
        except OSError as exc:
            raise io_error("cannot write", path, exc) from None
        view = view[n:]
        offset += n


class _Stopped(Exception):
    """Another shard failed: this one stops at its next chunk (never reaches the caller)."""


class ShardWriter:
    """Writes shards from a shared pool of builder threads (``jobs`` of them; none with 1).

    ``write`` may run for several shards at once, each in its own thread: that thread hashes its
    shard's chunks in file order, up to ``ahead`` chunks behind the builders, which write them.  A
    chunk's buffer goes back to the pool once it is hashed.  ``stop()`` makes every running
    ``write`` give up at its next chunk (another shard failed, or the run was interrupted).
    """

    def __init__(self, plan: Plan, ckpt: Checkpoint, jobs: int = 1, progress: Callable[[int], None] | None = None,
                 *, shards_at_once: int = 1):
        self.plan = plan
        self.ckpt = ckpt
        self.jobs = max(1, int(jobs))
        self.pool = BufferPool()
        self.source = ShardSource(plan, ckpt, self.pool)
        self._progress = progress or (lambda _: None)
        self._progress_lock = threading.Lock()
        self._stop = threading.Event()
        self.ahead = max(4, AHEAD_PER_JOB * self.jobs // max(1, shards_at_once))
        self._builders = ThreadPoolExecutor(self.jobs, thread_name_prefix="gptq2xpu",
                                            initializer=signals_to_the_main_thread) if self.jobs > 1 else None

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        if self._builders is not None:
            self._builders.shutdown(wait=True, cancel_futures=True)

    def _report(self, nbytes: int) -> None:
        with self._progress_lock:
            self._progress(nbytes)

    def write(self, shard: ShardPlan, fd: int, path: Path) -> dict:
        """Fill the new, empty file ``fd`` (named ``path`` in messages) with the shard."""
        tasks = self.source.tasks(shard)
        digest = hashlib.sha256()
        run = self._serial if self._builders is None else self._pipelined
        size = run(tasks, fd, path, digest)
        if size != shard.layout.file_size:  # pragma: no cover - guards the planner/writer contract
            raise AssertionError(f"{shard.name}: wrote {size} bytes, planned {shard.layout.file_size}")
        return {"sha256": digest.hexdigest(), "size": size}

    def _consume(self, offset: int, chunk: Chunk, size: int, digest, shard_path) -> int:
        if offset != size:  # pragma: no cover - guards the planner/writer contract
            raise AssertionError(f"{shard_path}: chunk at {offset}, expected {size}")
        digest.update(chunk.data)
        return size + chunk.data.nbytes

    def _serial(self, tasks, fd: int, path, digest) -> int:
        """``--jobs 1``: build, write and hash each chunk in turn, in this thread."""
        size = 0
        for offset, task in tasks:
            if self._stop.is_set():
                raise _Stopped
            chunk = task()
            _write_all(fd, chunk.data, path, offset)
            size = self._consume(offset, chunk, size, digest, path)
            if chunk.release:
                chunk.release()
            self._report(chunk.data.nbytes)
        return size

    @staticmethod
    def _build_and_write(offset: int, task, fd: int, path) -> Chunk:
        chunk = task()
        _write_all(fd, chunk.data, path, offset)
        return chunk

    def _pipelined(self, tasks, fd: int, path, digest) -> int:
        """Builder threads build each chunk and write it at its offset while it is in their cache;
        this thread hashes the chunks in file order, ``ahead`` chunks behind the builders."""
        window: deque = deque()
        pending = iter(tasks)
        size = 0

        def fill() -> None:
            while len(window) < self.ahead:
                nxt = next(pending, None)
                if nxt is None:
                    return
                offset, task = nxt
                window.append((offset, self._builders.submit(self._build_and_write, offset, task, fd, path)))

        try:
            fill()
            while window:
                if self._stop.is_set():
                    raise _Stopped
                offset, fut = window.popleft()
                chunk = fut.result()
                size = self._consume(offset, chunk, size, digest, path)
                if chunk.release:
                    chunk.release()
                self._report(chunk.data.nbytes)
                fill()
        finally:  # no builder may still write into fd when the caller closes it
            for _, fut in window:
                fut.cancel()
            for _, fut in window:
                if not fut.cancelled():
                    with contextlib.suppress(BaseException):
                        fut.result()
        return size


def write_shards(plan: Plan, ckpt: Checkpoint, folder: Path, indices, jobs: int,
                 progress: Callable[[int], None] | None) -> dict:
    """Write the shards ``indices`` of the plan into ``folder``, each through a temporary name;
    returns their manifest records.  Up to ``jobs // 2`` shards are written at once: each takes a
    core to hash, and the builders need the others."""
    indices = list(indices)
    jobs = max(1, int(jobs))
    at_once = max(1, min(len(indices), jobs // 2))
    writer = ShardWriter(plan, ckpt, jobs, progress, shards_at_once=at_once)
    try:
        if at_once == 1:
            return {plan.shards[i].name: _write_one(writer, plan, ckpt, folder, i) for i in indices}
        with ThreadPoolExecutor(at_once, thread_name_prefix="gptq2xpu-shard",
                                initializer=signals_to_the_main_thread) as shards:
            futures = []
            try:
                futures.extend(shards.submit(_write_one, writer, plan, ckpt, folder, i) for i in indices)
                _wait_for_shards(futures)
            except BaseException:  # an interrupt, even while the shards are handed out: the started ones stop
                writer.stop()
                raise
            finally:  # a failed shard: the others stop too
                if not all(f.done() and f.exception() is None for f in futures):
                    writer.stop()
                    for f in futures:
                        f.cancel()
                wait(futures)
            for f in futures:
                exc = None if f.cancelled() else f.exception()
                if exc is not None and not isinstance(exc, _Stopped):
                    raise exc
            return {plan.shards[i].name: f.result() for i, f in zip(indices, futures)}
    finally:
        writer.close()


def _wait_for_shards(futures) -> None:
    """Until every shard is written or one failed, running Python code every :data:`POLL_S`."""
    while True:
        done, pending = wait(futures, timeout=POLL_S, return_when=FIRST_EXCEPTION)
        if not pending or any(f.exception() is not None for f in done):
            return


def _write_one(writer: ShardWriter, plan: Plan, ckpt: Checkpoint, folder: Path, i: int) -> dict:
    shard = plan.shards[i]
    try:
        fd, tmp = open_temp(folder, shard.name)
    except OSError as exc:
        raise io_error("cannot create a file in", folder, exc) from None
    try:
        record = writer.write(shard, fd, tmp)
        ckpt.check_unchanged()  # a few stats per shard: catch a changing source early
        os.replace(tmp, folder / shard.name)  # before closing: the lock covers the file until it has its name
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    finally:
        os.close(fd)
    return record
