"""Zero-shot semantic segmentation with a trained OVSegmentor (paper Eq. 1; docs/paper_vs_authors.md Q25).

The pipeline is the authors' (GroupViT's `GroupViTSegInference` inside mmseg 0.18 slide inference):

  1. Resize the image so its short side is 448 (mmcv `imrescale` rule with scale (2048, 448)), bilinear with
     half-pixel centres and no antialiasing on the float values, then normalise with the ImageNet mean/std.
  2. Cut 448 x 448 windows with stride 224 (mmseg grid arithmetic, windows clamped to the image).
  3. Per window, Eq. 1: with A the soft pixel->group assignment [K, h*w] upsampled bilinearly to the window,
     Z_g the L2-normalised projected group tokens [K, P], z the L2-normalised projected image embedding [P],
     T the L2-normalised class embeddings [N, P] and s = logit_scale_exp (clamped at 100):

         g(x)   = argmax_k A[k, x]                                   (hard pixel -> group)
         P_pre  = softmax_N(s Z_g T^T)                               [K, N]
         keep   = top-5 classes of softmax_N(s z T^T)                (image-level filter)
         P      = softmax_{N, kept only}(s Z_g T^T) * P_pre          [K, N]
         logit[c, x] = P[g(x), c]

     With a background class, the background logit is 1 where max_c logit[c, x] < min(threshold, max P)
     and 0 elsewhere, and it is channel 0. With `eval.background='prompt'` (not in the paper; for models
     trained with `loss.group_match_weight`) the background is instead one more class, the prompt
     "a photo of a background.", in row 0 of T, exempt from the top-5 filter, and no threshold is used.
  4. Window logits are summed into the resized image and divided by the per-pixel window count, resized
     bilinearly (align_corners=False, no antialias) to the original size, and softmaxed over classes.

Class embeddings are the mean over prompt templates of the projected [CLS] embeddings, then L2-normalised.
The window step is one jitted function, compiled once per (model, window shape, batch size, number of
classes); windows of an image run in batches of `eval.window_batch` (the rest in power-of-two batches).
This module imports no optimizer and no trainer.
"""

import collections
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ovseg_jax import checkpoint
from ovseg_jax import errors
from ovseg_jax import eval_config
from ovseg_jax import pamr as pamr_lib
from ovseg_jax import param_tree
from ovseg_jax import prompts
from ovseg_jax import resize as resize_lib
from ovseg_jax import tokenizer as tokenizer_lib
from ovseg_jax.models.ovsegmentor import OVSegmentor
from ovseg_jax.normalize import l2_normalize

MEAN = np.array([123.675, 116.28, 103.53], np.float32)
STD = np.array([58.395, 57.12, 57.375], np.float32)
BACKGROUND = prompts.BACKGROUND


_TEXT_CHUNK = 256  # prompts per BERT call when building class embeddings (bounds memory for 80 templates)
TEXT_CACHE_SIZE = 128  # vocabularies whose embeddings a Segmenter keeps (least recently used dropped first)


# ------------------------------------------------------------------------------------------------------------
# Pre-processing and tiling (NumPy; shapes differ per image, so nothing here is compiled).
# ------------------------------------------------------------------------------------------------------------

def rescale_size(h: int, w: int, short_side: int = 448, long_side: int = 2048) -> tuple[int, int]:
  """mmcv `imrescale` size rule for scale (long_side, short_side) -> (new_h, new_w).

  f = min(long_side / max(h, w), short_side / min(h, w)); new size = int(x * f + 0.5) per side.
  """
  f = min(long_side / max(h, w), short_side / min(h, w))
  return int(h * f + 0.5), int(w * f + 0.5)


def preprocess(image: np.ndarray, short_side: int = 448, long_side: int = 2048) -> np.ndarray:
  """uint8 RGB [H, W, 3] -> normalised float32 [h, w, 3] at the mmcv-rescaled size (step 1 above).

  The resize runs on the float values and is not re-quantised to uint8 (the golden reference does the same).
  """
  h, w = image.shape[:2]
  x = resize_lib.resize_hw(image.astype(np.float32), rescale_size(h, w, short_side, long_side), axes=(0, 1))
  return (x - MEAN) / STD


def slide_windows(h: int, w: int, window: int, stride: int) -> np.ndarray:
  """mmseg slide-inference windows of an [h, w] image -> int64 [n, 4] rows (y1, y2, x1, x2).

  Rows outer, columns inner. Grid: n_h = max(h - window + stride - 1, 0) // stride + 1 (same for w); the
  window (i * stride, j * stride) is clamped to end inside the image and then moved back to keep its size,
  so every window is min(window, h) x min(window, w).
  """
  n_h = max(h - window + stride - 1, 0) // stride + 1
  n_w = max(w - window + stride - 1, 0) // stride + 1
  out = []
  for i in range(n_h):
    for j in range(n_w):
      y2, x2 = min(i * stride + window, h), min(j * stride + window, w)
      out.append((max(y2 - window, 0), y2, max(x2 - window, 0), x2))
  return np.asarray(out, np.int64).reshape(-1, 4)


def slide_inference(x: np.ndarray, window_fn, window: int, stride: int, window_batch: int) -> np.ndarray:
  """Averages per-window logits over the overlapping windows (step 4 above, before the resize).

  Args:
    x: float32 [h, w, 3] pre-processed image.
    window_fn: crops float32 [b, wh, ww, 3] -> logits [b, C, wh, ww] (b <= window_batch).
  Returns:
    float32 [C, h, w] = sum over windows of the window logits / number of windows covering the pixel.
  """
  h, w = x.shape[:2]
  wins = slide_windows(h, w, window, stride)
  preds, count = None, np.zeros((h, w), np.float32)
  for start in range(0, len(wins), window_batch):
    chunk = wins[start:start + window_batch]
    crops = np.stack([x[y1:y2, x1:x2] for y1, y2, x1, x2 in chunk])
    logits = np.asarray(window_fn(crops), np.float32)
    if preds is None:
      preds = np.zeros((logits.shape[1], h, w), np.float32)
    for (y1, y2, x1, x2), lg in zip(chunk, logits):
      preds[:, y1:y2, x1:x2] += lg
      count[y1:y2, x1:x2] += 1
  return preds / count


def scores_from_logits(logits: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
  """float32 [C, h, w] averaged logits -> softmax_C of their bilinear resize to out_hw: [C, H, W]."""
  z = resize_lib.resize_hw(logits, out_hw, axes=(1, 2))
  z = np.exp(z - z.max(axis=0, keepdims=True))
  return (z / z.sum(axis=0, keepdims=True)).astype(np.float32)


# ------------------------------------------------------------------------------------------------------------
# Eq. 1 as pure functions of arrays (jit-friendly).
# ------------------------------------------------------------------------------------------------------------

def group_class_affinity(image_feat: jnp.ndarray, image_x: jnp.ndarray, text_emb: jnp.ndarray,
                         scale: jnp.ndarray, top_k: int = 5, background_row: bool = False,
                         background_margin=0.0) -> jnp.ndarray:
  """Group -> class probabilities of Eq. 1 with the authors' image-level top-k filter.

  Args:
    image_feat: [B, K, P] projected group tokens (not normalised).
    image_x: [B, P] projected image embedding (not normalised).
    text_emb: [N, P] L2-normalised class embeddings.
    scale: scalar logit scale exp(t), already clamped.
    top_k: classes kept per image (min(top_k, N)).
    background_row: text_emb[0] is the background prompt: always kept, the top-k runs over the other rows.
    background_margin: with background_row, subtracted from the background row's cosine (a float or traced
      scalar; `eval.bg_prompt_margin`, not in the paper).
  Returns:
    P [B, K, N] = softmax_N over the kept classes of (s Z_g T^T) * softmax_N(s Z_g T^T), where with
    background_row the cosine Z_g t_0 of the background prompt is first lowered by background_margin.
  """
  zg = l2_normalize(image_feat)
  z = l2_normalize(image_x)
  cosine = jnp.einsum('bkp,np->bkn', zg, text_emb, precision='highest')
  if background_row:
    cosine = cosine.at[..., 0].add(-jnp.asarray(background_margin, cosine.dtype))
  group_logits = cosine * scale
  pre = jax.nn.softmax(group_logits, axis=-1)
  image_prob = jax.nn.softmax(jnp.einsum('bp,np->bn', z, text_emb, precision='highest') * scale, axis=-1)
  n = text_emb.shape[0]
  if background_row:
    image_prob = image_prob.at[:, 0].set(-1.0)                        # not a competitor of the classes
  _, top = jax.lax.top_k(image_prob, min(top_k, n - int(background_row)))  # [B, k]
  keep = jax.nn.one_hot(top, n, dtype=jnp.int32).sum(axis=1) > 0       # [B, N]
  if background_row:
    keep = keep.at[:, 0].set(True)
  masked = jnp.where(keep[:, None, :], group_logits, -jnp.inf)
  return jax.nn.softmax(masked, axis=-1) * pre


def eq1_logits(soft: jnp.ndarray, grid: tuple[int, int], image_feat: jnp.ndarray, image_x: jnp.ndarray,
               text_emb: jnp.ndarray, scale: jnp.ndarray, out_hw: tuple[int, int], *, top_k: int = 5,
               bg_threshold=None, background_row: bool = False, background_margin=0.0) -> jnp.ndarray:
  """Per-window class logits of Eq. 1 (GroupViT `encode_decode`).

  Args:
    soft: [B, K, L] soft pixel->group assignment (softmax over K), L = h * w patches row-major.
    grid: (h, w) patch grid.
    image_feat, image_x, text_emb, scale, top_k: see `group_class_affinity`.
    out_hw: (H, W) window size in pixels; the soft maps are upsampled bilinearly (align_corners=False).
    bg_threshold: None (no background channel) or the background threshold (a float or traced scalar).
    background_row: text_emb[0] is the background prompt (`eval.background='prompt'`): channel 0 is then its
      P like any class's, and bg_threshold must be None.
    background_margin: see `group_class_affinity`.
  Returns:
    [B, C, H, W] logits, C = N (+1 with the background first): logit[c, x] = P[argmax_k A[k, x], c];
    background = 1 where max_c logit[c, x] < min(bg_threshold, max P), else 0.
  """
  b, k, _ = soft.shape
  maps = resize_lib.resize(soft.reshape(b, k, *grid), out_hw, 'bilinear', align_corners=False,
                           spatial_axes=(-2, -1))                     # [B, K, H, W]
  group = jnp.argmax(maps, axis=1)                                    # [B, H, W]
  p = group_class_affinity(image_feat, image_x, text_emb, scale, top_k, background_row,
                           background_margin)                          # [B, K, N]
  fg = jnp.moveaxis(p[jnp.arange(b)[:, None, None], group], -1, 1)   # [B, N, H, W]
  if bg_threshold is None:
    return fg
  thr = jnp.minimum(bg_threshold, p.max(axis=(1, 2)))                 # [B]
  bg = (fg.max(axis=1) < thr[:, None, None]).astype(fg.dtype)         # [B, H, W]
  return jnp.concatenate([bg[:, None], fg], axis=1)


# ------------------------------------------------------------------------------------------------------------
# The Segmenter.
# ------------------------------------------------------------------------------------------------------------

def default_eval_config(**overrides) -> ml_collections.ConfigDict:
  """`config.eval` defaults (eval_config.py) with keyword overrides (unknown keys are an error)."""
  cfg = eval_config.defaults()
  for key, value in overrides.items():
    if value is None:
      continue
    if key not in cfg:
      raise ValueError(f'unknown eval option {key!r}; known: {sorted(cfg.keys())}')
    cfg[key] = type(cfg[key])(value) if isinstance(cfg[key], (int, float)) and not isinstance(
        cfg[key], bool) else value
  return cfg


# (model, batch, h, w, C, with_bg) -> times the window step was traced. Each entry should stay at 1.
WINDOW_TRACES = {}


@functools.partial(jax.jit, static_argnames=('model', 'top_k', 'with_bg', 'bg_prompt'))
def _window_step(variables, crops, text_emb, bg_threshold, bg_margin, *, model, top_k, with_bg, bg_prompt=False):
  """Eq. 1 on a batch of windows: crops [b, h, w, 3] -> logits [b, C, h, w].

  Module-level with the (hashable) model as a static argument, so Segmenters of the same model config
  share compilations.
  """
  key = (model, *crops.shape[:3], text_emb.shape[0] + int(with_bg and not bg_prompt), with_bg)
  WINDOW_TRACES[key] = WINDOW_TRACES.get(key, 0) + 1
  out = model.apply(variables, crops, train=False, method=OVSegmentor.encode_image)
  scale = model.apply(variables, method=OVSegmentor.logit_scale_exp)
  return eq1_logits(out['soft'], tuple(out['grid']), out['image_feat'], out['image_x'], text_emb, scale,
                    crops.shape[1:3], top_k=top_k, bg_threshold=bg_threshold if with_bg and not bg_prompt else None,
                    background_row=with_bg and bg_prompt, background_margin=bg_margin)


@functools.partial(jax.jit, static_argnames=('model',))
def _text_step(variables, ids, mask, *, model):
  """Projected [CLS] embeddings text_x [B, P] of token ids [B, T]."""
  return model.apply(variables, ids, mask, train=False, method=OVSegmentor.encode_text)['text_x']


def abstract_variables(model_config) -> dict:
  """The {'params', 'batch_stats'} tree of `OVSegmentor(model_config)` as jax.ShapeDtypeStructs (no FLOPs)."""
  model = OVSegmentor(config=ml_collections.FrozenConfigDict(model_config))
  size = model_config.vision.img_size
  ids = jnp.ones((1, 2), jnp.int32)
  return jax.eval_shape(lambda k: model.init({'params': k, 'dropout': k, 'gumbel': k},
                                             jnp.zeros((1, size, size, 3)), ids, ids, train=False),
                        jax.random.PRNGKey(0))


def checked_abstract_variables(model_config, where: str) -> dict:
  """`abstract_variables`, with a config that builds no model (a wrong type, 0 heads, a missing key, ...) as
  one UsageError naming `where` (the file it came from)."""
  try:
    return abstract_variables(model_config)
  except errors.UsageError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (flax / jax / ml_collections raise many types)
    line = next((x.strip() for x in str(e).splitlines() if x.strip()), '')
    raise errors.UsageError(f'{where} does not describe a model this code builds ({type(e).__name__}: '
                            f'{line[:200]})') from e


@jax.jit
def _finite_leaves(tree):
  return jax.tree.map(lambda x: jnp.isfinite(x).all() if jnp.issubdtype(x.dtype, jnp.inexact) else True, tree)


def first_non_finite(variables) -> str | None:
  """The name of the first array holding a NaN or Inf ('params/img_encoder/norm/scale'), else None: one
  jitted all-reduce per array, fetched together."""
  flags = jax.device_get(_finite_leaves(variables))
  return next((name for name, ok in param_tree.named_leaves(flags) if not ok), None)


def _bucket(n: int, cap: int) -> int:
  """Smallest power of two >= n, capped at `cap` (bounds the number of compiled batch sizes)."""
  return min(cap, 1 << max(n - 1, 0).bit_length())


class Segmenter:
  """Zero-shot segmentation of any image with any class names.

  Example:
    seg = Segmenter.from_checkpoint('runs/converted')          # inference checkpoint (checkpoint.py)
    labels, scores = seg.segment(image, ['cat', 'dog', 'potted plant'])
    # image uint8 [H, W, 3]; labels int32 [H, W] (0 = background, i = class_names[i - 1]);
    # scores float32 [4, H, W] softmax over (background, cat, dog, potted plant)
  """

  def __init__(self, model_config, variables, eval_config=None):
    """model_config: `config.model`; variables: {'params', 'batch_stats'} of OVSegmentor (NumPy or JAX);
    eval_config: a `config.eval` ConfigDict, a dict of overrides of its defaults, or None for the defaults."""
    self.model_config = ml_collections.ConfigDict(model_config)
    self.model = OVSegmentor(config=ml_collections.FrozenConfigDict(self.model_config))
    if eval_config is None or isinstance(eval_config, dict):
      eval_config = default_eval_config(**(eval_config or {}))  # a plain dict holds overrides
    self.eval_config = eval_config
    if self.eval_config.background not in ('threshold', 'prompt'):
      raise ValueError(f"eval.background={self.eval_config.background!r}: expected 'threshold' or 'prompt'")
    if not np.isfinite(float(self.eval_config.get('bg_prompt_margin', 0.0))):
      raise ValueError(f'eval.bg_prompt_margin={self.eval_config.bg_prompt_margin!r}: must be a finite number')
    if self.eval_config.templates not in prompts.TEMPLATES:
      raise ValueError(f'eval.templates={self.eval_config.templates!r}: expected one of '
                       f'{sorted(prompts.TEMPLATES)}')
    self.variables = jax.device_put(jax.tree.map(jnp.asarray, dict(variables)))
    self.patch_size = int(self.model_config.vision.patch_size)
    self.tokenizer = tokenizer_lib.get_tokenizer(max_length=int(self.model_config.text.max_length))
    self._text_cache = collections.OrderedDict()  # LRU: a long-lived server (demo.py) sees many vocabularies
    self.text_encodes = 0  # vocabularies encoded so far (text_embedding cache misses)

  @classmethod
  def from_checkpoint(cls, directory: str, **eval_overrides) -> 'Segmenter':
    """Loads an inference checkpoint (`convert official` / `export`); overrides set `config.eval` keys.

    Eval settings resolve as: the defaults (eval_config.py) < the `eval` block the checkpoint was exported
    with (e.g. tiny's 128 px windows; see `export.py`) < `eval_overrides`. The variables must fit the model
    their model_config builds (one error lists every missing, unexpected or mis-shaped array), and be finite:
    a NaN or Inf would make every score NaN, so it is refused, naming the first such array.
    """
    target = checked_abstract_variables(checkpoint.load_model_config(directory),
                                        f'{directory}/{checkpoint.MODEL_CONFIG}')
    model_config, variables = checkpoint.load_inference(directory, target=target)
    saved = checkpoint.load_meta(directory).get('eval') or {}
    try:
      default_eval_config(**saved)
    except (TypeError, ValueError) as e:   # not an object, an unknown key, a value of another type
      raise errors.UsageError(f'{directory}/{checkpoint.META}: bad `eval` settings ({e})') from e
    seg = cls(model_config, variables, default_eval_config(**{**saved, **eval_overrides}))
    bad = first_non_finite(seg.variables)
    if bad is not None:
      raise errors.UsageError(f'{directory} holds non-finite weights (NaN or Inf), first in {bad}: the run that '
                              'wrote them diverged or the files are damaged; export another step')
    return seg

  # --- public API ----------------------------------------------------------------------------------------

  def text_embedding(self, class_names) -> jnp.ndarray:
    """[N, P] L2-normalised class embeddings (mean over templates of text_x), cached per vocabulary (LRU).

    All prompts are tokenised together with padding to the longest, as the authors build them.
    """
    class_names = tuple(class_names)
    key = (class_names, self.eval_config.templates)
    if key in self._text_cache:
      self._text_cache.move_to_end(key)
      return self._text_cache[key]
    templates = prompts.TEMPLATES[self.eval_config.templates]
    texts = [t.format(c) for c in class_names for t in templates]   # class-major, as the authors
    ids, mask = self.tokenizer(texts, padding='longest')
    feats = []
    for start in range(0, len(texts), _TEXT_CHUNK):
      ids_c, mask_c = ids[start:start + _TEXT_CHUNK], mask[start:start + _TEXT_CHUNK]
      n = len(ids_c)
      pad = _bucket(n, _TEXT_CHUNK) - n  # a few fixed batch sizes -> few compilations
      if pad:
        ids_c = np.concatenate([ids_c, np.repeat(ids_c[-1:], pad, 0)])
        mask_c = np.concatenate([mask_c, np.repeat(mask_c[-1:], pad, 0)])
      feats.append(np.asarray(_text_step(self.variables, ids_c, mask_c, model=self.model))[:n])
    feats = np.concatenate(feats).reshape(len(class_names), len(templates), -1).mean(axis=1)
    emb = l2_normalize(jnp.asarray(feats))
    self._text_cache[key] = emb
    self.text_encodes += 1
    if len(self._text_cache) > TEXT_CACHE_SIZE:
      self._text_cache.popitem(last=False)
    return emb

  def window_logits(self, crops: np.ndarray, text_emb, background: bool = True,
                    background_threshold: float | None = None) -> np.ndarray:
    """Eq. 1 on pre-processed windows: float32 [b, h, w, 3] -> [b, C, h, w] (background first if any).

    Runs in batches of `eval.window_batch`; a shorter rest is split into power-of-two batches (3 = 2 + 1),
    so nothing is padded and at most log2(window_batch) + 1 batch sizes are ever compiled.
    """
    thr = np.float32(self.eval_config.bg_threshold if background_threshold is None else background_threshold)
    bg_prompt = bool(background) and self.eval_config.background == 'prompt'
    margin = np.float32(self.eval_config.get('bg_prompt_margin', 0.0))   # traced: no recompile per value
    if bg_prompt:   # the background prompt is class row 0 (eval.background='prompt')
      text_emb = jnp.concatenate([self.text_embedding((BACKGROUND,)), jnp.asarray(text_emb)], axis=0)
    cap = max(1, int(self.eval_config.window_batch))
    out, start = [], 0
    while start < len(crops):
      n = min(cap, 1 << ((len(crops) - start).bit_length() - 1))
      chunk = np.asarray(crops[start:start + n], np.float32)
      logits = _window_step(self.variables, chunk, text_emb, thr, margin, model=self.model,
                            top_k=int(self.eval_config.top_k), with_bg=bool(background), bg_prompt=bg_prompt)
      out.append(np.asarray(logits))
      start += n
    return np.concatenate(out)

  def check_size(self, h: int, w: int) -> tuple[int, int]:
    """Raises a one-line ValueError for images smaller than one patch; returns the network input size."""
    p = self.patch_size
    if h < p or w < p:
      raise ValueError(f'image {h}x{w} is smaller than one {p}x{p} patch')
    nh, nw = rescale_size(h, w, int(self.eval_config.short_side), int(self.eval_config.long_side))
    if nh < p or nw < p:
      raise ValueError(f'image {h}x{w} becomes {nh}x{nw} at short side {self.eval_config.short_side}, '
                       f'smaller than one {p}x{p} patch')
    return nh, nw

  def slide_logits(self, x: np.ndarray, text_emb, background: bool = True,
                   background_threshold: float | None = None) -> np.ndarray:
    """Window-averaged logits of a pre-processed image: float32 [h, w, 3] -> [C, h, w]."""
    fn = functools.partial(self.window_logits, text_emb=text_emb, background=background,
                           background_threshold=background_threshold)
    return slide_inference(x, fn, int(self.eval_config.window), int(self.eval_config.stride),
                           int(self.eval_config.window_batch))

  def segment(self, image: np.ndarray, class_names, background: bool = True, *,
              background_threshold: float | None = None):
    """Segments one image.

    Args:
      image: uint8 [H, W, 3] RGB.
      class_names: the N foreground class names (any strings; each is put into the prompt templates).
      background: add a background class (channel 0) predicted by the threshold rule of Eq. 1.
      background_threshold: overrides `eval.bg_threshold` (VOC 0.95, Context 0.35, COCO Object 0.9).
    Returns:
      labels int32 [H, W] (argmax of scores) and scores float32 [C, H, W], C = N (+1 with background
      first), the softmax over classes of the window-averaged logits resized to H x W.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
      raise ValueError(f'expected a uint8 RGB image [H, W, 3]; got {image.dtype} {list(image.shape)}')
    names = [class_names] if isinstance(class_names, str) else list(class_names)
    if not names or any(not isinstance(c, str) or not c.strip() for c in names):
      raise ValueError(f'class_names must be non-empty strings; got {names!r}')
    if len(set(names)) != len(names):
      raise ValueError(f'class_names has duplicates: {names!r}')
    if background and any(c.strip().lower() == BACKGROUND for c in names):
      raise ValueError("pass foreground names only: with background=True the 'background' class is added "
                       'as channel 0 (it is never prompted)')
    h, w = image.shape[:2]
    self.check_size(h, w)
    text_emb = self.text_embedding(names)
    x = preprocess(image, int(self.eval_config.short_side), int(self.eval_config.long_side))
    logits = self.slide_logits(x, text_emb, background, background_threshold)
    if self.eval_config.pamr:   # TCL's refinement of the logits along the image's edges (pamr.py)
      logits = np.asarray(pamr_lib.refine_logits(
          x, logits, iterations=int(self.eval_config.pamr_iterations),
          dilations=tuple(int(d) for d in self.eval_config.pamr_dilations),
          downsample=int(self.eval_config.pamr_downsample)))
    scores = scores_from_logits(logits, (h, w))
    return scores.argmax(axis=0).astype(np.int32), scores

  @staticmethod
  def class_list(class_names, background: bool = True) -> list[str]:
    """Names of the score channels: ['background', *class_names] or class_names."""
    names = [class_names] if isinstance(class_names, str) else list(class_names)
    return [BACKGROUND, *names] if background else names


def num_windows(h: int, w: int, eval_config) -> int:
  """Windows the slide inference runs for an [h, w] input image (after the short-side resize)."""
  nh, nw = rescale_size(h, w, int(eval_config.short_side), int(eval_config.long_side))
  s, win = int(eval_config.stride), int(eval_config.window)
  return (max(nh - win + s - 1, 0) // s + 1) * (max(nw - win + s - 1, 0) // s + 1)

