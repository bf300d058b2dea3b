"""The interface every output format implements (see :mod:`gptq2xpu.outputs`)."""

from __future__ import annotations


class OutputFormat:
    """What one ``--format`` writes: its output tensors and its quantization description."""

    name: str = ""
    #: where this format is served, one line (``inspect``, the model card)
    serves: str = ""

    def items(self, ckpt, layers, options, quant):
        """``(output items, source tensors written unchanged, linears written on their own, ignored
        float linears)`` of the plan: :class:`gptq2xpu.plan.model.OutputItem` list, name list,
        ``{module: LinearPlan}``, module list.  Raises InputError for what the format cannot hold."""
        raise NotImplementedError

    def quantization_config(self, plan) -> dict:
        """The ``quantization_config`` written into the output's config.json (and side files)."""
        raise NotImplementedError
