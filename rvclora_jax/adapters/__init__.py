"""Adapters as files and as values: :mod:`.files` (``adapter.safetensors`` +
``adapter_config.json``, fingerprints, applying to a model) and :mod:`.arithmetic`
(exact mixing, SVD compression, extraction from a fine-tuned voice, info)."""

from .arithmetic import (  # noqa: F401
    EnergyReport,
    ExtractReport,
    FullChange,
    LayerEnergy,
    compress,
    extract,
    info,
    mix,
    mixed_fingerprint,
    probe_error,
)
from .files import (  # noqa: F401
    ADAPTER_CONFIG,
    ADAPTER_FORMAT,
    ADAPTER_FORMAT_VERSION,
    ADAPTER_WEIGHTS,
    Adapter,
    apply_adapter,
    check_adapter_fits,
    check_fingerprint,
    fingerprint,
    load_adapter,
    resolve_adapter_path,
    save_adapter,
)

__all__ = ["Adapter", "save_adapter", "load_adapter", "resolve_adapter_path", "apply_adapter", "check_adapter_fits",
           "check_fingerprint", "fingerprint", "ADAPTER_WEIGHTS", "ADAPTER_CONFIG", "ADAPTER_FORMAT",
           "ADAPTER_FORMAT_VERSION", "mix", "compress", "extract", "info", "probe_error", "mixed_fingerprint",
           "EnergyReport", "ExtractReport", "LayerEnergy", "FullChange"]
