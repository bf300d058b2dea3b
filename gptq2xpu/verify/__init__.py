"""Standalone checks of a converted checkpoint: independent unpack path, reference MoE, devices."""
