"""Pixel-adaptive mask refinement (PAMR; Araslanov & Roth, CVPR 2020), as TCL applies it at inference.

PAMR smooths class score maps along the image's own edges: each pixel's scores become a weighted average of
its neighbours' scores, with weights that are large for neighbours of similar colour. Repeated a few times,
the scores flow along regions of one colour and stop at colour edges.

Definition. I is the image [H, W, 3] and m_t the masks [C, H, W]. For each pixel i, N(i) holds the 8 pixels
at offsets d * (dy, dx), (dy, dx) in {-1, 0, 1}^2 minus (0, 0), for every dilation d, so |N(i)| =
8 * len(dilations). Outside the image the border pixel is repeated (replicate padding), for the image and
for the masks alike. Then

    sigma_c(i)  = sample standard deviation (ddof 1) of I_c over the 3 x 3 windows of every dilation around
                  i (9 * len(dilations) values: the centre once per dilation)
    k(i, j)     = -(1/3) sum_c |I_c(i) - I_c(j)| / (0.1 * sigma_c(i) + 1e-8)       j in N(i)
    alpha(i, j) = exp k(i, j) / sum_{q in N(i)} exp k(i, q)                       (softmax over N(i))
    m_{t+1}(i)  = sum_{j in N(i)} alpha(i, j) m_t(j)                              t = 0 .. iterations - 1

The affinities alpha depend on the image only and are computed once. Each update is a convex combination,
linear in the masks, so it commutes with any per-pixel linear map of the channels.

TCL's settings (github:kakaobrain/tcl, `models/tcl/tcl.py` `apply_pamr` and `configs/eval.yml`): 10
iterations, dilations (1, 2, 4, 8, 12, 24), on for every benchmark. TCL refines the soft masks of each 448 x 448
slide window at the resolution its decoder emits them, a quarter of the window (112 x 112), against the
normalised window bilinearly resized to that size (align_corners=True). It then resizes the masks bilinearly
back to the window. `refine_logits` does the same at a quarter of the resized image. It runs once per image,
on the window-averaged logits of Eq. 1, just before they are resized to the original size and softmaxed
(`inference.Segmenter.segment`).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ovseg_jax import resize as resize_lib

TCL_ITERATIONS = 10
TCL_DILATIONS = (1, 2, 4, 8, 12, 24)
TCL_DOWNSAMPLE = 4   # TCL's masks are 1/4 of the window
BUCKET = 16          # refine_logits pads to multiples of this: a few compilations for any image sizes

# (batch, channels, padded height, padded width, iterations, dilations) -> times traced (each should stay 1).
TRACES = {}


def _offsets(dilations) -> list[tuple[int, int]]:
  """The neighbour offsets (dy, dx) of N(i), dilation by dilation."""
  return [(dy * d, dx * d) for d in dilations for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


def _shift(x: jnp.ndarray, dy: int, dx: int, size) -> jnp.ndarray:
  """x [..., Hp, Wp] -> x at (y + dy, x + dx), rows / columns clamped into the valid [0, size) (the
  replicate border). Pixels past `size` (padding) are computed too but read nothing outside the valid part."""
  iy = jnp.clip(jnp.arange(x.shape[-2]) + dy, 0, size[0] - 1)
  ix = jnp.clip(jnp.arange(x.shape[-1]) + dx, 0, size[1] - 1)
  return jnp.take(jnp.take(x, iy, axis=-2), ix, axis=-1)


def affinity(image: jnp.ndarray, dilations=TCL_DILATIONS, size=None) -> jnp.ndarray:
  """The PAMR weights alpha of an image.

  Args:
    image: [H, W, 3] float (any normalisation; TCL's is the ImageNet mean / std, as inference's).
    dilations: the neighbourhood dilations, in pixels.
    size: (h, w) of the valid top-left part when the image is padded (may be traced); None: all of it.
  Returns:
    alpha [P, H, W], P = 8 * len(dilations): softmax over P of k(i, j) (module docstring).
  """
  x = jnp.moveaxis(image.astype(jnp.float32), -1, 0)                  # [3, H, W]
  size = x.shape[1:] if size is None else size
  offsets = _offsets(dilations)
  window = offsets + [(0, 0)] * len(dilations)                        # 9 per dilation: the centre once each
  sigma = jnp.std(jnp.stack([_shift(x, dy, dx, size) for dy, dx in window]), axis=0, ddof=1)   # [3, H, W]
  diff = jnp.abs(x[None] - jnp.stack([_shift(x, dy, dx, size) for dy, dx in offsets]))       # [P, 3, H, W]
  k = -(diff / (0.1 * sigma + 1e-8)).mean(axis=1)                     # [P, H, W]
  return jax.nn.softmax(k, axis=0)


@functools.partial(jax.jit, static_argnames=('iterations', 'dilations'))
def _pamr(image, masks, size, *, iterations, dilations):
  """`pamr` on arrays whose valid part is the top-left `size` (int32 [2]) of [B, Hp, Wp]."""
  TRACES[(*masks.shape, iterations, dilations)] = TRACES.get((*masks.shape, iterations, dilations), 0) + 1
  offsets = _offsets(dilations)
  alpha = jax.vmap(lambda im: affinity(im, dilations, size))(image)   # [B, P, Hp, Wp]

  def update(_, m):                                                   # m [B, C, Hp, Wp]
    # A sum over the P shifted copies (not a [P, B, C, H, W] stack): XLA fuses it into one pass.
    out = jnp.zeros_like(m)
    for p, (dy, dx) in enumerate(offsets):
      out = out + alpha[:, p, None] * _shift(m, dy, dx, size)
    return out

  return jax.lax.fori_loop(0, iterations, update, masks.astype(jnp.float32))


def _check(iterations: int, dilations) -> tuple:
  dilations = tuple(int(d) for d in dilations)
  if not dilations or min(dilations) < 1 or iterations < 0:
    raise ValueError(f'PAMR needs dilations >= 1 and iterations >= 0; got dilations={dilations}, '
                     f'iterations={iterations}')
  return dilations


def pamr(image, masks, *, iterations: int = TCL_ITERATIONS, dilations=TCL_DILATIONS) -> jnp.ndarray:
  """Refines masks along the image's edges (module docstring). Jitted; compiled once per shape.

  Args:
    image: [B, H, W, 3] float.
    masks: [B, C, H, W] float, at the image's resolution (scores, probabilities or logits).
    iterations: update steps m_t -> m_{t+1}.
    dilations: neighbourhood dilations in pixels.
  Returns:
    [B, C, H, W] refined masks (float32).
  """
  if tuple(image.shape[1:3]) != tuple(masks.shape[2:]):
    raise ValueError(f'masks {tuple(masks.shape)} must have the size of the image {tuple(image.shape)}')
  dilations = _check(iterations, dilations)
  return _pamr(image, masks, np.asarray(masks.shape[2:], np.int32), iterations=int(iterations),
               dilations=dilations)


def refine_logits(image: np.ndarray, logits: np.ndarray, *, iterations: int = TCL_ITERATIONS,
                  dilations=TCL_DILATIONS, downsample: int = TCL_DOWNSAMPLE) -> np.ndarray:
  """PAMR on one image's window-averaged class logits, at 1 / `downsample` of their size, as TCL.

  The resizes run on the host (NumPy). PAMR runs on arrays zero-padded to multiples of `BUCKET`, with the
  true size passed as data, so images of many sizes share a few compilations; the result is that of the
  unpadded arrays (neighbours are clamped into the true size).

  Args:
    image: float [h, w, 3] the normalised network-input image (inference.preprocess).
    logits: float [C, h, w] the window-averaged logits of Eq. 1 (background first when present).
    iterations, dilations: see `pamr`.
    downsample: PAMR runs at (round(h / downsample), round(w / downsample)), at least 1 x 1.
  Returns:
    float32 [C, h, w] refined logits: the logits resized bilinearly to the small size, refined against the
    image resized there bilinearly with align_corners=True (TCL), resized back bilinearly (align_corners=False).
  """
  dilations = _check(iterations, dilations)
  if downsample < 1:
    raise ValueError(f'PAMR downsample={downsample}: expected a whole number >= 1')
  c, h, w = logits.shape
  sh, sw = max(1, round(h / downsample)), max(1, round(w / downsample))
  rh = resize_lib.interpolation_matrix(h, sh, 'bilinear', True)
  rw = resize_lib.interpolation_matrix(w, sw, 'bilinear', True)
  im = np.tensordot(rh, np.asarray(image, np.float64), axes=(1, 0))            # [sh, w, 3]
  im = np.einsum('axc,bx->abc', im, rw).astype(np.float32)                       # [sh, sw, 3]
  z = resize_lib.resize_hw(np.asarray(logits, np.float32), (sh, sw), axes=(1, 2))
  ph, pw = -(-sh // BUCKET) * BUCKET, -(-sw // BUCKET) * BUCKET
  im_p = np.zeros((1, ph, pw, 3), np.float32)
  im_p[0, :sh, :sw] = im
  z_p = np.zeros((1, c, ph, pw), np.float32)
  z_p[0, :, :sh, :sw] = z
  out = _pamr(im_p, z_p, np.asarray((sh, sw), np.int32), iterations=int(iterations), dilations=dilations)
  out = np.asarray(out)[0, :, :sh, :sw]
  return resize_lib.resize_hw(out, (h, w), axes=(1, 2))
