"""``verify`` as a library call: standalone checks, then (with a source) bit-exact and numerical.

>>> from gptq2xpu.verify.runner import verify
>>> report = verify("qwen3-xpu", source="Qwen/Qwen3-30B-A3B-GPTQ-Int4")   # doctest: +SKIP
>>> report["status"]                                                       # doctest: +SKIP
'pass'
"""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..errors import InputError, UsageError
from .standalone import Findings, check_manifest, check_output_folder, verify_standalone


def select_layers(prefixes: list[str], spec: str | None) -> list[str]:
    """``None``/"all" -> all; "0,3,10-12" -> by index (negative counts from the end); "sample:N"."""
    if not spec or spec == "all":
        return list(prefixes)
    m = re.fullmatch(r"sample:(\d+)", spec)
    if m:
        from .bits import sample_experts

        return [prefixes[i] for i in sample_experts(len(prefixes), max(1, int(m[1])))]
    chosen = []
    for part in spec.split(","):
        part = part.strip()
        try:
            if re.fullmatch(r"-?\d+", part):
                chosen.append(prefixes[int(part)])
            elif re.fullmatch(r"\d+-\d+", part):
                a, b = map(int, part.split("-"))
                chosen.extend(prefixes[a : b + 1])
            elif part in prefixes:
                chosen.append(part)
            else:
                raise ValueError
        except (ValueError, IndexError):
            raise UsageError(f"--layers {spec!r}: {part!r} is not a layer index (0..{len(prefixes) - 1}), range or prefix") from None
    return list(dict.fromkeys(chosen))


def verify(output, source=None, *, revision=None, token=None, device: str = "auto", dtype: str = "auto",
           backend: str = "auto", layers: str | None = None, tokens: int = 64, seed: int = 0,
           numeric: bool = True, exhaustive: bool = False, jobs: int | None = None) -> dict:
    t0 = time.perf_counter()
    if not jobs:
        from ..parallel import default_jobs

        jobs = default_jobs()
    if backend not in ("auto", "reference", "xpu-kernels"):
        raise UsageError(f"--backend {backend!r}: choose auto, reference or xpu-kernels")
    if dtype not in ("auto", "bfloat16", "float16", "float32"):
        raise UsageError(f"--dtype {dtype!r}: choose bfloat16, float16 or float32")
    folder = Path(output)
    check_output_folder(folder)
    findings = Findings()
    manifest = Findings()
    report: dict = {"output": str(output), "source": str(source) if source else None}
    layer_rows: list[dict] = []
    if source is not None:  # torch (a second or two of CPU to import) loads beside the standalone checks
        from .bits import _import_torch_in_background

        _import_torch_in_background()
    # hashing every file is one long serial read per file: overlap it with everything else
    with ThreadPoolExecutor(1, thread_name_prefix="gptq2xpu-hash") as bg:
        hashing = bg.submit(check_manifest, folder, manifest, max(1, jobs - 1))
        out, block = verify_standalone(folder, findings, jobs, skip_manifest=True)
        try:
            if source is not None and out is not None:
                layer_rows = _against_source(out, block, source, findings, revision=revision, token=token, device=device,
                                             dtype=dtype, backend=backend, layers=layers, tokens=tokens, seed=seed,
                                             numeric=numeric, exhaustive=exhaustive, report=report, jobs=jobs)
        finally:
            if out is not None:
                out.close()
            hashing.result()
    findings.checks[:0] = manifest.checks
    report.update(
        status="pass" if findings.ok else "fail",
        checks=findings.checks,
        layers=layer_rows,
        failures=findings.failures,
        seconds=round(time.perf_counter() - t0, 3),
    )
    return report


def _against_source(out, block, source, findings: Findings, *, revision, token, device, dtype, backend, layers,
                    tokens, seed, numeric, exhaustive, report, jobs) -> list[dict]:
    from ..read import open_source
    from .bits import check_layer_bits, check_passthrough, restore_torch_threads

    rows: list[dict] = []
    prefixes = list(block.get("layers", {}))
    chosen = select_layers(prefixes, layers)
    with open_source(source, revision=revision, token=token) as src:
        fp = (block.get("source") or {}).get("fingerprint")
        if isinstance(fp, str) and fp and fp != src.fingerprint():
            raise InputError(f"{source}: SOURCE is not the checkpoint {out.root} was made from (its headers differ "
                             f"from the fingerprint recorded at conversion, {fp[:23]}...)")
        t_bits = time.perf_counter()
        bit_problems = []

        def bits(prefix):
            return check_layer_bits(src, out, prefix, block["layers"][prefix], block, exhaustive=exhaustive)

        # layers are independent; numpy, pread and torch release the GIL
        try:
            with ThreadPoolExecutor(max(1, jobs)) as pool:
                for problems in pool.map(bits, prefixes):
                    bit_problems += problems
        finally:
            restore_torch_threads()
        findings.add("bit-exact experts", not bit_problems,
                     "; ".join(bit_problems[:10]) if bit_problems else
                     f"{len(prefixes)} layers: codes, zero points, row order, scales equal the source "
                     f"({'every' if exhaustive else 'sampled'} expert also decoded nibble by nibble)")
        pt = check_passthrough(src, out, block)
        findings.add("pass-through tensors", not pt, "; ".join(pt[:10]) if pt else "every other tensor byte-identical to the source")
        report["bit_exact_seconds"] = round(time.perf_counter() - t_bits, 3)
        if not numeric:
            report["numeric"] = "skipped (--no-numeric)"
            return rows
        import torch

        from .device import import_ipex, runtime_info, select_device, synchronize
        from .numeric import numeric_layer_safe
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
            raise UsageError(f"--backend xpu-kernels: {why}")
        report["device"] = runtime_info(dev)
        report["dtype"] = str(tdtype).replace("torch.", "")
        report["backend"] = {"requested": backend, "kernel_ran": run_kernel,
                             "detail": "vllm_xpu_kernels XpuFusedMoe compared with the reference" if run_kernel
                             else f"kernel run skipped: {why}" if backend != "reference" else "reference only (--backend reference)"}
        t_num = time.perf_counter()
        for i, prefix in enumerate(chosen):
            synchronize(dev)
            t = time.perf_counter()
            row = numeric_layer_safe(src, out, prefix, block, dev, tdtype, tokens, seed + i, run_kernel)
            synchronize(dev)
            row["seconds"] = round(time.perf_counter() - t, 4)
            rows.append(row)
        bad = [r for r in rows if not r["ok"]]
        findings.add("reference MoE", not bad,
                     "; ".join(f"{r['prefix']}: rel {r['rel']:.3g}, cosine {r['cosine']:.6f}" for r in bad[:5]) if bad else
                     f"{len(rows)} layer(s) within {report['dtype']} tolerance on {dev.type}")
        report["numeric_seconds"] = round(time.perf_counter() - t_num, 3)
    return rows
