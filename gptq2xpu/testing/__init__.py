"""Tools for tests, the demo and benchmarks: synthetic GPTQ MoE checkpoints with ground truth (not used by
conversion)."""
