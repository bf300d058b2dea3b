"""Build ``tests/fixtures/ct-pack-quantized``: a tiny Qwen3-MoE-shaped checkpoint compressed by the
REAL compressed-tensors pack-quantized path (the one llm-compressor's ``save_pretrained`` runs).

    python -m venv --system-site-packages /tmp/ctvenv          # reuses the installed torch
    /tmp/ctvenv/bin/pip install compressed-tensors==0.20.0
    /tmp/ctvenv/bin/python scripts/make_ct_fixture.py [OUT]    # default tests/fixtures/ct-pack-quantized

What it does, with compressed-tensors' own code at every step that matters:

1. a torch module tree named like Qwen3-MoE (``model.layers.{L}.mlp.experts.{e}.{gate,up,down}_proj``
   as ``nn.Linear``, the router ``mlp.gate``, norms, embeddings, ``lm_head``), bf16, 2 layers,
   4 experts, hidden 128, moe_intermediate 64 (no attention: kept out to stay small);
2. ``apply_quantization_config`` with a W4A16 scheme (int, 4 bits, symmetric, group 32, targets
   ``Linear``, ignore ``lm_head`` and ``re:.*mlp.gate$``, format ``pack-quantized``);
3. every expert weight is set to ``q * s`` for random int4 values ``q`` in -8..7 and random positive
   bf16 scales ``s`` (one per 32 inputs), and ``weight_scale`` to ``s``;
4. ``ModelCompressor.compress_model`` quantizes and packs every targeted module
   (``PackedQuantizationCompressor.compress`` -> ``quantize`` + ``pack_to_int32``) and drops the
   symmetric zero points; the state dict is saved with ``safetensors.torch.save_file``;
5. ``QuantizationConfig.from_pretrained(model)`` + ``ModelCompressor.update_config`` write the
   ``quantization_config`` block of ``config.json`` exactly as llm-compressor does.

The script checks that the packer reproduced ``q`` (``unpack_from_int32``) and then writes the
ground truth, independently of any packer, to ``ground_truth.safetensors`` (see the README there).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import compressed_tensors
import torch
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
    apply_quantization_config,
)
from safetensors.torch import save_file
from torch import nn

LAYERS, EXPERTS, HIDDEN, INTER, GROUP, VOCAB, TOP_K = 2, 4, 128, 64, 32, 32, 2
ROLES = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


class Expert(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_proj = nn.Linear(HIDDEN, INTER, bias=False)
        self.up_proj = nn.Linear(HIDDEN, INTER, bias=False)
        self.down_proj = nn.Linear(INTER, HIDDEN, bias=False)


class SparseMoe(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(HIDDEN, EXPERTS, bias=False)
        self.experts = nn.ModuleList(Expert() for _ in range(EXPERTS))


class DecoderLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(HIDDEN, eps=1e-6)
        self.post_attention_layernorm = nn.RMSNorm(HIDDEN, eps=1e-6)
        self.mlp = SparseMoe()


class Backbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCAB, HIDDEN)
        self.layers = nn.ModuleList(DecoderLayer() for _ in range(LAYERS))
        self.norm = nn.RMSNorm(HIDDEN, eps=1e-6)


class CausalLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = Backbone()
        self.lm_head = nn.Linear(HIDDEN, VOCAB, bias=False)


def model_config() -> dict:
    return {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
        "hidden_size": HIDDEN, "intermediate_size": 2 * INTER, "moe_intermediate_size": INTER,
        "num_experts": EXPERTS, "num_experts_per_tok": TOP_K, "norm_topk_prob": True,
        "num_hidden_layers": LAYERS, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 64,
        "vocab_size": VOCAB, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "hidden_act": "silu", "decoder_sparse_step": 1, "mlp_only_layers": [], "router_aux_loss_coef": 0.001,
        "output_router_logits": False, "attention_bias": False, "attention_dropout": 0.0,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 0, "eos_token_id": 1,
        "use_cache": True, "transformers_version": "5.24.0",
    }


def pack_hi_lo(values: torch.Tensor) -> torch.Tensor:
    """Ground-truth storage, deliberately unlike any packer under test: int values -8..7 as
    ``value + 8``, two per byte, the EVEN column in the HIGH nibble."""
    u = (values.to(torch.int16) + 8).to(torch.uint8)
    return (u[..., 0::2] << 4) | u[..., 1::2]


def main(out: Path) -> None:
    torch.manual_seed(20240611)
    gen = torch.Generator().manual_seed(7)
    model = CausalLM().to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_((torch.randn(p.shape, generator=gen) * 0.05).to(p.dtype))
        for _, mod in model.named_modules():
            if isinstance(mod, nn.RMSNorm):
                mod.weight.copy_((1 + torch.randn(HIDDEN, generator=gen) * 0.05).to(torch.bfloat16))

    scheme = QuantizationScheme(
        targets=["Linear"],
        weights=QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=GROUP),
    )
    qconfig = QuantizationConfig(config_groups={"group_0": scheme}, format="pack-quantized",
                                 ignore=["lm_head", "re:.*mlp.gate$"])
    apply_quantization_config(model, qconfig, show_progress=False)

    truth: dict[str, torch.Tensor] = {}
    values: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for L in range(LAYERS):
            for role, proj in ROLES.items():
                qs, ss = [], []
                for e in range(EXPERTS):
                    mod = getattr(model.model.layers[L].mlp.experts[e], proj)
                    out_f, in_f = mod.weight.shape
                    q = torch.randint(-8, 8, (out_f, in_f), generator=gen, dtype=torch.int8)
                    q[0, :16] = torch.arange(-8, 8, dtype=torch.int8)  # every value occurs
                    logs = torch.empty(out_f, in_f // GROUP).uniform_(math.log(2**-9), math.log(2**-5), generator=gen)
                    s = logs.exp().to(torch.bfloat16)
                    mod.weight.copy_((q.float() * s.float().repeat_interleave(GROUP, 1)).to(torch.bfloat16))
                    mod.weight_scale.copy_(s)
                    qs.append(q)
                    ss.append(s)
                    values[f"model.layers.{L}.mlp.experts.{e}.{proj}"] = q
                truth[f"layers.{L}.{role}.codes_hi_lo"] = pack_hi_lo(torch.stack(qs)).contiguous()
                truth[f"layers.{L}.{role}.scales"] = torch.stack(ss).contiguous()

    # the real compression path, as save_pretrained runs it
    ModelCompressor(quantization_config=qconfig).compress_model(model)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}

    for module, q in values.items():
        packed = state[f"{module}.weight_packed"]
        assert packed.dtype == torch.int32 and packed.shape == (q.shape[0], q.shape[1] // 8), module
        assert torch.equal(packed, pack_to_int32(q, 4)), module
        assert torch.equal(unpack_from_int32(packed, 4, torch.Size(q.shape)), q), module
        assert state[f"{module}.weight_shape"].tolist() == list(q.shape)
        assert f"{module}.weight_zero_point" not in state  # symmetric: dropped by the compressor
    assert "model.layers.0.mlp.gate.weight" in state and state["lm_head.weight"].dtype == torch.bfloat16

    out.mkdir(parents=True, exist_ok=True)
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    save_file(truth, out / "ground_truth.safetensors",
              metadata={"format": "gptq2xpu-ground-truth",
                        "codes": "value+8, two per byte, even column in the high nibble"})
    (out / "config.json").write_text(json.dumps(model_config(), indent=2, sort_keys=True) + "\n")
    saved = QuantizationConfig.from_pretrained(model, format="pack-quantized")
    ModelCompressor(quantization_config=saved).update_config(str(out))
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors" and cfg["format"] == "pack-quantized", cfg
    print(f"compressed-tensors {compressed_tensors.__version__}, torch {torch.__version__}: wrote {out}")
    for p in sorted(out.iterdir()):
        print(f"  {p.name}: {p.stat().st_size} bytes")


if __name__ == "__main__":
    default = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "ct-pack-quantized"
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else default)
