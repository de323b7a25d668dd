"""Converters between RVC PyTorch files and rvclora-jax (the only place torch is used)."""
