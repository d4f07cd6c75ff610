r"""A local web page for the segmenter: upload an image (or pick a sample), type any classes, see the result.

  python -m ovseg_jax.demo --checkpoint EXPORT [--host 127.0.0.1] [--port 7860] [--eval.KEY=VALUE ...]

then open the address it prints. The page shows the overlay with its legend, the group map (each pixel's
argmax group of the binding module's soft assignment, as `visualize` draws it) and each class's share of the
pixels, and offers the label PNG (palette PNG of class indices, as `segment --save_labels`) for download.
Settings per request: the classes (comma-separated, the rules of `segment --classes`), the background class
and its threshold (default eval.bg_threshold), the prompt templates (simple | imagenet80).

The model is loaded once. Class embeddings are cached per (classes, templates) by `Segmenter.text_embedding`,
and the window step compiles once per window batch shape and number of classes (inference.py), so a second
request with the same classes and an image of the same size encodes no text and compiles nothing; each answer
reports both.

The server is the standard library's ThreadingHTTPServer: it needs nothing beyond requirements.txt and makes
no request to the network. It serves one page (demo_page.html, no external resources) and a JSON API:
  GET  /api/info                 model, samples, templates, limits
  GET  /sample/NAME.png          a built-in sample image
  POST /api/segment?classes=...&threshold=...&templates=...&background=1&sample=NAME|name=FILE
                                 body: the image file's bytes (Content-Type application/octet-stream), or
                                 empty with `sample`; answer: JSON with base64 PNGs, the legend and timings.
Uploads are read by the project's image reader (images.read_rgb) under its pixel budget (--max_pixels, else
$OVSEG_MAX_PIXELS, else 8192x8192); a body over --max_upload_mb is refused unread. Bad input (a corrupt, huge
or tiny image, an empty or repeated class, a bad threshold) is answered with one line that the page shows.
It binds to 127.0.0.1 by default; on a loopback address it answers only requests whose Host is a loopback
name (no DNS rebinding), and it runs nothing from its input. A missing or invalid checkpoint is one line on
stderr and exit code 2.
"""

import base64
import copy
import dataclasses
import functools
import http.server
import importlib.util
import io
import ipaddress
import json
import math
import os
import re
import socket
import sys
import threading
import time
import traceback
import urllib.parse

from absl import flags
import numpy as np
from PIL import Image

from ovseg_jax import cli
from ovseg_jax import errors
from ovseg_jax import eval_datasets
from ovseg_jax import images
from ovseg_jax import prompts
from ovseg_jax import segment as segment_cli

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'demo_page.html')
DEFAULT_MAX_UPLOAD_MB = 20
MAX_CLASSES = 200           # keeps a request's text encoding bounded (imagenet80: 80 prompts per class)
MAX_CLASSES_CHARS = 4000
DISPLAY_MAX_SIDE = 1024     # the overlay and group map shown are scaled down to this; the label PNG is not
COMPILE_EVENT = '/jax/core/compile/backend_compile_duration'
_LOOPBACK_NAMES = ('localhost', '127.0.0.1', '::1')


# ------------------------------------------------------------------------------------------------------------
# Built-in samples.
# ------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Sample:
  title: str
  classes: str          # the classes suggested on the page
  make: object          # () -> uint8 [H, W, 3]


def _synthetic(index: int) -> np.ndarray:
  from ovseg_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  return synthetic.make_example(0, 'val', index, min_size=448, max_size=448)['image']


def _skimage(name: str) -> np.ndarray:
  from skimage import data  # pylint: disable=g-import-not-at-top
  return np.ascontiguousarray(getattr(data, name)()[..., :3])


def sample_table() -> dict:
  """{name: Sample}: three synthetic images (data/synthetic.py, held-out split), and scikit-image's photos
  astronaut / chelsea / coffee when scikit-image is installed (they ship inside the package)."""
  from ovseg_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  shapes = ', '.join(synthetic.SHAPES)
  table = {f'synthetic-{i}': Sample(f'synthetic shapes {i}', shapes, functools.partial(_synthetic, i))
           for i in (1, 2, 3)}
  if importlib.util.find_spec('skimage') is None:
    return table
  for name, title, classes in (('astronaut', 'astronaut (scikit-image)', 'person, flag, rocket, sky'),
                               ('chelsea', 'chelsea the cat (scikit-image)', 'cat, wall, floor'),
                               ('coffee', 'coffee (scikit-image)', 'cup, coffee, spoon, table')):
    table[name] = Sample(title, classes, functools.partial(_skimage, name))
  return table


# ------------------------------------------------------------------------------------------------------------
# The work behind one request (no HTTP here).
# ------------------------------------------------------------------------------------------------------------

def _png(array_or_image, **kw) -> bytes:
  im = array_or_image if isinstance(array_or_image, Image.Image) else Image.fromarray(array_or_image)
  buf = io.BytesIO()
  im.save(buf, format='PNG', **kw)
  return buf.getvalue()


def label_png(labels: np.ndarray) -> bytes:
  """int [H, W] in [0, 255] -> palette PNG bytes, the file `segment --save_labels` writes
  (eval_datasets.write_label_png, in memory)."""
  im = Image.fromarray(labels.astype(np.uint8), mode='P')
  im.putpalette(eval_datasets.voc_palette().reshape(-1).tolist())
  return _png(im)


def _display_size(h: int, w: int) -> tuple[int, int]:
  f = min(1.0, DISPLAY_MAX_SIDE / max(h, w))
  return max(1, round(h * f)), max(1, round(w * f))


def _nearest(labels: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
  """int [H, W] -> int [h, w] by nearest neighbour (the labels shown at display size)."""
  if labels.shape == tuple(hw):
    return labels
  return np.asarray(Image.fromarray(labels.astype(np.int32)).resize(hw[::-1], Image.NEAREST))


def group_map(segmenter, shown: np.ndarray, image: np.ndarray) -> np.ndarray:
  """int [h, w]: `visualize`'s group map (argmax group of the soft assignment on the whole image at the eval
  short side), jitted (mask_probe.group_affinity), of the display-size image `shown`; of the full `image`
  when `shown` is too thin for one patch. [K, H, W] at full size would be costly for a large upload."""
  from ovseg_jax import mask_probe  # pylint: disable=g-import-not-at-top  (imports jax)
  try:
    return mask_probe.group_affinity(segmenter, shown).argmax(axis=0)
  except ValueError:
    return _nearest(mask_probe.group_affinity(segmenter, image).argmax(axis=0), shown.shape[:2])


def group_colours(groups: np.ndarray) -> np.ndarray:
  """int [h, w] group indices -> uint8 [h, w, 3] in visualize's group colours."""
  from ovseg_jax import visualize  # pylint: disable=g-import-not-at-top  (imports jax)
  colours = visualize._GROUP_COLOURS  # pylint: disable=protected-access
  return colours[groups % len(colours)]


def parse_classes(text: str, background: bool) -> list:
  """segment's rules (no empty or repeated name, no 'background' while it is on), worded for the page."""
  if not text.strip(' ,'):
    raise errors.UsageError('Type at least one class name, e.g. "cat, dog, potted plant".')
  if len(text) > MAX_CLASSES_CHARS:
    raise errors.UsageError(f'The class list is {len(text)} characters long; at most {MAX_CLASSES_CHARS} '
                            'are accepted.')
  try:
    names = segment_cli.parse_classes(text, background)
  except errors.UsageError as e:
    raise errors.UsageError(str(e).replace('--classes', 'Classes', 1).replace(
        'pass --no_background', 'untick "background class"')) from None
  if len(names) > MAX_CLASSES:
    raise errors.UsageError(f'{len(names)} classes given; at most {MAX_CLASSES} per request.')
  return names


def parse_threshold(text: str) -> float | None:
  """'' -> None (eval.bg_threshold); else a number in [0, 1]."""
  if not text.strip():
    return None
  try:
    value = float(text)
  except ValueError:
    value = math.nan
  if not 0.0 <= value <= 1.0:   # also refuses nan
    raise errors.UsageError(f'Background threshold {text.strip()!r} must be a number between 0 and 1 '
                            '(or empty for the default).')
  return value


class CompileCounter:
  """Counts XLA backend compilations in this process (JAX's monitoring event), for the answers' `compiles`."""

  def __init__(self):
    self.count = 0
    from jax import monitoring  # pylint: disable=g-import-not-at-top
    monitoring.register_event_duration_secs_listener(self._listen)

  def _listen(self, event, duration, **kwargs):
    del duration, kwargs
    if event == COMPILE_EVENT:
      self.count += 1


class Demo:
  """The model, its per-templates Segmenters (one set of weights), the samples, and `segment(request)`."""

  def __init__(self, segmenter, *, checkpoint: str = '', max_pixels: int | None = None,
               max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB):
    self.base = segmenter
    self.checkpoint = checkpoint
    self.max_pixels = images.resolve_max_pixels(max_pixels)
    self.max_upload = int(max_upload_mb * 1024 * 1024)
    self.samples = sample_table()
    self._segmenters = {segmenter.eval_config.templates: segmenter}
    self._sample_images = {}
    self._lock = threading.Lock()  # one request at a time on the model: 2 at once only share the cores
    self.compiles = CompileCounter()

  def segmenter(self, templates: str):
    """The Segmenter for `templates`: same weights and compilations, its own text cache."""
    if templates not in prompts.TEMPLATES:
      raise errors.UsageError(f'Unknown prompt templates {templates!r}; choose one of '
                              f'{", ".join(sorted(prompts.TEMPLATES))}.')
    if templates not in self._segmenters:
      cfg = copy.deepcopy(self.base.eval_config)
      cfg.templates = templates
      self._segmenters[templates] = type(self.base)(self.base.model_config, self.base.variables, cfg)
    return self._segmenters[templates]

  def sample_image(self, name: str) -> np.ndarray:
    if name not in self.samples:
      raise errors.UsageError(f'Unknown sample {name!r}.')
    if name not in self._sample_images:
      self._sample_images[name] = self.samples[name].make()
    return self._sample_images[name]

  def info(self) -> dict:
    cfg = self.base.eval_config
    return {
        'checkpoint': self.checkpoint,
        'model': {'patch_size': self.base.patch_size, 'img_size': int(self.base.model_config.vision.img_size)},
        'eval': {k: cfg[k] for k in ('short_side', 'window', 'stride', 'templates', 'bg_threshold')},
        'templates': sorted(prompts.TEMPLATES),
        'samples': [{'name': k, 'title': s.title, 'classes': s.classes} for k, s in self.samples.items()],
        'max_upload_bytes': self.max_upload,
        'max_pixels': self.max_pixels,
        'max_pixels_text': images.describe_budget(self.max_pixels),
    }

  def segment(self, params: dict, body: bytes) -> dict:
    """One request -> the answer's JSON dict. UsageError (one line for the page) for any bad input.

    params: the query parameters (str values); body: the uploaded file's bytes (empty with `sample`).
    """
    t0 = time.perf_counter()
    background = params.get('background', '1') not in ('0', 'false', 'off', '')
    classes = parse_classes(params.get('classes', ''), background)
    threshold = parse_threshold(params.get('threshold', '')) if background else None
    seg = self.segmenter(params.get('templates') or self.base.eval_config.templates)
    sample = params.get('sample', '')
    if sample:
      image, source = self.sample_image(sample), f'sample {sample}'
    elif body:
      source = _safe_name(params.get('name', '')) or 'upload'
      image = images.read_rgb(body, max_pixels=self.max_pixels, name=source, exif_transpose=True)
    else:
      raise errors.UsageError('Choose an image: upload one or pick a sample.')
    h, w = image.shape[:2]
    try:
      seg.check_size(h, w)
    except ValueError as e:
      raise errors.UsageError(f'{source}: {e}') from None
    t_read = time.perf_counter()

    dh, dw = _display_size(h, w)
    shown = image if (dh, dw) == (h, w) else np.asarray(Image.fromarray(image).resize((dw, dh), Image.BILINEAR))
    with self._lock:
      compiles0, encodes0 = self.compiles.count, seg.text_encodes
      t1 = time.perf_counter()
      seg.text_embedding(classes)           # cached per (classes, templates); segment() reuses it
      t2 = time.perf_counter()
      labels, _ = seg.segment(image, classes, background, background_threshold=threshold)
      t3 = time.perf_counter()
      groups = group_map(seg, shown, image)
      t4 = time.perf_counter()
      compiles, text_cached = self.compiles.count - compiles0, seg.text_encodes == encodes0

    names = seg.class_list(classes, background)
    colours = segment_cli.class_colours(len(names), background)
    counts = np.bincount(labels.reshape(-1), minlength=len(names))
    overlay = segment_cli.render_overlay(shown, _nearest(labels, (dh, dw)), names, background)
    out = {
        'source': source, 'width': w, 'height': h, 'templates': seg.eval_config.templates,
        'background': background,
        'threshold': float(seg.eval_config.bg_threshold if threshold is None else threshold) if background else None,
        'classes': [{'name': n, 'colour': '#%02x%02x%02x' % tuple(int(v) for v in colours[i]),
                     'share': float(100.0 * counts[i] / labels.size), 'background': background and i == 0}
                    for i, n in enumerate(names)],
        'num_groups': int(len(np.unique(groups))),
        'overlay': base64.b64encode(_png(overlay, compress_level=3)).decode(),
        'groups': base64.b64encode(_png(group_colours(_nearest(groups, (dh, dw))), compress_level=3)).decode(),
        'labels': base64.b64encode(label_png(labels)).decode(),
        'text_cached': bool(text_cached), 'compiles': int(compiles),
    }
    t5 = time.perf_counter()
    out['seconds'] = {'read': t_read - t0, 'text': t2 - t1, 'segment': t3 - t2, 'groups': t4 - t3,
                      'render': t5 - t4, 'total': t5 - t0}
    return out


def _safe_name(name: str) -> str:
  """An uploaded file's name for messages: its base name, printable characters only, at most 100."""
  name = os.path.basename(name.replace('\\', '/'))
  return re.sub(r'[^\w .,()+=-]', '_', name)[:100]


# ------------------------------------------------------------------------------------------------------------
# HTTP.
# ------------------------------------------------------------------------------------------------------------

def _is_loopback(host: str) -> bool:
  if host == 'localhost':
    return True
  try:
    return ipaddress.ip_address(host).is_loopback
  except ValueError:
    return False


def _host_name(header: str) -> str:
  """'localhost:7860' -> 'localhost', '[::1]:7860' -> '::1'."""
  header = header.strip().lower()
  if header.startswith('['):
    return header[1:header.find(']')] if ']' in header else header
  return header.rsplit(':', 1)[0] if header.count(':') == 1 else header


class Handler(http.server.BaseHTTPRequestHandler):
  """GET the page, the info and the samples; POST a segmentation. Nothing else, nothing from disk but the page."""

  server_version = 'ovseg_jax-demo'
  sys_version = ''
  protocol_version = 'HTTP/1.1'
  demo: Demo = None      # set by make_server
  page: bytes = b''
  loopback_only = True

  # --- replies -----------------------------------------------------------------------------------------------

  def _send(self, status: int, body: bytes, content_type: str, close: bool = False) -> None:
    self.send_response(status)
    self.send_header('Content-Type', content_type)
    self.send_header('Content-Length', str(len(body)))
    self.send_header('Cache-Control', 'no-store')
    self.send_header('X-Content-Type-Options', 'nosniff')
    self.send_header('Content-Security-Policy', "default-src 'self'; img-src 'self' data: blob:; "
                     "style-src 'unsafe-inline'; script-src 'unsafe-inline'; connect-src 'self' blob:")
    if close:
      self.send_header('Connection', 'close')
      self.close_connection = True
    self.end_headers()
    if self.command != 'HEAD':
      self.wfile.write(body)

  def _json(self, status: int, obj: dict, close: bool = False) -> None:
    self._send(status, json.dumps(obj).encode(), 'application/json', close)

  def _error(self, status: int, message: str, close: bool = False) -> None:
    self._json(status, {'error': message}, close)

  def log_request(self, code='-', size='-'):  # pylint: disable=unused-argument
    pass  # one line per segmentation instead (below); errors still go through log_error

  def _host_ok(self) -> bool:
    host = self.headers.get('Host')
    if not self.loopback_only or host is None:
      return True
    if _host_name(host) in _LOOPBACK_NAMES:
      return True
    self._error(421, 'this server answers only requests addressed to localhost / 127.0.0.1', close=True)
    return False

  # --- routes ------------------------------------------------------------------------------------------------

  def do_GET(self):  # pylint: disable=invalid-name
    if not self._host_ok():
      return
    path = urllib.parse.urlsplit(self.path).path
    if path in ('/', '/index.html'):
      return self._send(200, self.page, 'text/html; charset=utf-8')
    if path == '/api/info':
      return self._json(200, self.demo.info())
    m = re.fullmatch(r'/sample/([\w-]+)\.png', path)
    if m and m.group(1) in self.demo.samples:
      return self._send(200, _png(self.demo.sample_image(m.group(1))), 'image/png')
    if path == '/favicon.ico':
      return self._send(204, b'', 'image/x-icon')
    return self._error(404, f'no page {path}')

  def do_HEAD(self):  # pylint: disable=invalid-name
    self.do_GET()

  def do_POST(self):  # pylint: disable=invalid-name
    if not self._host_ok():
      return
    url = urllib.parse.urlsplit(self.path)
    if url.path != '/api/segment':
      return self._error(404, f'no endpoint {url.path}', close=True)
    # A cross-site page cannot send this type without a CORS preflight, which is never granted.
    if self.headers.get_content_type() != 'application/octet-stream':
      return self._error(415, 'send the image bytes as application/octet-stream', close=True)
    if 'chunked' in self.headers.get('Transfer-Encoding', '').lower():
      return self._error(411, 'send a Content-Length', close=True)
    try:
      length = int(self.headers.get('Content-Length', '0'))
    except ValueError:
      length = -1
    if length < 0:
      return self._error(400, 'bad Content-Length', close=True)
    if length > self.demo.max_upload:
      return self._error(413, f'The file is {length / 2**20:.1f} MB; uploads are limited to '
                         f'{self.demo.max_upload / 2**20:.0f} MB.', close=True)
    body = self.rfile.read(length) if length else b''
    params = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query, keep_blank_values=True).items()}
    try:
      out = self.demo.segment(params, body)
    except errors.UsageError as e:
      self.log_message('refused: %s', str(e))
      return self._error(400, str(e))
    except Exception as e:  # pylint: disable=broad-except  (a bug: its traceback goes to the log, not the page)
      traceback.print_exc(file=sys.stderr)
      return self._error(500, f'Internal error ({type(e).__name__}); the server log has the details.')
    s = out['seconds']
    self.log_message('%s %dx%d, %d classes: %.2f s (segment %.2f s, text %s, %d compiles)', out['source'],
                     out['width'], out['height'], len(out['classes']), s['total'], s['segment'],
                     'cached' if out['text_cached'] else f'{s["text"]:.2f} s', out['compiles'])
    self._json(200, out)


class Server(http.server.ThreadingHTTPServer):
  daemon_threads = True

  def __init__(self, address, handler):
    if ':' in address[0]:
      self.address_family = socket.AF_INET6
    super().__init__(address, handler)


def make_server(demo: Demo, host: str = '127.0.0.1', port: int = 7860) -> Server:
  """A server bound to (host, port) (port 0: any free port; read `server.server_address`)."""
  with open(PAGE, 'rb') as f:
    page = f.read()
  handler = type('DemoHandler', (Handler,), {'demo': demo, 'page': page, 'loopback_only': _is_loopback(host)})
  return Server((host, port), handler)


# ------------------------------------------------------------------------------------------------------------
# Command line.
# ------------------------------------------------------------------------------------------------------------

def parse_args(argv=None):
  fv = flags.FlagValues()
  flags.DEFINE_string('checkpoint', None, 'inference checkpoint folder (convert official / export)', flag_values=fv)
  flags.DEFINE_string('host', '127.0.0.1', 'address to listen on (0.0.0.0 opens the page to the network)',
                      flag_values=fv)
  flags.DEFINE_integer('port', 7860, 'port to listen on (0: any free port)', flag_values=fv)
  flags.DEFINE_integer('max_pixels', None, 'pixel budget of an uploaded image (default: '
                       f'${images.ENV_MAX_PIXELS}, else {images.DEFAULT_MAX_PIXELS} = 8192x8192)', flag_values=fv)
  flags.DEFINE_float('max_upload_mb', DEFAULT_MAX_UPLOAD_MB, 'largest upload accepted, in MB', flag_values=fv)
  return cli.parse(fv, argv, prog='python -m ovseg_jax.demo', doc=__doc__, required=('checkpoint',),
                   eval_settings=True)


@cli.entry_point
def main(argv=None) -> int:
  args = parse_args(argv)
  if not 0 <= args.port <= 65535:
    cli.error(f'--port {args.port} is not a port number (0-65535)')
  if not args.max_upload_mb > 0:
    cli.error(f'--max_upload_mb {args.max_upload_mb} must be positive')
  try:
    max_pixels = images.resolve_max_pixels(args.max_pixels)
    from ovseg_jax import inference  # pylint: disable=g-import-not-at-top
    segmenter = inference.Segmenter.from_checkpoint(args.checkpoint, **args.eval)
    demo = Demo(segmenter, checkpoint=args.checkpoint, max_pixels=max_pixels, max_upload_mb=args.max_upload_mb)
  except (FileNotFoundError, ValueError) as e:   # UsageError is a ValueError
    print(f'error: {e}', file=sys.stderr)
    return 2
  try:
    server = make_server(demo, args.host, args.port)
  except OSError as e:
    print(f'error: cannot listen on {args.host}:{args.port}: {e.strerror or e}', file=sys.stderr)
    return 2
  host, port = server.server_address[:2]
  shown = f'[{host}]' if ':' in host else host
  print(f'serving http://{shown}:{port}/ (Ctrl-C stops)', flush=True)
  try:
    server.serve_forever()
  except KeyboardInterrupt:
    pass
  finally:
    server.server_close()
  return 0


if __name__ == '__main__':
  sys.exit(main())
