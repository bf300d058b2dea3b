"""``verify`` as a library call: standalone checks, then (with a source) bit-exact and numerical.

>>> from gptq2xpu.verify.runner import verify
>>> report = verify("qwen3-xpu", source="Qwen/Qwen3-30B-A3B-GPTQ-Int4")   # doctest: +SKIP
>>> report["status"]                                                       # doctest: +SKIP
'pass'
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..contract import ConvertedBlock
from ..errors import InputError, UsageError
from ..interrupts import mapped, result_of, signals_to_the_main_thread
from . import MAX_SEED, MAX_TOKENS
from .standalone import Findings, check_manifest, check_output_folder, check_some_output, verify_standalone

#: Bounds of the reference MoE's token batch and seed (inclusive; the CLI's bounds too).

#: ``progress(stage, done, total, unit)``
Progress = Callable[[str, int, int, str], None]


def _no_progress(*_args) -> None:
    return None


def check_layers_spec(spec: str | None) -> None:
    """The form of ``--layers`` before any work: ``sample:N`` with N >= 1, ranges ``a-b`` with a <= b
    (indices and prefixes are checked against the layers once the output is open)."""
    if not spec or spec == "all":
        return
    if spec.startswith("sample:"):
        m = re.fullmatch(r"sample:0*(\d{1,18})", spec)
        if not m or int(m[1]) < 1:
            raise UsageError(f"--layers {spec!r}: sample:N takes a number of layers N from 1 to {10**18 - 1}, "
                             "e.g. sample:4")
        return
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)-(\d+)", part.strip())
        if not part.strip() or (m and int(m[1]) > int(m[2])):
            raise UsageError(f"--layers {spec!r}: {part.strip()!r} is not a layer index, range a-b (a <= b) or prefix")


def _check_bounds(**values: tuple[object, int, int | None]) -> None:
    """Each ``name=(value, low, high)`` an integer within its bounds (high None: unbounded)."""
    for name, (value, low, high) in values.items():
        if type(value) is not int or value < low or (high is not None and value > high):
            upto = f"..{high}" if high is not None else " or more"
            raise UsageError(f"--{name} {value!r}: expected an integer {low}{upto}")


def select_layers(prefixes: list[str], spec: str | None) -> list[str]:
    """``None``/"all" -> all; "0,3,10-12" -> by index (negative counts from the end); "sample:N"."""
    check_layers_spec(spec)
    if not spec or spec == "all":
        return list(prefixes)
    m = re.fullmatch(r"sample:(\d+)", spec)
    if m:
        from .bits import sample_experts

        return [prefixes[i] for i in sample_experts(len(prefixes), int(m[1]))]
    chosen = []
    for part in spec.split(","):
        part = part.strip()
        try:
            if re.fullmatch(r"-?\d+", part):
                chosen.append(prefixes[int(part)])
            elif re.fullmatch(r"\d+-\d+", part):
                a, b = map(int, part.split("-"))
                if not a <= b < len(prefixes):
                    raise ValueError
                chosen.extend(prefixes[a : b + 1])
            elif part in prefixes:
                chosen.append(part)
            else:
                raise ValueError
        except (ValueError, IndexError):
            n = len(prefixes)
            example = f", or a layer prefix such as {prefixes[0]}" if prefixes else ""
            raise UsageError(f"--layers {spec!r}: {part!r} names no layer of OUTPUT's {n} converted MoE layer(s); "
                             f"give indices 0..{n - 1} (negative: from the end), ranges a-b within them"
                             f"{example}") from None
    return list(dict.fromkeys(chosen))


def verify(output, source=None, *, revision=None, token=None, device: str = "auto", dtype: str = "auto",
           backend: str = "auto", layers: str | None = None, tokens: int = 64, seed: int = 0,
           numeric: bool = True, exhaustive: bool = False, jobs: int | None = None,
           progress: Progress | None = None) -> dict:
    """Verify OUTPUT (and against SOURCE when given); returns the report ``--json`` prints.

    ``progress(stage, done, total, unit)`` is called as work completes: stage "hashing" in bytes,
    "bit-exact" and "reference MoE" in layers."""
    t0 = time.perf_counter()
    progress = progress or _no_progress
    if not jobs:
        from ..parallel import default_jobs

        jobs = default_jobs()
    if backend not in ("auto", "reference", "xpu-kernels"):
        raise UsageError(f"--backend {backend!r}: choose auto, reference or xpu-kernels")
    if dtype not in ("auto", "bfloat16", "float16", "float32"):
        raise UsageError(f"--dtype {dtype!r}: choose bfloat16, float16 or float32")
    check_layers_spec(layers)
    _check_bounds(tokens=(tokens, 1, MAX_TOKENS), seed=(seed, 0, MAX_SEED), jobs=(jobs, 1, None))
    folder = Path(output)
    check_output_folder(folder)
    check_some_output(folder)
    findings = Findings()
    manifest = Findings()
    report: dict = {"output": str(output), "source": str(source) if source else None, "warnings": []}
    layer_rows: list[dict] = []
    if source is not None:  # torch (a second or two of CPU to import) loads beside the standalone checks
        from .bits import _import_torch_in_background

        _import_torch_in_background()
    # hashing every file is one long serial read per file: overlap it with everything else
    with ThreadPoolExecutor(1, thread_name_prefix="gptq2xpu-hash", initializer=signals_to_the_main_thread) as bg:
        hashing = bg.submit(check_manifest, folder, manifest, max(1, jobs - 1),
                            progress=lambda done, total: progress("hashing", done, total, "bytes"))
        out, block, mismatched = verify_standalone(folder, findings, jobs, skip_manifest=True)
        try:
            if source is not None and out is not None:
                layer_rows = _against_source(out, block, mismatched, source, findings, revision=revision, token=token,
                                             device=device, dtype=dtype, backend=backend, layers=layers,
                                             tokens=tokens, seed=seed, numeric=numeric, exhaustive=exhaustive,
                                             report=report, jobs=jobs, progress=progress)
        finally:
            if out is not None:
                out.close()
            result_of(hashing)
    findings.checks[:0] = manifest.checks
    report.update(
        status="pass" if findings.ok else "fail",
        checks=findings.checks,
        layers=layer_rows,
        failures=findings.failures,
        seconds=round(time.perf_counter() - t0, 3),
    )
    return report


def check_same_source(src, out, block: ConvertedBlock, source) -> None:
    """SOURCE must be the checkpoint OUTPUT was made from: its header fingerprint and (where
    recorded) its sampled data fingerprint must equal those recorded at conversion."""
    not_it = f"{source}: SOURCE is not the checkpoint {out.root} was made from"
    fp, data_fp = block.fingerprint, block.data_fingerprint
    if not fp:
        raise InputError(f"{out.root}: its config block records no source fingerprint, so SOURCE cannot be matched "
                         "to it (not written by gptq2xpu convert?)")
    if fp != src.fingerprint():
        raise InputError(f"{not_it} (its safetensors headers differ from the fingerprint recorded at "
                         f"conversion, {fp[:23]}...)")
    if data_fp and data_fp != src.data_fingerprint():
        raise InputError(f"{not_it} (same tensor names and shapes, but its weights differ from the data "
                         "fingerprint recorded at conversion)")


def _against_source(out, block: ConvertedBlock, mismatched: set[str], source, findings: Findings, *, revision, token,
                    device, dtype, backend, layers, tokens, seed, numeric, exhaustive, report, jobs,
                    progress) -> list[dict]:
    from ..read import open_source
    from .bits import source_header_problems

    prefixes = list(block.layers)
    chosen = select_layers(prefixes, layers)
    with open_source(source, revision=revision, token=token) as src:
        check_same_source(src, out, block, source)
        if not block.compressed_tensors:
            _same_description(src, out, findings)
        unread = _unreadable_layers(src, block, mismatched, source_header_problems)
        setup = _numeric_setup(device, dtype, backend, report) if numeric else None
        if setup is None:
            report["numeric"] = "skipped (--no-numeric)"

        def reference() -> list[dict]:
            return _reference_moe(src, out, block, chosen, unread, setup, tokens, seed, report, progress)

        # On a GPU or XPU the reference MoE (reads, then device math) overlaps the bit-exact checks
        # (CPU threads); on a CPU both compete for the same cores, so they run one after the other.
        with ThreadPoolExecutor(1, thread_name_prefix="gptq2xpu-reference",
                                initializer=signals_to_the_main_thread) as side:
            overlapped = side.submit(reference) if setup is not None and overlaps(setup[0]) else None
            try:
                _bit_exact(src, out, block, prefixes, unread, findings, exhaustive, jobs, report, progress)
            except BaseException:
                if overlapped is not None:
                    overlapped.cancel()
                raise
            rows = result_of(overlapped) if overlapped is not None else (reference() if setup is not None else [])
        if setup is not None:
            bad = [r for r in rows if not r["ok"]]
            findings.add("reference MoE", not bad, "; ".join(map(reference_failure, bad[:5])) if bad else
                         f"{len(rows)} layer(s) within {report['dtype']} tolerance on {setup[0].type}")
    return rows


def _same_description(src, out, findings: Findings) -> None:
    """An ``xpu`` output serves its other layers with the source's quantization description: it
    must be the source's own (:mod:`.serving_config`)."""
    from ..read.quant_config import read_quant_config
    from .serving_config import source_problems

    problems = source_problems(out.config, read_quant_config(src.folder, src.config).raw)
    findings.add("source quantization description", not problems, "; ".join(problems) if problems else
                 "source_quantization_config is the source's own description")


def reference_failure(row: dict) -> str:
    """Why a layer failed the reference MoE, in words: the error that stopped it, the non-finite
    values it produced, or how far the two sides are apart."""
    if row.get("error"):
        return f"{row['prefix']}: {row['error']}"
    if not (math.isfinite(row["rel"]) and math.isfinite(row["cosine"])):
        return (f"{row['prefix']}: the reference MoE produced non-finite values (NaN or infinity), so "
                "the two sides cannot be compared")
    return f"{row['prefix']}: rel {row['rel']:.3g}, cosine {row['cosine']:.6f}"


def _unreadable_layers(src, block: ConvertedBlock, mismatched: set[str], source_problems) -> dict[str, str]:
    """The layers no comparison may read by the config block's shapes, and why: their converted
    tensors disagree with the block (the layout check said how), or SOURCE's headers do."""
    unread = {prefix: "its converted tensors disagree with the config block (see layout)" for prefix in mismatched}
    for prefix, layer in block.layers.items():
        if prefix not in unread:
            problems = source_problems(src, layer)
            if problems:
                unread[prefix] = "; ".join(problems)
    return unread


def overlaps(device) -> bool:
    """Whether the reference MoE runs beside the bit-exact checks (its math is not on the CPU)."""
    return device.type != "cpu"


def _bit_exact(src, out, block: ConvertedBlock, prefixes, unread: dict[str, str], findings: Findings, exhaustive,
               jobs, report, progress) -> None:
    from .bits import check_layer_bits, check_linear_bits, check_passthrough, restore_torch_threads

    t_bits = time.perf_counter()
    bit_problems = [f"{prefix}: not compared: {why}" for prefix, why in unread.items()]

    def bits(prefix):
        if prefix in unread:
            return []
        return check_layer_bits(src, out, prefix, block.layers[prefix], block, exhaustive=exhaustive)

    # layers are independent; numpy, pread and torch release the GIL
    progress("bit-exact", 0, len(prefixes), "layers")
    try:
        with ThreadPoolExecutor(max(1, jobs), thread_name_prefix="gptq2xpu-bits",
                                initializer=signals_to_the_main_thread) as pool:
            for i, problems in enumerate(mapped(pool, bits, prefixes), 1):
                bit_problems += problems
                progress("bit-exact", i, len(prefixes), "layers")
    finally:
        restore_torch_threads()
    findings.add("bit-exact experts", not bit_problems,
                 "; ".join(bit_problems[:10]) if bit_problems else
                 f"{len(prefixes)} layers: codes, zero points, row order, scales equal the source "
                 f"({'every' if exhaustive else 'sampled'} expert also decoded nibble by nibble)")
    if block.compressed_tensors:
        lin = check_linear_bits(src, out, block)
        findings.add("bit-exact linears", not lin, "; ".join(lin[:10]) if lin else
                     f"{len(block.linears)} linear(s) outside the MoE layers: packed words, zero points, row order, "
                     "scales equal the source")
    pt = check_passthrough(src, out, block)
    findings.add("pass-through tensors", not pt,
                 "; ".join(pt[:10]) if pt else "every other tensor byte-identical to the source")
    report["bit_exact_seconds"] = round(time.perf_counter() - t_bits, 3)


def _numeric_setup(device, dtype, backend, report):
    """(torch device, compute dtype, whether the real kernel runs); usage errors before any work."""
    import torch

    from .device import import_ipex, runtime_info, select_device
    from .xpu_kernels import kernels_status

    import_ipex()
    dev = select_device(device)
    tdtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}.get(dtype)
    if tdtype is None:
        tdtype = torch.float32 if dev.type == "cpu" else torch.bfloat16
    available, why = kernels_status(dev)
    if available and tdtype == torch.float32:
        available, why = False, "the kernel runs bfloat16/float16 activations only (--dtype float32 asked)"
    run_kernel = backend != "reference" and available
    if backend == "xpu-kernels" and not available:
        raise UsageError(f"--backend xpu-kernels: {why}; --backend auto runs the kernel where it can and says "
                         "why it did not")
    report["device"] = runtime_info(dev)
    report["dtype"] = str(tdtype).replace("torch.", "")
    report["backend"] = {"requested": backend, "kernel_ran": run_kernel,
                         "detail": "vllm_xpu_kernels XpuFusedMoe compared with the reference" if run_kernel
                         else f"kernel run skipped: {why}" if backend != "reference"
                         else "reference only (--backend reference)"}
    return dev, tdtype, run_kernel


def _reference_moe(src, out, block: ConvertedBlock, chosen, unread: dict[str, str], setup, tokens, seed, report,
                   progress) -> list[dict]:
    from .device import synchronize
    from .numeric import numeric_layer_safe

    dev, tdtype, run_kernel = setup
    rows = []
    t_num = time.perf_counter()
    progress("reference MoE", 0, len(chosen), "layers")
    for i, prefix in enumerate(chosen):
        synchronize(dev)
        t = time.perf_counter()
        if prefix in unread:
            row = {"prefix": prefix, "ok": False, "error": f"not run: {unread[prefix]}", "rel": float("nan"),
                   "cosine": float("nan"), "max_abs": float("nan")}
        else:
            row = numeric_layer_safe(src, out, prefix, block, dev, tdtype, tokens, seed + i, run_kernel)
        synchronize(dev)
        row["seconds"] = round(time.perf_counter() - t, 4)
        rows.append(row)
        progress("reference MoE", i + 1, len(chosen), "layers")
    report["numeric_seconds"] = round(time.perf_counter() - t_num, 3)
    return rows
