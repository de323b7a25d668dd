"""rvclora-jax: exact LoRA fine-tuning of RVC voice models in JAX/Flax NNX."""

__version__ = "0.1.0"

from .layers import Conv1d, ConvTranspose1d, Dense, LoRAParam, delta_kernel  # noqa: E402,F401
from .lora import (  # noqa: E402,F401
    PRESETS,
    LoRAConfig,
    apply_adapter,
    inject,
    load_adapter,
    merge,
    partition,
    save_adapter,
    summarize,
    unmerge,
)
