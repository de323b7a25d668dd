"""The front end: from raw recordings to RVC's training folder, in JAX.

Slicing and resampling (RVC's preprocess), pitch (RMVPE, FCPE, harvest) and content
features (HuBERT/ContentVec). Each network is a model family of its own
(:mod:`rvclora_jax.families`); its ``.pt``/``.bin`` loaders live in ``rvclora_convert``.
"""
