"""rvclora-jax: exact LoRA fine-tuning of RVC voice models in JAX/Flax NNX."""

__version__ = "0.1.0"

from .layers import (  # noqa: E402,F401
    Adaptable,
    Conv1d,
    ConvTranspose1d,
    Dense,
    Embed,
    LoRAParam,
    layer_kind,
    register_layer_kind,
)
from .lora import (  # noqa: E402,F401
    PRESETS,
    LoRAConfig,
    inject,
    merge,
    partition,
    summarize,
    unmerge,
)
from .adapters import apply_adapter, load_adapter, save_adapter  # noqa: E402,F401
