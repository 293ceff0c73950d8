"""Adversarial image denoiser D (paper section 3.3, Figure 3).

9x9 conv -> ``num_blocks`` residual blocks (3x3) -> one global self-attention
(transformer) block -> 9x9 conv back to RGB. No downsampling anywhere; the output
has the input's shape and lies in (0, 1).

**Global attention that fits memory.** Attention over every pixel of a 224x224
image is 50,176 tokens (a 10 GB score matrix per head). We attend over *patch
tokens* instead (ViT-style): the feature map is cut into non-overlapping
``patch x patch`` patches, each projected to an ``attn_dim`` token with a fixed
2-D sine-cosine position code; every token attends to every other (global
receptive field). Each token's result is projected to the trunk's channels and
bilinearly upsampled back to pixels (not unembedded patch by patch, which stamps
a visible ``patch x patch`` grid on every image) and added residually, so fine
detail flows through the skip path. At 224x224 with ``patch=8`` that is 784
tokens (a 2.4 MB score matrix per head). The image side must be divisible by
``patch``.

**Output.** ``D(x) = sigmoid(logit(clip(x)) + r(x))`` with the last conv initialised
to zero, so an untrained D is (to within 1/512) the identity. The clip to
[1/512, 1 - 1/512] keeps the logit finite; it is straight-through (its gradient is 1
everywhere), so pure white or black pixels (product-photo backgrounds) still pass input
gradients, and attacks through D see no masked gradient there.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxvars import layers

_EDGE = 1.0 / 512.0


def sincos_2d(h: int, w: int, dim: int) -> np.ndarray:
  """Fixed 2-D sine-cosine position codes, float32 [h * w, dim] (dim divisible by 4)."""
  if dim % 4:
    raise ValueError(f"attention dim {dim} must be divisible by 4")
  omega = 1.0 / (10000 ** (np.arange(dim // 4) / (dim // 4)))
  ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  out = [f(a.reshape(-1, 1) * omega) for a in (ys, xs) for f in (np.sin, np.cos)]
  return np.concatenate(out, axis=1).astype(np.float32)


class ResidualBlock(nn.Module):
  """conv3x3 -> ReLU -> conv3x3 (zero-initialised), plus the input; computed in ``dtype``."""
  channels: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    y = nn.relu(layers.Conv(self.channels, (3, 3), padding=1, dtype=self.dtype,
                            name="conv1")(x))
    y = layers.Conv(self.channels, (3, 3), padding=1, kernel_init=nn.initializers.zeros,
                    dtype=self.dtype, name="conv2")(y)
    return x + y


class GlobalAttentionBlock(nn.Module):
  """A pre-norm transformer block over patch tokens of a [B, H, W, C] map (see module doc),
  computed in ``dtype`` (LayerNorm statistics and the softmax in float32)."""
  patch: int = 8
  dim: int = 128
  heads: int = 4
  mlp_ratio: int = 2
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    p = self.patch
    if h % p or w % p:
      raise ValueError(f"denoiser input {h}x{w} is not divisible by patch={p}; set "
                       "config.denoiser.patch to a divisor of the image size")
    gh, gw = h // p, w // p
    tokens = x.reshape(b, gh, p, gw, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, gh * gw, p * p * c)
    dense = functools.partial(nn.Dense, dtype=self.dtype)
    z = dense(self.dim, name="embed")(tokens) + jnp.asarray(sincos_2d(gh, gw, self.dim),
                                                             self.dtype)
    y = nn.LayerNorm(dtype=self.dtype, name="ln1")(z)
    # force_fp32_for_softmax: the attention weights' softmax in float32 (a no-op in float32).
    z = z + nn.MultiHeadDotProductAttention(num_heads=self.heads, dtype=self.dtype,
                                            force_fp32_for_softmax=True, name="attention")(y, y)
    y = nn.LayerNorm(dtype=self.dtype, name="ln2")(z)
    y = dense(self.dim * self.mlp_ratio, name="mlp1")(y)
    z = z + dense(self.dim, name="mlp2")(nn.gelu(y))
    out = dense(c, kernel_init=nn.initializers.zeros, name="unembed")(z).reshape(b, gh, gw, c)
    return x + jax.image.resize(out, (b, h, w, c), method="bilinear")


class Denoiser(nn.Module):
  """Image denoiser D.

  Attributes:
    channels: width of the convolutional trunk.
    num_blocks: residual blocks (paper: 9).
    patch, attn_dim, heads: the global attention block (see module doc).
    dtype: computation dtype of the trunk, the attention block and the output conv
      (``config.dtype``; parameters stay float32). The residual r(x) is cast to float32
      and the skip path ``sigmoid(logit(clip(x)) + r)`` is float32 whatever ``dtype``, so
      an untrained D stays the identity to float32 precision (a bfloat16 pixel is only
      2**-8 apart near 1, a third of an 8/255 budget's step).

  ``__call__(x)``: float32 [B, H, W, 3] in [0, 1] -> float32 [B, H, W, 3] in (0, 1).
  """
  channels: int = 64
  num_blocks: int = 9
  patch: int = 8
  attn_dim: int = 128
  heads: int = 4
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(layers.Conv, dtype=self.dtype)
    h = nn.relu(conv(self.channels, (9, 9), padding=4, name="conv_in")(
        (x * 2.0 - 1.0).astype(self.dtype)))
    for k in range(self.num_blocks):
      h = ResidualBlock(self.channels, dtype=self.dtype, name=f"block{k}")(h)
    h = GlobalAttentionBlock(self.patch, self.attn_dim, self.heads, dtype=self.dtype,
                             name="attention")(h)
    r = conv(3, (9, 9), padding=4, kernel_init=nn.initializers.zeros, name="conv_out")(h)
    r = r.astype(jnp.float32)
    xc = x + jax.lax.stop_gradient(jnp.clip(x, _EDGE, 1.0 - _EDGE) - x)  # Straight-through.
    return jax.nn.sigmoid(jnp.log(xc) - jnp.log1p(-xc) + r)
