"""gptq2xpu: convert GPTQ int4 Mixture-of-Experts checkpoints to the Intel XPU fused-MoE layout.

Data flows one way, and the package layout shows it::

    source/    resolve a folder or Hugging Face repo id; validate safetensors headers, index, configs
    naming     which tensor is what (experts, routers, shared experts, float experts)
    formats/   one module per on-disk quantization format (GPTQ, compressed-tensors)
    plan       the whole conversion decided from headers alone (what ``inspect`` prints)
    repack     the one place that builds XPU bytes and scales
    writer     streams planned tensors into shards atomically; index, config block, manifest
    verify/    standalone checks, independent unpack path, reference MoE, device dispatch
    load       a lazy loader for runtimes
    xpu_handover  how ``load`` and ``verify`` hand int4 experts to ``XpuFusedMoe``
    cli/       thin typer commands over the above

Only ``verify`` and ``load`` import torch; ``convert`` and ``inspect`` run on numpy alone.
"""

__version__ = "0.1.0"

#: Name of the block gptq2xpu adds to the output ``config.json``.
CONFIG_BLOCK = "gptq2xpu"
#: Name of the manifest file listing every written file with its size and sha256.
MANIFEST_NAME = "gptq2xpu-manifest.json"
#: Version of the converted on-disk format described by the config block.
FORMAT_VERSION = 1
