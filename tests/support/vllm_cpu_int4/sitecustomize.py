"""Put this folder on ``PYTHONPATH`` with ``GPTQ2XPU_TEST_CPU_INT4_WITHOUT_AMX=1`` to let vLLM's CPU
int4 MoE kernel (``CPUExpertsInt4``) run on an x86 CPU without AMX tiles, in every process vLLM
starts (its engine core and tensor-parallel workers are new Python processes).

vLLM offers that kernel only where ``torch.cpu._is_amx_tile_supported()``; its int4 kernel also
runs on AVX-512 (measured on an AMD EPYC with AVX-512 VNNI/BF16), and without it vLLM has no int4
MoE backend on such a CPU at all.  Only that device check is lifted, the moment vLLM's module is
imported, and for every model of the run alike (a GPTQ source and its conversion run the same
kernel).  Nothing happens without the variable, or on a CPU with AMX.
"""

import importlib.abc
import importlib.util
import os
import sys

ENV = "GPTQ2XPU_TEST_CPU_INT4_WITHOUT_AMX"
TARGET = "vllm.model_executor.layers.fused_moe.experts.cpu_moe"


class _LiftAmxCheck(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):  # noqa: ARG002 - the finder protocol
        if name != TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            import torch

            if not torch.cpu._is_amx_tile_supported():
                module.CPUExpertsInt4._supports_current_device = staticmethod(lambda: True)

        spec.loader.exec_module = exec_module
        return spec


if os.environ.get(ENV) == "1":
    sys.meta_path.insert(0, _LiftAmxCheck())
