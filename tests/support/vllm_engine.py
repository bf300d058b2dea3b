"""Helpers of the vLLM tests (``tests/test_vllm_serving.py``): references, planted defects, the
logprob comparison, and running ``tests/support/vllm_runner.py``.

Independent of the converter and of the plugin: GPTQ tensors are dequantized here with the GPTQ
formula (zero points and ``g_idx`` honoured) in torch, and defects are planted by editing the
converted tensors with safetensors.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
RUNNER = HERE / "vllm_runner.py"
#: vLLM's CPU int4 MoE kernel (``CPUExpertsInt4``) allowed on an x86 CPU without AMX tiles, in every
#: process vLLM starts (``tests/support/vllm_cpu_int4/sitecustomize.py``): vLLM offers it only with AMX, and
#: without it has no int4 MoE backend on such a CPU at all, for a GPTQ source or a conversion alike.
#: Every engine of a comparison runs with it, so both sides run the same kernel; on a CPU with AMX
#: it changes nothing.
CPU_INT4_ENV = {"GPTQ2XPU_TEST_CPU_INT4_WITHOUT_AMX": "1",
                "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE / "vllm_cpu_int4"),
                                                            os.environ.get("PYTHONPATH")]))}
#: What ``SOURCE`` folders may hold besides the model: the AutoRound fixture's test data.
NOT_MODEL = ("reference.safetensors",)
_EXPERT_QWEIGHT = re.compile(r"^(?P<module>.+\.experts\.\d+\.[^.]+)\.qweight$")


# ------------------------------------------------------------------------------ checkpoints


def copy_model(src: Path, dst: Path) -> Path:
    """``src`` without files that are not part of the model (vLLM loads every *.safetensors)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*NOT_MODEL))
    return dst


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as fh:
            for name in fh.keys():  # noqa: SIM118 (safe_open has keys() but is not iterable)
                out[name] = fh.get_tensor(name)
    return out


def _save(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    """One ``model.safetensors`` (these test models are small); drops any index."""
    for f in folder.glob("*.safetensors"):
        f.unlink()
    (folder / "model.safetensors.index.json").unlink(missing_ok=True)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def gptq_dequantize(qweight, scales, qzeros, g_idx, *, v1: bool) -> torch.Tensor:
    """A 4-bit GPTQ linear as float32 ``[out, in]``: ``(q - zero) * scale`` with its group's values."""
    rows, n = qweight.shape
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    q = ((qweight.unsqueeze(1) >> shifts.view(1, 8, 1)) & 0xF).reshape(rows * 8, n)
    z = ((qzeros.unsqueeze(2) >> shifts.view(1, 1, 8)) & 0xF).reshape(qzeros.shape[0], n) + (1 if v1 else 0)
    g = g_idx.long() if g_idx is not None else torch.arange(rows * 8) // (rows * 8 // scales.shape[0])
    return ((q.float() - z[g].float()) * scales[g].float()).T.contiguous()


def float_experts_reference(src: Path, dst: Path, dtype=torch.bfloat16) -> Path:
    """The source with its routed experts dequantized to ``dtype``; everything else unchanged.

    The experts' values are the GPTQ formula's, rounded once.  The quantization config gets a
    ``dynamic`` rule excluding every routed-experts module (vLLM names them ``<layer>.experts``),
    so vLLM loads those float experts unquantized and every other layer exactly as from the source;
    where nothing else is quantized, the config goes and the reference is a plain float checkpoint.
    """
    copy_model(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    qc = cfg["quantization_config"]
    v1 = str(qc.get("checkpoint_format", "gptq")) == "gptq"
    tensors = _tensors(dst)
    for name in [n for n in tensors if _EXPERT_QWEIGHT.match(n)]:
        m = _EXPERT_QWEIGHT.match(name)["module"]
        w = gptq_dequantize(tensors.pop(f"{m}.qweight"), tensors.pop(f"{m}.scales"), tensors.pop(f"{m}.qzeros"),
                            tensors.pop(f"{m}.g_idx", None), v1=v1)
        tensors[f"{m}.weight"] = w.to(dtype)
    _save(dst, tensors)
    if any(n.endswith(".qweight") for n in tensors):
        qc["dynamic"] = {r"-:.*\.experts$": {}, **(qc.get("dynamic") or {})}
    else:  # nothing else was quantized: a plain float checkpoint
        del cfg["quantization_config"]
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst


def vllm_loadable_source(src: Path, dst: Path, float_moe_layers=()) -> Path:
    """The source as vLLM's GPTQ path can load it: MoE layers whose experts are float get a rule
    in vLLM's naming (``<layer>.experts``; GPTQModel rules name the per-expert modules instead)."""
    copy_model(src, dst)
    if float_moe_layers:
        cfg = json.loads((dst / "config.json").read_text())
        qc = cfg["quantization_config"]
        rules = {f"-:{re.escape(p)}\\.experts$": {} for p in float_moe_layers}
        qc["dynamic"] = {**rules, **(qc.get("dynamic") or {})}
        (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return dst


DEFECTS = ("gate_up_swapped", "scales_doubled", "inputs_swapped")


def plant_defect(out: Path, kind: str, prefix: str, expert: int) -> None:
    """One defect in one expert of a converted checkpoint, as a buggy converter would write it."""
    tensors = _tensors(out)
    w13, s13 = f"{prefix}.experts.w13_qweight", f"{prefix}.experts.w13_scales"
    block = json.loads((out / "config.json").read_text())["gptq2xpu"]["layers"][prefix]
    n, p = block["intermediate_size"], block["padded_intermediate_size"]
    if kind == "gate_up_swapped":  # gate rows and up rows exchanged, with their scales
        for name in (w13, s13):
            t = tensors[name].clone()
            t[expert, :n], t[expert, p : p + n] = tensors[name][expert, p : p + n], tensors[name][expert, :n]
            tensors[name] = t
    elif kind == "scales_doubled":  # every scale of the expert, w13 and w2
        for name in (s13, f"{prefix}.experts.w2_scales"):
            t = tensors[name].clone()
            t[expert] *= 2
            tensors[name] = t
    elif kind == "inputs_swapped":  # inputs 0 and 1 of w13 (the two nibbles of byte 0 of every row)
        t = tensors[w13].clone()
        b = t[expert, :, 0]
        t[expert, :, 0] = (b >> 4) | (b << 4)
        tensors[w13] = t
    else:  # pragma: no cover
        raise ValueError(kind)
    _save(out, tensors)


# ------------------------------------------------------------------------------ logprobs


def prompts(vocab: int, seed: int = 12, lengths=(12, 10, 14, 8)) -> list[list[int]]:
    """Seeded token prompts (ids 3.. avoid the synthetic tokenizers' specials)."""
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, size=n).tolist() for n in lengths]


def position_diffs(a, b) -> list[float]:
    """Per prompt position: the largest |logprob difference| over every token in either side's top
    20.  A token in one side's top 20 only counts with the least difference it can have: its
    distance above the other side's 20th logprob."""
    out = []
    for pa, pb in zip(a, b, strict=True):
        for xa, xb in zip(pa, pb, strict=True):
            if xa is None or xb is None:
                assert xa is None and xb is None
                continue
            floor_a, floor_b = min(xa.values()), min(xb.values())
            worst = 0.0
            for tok in set(xa) | set(xb):
                if tok in xa and tok in xb:
                    d = abs(xa[tok] - xb[tok])
                elif tok in xa:
                    d = max(0.0, xa[tok] - floor_b)
                else:
                    d = max(0.0, xb[tok] - floor_a)
                worst = max(worst, d)
            out.append(worst)
    return out


def logprob_diff(a, b) -> float:
    """The largest difference at any position (see :func:`position_diffs`)."""
    return max(position_diffs(a, b))


def median_position_diff(a, b) -> float:
    return float(np.median(position_diffs(a, b)))


# ------------------------------------------------------------------------------ the runner


def run_vllm(jobs: list[dict], prompt_ids, workdir: Path, *, env: dict | None = None,
             timeout: float | None = None) -> tuple[dict, str]:
    """Run ``jobs`` in one ``vllm_runner.py`` process: ``({job name: result}, vLLM's log)``.  A job
    missing from the results (the process died) gets the exit status and the log's tail as its error.

    The timeout only guards against a hang: by default 15 minutes and 2 more per job (the largest
    call starts about 40 engines, one after another), so a slow or loaded machine never meets it."""
    timeout = 900 + 120 * len(jobs) if timeout is None else timeout
    workdir.mkdir(parents=True, exist_ok=True)
    spec, results = workdir / "jobs.json", workdir / "results.json"
    spec.write_text(json.dumps({"prompts": prompt_ids, "jobs": jobs}))
    results.unlink(missing_ok=True)
    penv = {**os.environ, "VLLM_ALLOW_INSECURE_SERIALIZATION": "1", "TOKENIZERS_PARALLELISM": "false",
            **(env or {})}
    with open(workdir / "runner.log", "w") as log:
        proc = subprocess.run([sys.executable, str(RUNNER), str(spec), str(results)], env=penv, stdout=log,
                              stderr=subprocess.STDOUT, timeout=timeout)
    text = (workdir / "runner.log").read_text(errors="replace")
    out = json.loads(results.read_text()) if results.exists() else {}
    for job in jobs:
        out.setdefault(job["name"], {"error": f"runner exited {proc.returncode} before this job finished",
                                     "traceback": text[-3000:]})
    return out, text
