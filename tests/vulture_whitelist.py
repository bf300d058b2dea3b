"""Names vulture cannot see being used: a framework, a plugin system, the import system or code
outside the scanned paths reads them.  vulture reads this file with the code (pyproject.toml,
``[tool.vulture]``); nothing imports or runs it.  Every entry says who uses the name."""

from unittest.mock import Mock

_ = Mock()

_used_outside_the_scanned_code = (
    # gptq2xpu/cli/__init__.py: typer calls the app's callback (the root options) on every command
    _._root,
    # gptq2xpu/load.py: public API; the README's loader example, which tests/test_released_kernel.py
    # runs, calls it
    _.iter_layers,
    # gptq2xpu/vllm_plugin/__init__.py: the vllm.general_plugins entry point (pyproject.toml)
    _.register,
    # gptq2xpu/vllm_plugin/config.py: vLLM's QuantizationConfig interface
    _.get_name,
    _.get_supported_act_dtypes,
    _.get_min_capability,
    _.get_config_filenames,
    # gptq2xpu/vllm_plugin/moe.py: attributes vLLM's fused-MoE layer reads from its quant method and
    # its moe config, and create_weights' keyword arguments (vLLM's signature)
    _.use_marlin,
    _.experts_cls,
    _.intermediate_size_per_partition_unpadded,
    _.extra_weight_attrs,
    # scripts/make_ct_fixture.py: torch.nn submodules, found by named_modules()/state_dict()
    _.gate_proj,
    _.up_proj,
    _.down_proj,
    _.input_layernorm,
    _.post_attention_layernorm,
    _.embed_tokens,
    _.lm_head,
    # tests/support/hubserver.py: http.server's request handler and server interface
    _.daemon_threads,
    _.protocol_version,
    _.log_message,
    _.do_HEAD,
    _.do_GET,
    _.close_connection,
    # tests/support/released_kernel.py: the import system finds a package's modules through __path__
    _.__path__,
    # gptq2xpu/read/regex.py: options google-re2 reads
    _.max_mem,
    _.log_errors,
    # tests/conftest.py: pytest hooks; tests/test_vllm_serving.py: pytest reads pytestmark
    _.pytest_runtest_logreport,
    _.pytest_sessionfinish,
    _.pytest_terminal_summary,
    _.pytestmark,
    _._supports_current_device,  # tests/support/vllm_cpu_int4/sitecustomize.py: replaces vLLM's own method
    # gptq2xpu/vllm_plugin/xpu_experts.py: an object's class is changed by assigning it
    _.__class__,
    # scripts/xpu_load_memory.py: vLLM's MoE runner calls what its _forward_entry holds
    _._forward_entry,
)
