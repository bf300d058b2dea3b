"""Standalone checks of a converted checkpoint: independent unpack path, reference MoE, devices."""

#: Bounds of verify's numeric options (the command line checks them too, without importing the verifier).
MAX_TOKENS = 65536
MAX_SEED = 2**32 - 1
