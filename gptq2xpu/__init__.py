"""gptq2xpu: convert GPTQ int4 Mixture-of-Experts checkpoints to the Intel XPU fused-MoE layout.

Data flows one way, and the package layout shows it (read -> plan -> repack -> write -> verify ->
serve)::

    contract       the converted checkpoint's names and config-block schema, shared by both sides
    read/          resolve a folder or hub repo id; untrusted paths, headers, index, configs
    naming         which tensor is what (experts, routers, shared experts, float experts)
    formats/       one module per on-disk quantization format (GPTQ, compressed-tensors)
    plan/          the whole conversion decided from headers alone (what ``inspect`` prints)
    audit          what only the data can tell (zero points, row order, finite scales)
    repack         the one place that builds XPU bytes and scales
    write/         shards streamed at planned offsets, documents, atomic publishing, split runs
    verify/        standalone checks, bit-exact and numerical checks against the source (own unpack)
    serving        what a converted checkpoint declares for serving (quantization_config, model card)
    vllm_plugin/   the vLLM quantization method that serves converted checkpoints
    load           a lazy loader for runtimes; xpu_handover: how int4 experts reach XpuFusedMoe
    cli/           thin typer commands over the above
    testing/       synthetic checkpoints with ground truth (tests, the demo, benchmarks)

torch is optional (``pip install -e '.[torch]'``, see :mod:`gptq2xpu.optional_torch`): only
``verify --source``, ``demo``, ``load`` and the vLLM plugin import it; ``convert``, ``inspect``,
``finalize`` and a standalone ``verify`` run on numpy alone.
"""

__version__ = "0.1.0"
