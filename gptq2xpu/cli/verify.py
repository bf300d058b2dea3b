"""``gptq2xpu verify`` (filled in with the verifier)."""
