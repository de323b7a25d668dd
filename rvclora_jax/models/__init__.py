"""Flax NNX port of the RVC model family (synthesizers and discriminators).

Conventions shared by every module here:

* Layout is channels-last: activations are ``[batch, time, channels]``; masks are
  ``[batch, time, 1]`` floats. (RVC/torch is ``[B, C, T]``; tests transpose.)
* Attribute names are RVC's ``state_dict`` names, so ``enc_p/encoder/attn_layers/0/conv_q``
  is torch's ``enc_p.encoder.attn_layers.0.conv_q``; lists of modules are ``nnx.List``.
  ``convert/state_dict.py`` relies on this to map weights without a hand-written table.
* Every linear map is a ``rvclora_jax.layers`` ``Dense``/``Conv1d``/``ConvTranspose1d``
  (so LoRA can wrap it by path); torch weight-normed layers pass ``weight_norm=True``
  (metadata for export only: weights are stored folded).
* Randomness is an explicit argument (noise arrays) so tests can feed torch's draws.
"""
