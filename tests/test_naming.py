"""``gptq2xpu.naming`` on names written out here: what is an expert, a router, a shared expert;
the family label; the routing read from configs; the natural order of names."""

from __future__ import annotations

import pytest

from gptq2xpu.errors import InputError
from gptq2xpu.naming import PROJECTION_ROLES, RoutingParams, classify, detect_family, natural_key, routing_params


def test_natural_key_orders_numbers_by_value():
    names = ["layers.10.mlp", "layers.2.mlp", "layers.02.x", "layers.1.mlp", "layers.9" + "0" * 30]
    assert sorted(names, key=natural_key) == ["layers.1.mlp", "layers.2.mlp", "layers.02.x", "layers.10.mlp",
                                              "layers.9" + "0" * 30]
    assert natural_key("a5000b") > natural_key("a999b")


def test_classify_sorts_experts_routers_and_shared_experts():
    names = [
        "model.layers.0.mlp.experts.1.down_proj.qweight",
        "model.layers.0.mlp.experts.0.gate_proj.qweight",
        "model.layers.0.mlp.experts.0.gate_proj.scales",
        "model.layers.0.mlp.gate.weight",
        "model.layers.0.mlp.shared_expert.up_proj.qweight",
        "model.layers.0.mlp.shared_expert_gate.weight",
        "model.layers.1.block_sparse_moe.experts.0.w1.qweight",
        "model.layers.1.block_sparse_moe.gate.weight",
        "model.layers.2.mlp.gate_proj.weight",                  # a dense layer: no experts
        "model.layers.3.mlp.experts.gate_up_proj",              # transformers' fused float experts
        "model.layers.3.mlp.experts.down_proj",
        "model.embed_tokens.weight",
    ]
    tm = classify(names)
    assert list(tm.moe) == ["model.layers.0.mlp", "model.layers.1.block_sparse_moe", "model.layers.3.mlp"]
    g0 = tm.moe["model.layers.0.mlp"]
    assert g0.experts == {0: {"gate_proj": {"qweight": names[1], "scales": names[2]}},
                          1: {"down_proj": {"qweight": names[0]}}}
    assert g0.names == names[:3] and g0.fused == {}
    assert tm.moe["model.layers.1.block_sparse_moe"].experts == {0: {"w1": {"qweight": names[6]}}}
    assert tm.moe["model.layers.3.mlp"].fused == {"gate_up_proj": names[9], "down_proj": names[10]}
    assert tm.routers == {"model.layers.0.mlp": [names[3]], "model.layers.1.block_sparse_moe": [names[7]]}
    assert tm.shared == {"model.layers.0.mlp": [names[4], names[5]]}


def test_classify_refuses_an_expert_number_written_two_ways():
    names = ["m.experts.1.w1.qweight", "m.experts.01.w1.qweight"]
    with pytest.raises(InputError, match=r"both hold expert 1 of 'm'"):
        classify(names)
    with pytest.raises(InputError, match=r"expert number '٣' is not written as a plain decimal"):
        classify(["m.experts.٣.w1.qweight"])
    long = classify(["m.experts.1234567890.w1.qweight"])   # more digits than any real model
    assert long.moe["m"].bad_indices == ["1234567890"] and long.moe["m"].experts == {}


def test_projection_roles():
    assert {p: r for p, r in PROJECTION_ROLES.items() if r == "gate"} == {"gate_proj": "gate", "w1": "gate"}
    assert PROJECTION_ROLES["w3"] == "up" and PROJECTION_ROLES["w2"] == "down"


def test_detect_family():
    assert detect_family({"model_type": "qwen3_moe"}, []) == "qwen3_moe"
    assert detect_family({"model_type": "kimi_k2"}, []) == "deepseek_v3"
    assert detect_family({"model_type": "wrapper", "text_config": {"model_type": "qwen3_5_moe_text",
                                                                   "hidden_size": 8}}, []) == "qwen3_5_moe"
    assert detect_family({}, ["a.block_sparse_moe.experts.0.w1.weight"]) == "mixtral"
    assert detect_family({}, ["a.shared_experts.x", "a.experts.0.w1.weight"]) == "deepseek-like"
    assert detect_family({}, ["a.experts.0.w1.weight"]) == "generic-moe"
    assert detect_family({}, ["a.b"]) == "unknown"


def test_routing_params():
    assert routing_params({"num_experts_per_tok": 8}, "qwen3_moe", 128) == RoutingParams(8, "softmax", True, 1.0)
    assert routing_params({"num_experts_per_tok": 8}, "qwen2_moe", 60) == RoutingParams(8, "softmax", False, 1.0)
    assert routing_params({"num_experts_per_tok": 8, "routed_scaling_factor": 2.5}, "deepseek_v3", 256) == \
        RoutingParams(8, "sigmoid", True, 2.5)
    assert routing_params({"routed_scaling_factor": 2.5}, "qwen3_moe", 4).routed_scaling_factor == 1.0
    assert routing_params({}, "mixtral", 8).top_k == 2                  # no key: 2
    assert routing_params({"num_experts_per_tok": 8}, "mixtral", 4).top_k == 4   # never more than the experts
    assert routing_params({"num_experts_per_tok": 8}, "mixtral", 4).to_dict() == dict(
        top_k=4, scoring="softmax", renormalize=True, routed_scaling_factor=1.0)


@pytest.mark.parametrize("config,message", [
    ({"num_experts_per_tok": -1}, "num_experts_per_tok must be a positive integer, found -1"),
    ({"num_experts_per_tok": 2.0}, "num_experts_per_tok must be a positive integer, found 2.0"),
    ({"scoring_func": "relu"}, "scoring_func 'relu' is not softmax or sigmoid"),
    ({"norm_topk_prob": "yes"}, "norm_topk_prob must be true or false, found 'yes'"),
    ({"routed_scaling_factor": 0}, "routed_scaling_factor must be a positive number, found 0"),
])
def test_routing_params_refuses(config, message):
    with pytest.raises(InputError) as exc:
        routing_params(config, "deepseek_v3", 8)
    assert str(exc.value) == f"config.json: {message}"
