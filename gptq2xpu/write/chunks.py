"""Where every output byte comes from: each shard as an ordered list of chunk-producing tasks.

A chunk is produced by a small task: copy a slice of a source tensor, build one expert's w13 or
w2 rows, a layer's scales, or a dequantized router (all built by :mod:`gptq2xpu.repack`).  Buffers
are pooled and reused, so memory stays at a few chunks whatever the model size: nothing holds a
layer, a shard or a model.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..contract import W2_QWEIGHT, W13_QWEIGHT
from ..formats import FORMATS
from ..plan import Plan, ShardPlan
from ..read import Checkpoint
from ..repack import (
    dequantize_router,
    fill_w2,
    fill_w13,
    from_float32,
    layer_scales,
    linear_scales,
    read_role_scales,
    read_rows,
    read_scales,
    to_float32,
)

COPY_CHUNK = 1024 * 1024
#: Output bytes of scales per chunk (whole experts): a layer's scales are 3-6 MiB, and a shard
#: starts with all its layers' scales (widest dtype first), built by many threads at once.
SCALES_CHUNK = 512 * 1024


class BufferPool:
    """Reusable byte buffers keyed by size: fresh pages cost more than the copy itself."""

    def __init__(self):
        self._free: dict[int, list[np.ndarray]] = {}
        self._lock = threading.Lock()

    def get(self, nbytes: int) -> np.ndarray:
        with self._lock:
            lst = self._free.get(nbytes)
            if lst:
                return lst.pop()
        return np.empty(nbytes, dtype=np.uint8)

    def put(self, buf: np.ndarray) -> None:
        with self._lock:
            self._free.setdefault(buf.nbytes, []).append(buf)


@dataclass
class Chunk:
    data: memoryview
    release: Callable[[], None] | None = None


# ------------------------------------------------------------------------------ chunk tasks


class ShardSource:
    """Turns a shard's planned items into an ordered list of chunk-producing tasks."""

    def __init__(self, plan: Plan, ckpt: Checkpoint, pool: BufferPool):
        self.plan = plan
        self.ckpt = ckpt
        self.pool = pool
        self._local = threading.local()

    def _scratch(self, nbytes: int) -> np.ndarray:
        """This thread's own scratch buffer (source words read before they are transposed): it stays
        in this core's cache, where a pooled one would come from another core's (measured: the
        reads into it cost up to 2x the CPU)."""
        buf = getattr(self._local, "scratch", None)
        if buf is None or buf.nbytes < nbytes:
            buf = self._local.scratch = np.empty(nbytes, dtype=np.uint8)
        return buf[:nbytes]

    def tasks(self, shard: ShardPlan) -> list[tuple[int, Callable[[], Chunk]]]:
        """``(file offset, task)`` pairs in file order; each task's chunk starts at its offset."""
        out: list[tuple[int, Callable[[], Chunk]]] = [(0, lambda h=shard.layout.header: Chunk(memoryview(h)))]
        for item in shard.items:
            kind = item.source
            start = shard.layout.offsets[item.tensor.name][0]
            if kind == "copy":
                out.extend(self._copy_tasks(item.ref, start))
            elif kind in ("w13_qweight", "w2_qweight"):
                layer = self.plan.layer(item.ref)
                fn = self._w13 if kind == "w13_qweight" else self._w2
                step = item.tensor.nbytes // layer.experts
                out.extend((start + e * step, lambda e=e, lyr=layer, f=fn: f(lyr, e)) for e in range(layer.experts))
            elif kind in ("w13_scales", "w2_scales"):
                # a few experts per chunk: memory stays a chunk's whatever the layer's size
                layer = self.plan.layer(item.ref)
                step = item.tensor.nbytes // layer.experts
                per = max(1, SCALES_CHUNK // max(1, step))
                out.extend((start + e * step, lambda lyr=layer, k=kind, e=e, n=per: self._scales(lyr, k, e, n))
                           for e in range(0, layer.experts, per))
            elif kind in ("weight_packed", "weight_scale", "weight_shape"):
                linear = self.plan.linear(item.ref)
                out.append((start, lambda lin=linear, k=kind: self._linear(lin, k)))
            elif kind == "router":
                layer = self.plan.layer(item.ref)
                out.append((start, lambda lyr=layer, t=item.tensor: self._router(lyr, t)))
            else:  # pragma: no cover - plan and writer are built together
                raise AssertionError(kind)
        return out

    def _copy_tasks(self, name: str, start: int):
        ref = self.ckpt.ref(name)
        for off in range(0, ref.nbytes, COPY_CHUNK):
            size = min(COPY_CHUNK, ref.nbytes - off)

            def task(off=off, size=size, ref=ref):
                buf = self.pool.get(size)
                self.ckpt.read_into(ref, buf, offset=off)
                return Chunk(memoryview(buf), lambda: self.pool.put(buf))

            yield start + off, task

    def _rows_reader(self, layer, e, role, scratch):
        fmt = FORMATS[layer.format]
        fields = layer.fields(e, role)
        return lambda dst: read_rows(self.ckpt, fmt, fields, dst, scratch)

    def _w13(self, layer, e) -> Chunk:
        geo = layer.geometry
        rows, row_bytes = geo.shapes()[W13_QWEIGHT][1:]
        buf = self.pool.get(rows * row_bytes)
        sc = self._scratch(geo.intermediate * geo.hidden // 8 * 4).view(np.int32)
        out = buf.view(np.int32).reshape(rows, row_bytes // 4)
        fill_w13(out, geo, self._rows_reader(layer, e, "gate", sc), self._rows_reader(layer, e, "up", sc),
                 self.plan.options.nibble_encoding)
        return Chunk(memoryview(buf), lambda: self.pool.put(buf))

    def _w2(self, layer, e) -> Chunk:
        geo = layer.geometry
        rows, row_bytes = geo.shapes()[W2_QWEIGHT][1:]
        buf = self.pool.get(rows * row_bytes)
        sc = self._scratch(geo.hidden * geo.intermediate // 8 * 4 * 2).view(np.int32)
        out = buf.view(np.int32).reshape(rows, row_bytes // 4)
        half = geo.hidden * geo.intermediate // 8
        fill_w2(out, geo, self._rows_reader(layer, e, "down", sc[:half]), sc[half:], self.plan.options.nibble_encoding)
        return Chunk(memoryview(buf), lambda: self.pool.put(buf))

    def _scales(self, layer, kind, first: int, count: int) -> Chunk:
        """Experts ``first..first+count`` (fewer at the end of the layer) of a layer's scales."""
        count = min(count, layer.experts - first)
        fmt = FORMATS[layer.format]
        roles = ("gate", "up") if kind == "w13_scales" else ("down",)
        stacks = {role: read_role_scales(self.ckpt, fmt, [layer.fields(e, role)[fmt.scales]
                                                          for e in range(first, first + count)])
                  for role in roles}
        arr = layer_scales(
            stacks,
            layer.geometry,
            roles=roles,
            src_groups=layer.source_groups,
            src_dtype=layer.source_scale_dtype,
            dst_dtype=layer.scale_dtype,
        )
        return Chunk(memoryview(np.ascontiguousarray(arr).reshape(-1).view(np.uint8)))

    def _linear(self, lin, kind: str) -> Chunk:
        """One tensor of a linear written on its own (``--format compressed-tensors``): its packed
        words as rows ``[N, K/8]`` (GPTQ transposed), its scales ``[N, K/group]``, or its shape."""
        fmt = FORMATS[lin.format]
        n, k = lin.out_features, lin.in_features
        if kind == "weight_shape":
            return Chunk(memoryview(np.array([n, k], dtype="<i8").view(np.uint8)))
        if kind == "weight_scale":
            arr = linear_scales(read_scales(self.ckpt, fmt, lin.fields), src_group=lin.spec.group_size,
                                group=lin.group, src_dtype=lin.spec.scale_dtype, dst_dtype=lin.scale_dtype)
            return Chunk(memoryview(np.ascontiguousarray(arr).reshape(-1).view(np.uint8)))
        buf = self.pool.get(n * k // 2)
        read_rows(self.ckpt, fmt, lin.fields, buf.view(np.int32).reshape(n, k // 8),
                  self._scratch(n * k // 2).view(np.int32))
        return Chunk(memoryview(buf), lambda: self.pool.put(buf))

    def _router(self, layer, tensor) -> Chunk:
        fields = {n.rsplit(".", 1)[1]: n for n in layer.routers}
        read = lambda f: self.ckpt.read(fields[f]) if f in fields else None  # noqa: E731
        scales = self.ckpt.read(fields["scales"])
        scales_dtype = self.ckpt.ref(fields["scales"]).dtype
        if scales_dtype == "BF16":
            scales = scales.view(np.uint16).reshape(self.ckpt.ref(fields["scales"]).shape)
        w = dequantize_router(read("qweight"), to_float32(scales, scales_dtype), read("qzeros"), read("g_idx"),
                              self.plan.quant.checkpoint_format)
        arr = from_float32(np.ascontiguousarray(w), tensor.dtype)
        return Chunk(memoryview(arr.reshape(-1).view(np.uint8)))
