"""RVC's training losses (``rvc.lib.train.losses``) as pure ``jnp`` functions.

Conventions are channels-last: feature maps are ``list[list[Array]]`` (one inner list
per discriminator, one array per layer), scores are ``list[Array]`` (one per
discriminator). Everything is computed in float32, like RVC's ``.float()`` casts.
The total generator loss in RVC is ``adv + fm + C_MEL * mel_l1 + C_KL * kl``.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

C_MEL = 45.0  # hps.train.c_mel
C_KL = 1.0  # hps.train.c_kl


def _f32(x) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


def feature_loss(fmap_r: Sequence[Sequence[jax.Array]],
                 fmap_g: Sequence[Sequence[jax.Array]]) -> jax.Array:
    """Feature-matching loss; mirrors ``rvc.lib.train.losses.feature_loss``.

    ``2 * Σ_d Σ_l mean|r − g|`` with the real maps detached (``stop_gradient``), so
    only the generated maps receive gradient."""
    total = jnp.zeros((), jnp.float32)
    for maps_r, maps_g in zip(fmap_r, fmap_g, strict=True):
        for r, g in zip(maps_r, maps_g, strict=True):
            r = jax.lax.stop_gradient(_f32(r))
            total = total + jnp.mean(jnp.abs(r - _f32(g)))
    return 2.0 * total


def discriminator_loss(real_scores: Sequence[jax.Array], fake_scores: Sequence[jax.Array]
                       ) -> tuple[jax.Array, list[jax.Array], list[jax.Array]]:
    """LSGAN discriminator loss; mirrors ``rvc.lib.train.losses.discriminator_loss``.

    Returns ``(Σ_d [mean((1−D(y))²) + mean(D(ŷ)²)], r_losses, g_losses)``. RVC returns
    the per-discriminator terms as Python floats (``.item()``); here they are scalar
    arrays so the function stays jit-able. Callers pass ``stop_gradient(ŷ)`` scores,
    as RVC does with ``y_hat.detach()``."""
    total = jnp.zeros((), jnp.float32)
    r_losses, g_losses = [], []
    for r, g in zip(real_scores, fake_scores, strict=True):
        r_loss = jnp.mean((1.0 - _f32(r)) ** 2)
        g_loss = jnp.mean(_f32(g) ** 2)
        total = total + r_loss + g_loss
        r_losses.append(r_loss)
        g_losses.append(g_loss)
    return total, r_losses, g_losses


def generator_loss(fake_scores: Sequence[jax.Array]) -> tuple[jax.Array, list[jax.Array]]:
    """LSGAN generator (adversarial) loss; mirrors ``rvc.lib.train.losses.generator_loss``.

    Returns ``(Σ_d mean((1−D(ŷ))²), per-discriminator losses)``."""
    total = jnp.zeros((), jnp.float32)
    per_d = []
    for g in fake_scores:
        loss = jnp.mean((1.0 - _f32(g)) ** 2)
        per_d.append(loss)
        total = total + loss
    return total, per_d


def kl_loss(z_p: jax.Array, logs_q: jax.Array, m_p: jax.Array, logs_p: jax.Array,
            z_mask: jax.Array) -> jax.Array:
    """KL term; mirrors ``rvc.lib.train.losses.kl_loss``.

    Inputs are channels-last ``[B, T, C]``, ``z_mask`` is ``[B, T, 1]``. Per element
    ``logs_p − logs_q − 0.5 + 0.5·(z_p − m_p)²·exp(−2·logs_p)``, summed over all
    elements times the mask and divided by ``Σ z_mask`` (i.e. by the number of valid
    frames, not frames × channels). All in float32."""
    z_p, logs_q, m_p, logs_p, z_mask = map(_f32, (z_p, logs_q, m_p, logs_p, z_mask))
    kl = logs_p - logs_q - 0.5 + 0.5 * jnp.square(z_p - m_p) * jnp.exp(-2.0 * logs_p)
    return jnp.sum(kl * z_mask) / jnp.sum(z_mask)


def mel_l1(y_mel: jax.Array, y_hat_mel: jax.Array) -> jax.Array:
    """Mel reconstruction term ``mean|y_mel − y_hat_mel|``; mirrors RVC ``train.py``'s
    ``F.l1_loss(y_mel, y_hat_mel)`` (RVC multiplies it by ``C_MEL`` = 45 outside)."""
    return jnp.mean(jnp.abs(_f32(y_mel) - _f32(y_hat_mel)))
