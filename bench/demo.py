"""The web demo's latency for one 448 x 448 image, next to the `segment` command's.

    python -m bench.demo [--model vitb] [--checkpoint EXPORT] [--runs 3]

Without --checkpoint, a random-init inference checkpoint of --model (configs/<model>.py, bench.inference.build)
is written to a temporary folder first. The image is scikit-image's astronaut resized to 448 x 448 (one 448
window at the default eval settings; a random image without scikit-image), the classes the 20 VOC names.
Each side runs in its own fresh process, one after the other:
  * segment: `python -m ovseg_jax.segment --checkpoint C --image astronaut448.png --classes VOC20 --output o.png`,
    wall time of the whole command (start-up, checkpoint load, text encoding, compilation, segmentation,
    writing the overlay): what one image costs from the command line.
  * demo: `python -m ovseg_jax.demo --checkpoint C --port 0`, time to its 'serving' line, then POSTs of the
    same image: the first (encodes the classes, compiles), --runs more with the same classes (median; the
    answers must report cached text and 0 compilations), and one with 20 other classes (text encoding; the
    window step compiles once per number of classes, so the same count reuses it).
    Per request: the HTTP round trip, and the server's own split (segment / group map / PNGs).
Prints one JSON line.
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

from absl import flags
import numpy as np
from PIL import Image

from ovseg_jax import cli
from ovseg_jax import eval_datasets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ', '.join(eval_datasets.VOC_CLASSES[1:])
# 20 other names: same count, so only the text is new (the window step compiles once per number of classes)
OTHER_CLASSES = ('sky, flag, rocket, helmet, suit, building, tree, grass, road, wall, floor, ceiling, window, '
                 'door, table, lamp, book, clock, cup, keyboard')


def image_448() -> np.ndarray:
  try:
    from skimage import data  # pylint: disable=g-import-not-at-top
    return np.asarray(Image.fromarray(data.astronaut()).resize((448, 448), Image.BILINEAR))
  except ImportError:
    return np.random.default_rng(0).integers(0, 256, (448, 448, 3), dtype=np.uint8)


def random_checkpoint(model: str, directory: str) -> str:
  from bench import inference as bench_inference  # pylint: disable=g-import-not-at-top
  from ovseg_jax import checkpoint  # pylint: disable=g-import-not-at-top
  mc, variables, _, _ = bench_inference.build(model)
  return checkpoint.save_inference(directory, mc, variables, {'source': f'bench.demo random init {model}'})


def _env():
  return {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': os.environ.get('XLA_FLAGS', '')}


def time_segment(ckpt: str, image_path: str, out_dir: str) -> dict:
  cmd = [sys.executable, '-m', 'ovseg_jax.segment', '--checkpoint', ckpt, '--image', image_path,
         '--classes', CLASSES, '--output', os.path.join(out_dir, 'overlay.png')]
  t = time.perf_counter()
  p = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, check=False)
  wall = time.perf_counter() - t
  if p.returncode != 0:
    raise RuntimeError(f'segment failed ({p.returncode}): {p.stderr[-2000:]}')
  return {'command_s': round(wall, 3)}


def _post(url: str, classes: str, body: bytes) -> tuple[float, dict]:
  q = urllib.parse.urlencode({'classes': classes, 'name': 'astronaut448.png'})
  req = urllib.request.Request(f'{url}api/segment?{q}', data=body, method='POST',
                               headers={'Content-Type': 'application/octet-stream'})
  t = time.perf_counter()
  with urllib.request.urlopen(req, timeout=1800) as r:
    out = json.loads(r.read())
  return time.perf_counter() - t, out


def _split(wall: float, out: dict) -> dict:
  s = out['seconds']
  return {'request_s': round(wall, 3), 'segment_s': round(s['segment'], 3), 'text_s': round(s['text'], 3),
          'group_map_s': round(s['groups'], 3), 'render_s': round(s['render'], 3),
          'text_cached': out['text_cached'], 'compiles': out['compiles']}


def time_demo(ckpt: str, png: bytes, runs: int) -> dict:
  cmd = [sys.executable, '-m', 'ovseg_jax.demo', '--checkpoint', ckpt, '--port', '0']
  t = time.perf_counter()
  proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
  try:
    line = proc.stdout.readline()
    if not line.startswith('serving '):
      raise RuntimeError(f'the demo did not start: {line!r}')
    url = line.split()[1]
    result = {'start_s': round(time.perf_counter() - t, 3), 'first': _split(*_post(url, CLASSES, png))}
    warm = [_split(*_post(url, CLASSES, png)) for _ in range(runs)]
    if any(not w['text_cached'] or w['compiles'] for w in warm):
      raise RuntimeError(f'a repeated request encoded text or compiled: {warm}')
    result['warm'] = {k: round(statistics.median(w[k] for w in warm), 3)
                      for k in ('request_s', 'segment_s', 'group_map_s', 'render_s')}
    result['warm_runs'] = [w['request_s'] for w in warm]
    result['new_classes'] = _split(*_post(url, OTHER_CLASSES, png))
    return result
  finally:
    proc.terminate()
    proc.wait(30)


def main(argv=None) -> int:
  fv = flags.FlagValues()
  flags.DEFINE_string('model', 'vitb', 'configs/<model>.py for the random-init checkpoint', flag_values=fv)
  flags.DEFINE_string('checkpoint', None, 'an inference checkpoint (default: random init of --model)',
                      flag_values=fv)
  flags.DEFINE_integer('runs', 3, 'repeated demo requests (median)', flag_values=fv)
  args = cli.parse(fv, argv, prog='python -m bench.demo', doc=__doc__)
  load0 = os.getloadavg()
  with tempfile.TemporaryDirectory(prefix='bench_demo_') as tmp:
    ckpt = args.checkpoint or random_checkpoint(args.model, os.path.join(tmp, 'ckpt'))
    image_path = os.path.join(tmp, 'astronaut448.png')
    Image.fromarray(image_448()).save(image_path)
    with open(image_path, 'rb') as f:
      png = f.read()
    seg = time_segment(ckpt, image_path, tmp)
    dem = time_demo(ckpt, png, args.runs)
  print(json.dumps({'bench': 'demo', 'model': args.checkpoint or f'{args.model} (random init)',
                    'image': '448x448', 'classes': 20, 'segment': seg, 'demo': dem,
                    'load_average': [round(x, 2) for x in (*load0[:1], os.getloadavg()[0])]}))
  return 0


if __name__ == '__main__':
  sys.exit(main())
