"""The conversion as a library call: resolve -> open -> plan -> audit -> write.

>>> from gptq2xpu.convert import convert
>>> result = convert("Qwen/Qwen3-30B-A3B-GPTQ-Int4", "qwen3-xpu")      # doctest: +SKIP
>>> result["converted_layers"]                                          # doctest: +SKIP
48
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

from .audit import audit, audit_linears
from .errors import InputError
from .interrupts import signals_to_the_main_thread
from .memory import settle
from .parallel import default_jobs
from .plan import ConvertOptions, Plan, build_plan
from .read import Checkpoint, open_source
from .write import write_checkpoint, write_part
from .write.output import check_not_source
from .write.split import check_part, part_shards

#: Default --jobs ceiling (see convert()).
MAX_DEFAULT_JOBS = 8

def make_plan(ckpt: Checkpoint, options: ConvertOptions) -> Plan:
    plan = build_plan(ckpt, options)
    plan.fingerprint = ckpt.fingerprint()
    return plan


#: Audit threads per --jobs: a 48-layer model's audit is a few CPU seconds of small reads and
#: checks; a thread per four cores keeps it well ahead of the writing it runs beside.
AUDIT_THREADS_PER_JOB = 0.25


def audit_layers(plan: Plan, ckpt: Checkpoint, jobs: int, stop: threading.Event | None = None) -> list[str]:
    """:func:`~gptq2xpu.audit.audit` of every converted layer, layers spread over ``jobs // 4``
    threads: the same warnings in the same order, and the first failing layer's error.  Once
    ``stop`` is set, no further layer is started (the run is ending anyway)."""
    stop = stop or threading.Event()

    def one(layer) -> list[str]:
        if stop.is_set():
            raise InputError("the audit was stopped")  # never reported: the run is already failing
        return audit(plan, ckpt, [layer])

    layers = plan.converted
    threads = max(1, min(len(layers), int(jobs * AUDIT_THREADS_PER_JOB)))
    if threads == 1:
        found = [w for layer in layers for w in one(layer)]
    else:
        with ThreadPoolExecutor(threads, thread_name_prefix="gptq2xpu-audit",
                                initializer=signals_to_the_main_thread) as pool:
            found = [w for part in pool.map(one, layers) for w in part]
    return found + audit_linears(plan, ckpt)  # compressed-tensors: the linears outside MoE layers


def convert(source, output, *, options: ConvertOptions | None = None, jobs: int | None = None,
            overwrite: bool = False, dry_run: bool = False, part: tuple[int, int] | None = None,
            revision: str | None = None, token: str | None = None,
            progress: Callable[[int, int], None] | None = None) -> dict:
    """Convert SOURCE into OUTPUT.  Returns a summary dict (the same one ``--json`` prints)."""
    options = options or ConvertOptions()
    # past about 8 workers the page cache, not the cores, bounds the writing; more threads only
    # contend (16-core host, 48 layers: --jobs 8 9.8 s, --jobs 16 11.9 s; scripts/bench.py --jobs-sweep)
    jobs = jobs or min(default_jobs(), MAX_DEFAULT_JOBS)
    t0 = time.perf_counter()
    with open_source(source, revision=revision, token=token) as ckpt:
        plan = make_plan(ckpt, options)
        summary = plan.to_dict()
        summary["output"] = str(output)
        if dry_run:
            check_not_source(Path(os.path.abspath(output)), ckpt.root)  # what the run refuses before writing
            if part is not None:
                check_part(plan, *part)
            summary["dry_run"] = True
            return summary
        plan.raise_refusals()
        plan.data_fingerprint = ckpt.data_fingerprint()
        shards = plan.shards if part is None else [plan.shards[i] for i in part_shards(plan, *part)]
        total = sum(t.nbytes for s in shards for t in s.layout.tensors)  # what the ticks count
        settle()  # what parsing the headers freed goes back before the buffers are made
        done = [0]
        if progress:
            progress(0, total)
        # The audit (zero points, row order, finite scales: small metadata reads) runs beside the
        # writing; a failure stops the writing at the next chunk, and nothing is published before
        # the audit has passed.  Either way a failed run leaves nothing at OUTPUT.
        # Split runs write into a shared folder without a staging area: audit them first.
        bg = ThreadPoolExecutor(1, thread_name_prefix="gptq2xpu-audit", initializer=signals_to_the_main_thread)
        stop_audit = threading.Event()
        audited = bg.submit(audit_layers, plan, ckpt, jobs, stop_audit)
        if part is not None:
            audited.result()

        def tick(n: int) -> None:
            if audited.done() and audited.exception() is not None:
                raise audited.exception()
            done[0] += n
            if progress:
                progress(done[0], total)

        def before_publish() -> None:
            plan.warnings.extend(audited.result())

        def stop_reading() -> None:  # the writing failed: the audit stops before the stage is removed
            stop_audit.set()
            wait([audited])

        try:
            if part is None:
                files = write_checkpoint(plan, ckpt, Path(output), jobs=jobs, overwrite=overwrite, progress=tick,
                                         before_publish=before_publish, stop_reading=stop_reading)
            else:
                files = write_part(plan, ckpt, Path(output), part[0], part[1], jobs=jobs, progress=tick,
                                   before_publish=before_publish)
                summary["part"] = f"{part[0]}/{part[1]}"
        finally:
            if not audited.done():
                stop_audit.set()  # the writing ended before the audit: it failed, stop soon
            bg.shutdown(wait=True, cancel_futures=True)
        summary["warnings"] = list(plan.warnings)
        summary["files"] = len(files)
        summary["bytes_written"] = sum(f["size"] for f in files.values())
        summary["seconds"] = round(time.perf_counter() - t0, 3)
        summary["jobs"] = jobs
        return summary
