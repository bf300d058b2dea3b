"""What the tests share, as one package (``tests/`` is on ``sys.path`` under pytest; imported as
``support.<module>``):

* :mod:`.helpers` -- the CLI in-process and as a subprocess, the fixture paths, raw safetensors edits;
* :mod:`.planting` -- defects planted in converted outputs, for the verifier to catch;
* :mod:`.hostile` -- hostile folders and files (links, FIFOs, lying headers, the pickle trap);
* :mod:`.hubserver` -- a local look-alike of the Hugging Face hub on 127.0.0.1, with opt-in misbehaviours;
* :mod:`.int4` -- independent int4 packers and decoders (plain numpy loops);
* :mod:`.xpu_decode` -- a test-local decoder of converted outputs;
* :mod:`.released_kernel` -- the released vllm-xpu-kernels Python on CPU, its native operations emulated;
* :mod:`.vllm_engine` and ``vllm_runner.py`` -- vLLM engines in subprocesses, prompt logprobs and their comparison;
* :mod:`.ct` -- compressed-tensors outputs edited and regrouped by hand;
* :mod:`.vllm_layer` -- each supported vLLM release's MoE layer in its own process;
* ``vllm_cpu_int4/`` -- a ``sitecustomize`` that lets vLLM's CPU int4 MoE kernel run without AMX.
"""
