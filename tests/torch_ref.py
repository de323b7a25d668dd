"""Helpers for tests that compare against RVC's own PyTorch code (rvc==0.3.5)."""

from __future__ import annotations

import numpy as np
import torch

from rvclora_convert.state_dict import load_params, torch_to_flax


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Make every parameter non-trivial: weight-norm magnitudes away from ||v||,
    zero-initialised layers (the flow's ``post``) random, biases non-zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("weight_g") or name.endswith("original0"):
                p.mul_(0.5 + torch.rand(p.shape, generator=g))
            elif (p == 0).all() or name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return module


def randomize_batch_norms_(module: torch.nn.Module) -> torch.nn.Module:
    """Random affine parameters and running statistics for every ``BatchNorm2d`` (torch
    initialises them to the identity), so a port's folding of them is tested. Draws from
    torch's global RNG, in module order."""
    with torch.no_grad():
        for mod in module.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.3, 0.3)
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
                mod.num_batches_tracked.fill_(1000)
    return module


def randomize_norms_(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """A Hugging Face model's LayerNorm/GroupNorm gains and biases (initialised to (1, 0))
    and every bias made random, so their key mapping is tested."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if name.endswith("weight") else 0.0))
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def state_dict_np(module: torch.nn.Module) -> dict[str, np.ndarray]:
    # copy: .numpy() shares memory, and a later load_state_dict would change these arrays
    return {k: v.detach().cpu().numpy().copy() for k, v in module.state_dict().items()}


def load_torch_into(jax_model, torch_module: torch.nn.Module, **kw):
    params = torch_to_flax(jax_model, state_dict_np(torch_module), **kw)
    load_params(jax_model, params)
    return jax_model


def t2j(x: torch.Tensor) -> np.ndarray:
    """torch [B, C, T] → numpy [B, T, C]."""
    return x.detach().cpu().numpy().transpose(0, 2, 1)


def j2t(x) -> torch.Tensor:
    """jax/numpy [B, T, C] → torch [B, C, T]."""
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 2, 1)))


def assert_close(got, want, atol=1e-4, name=""):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
    err = np.abs(got - want).max() if got.size else 0.0
    rel = err / max(np.abs(want).max(), 1e-12)
    print(f"[parity] {name}: max|Δ| = {err:.2e} rel = {rel:.2e}")  # shown with pytest -s
    assert err <= atol, f"{name}: max|Δ| = {err:.3g} (rel {rel:.3g}) > {atol}"
    return err, rel
