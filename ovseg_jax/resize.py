"""PyTorch-exact image resizing as separable interpolation matrices.

`jax.image.resize` differs from `torch.nn.functional.interpolate` in the three places this project needs
torch's arithmetic (official notes §9.4): bicubic uses a = -0.75 in torch (-0.5 in JAX), bilinear with
`align_corners=True` does not exist in JAX, and JAX antialiases downsampling by default. Here each resize is
`out = R_h @ x @ R_w^T` with the [out, in] matrices R built in NumPy at trace time (shapes are static), so it
is exact, differentiable, jit-friendly and runs as two small matmuls on any backend.
"""

import functools

import jax.numpy as jnp
import numpy as np


def _cubic(t: np.ndarray, a: float = -0.75) -> np.ndarray:
  """Keys cubic convolution kernel with torch's a = -0.75."""
  t = np.abs(t)
  return np.where(t <= 1, ((a + 2) * t - (a + 3)) * t * t + 1,
                  np.where(t < 2, ((a * t - 5 * a) * t + 8 * a) * t - 4 * a, 0.0))


@functools.lru_cache(maxsize=256)
def interpolation_matrix(in_size: int, out_size: int, method: str, align_corners: bool) -> np.ndarray:
  """[out_size, in_size] float64 matrix reproducing torch `F.interpolate` along one axis (no antialias)."""
  if in_size < 1 or out_size < 1:
    raise ValueError(f'cannot resize {in_size} -> {out_size} pixels')
  dst = np.arange(out_size, dtype=np.float64)
  if align_corners:
    src = dst * ((in_size - 1) / (out_size - 1)) if out_size > 1 else np.zeros_like(dst)
  else:
    src = (dst + 0.5) * (in_size / out_size) - 0.5
  m = np.zeros((out_size, in_size), np.float64)
  rows = np.arange(out_size)
  if method == 'bilinear':
    if not align_corners:
      src = np.maximum(src, 0.0)  # torch clamps negative source coordinates for linear modes
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    lam = src - i0
    np.add.at(m, (rows, i0), 1.0 - lam)
    np.add.at(m, (rows, i1), lam)
  elif method == 'bicubic':
    i0 = np.floor(src).astype(np.int64)
    t = src - i0
    for tap in range(-1, 3):  # torch clamps the tap indices to the border (replicate padding)
      idx = np.clip(i0 + tap, 0, in_size - 1)
      np.add.at(m, (rows, idx), _cubic(t - tap))
  else:
    raise ValueError(f'unknown method {method!r}; expected bilinear or bicubic')
  return m


def resize(x: jnp.ndarray, out_hw: tuple[int, int], method: str = 'bilinear',
           align_corners: bool = False, spatial_axes: tuple[int, int] = (-3, -2)) -> jnp.ndarray:
  """Resizes the two `spatial_axes` of `x` (default [..., H, W, C]) like torch `F.interpolate`.

  Args:
    x: array with two spatial axes, e.g. [B, H, W, C] or [C, H, W] with spatial_axes=(-2, -1).
    out_hw: (H_out, W_out).
    method: 'bilinear' or 'bicubic' (a = -0.75).
    align_corners: torch's flag.
  Returns:
    x resized, same dtype, computed in float32 (or the input's float dtype if wider).
  """
  ha, wa = (a % x.ndim for a in spatial_axes)
  h, w = x.shape[ha], x.shape[wa]
  if (h, w) == tuple(out_hw):
    return x
  dtype = jnp.promote_types(x.dtype, jnp.float32)
  rh = jnp.asarray(interpolation_matrix(h, out_hw[0], method, align_corners), dtype)
  rw = jnp.asarray(interpolation_matrix(w, out_hw[1], method, align_corners), dtype)
  xt = jnp.moveaxis(x.astype(dtype), (ha, wa), (-2, -1))  # [..., H, W]
  hi = jnp.einsum('oh,...hw->...ow', rh, xt, precision='highest')
  out = jnp.einsum('pw,...ow->...op', rw, hi, precision='highest')
  return jnp.moveaxis(out, (-2, -1), (ha, wa)).astype(x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else dtype)
