"""The ``gptq2xpu`` quantization method for vLLM: which layer gets which method.

* The routed experts of a converted MoE layer (listed in config.json's ``gptq2xpu`` block, read
  with :func:`gptq2xpu.contract.parse_block`) get :class:`~gptq2xpu.vllm_plugin.moe.ConvertedMoEMethod`.
* MoE layers whose experts the block lists as passed through as float get vLLM's unquantized MoE.
* Routers written as float weights by ``--dequantize-router`` get vLLM's unquantized linear.
* Everything else (dense linears, routers, shared experts, ``lm_head``, layers kept with
  ``--keep-unsupported``) gets what vLLM's own method for the source's quantization description
  (``source_quantization_config``) gives it: the converted checkpoint holds those tensors byte for
  byte, so they load exactly as vLLM loads them from the source.

The block names modules as the checkpoint does; vLLM's models may rename them (e.g. multimodal
wrappers): names go through the model's own mapping, which vLLM hands over in
:meth:`Gptq2XpuConfig.apply_vllm_mapper`.

A config.json that carries an xpu-format block under another ``quant_method`` (a tampered or
hand-edited file) is claimed too, by :meth:`Gptq2XpuConfig.override_quantization_method`, and refused
with one line by :meth:`Gptq2XpuConfig.from_config`: vLLM's own GPTQ MoE method would otherwise take
the stacked tensors (its parameters have the same names) and run them as garbage.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import vllm
from vllm.logger import init_logger
from vllm.model_executor.layers.fused_moe import RoutedExperts, UnquantizedFusedMoEMethod
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization import (
    QUANTIZATION_METHODS,
    get_quantization_config,
    register_quantization_config,
)
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig

from ..contract import (
    CONFIG_BLOCK,
    EXPERT_TENSORS,
    FORMAT_VERSION,
    OUTPUT_XPU,
    W13_QWEIGHT,
    ConvertedBlock,
    expert_tensor,
    parse_block,
)
from ..errors import InputError
from ..serving import QUANT_METHOD, check_vllm_version

logger = init_logger("vllm.gptq2xpu")

#: Passed-through MoE layers whose experts are float tensors (see gptq2xpu.plan).
FLOAT_KINDS = ("float",)


def register_config() -> None:
    register_quantization_config(QUANT_METHOD)(Gptq2XpuConfig)


def base_config(source: dict) -> QuantizationConfig:
    """vLLM's own config for the source's quantization description (what vLLM would use for the source)."""
    if not isinstance(source, dict):
        raise InputError("quantization_config.source_quantization_config: expected an object, "
                         f"found {type(source).__name__}")
    method = str(source.get("quant_method", "gptq")).lower().replace("compressed_tensors", "compressed-tensors")
    known = [m for m in QUANTIZATION_METHODS if m != QUANT_METHOD]
    name = method if method in known else None
    if name is None:  # e.g. "auto-round": ask vLLM's methods which of them claims it, as vLLM does
        for cand in known:
            try:
                name = get_quantization_config(cand).override_quantization_method(dict(source), None)
            except Exception:  # noqa: BLE001 - a method that cannot even look at it does not claim it
                name = None
            if name:
                break
    if not name:
        raise InputError(f"quantization_config.source_quantization_config: quant_method {method!r} is not one "
                         f"this vLLM {vllm.__version__} knows")
    return get_quantization_config(name).from_config(json.loads(json.dumps(source)))


class Gptq2XpuConfig(QuantizationConfig):
    """``quant_method: "gptq2xpu"``: converted MoE layers, and the source's method for the rest."""

    def __init__(self, source: dict):
        self._base = base_config(source)
        self.source = source
        self._block: ConvertedBlock | None = None
        self._mapper = None
        self._index: dict[str, dict] | None = None
        super().__init__()

    # ---------------------------------------------------------------- vLLM's QuantizationConfig API

    @property
    def packed_modules_mapping(self) -> dict:  # models fill it in; the source's method needs it
        return self._base.packed_modules_mapping

    @packed_modules_mapping.setter
    def packed_modules_mapping(self, value: dict) -> None:
        self._base.packed_modules_mapping = value

    @property
    def _ignore_unexpected_suffixes(self):
        return self._base._ignore_unexpected_suffixes

    def __repr__(self) -> str:
        layers = len(self._block.layers) if self._block else "?"
        return f"Gptq2XpuConfig(converted MoE layers={layers}, source={self._base!r})"

    def get_name(self) -> str:
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.float16, torch.bfloat16]  # what the int4 MoE kernels and GPTQ linears run

    @classmethod
    def get_min_capability(cls) -> int:
        return 60  # as vLLM's GPTQ method; XPU and CPU have no capability

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # convert writes the description into config.json

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Gptq2XpuConfig:
        check_vllm_version(vllm.__version__)
        if str(config.get("quant_method", "")).lower() != QUANT_METHOD:  # claimed by override_quantization_method
            raise InputError(f"quantization_config.quant_method {config.get('quant_method')!r}: config.json holds "
                             f"the {CONFIG_BLOCK!r} block of a gptq2xpu conversion, whose quant_method is "
                             f"{QUANT_METHOD!r}; the file was changed: check the folder with `gptq2xpu verify`")
        if config.get("format_version") != FORMAT_VERSION:
            raise InputError(f"quantization_config.format_version {config.get('format_version')!r} is not "
                             f"{FORMAT_VERSION} (written by another gptq2xpu?)")
        return cls(config.get("source_quantization_config"))

    @classmethod
    def override_quantization_method(cls, hf_quant_cfg, user_quant, hf_config=None):
        """Ours: ``quant_method: gptq2xpu``, and any config.json that carries an xpu-format config block
        (another quant_method there would have vLLM's own method load the stacked tensors as garbage;
        :meth:`from_config` refuses it with one line)."""
        if user_quant not in (None, QUANT_METHOD):
            return None
        if str(hf_quant_cfg.get("quant_method", "")).lower() == QUANT_METHOD:
            return QUANT_METHOD
        block = getattr(hf_config, CONFIG_BLOCK, None) if hf_config is not None else None
        return QUANT_METHOD if isinstance(block, dict) and block.get("output_format", OUTPUT_XPU) == OUTPUT_XPU \
            else None

    def get_cache_scale_mapper(self):
        return self._base.get_cache_scale_mapper()

    def get_checkpoint_weight_mapper(self):
        """The source method's mapping, plus: each converted layer's four tensors renamed to where
        vLLM keeps its routed experts' parameters (``<prefix>.experts.routed_experts.w13_qweight``).
        Models whose loader indexes the model's parameters by name (DeepSeek-V2/V3, Kimi-K2) find
        them there; loaders that go module by module hand the name to the experts module, which
        passes it on to :func:`~gptq2xpu.vllm_plugin.moe.route_stacked_tensors`'s loader."""
        from vllm.model_executor.models.utils import WeightsMapper

        from .moe import routed_experts_child

        child = routed_experts_child()
        base = self._base.get_checkpoint_weight_mapper()
        if not child:
            return base
        renames = {f".experts.{n}": f".experts.{child}.{n}" for n in EXPERT_TENSORS}
        return base | WeightsMapper(orig_to_new_suffix=renames)

    def apply_vllm_mapper(self, hf_to_vllm_mapper) -> None:
        self._mapper = hf_to_vllm_mapper
        self._index = None
        self._base.apply_vllm_mapper(hf_to_vllm_mapper)

    def maybe_update_config(self, model_name: str, hf_config=None, revision: str | None = None) -> None:
        self._load_block(hf_config, model_name)
        self._base.maybe_update_config(model_name, hf_config=hf_config, revision=revision)

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        index = self._layers()
        if isinstance(layer, RoutedExperts):
            hf_prefix = index["converted"].get(prefix)
            if hf_prefix is not None:
                from .moe import ConvertedMoEMethod

                return ConvertedMoEMethod(self._block.layers[hf_prefix], self._block, layer.moe_config, prefix)
            from .moe import refuse_stacked_tensors

            listed = list(index["converted"])
            if index["passthrough"].get(prefix) in FLOAT_KINDS:
                return refuse_stacked_tensors(layer, prefix, listed, UnquantizedFusedMoEMethod(layer.moe_config))
            method = self._base.get_quant_method(layer, prefix)
            return method if method is None else refuse_stacked_tensors(layer, prefix, listed, method)
        elif isinstance(layer, LinearBase) and prefix in index["float_linears"]:
            return UnquantizedLinearMethod()
        return self._base.get_quant_method(layer, prefix)

    # ---------------------------------------------------------------- the block, under vLLM's names

    def _load_block(self, hf_config, model_name: str | None) -> None:
        doc = getattr(hf_config, CONFIG_BLOCK, None) if hf_config is not None else None
        if doc is None and model_name and (Path(model_name) / "config.json").is_file():
            doc = json.loads((Path(model_name) / "config.json").read_text(encoding="utf-8")).get(CONFIG_BLOCK)
        if doc is None:
            raise InputError(f"{model_name}: config.json declares quant_method {QUANT_METHOD!r} but has no "
                             f"{CONFIG_BLOCK!r} block describing the converted layers")
        self._block = parse_block(doc)
        self._index = None

    def _layers(self) -> dict[str, dict]:
        if self._block is None:  # maybe_update_config was not called: read the model being built
            from vllm.config import get_current_vllm_config

            mc = get_current_vllm_config().model_config
            self._load_block(getattr(mc, "hf_config", None), getattr(mc, "model", None))
        if self._index is None:
            b = self._block
            self._index = {
                # vLLM's name of a converted layer's experts module -> the block's (checkpoint) prefix
                "converted": {self._module(expert_tensor(p, W13_QWEIGHT)): p for p in b.layers},
                "passthrough": {self._module(expert_tensor(p, W13_QWEIGHT)): k for p, k in b.passthrough.items()},
                "float_linears": {self._module(name) for name in b.dequantized_routers},
            }
        return self._index

    def _module(self, tensor_name: str) -> str | None:
        """vLLM's module name for a checkpoint tensor name (through the model's own mapping)."""
        name = self._mapper.map_name(tensor_name) if self._mapper is not None else tensor_name
        return None if name is None else name.rsplit(".", 1)[0]
