"""PyTorch-exact image resizing as separable interpolation matrices.

`jax.image.resize` differs from `torch.nn.functional.interpolate` in the three places this project needs
torch's arithmetic (docs/paper_vs_authors.md Q29): bicubic uses a = -0.75 in torch (-0.5 in JAX), bilinear with
`align_corners=True` does not exist in JAX, and JAX antialiases downsampling by default. Here each resize is
`out = R_h @ x @ R_w^T` with the [out, in] matrices R built in NumPy at trace time (shapes are static), so it
is exact, differentiable, jit-friendly and runs as two small matmuls on any backend.

`resize_hw` is the NumPy twin for the host side of inference (image pre-processing, the final logits resize):
bilinear with torch's float32 tap arithmetic, two taps per output pixel instead of a dense matrix.
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


# ------------------------------------------------------------------------------------------------------------
# NumPy, float32 (host-side pre- and post-processing of inference.py).
# ------------------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=64)
def bilinear_taps_f32(in_size: int, out_size: int):
  """Torch's CPU bilinear taps (align_corners=False) along one axis: (i0, i1 int64 [out], w0, w1 float32 [out]).

  Computed in float32 as torch does: src = max(fma(in/out, dst + 0.5, -0.5), 0), i0 = floor(src),
  w1 = src - i0, w0 = 1 - w1. `interpolation_matrix` holds the same weights computed in float64; for
  ratios like 451/673 the float32 source coordinate differs by up to ~3e-5 pixel, which moves resized uint8
  values by up to ~3e-3. With torch's rounding (its compiled kernel fuses the multiply-add; emulated here in
  float64, exact for float32 operands) the resize agrees with torch to float32 rounding.
  """
  scale = np.float32(in_size) / np.float32(out_size)
  dst = np.arange(out_size, dtype=np.float32) + np.float32(0.5)
  src = (np.float64(scale) * dst.astype(np.float64) - 0.5).astype(np.float32)
  src = np.maximum(src, np.float32(0))
  i0 = np.minimum(src.astype(np.int64), in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  w1 = np.clip(src - i0.astype(np.float32), 0, 1).astype(np.float32)
  return i0, i1, np.float32(1) - w1, w1


def _lerp(x: np.ndarray, axis: int, out_size: int) -> np.ndarray:
  i0, i1, w0, w1 = bilinear_taps_f32(x.shape[axis], out_size)
  shape = [1] * x.ndim
  shape[axis] = out_size
  return np.take(x, i0, axis) * w0.reshape(shape) + np.take(x, i1, axis) * w1.reshape(shape)


def resize_hw(x: np.ndarray, out_hw: tuple[int, int], axes: tuple[int, int]) -> np.ndarray:
  """float32 torch-exact bilinear resize (align_corners=False, no antialias) of two axes of a NumPy array.

  Two taps per output pixel (O(output), not a dense [out, in] matmul), width first, then height: torch's
  order, out = w0_h (w0_w x00 + w1_w x01) + w1_h (w0_w x10 + w1_w x11).
  """
  x = np.asarray(x, np.float32)
  ha, wa = (a % x.ndim for a in axes)
  if (x.shape[ha], x.shape[wa]) == tuple(out_hw):
    return x
  return _lerp(_lerp(x, wa, out_hw[1]), ha, out_hw[0])
