"""The front end: from raw recordings to RVC's training folder, in JAX.

Slicing and resampling (RVC's preprocess), pitch (RMVPE, FCPE, harvest) and content
features (HuBERT/ContentVec). Each network is a model family of its own
(:mod:`rvclora_jax.families`); its ``.pt``/``.bin`` loaders live in ``rvclora_convert``.

Modules, in pipeline order (none is imported here, so importing the package costs nothing):
:mod:`~rvclora_jax.frontend.audio_io` (read any recording as RVC loads it),
:mod:`~rvclora_jax.frontend.slicer` (RVC's silence slicer),
:mod:`~rvclora_jax.frontend.preprocess` (RVC's preprocess.py for one recording),
:mod:`~rvclora_jax.frontend.pitch` (f0 methods by name, coarse pitch),
``rmvpe``/``fcpe``/``hubert`` (the networks), and
:mod:`~rvclora_jax.frontend.prepare` (the whole folder, resumable; ``rvclora prepare``).
"""
