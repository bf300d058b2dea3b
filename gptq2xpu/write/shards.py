"""Write one planned shard: workers build chunks and ``pwrite`` them at their planned offsets, one
thread hashes them in file order, so bytes and sha256 are the same whatever ``jobs`` is."""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..errors import io_error
from ..plan import Plan, ShardPlan
from ..read import Checkpoint
from .chunks import BufferPool, Chunk, ShardSource
from .documents import open_temp


def _write_all(fd: int, data: memoryview, path, offset: int) -> None:
    view = data.cast("B") if data.format != "B" else data
    while len(view):
        try:
            n = os.pwrite(fd, view, offset)
        except OSError as exc:
            raise io_error("cannot write", path, exc) from None
        view = view[n:]
        offset += n


class ShardWriter:
    """Writes shards with a bounded look-ahead of worker tasks, hashing in file order.

    Every chunk's place in the file is known from the plan, so the worker that builds a chunk also
    writes it (``pwrite`` at its offset: the copy into the page cache runs in parallel), and this
    thread only feeds the chunks to sha256 strictly in file order -- the one serial step -- and
    recycles their buffers.  Bytes and hashes are the same whatever ``jobs`` is.
    """

    def __init__(self, plan: Plan, ckpt: Checkpoint, jobs: int = 1, progress: Callable[[int], None] | None = None):
        self.plan = plan
        self.ckpt = ckpt
        self.jobs = max(1, int(jobs))
        self.pool = BufferPool()
        self.source = ShardSource(plan, ckpt, self.pool)
        self.progress = progress or (lambda n: None)

    def write(self, shard: ShardPlan, fd: int, path: Path) -> dict:
        """Fill the new, empty file ``fd`` (named ``path`` in messages) with the shard; close it."""
        tasks = self.source.tasks(shard)
        digest = hashlib.sha256()
        size = 0
        try:
            # closing() stops the workers (and waits for running ones) before fd is closed
            with contextlib.closing(self._run(tasks, fd, path)) as chunks:
                for offset, chunk in chunks:
                    if offset != size:  # pragma: no cover - guards the planner/writer contract
                        raise AssertionError(f"{shard.name}: chunk at {offset}, expected {size}")
                    digest.update(chunk.data)
                    size += chunk.data.nbytes
                    if chunk.release:
                        chunk.release()
                    self.progress(chunk.data.nbytes)
        finally:
            os.close(fd)
        if size != shard.layout.file_size:  # pragma: no cover - guards the planner/writer contract
            raise AssertionError(f"{shard.name}: wrote {size} bytes, planned {shard.layout.file_size}")
        return {"sha256": digest.hexdigest(), "size": size}

    @staticmethod
    def _produce(offset: int, task, fd: int, path) -> tuple[int, Chunk]:
        chunk = task()
        _write_all(fd, chunk.data, path, offset)
        return offset, chunk

    def _run(self, tasks, fd: int, path):
        if self.jobs == 1:
            for offset, t in tasks:
                yield self._produce(offset, t, fd, path)
            return
        window: deque = deque()
        with ThreadPoolExecutor(self.jobs, thread_name_prefix="gptq2xpu") as ex:
            try:
                for offset, t in tasks:
                    window.append(ex.submit(self._produce, offset, t, fd, path))
                    if len(window) >= self.jobs * 3:
                        yield window.popleft().result()
                while window:
                    yield window.popleft().result()
            finally:
                for f in window:
                    f.cancel()


def write_shards(plan: Plan, ckpt: Checkpoint, folder: Path, indices, jobs: int,
                 progress: Callable[[int], None] | None) -> dict:
    """Write the shards ``indices`` of the plan into ``folder``, each through a temporary name;
    returns their manifest records."""
    writer = ShardWriter(plan, ckpt, jobs, progress)
    files = {}
    for i in indices:
        shard = plan.shards[i]
        try:
            fd, tmp = open_temp(folder, shard.name)
        except OSError as exc:
            raise io_error("cannot create a file in", folder, exc) from None
        try:
            files[shard.name] = writer.write(shard, fd, tmp)
            ckpt.check_unchanged()  # a few stats per shard: catch a changing source early
            os.replace(tmp, folder / shard.name)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
    return files
