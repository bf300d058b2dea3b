"""The plugin's tensor-parallel slices equal the rank folders ``convert --emit-ranks`` writes.

The contract's slices (``LayerGeometry.rank_slices``) applied twice: by the converter
(``write.ranks.write_ranks``, numpy, written to ``tp-ranks/``) and by the plugin
(``gptq2xpu.vllm_plugin.slices``, torch, what each vLLM rank loads).  The slices themselves are
checked against hand-written ones in ``test_tp_and_load.py`` and ``test_contract.py``.  Regrouped
(w2 groups shrunk for the ranks) and zero-padded (N padded to P) conversions, every rank, all four
tensors.  No vLLM needed.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from support.planting import convert

from gptq2xpu.contract import CONFIG_BLOCK, EXPERT_TENSORS, parse_block, rank_folder
from gptq2xpu.vllm_plugin.slices import copy_rank_slice, rank_shape


def _tensor(folder, name):
    index = folder / "model.safetensors.index.json"
    shard = json.loads(index.read_text())["weight_map"][name] if index.exists() else "model.safetensors"
    with safe_open(folder / shard, "pt") as fh:
        return fh.get_tensor(name)


@pytest.mark.parametrize("tp,n,group,padded", [
    (2, 384, 128, 384),   # regroup: 192 per rank, w2 groups of 64
    (4, 192, 64, 256),    # pad: 48 per rank fits no group; N padded to 256 (64 per rank)
    (3, 96, 32, 96),      # 32 per rank: as-is
])
def test_rank_slices_equal_the_emitted_rank_folders(synth, tmp_path, tp, n, group, padded):
    info = synth(family="qwen3_moe", hidden=256, moe_intermediate=n, num_experts=4, group_size=group,
                 num_layers=1, attention=False, vocab=32)
    out = tmp_path / "out"
    convert(info.path, out, "--tp-size", str(tp), "--emit-ranks")
    block = parse_block(json.loads((out / "config.json").read_text())[CONFIG_BLOCK])
    entry = block.layers["model.layers.0.mlp"]
    assert entry.padded_intermediate_size == padded
    for name in EXPERT_TENSORS:
        full = _tensor(out, entry.tensor(name))
        seen = []
        for r in range(tp):
            want = _tensor(out / rank_folder(r, tp), entry.tensor(name))
            got = torch.empty(rank_shape(entry, name, tp), dtype=full.dtype)
            copy_rank_slice(entry, name, full, got, r, tp)
            assert torch.equal(got, want), (name, r)
            seen.append(got)
        assert not all(torch.equal(seen[0], s) for s in seen[1:]), name  # the ranks' slices differ


def test_a_wrong_slice_is_noticed(synth, tmp_path):
    """The comparison has teeth: rank 1's slice is not rank 0's, and up rows are not gate rows."""
    info = synth(family="qwen3_moe", hidden=256, moe_intermediate=384, num_experts=4, group_size=128,
                 num_layers=1, attention=False, vocab=32)
    out = tmp_path / "out"
    convert(info.path, out, "--tp-size", "2", "--emit-ranks")
    entry = parse_block(json.loads((out / "config.json").read_text())[CONFIG_BLOCK]).layers["model.layers.0.mlp"]
    full = _tensor(out, entry.tensor("w13_qweight"))
    want = _tensor(out / rank_folder(1, 2), entry.tensor("w13_qweight"))
    got = torch.empty(rank_shape(entry, "w13_qweight", 2), dtype=full.dtype)
    copy_rank_slice(entry, "w13_qweight", full, got, 0, 2)
    assert not torch.equal(got, want)
    copy_rank_slice(entry, "w13_qweight", full, got, 1, 2)
    got[:, 192:] = got[:, :192].clone()  # up rows replaced by gate rows
    assert not torch.equal(got, want)
