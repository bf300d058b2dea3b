#!/usr/bin/env python3
"""Memory and time of reading a safetensors header of ``--tensors`` entries (default 1 M, a
~100 MB header: the cap), measured with tracemalloc: what the compact tensor table holds after
the parse, the parse's peak, and what one ``TensorEntry`` object per tensor (a dict of objects,
the design the table replaces) would add.  The data section is a sparse file.

    python scripts/bench_header_memory.py [--tensors 1000000] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import struct
import tempfile
import time
import tracemalloc
from pathlib import Path

from gptq2xpu.safetensors_io import read_header

SHAPES = [[16, 96], [96, 2048], [2, 96], [768, 256], [256], [2048], [8, 8], [4]]


def write_header(path: Path, count: int) -> None:
    parts, off = [], 0
    for i in range(count):
        shape = SHAPES[i % 8]
        size = 4 * math.prod(shape)
        parts.append(f'"model.layers.{i // 20000}.e.{(i // 8) % 2500}.w{i % 8}":{{"dtype":"I32","shape":'
                     f'{json.dumps(shape, separators=(",", ":"))},"data_offsets":[{off},{off + size}]}}')
        off += size
    body = ("{" + ",".join(parts) + "}").encode()
    body += b" " * (-(8 + len(body)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(body)) + body)
        f.truncate(8 + len(body) + off)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tensors", type=int, default=1_000_000)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        path = Path(d) / "model.safetensors"
        write_header(path, args.tensors)
        tracemalloc.start()
        t0 = time.perf_counter()
        hdr = read_header(path)
        seconds = time.perf_counter() - t0
        gc.collect()
        table, peak = tracemalloc.get_traced_memory()
        objects = dict(hdr.tensors.items())
        gc.collect()
        extra = tracemalloc.get_traced_memory()[0] - table
        print(json.dumps({"tensors": len(objects), "header_mib": round((path.stat().st_size and
                          struct.unpack("<Q", path.open("rb").read(8))[0]) / 2**20, 1),
                          "parse_s": round(seconds, 2), "parse_peak_mib": round(peak / 2**20, 1),
                          "table_mib": round(table / 2**20, 1), "entry_objects_add_mib": round(extra / 2**20, 1)}))


if __name__ == "__main__":
    main()
