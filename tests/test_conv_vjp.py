"""The matmul-gradient convolution (layers.matmul_grad_conv1d) against torch autograd.

Conv1d routes strided convs and stride-1 convs whose kernel outweighs their input
(RVC's discriminator) through a custom VJP; test_layers' gradient cases are too small
to take the stride-1 route, so these shapes are chosen so that they do."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rvclora_jax.layers import Conv1d, _use_matmul_grads


@pytest.mark.parametrize("use_jit", [False, True])
@pytest.mark.parametrize("ci,co,k,stride,padding,dilation,T", [
    (16, 24, 5, 1, 2, 1, 9),       # DiscriminatorP's last conv, few positions
    (16, 24, 3, 1, 3, 3, 9),       # dilated, kernel larger than the input
    (16, 8, 7, 1, 9, 3, 10),
    (16, 24, 4, 1, 0, 1, 10),      # no padding, even kernel
    (16, 24, 5, 3, 2, 1, 11), (16, 24, 5, 3, 2, 1, 12),  # strided, with and without a tail
    (8, 6, 5, 2, (3, 0), 1, 23)])
def test_matmul_grad_conv_matches_torch_autograd(ci, co, k, stride, padding, dilation, T, use_jit):
    import torch

    layer = Conv1d(ci, co, k, stride=stride, padding=padding, dilation=dilation, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, T, ci)).astype(np.float32)
    assert _use_matmul_grads(x.shape, k, ci, co, stride, dilation)
    graphdef, params = nnx.split(layer, nnx.Param)
    y = np.asarray(layer(jnp.asarray(x)))
    gy = rng.standard_normal(y.shape).astype(np.float32)
    grad = jax.grad(lambda p, xx: jnp.sum(nnx.merge(graphdef, p)(xx) * gy), argnums=(0, 1))
    gp, gx = (jax.jit(grad) if use_jit else grad)(params, jnp.asarray(x))
    tx = torch.tensor(x.transpose(0, 2, 1), requires_grad=True)
    tw = torch.tensor(np.asarray(layer.kernel[...]).transpose(2, 1, 0), requires_grad=True)
    pl, pr = layer.padding
    ty = torch.nn.functional.conv1d(torch.nn.functional.pad(tx, (pl, pr)), tw, stride=stride, dilation=dilation)
    np.testing.assert_allclose(y - np.asarray(layer.bias[...]), ty.detach().numpy().transpose(0, 2, 1),
                               rtol=1e-5, atol=1e-5)
    (ty * torch.tensor(gy.transpose(0, 2, 1))).sum().backward()
    np.testing.assert_allclose(np.asarray(gx), tx.grad.numpy().transpose(0, 2, 1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(gp["kernel"][...]), tw.grad.numpy().transpose(2, 1, 0),
                               rtol=1e-4, atol=1e-4)
