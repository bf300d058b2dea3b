"""``gptq2xpu demo`` (filled in with the synthetic checkpoint builder)."""
