"""`python -m ovseg_jax.demo`: start-up errors, the HTTP API's refusals, and the page driven in a real browser.

The server runs in a subprocess on a free port (`--port 0`, read from its first line) with a tiny random
checkpoint. The browser test drives headless Chromium (Debian's `chromium` + `chromium-driver`, which
launch/test.sh installs when apt works) through selenium; it is skipped, naming what is missing, otherwise.
Set OVSEG_DEMO_SCREENSHOT=docs/demo.png to save the README's screenshot of the page.
"""

import base64
import http.client
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import urllib.parse

import numpy as np
import pytest
from PIL import Image

from ovseg_jax import demo
from ovseg_jax import errors
from ovseg_jax import inference
from tests import seg_fixtures

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_PIXELS = 1_000_000     # the server's pixel budget: a 1200 x 1000 upload is over it
START_TIMEOUT_S = 180


# ------------------------------------------------------------------------------------------------------------
# Start-up (in process: no server is started).
# ------------------------------------------------------------------------------------------------------------

def test_missing_checkpoint_is_one_line_and_exit_2(tmp_path, capsys):
  assert demo.main(['--checkpoint', str(tmp_path / 'nope'), '--port', '0']) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith('error: ') and 'nope' in err[0], err


def test_invalid_checkpoint_is_one_line_and_exit_2(tmp_path, capsys):
  (tmp_path / 'model_config.json').write_text('[1, 2]')
  assert demo.main(['--checkpoint', str(tmp_path), '--port', '0']) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith('error: ') and 'model_config.json' in err[0], err


def test_bad_flags_are_usage_errors(capsys):
  assert demo.main(['--checkpoint', 'x', '--port', '70000']) == 2
  assert demo.main(['--checkpoint', 'x', '--eval.nope=1']) == 2
  assert demo.main([]) == 2
  assert all(line.startswith('error: ') for line in capsys.readouterr().err.strip().splitlines())


def test_request_parsing():
  assert demo.parse_threshold('') is None and demo.parse_threshold(' 0.5 ') == 0.5
  for bad in ('abc', 'nan', '-0.1', '1.5', 'inf'):
    with pytest.raises(errors.UsageError, match='between 0 and 1'):
      demo.parse_threshold(bad)
  assert demo.parse_classes(' cat, potted plant ', True) == ['cat', 'potted plant']
  for bad, why in ((' , ', 'at least one class'), ('cat,,dog', 'empty'), ('cat, Cat', 'same class'),
                   ('cat, background', 'untick')):
    with pytest.raises(errors.UsageError, match=why):
      demo.parse_classes(bad, True)
  assert demo.parse_classes('cat, background', False) == ['cat', 'background']
  assert demo._safe_name('C:\\x\\<script>.png') == '_script_.png'  # pylint: disable=protected-access


# ------------------------------------------------------------------------------------------------------------
# The server.
# ------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def server(tmp_path_factory):
  """(base url, port, log path) of a demo server in a subprocess, stopped after the module."""
  log = tmp_path_factory.mktemp('demo') / 'server.log'
  evals = [f'--eval.{k}={v}' for k, v in seg_fixtures.TINY_EVAL.items()]
  cmd = [sys.executable, '-m', 'ovseg_jax.demo', '--checkpoint', seg_fixtures.shared_tiny_checkpoint(),
         '--port', '0', '--max_pixels', str(MAX_PIXELS), *evals]
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': ''}
  with open(log, 'w') as err:
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
  watchdog = threading.Timer(START_TIMEOUT_S, proc.kill)  # a server that never prints its address
  watchdog.start()
  line = proc.stdout.readline()
  watchdog.cancel()
  if not line.startswith('serving http://'):
    proc.kill()
    pytest.fail(f'the demo did not start: {line!r}\n{log.read_text()[-3000:]}')
  url = line.split()[1]
  try:
    yield url, urllib.parse.urlsplit(url).port, log
  finally:
    proc.terminate()
    try:
      proc.wait(10)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()


def _request(port, method, path, body=b'', headers=None):
  conn = http.client.HTTPConnection('127.0.0.1', port, timeout=120)
  try:
    conn.request(method, path, body=body, headers=headers or {})
    r = conn.getresponse()
    return r.status, r.read(), r.getheader('Content-Type')
  finally:
    conn.close()


def _post(port, query: dict, body=b'', **headers):
  status, data, _ = _request(port, 'POST', '/api/segment?' + urllib.parse.urlencode(query), body,
                             {'Content-Type': 'application/octet-stream', **headers})
  return status, json.loads(data)


def _png_bytes(array) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format='PNG')
  return buf.getvalue()


def test_api_segments_and_caches(server):
  _, port, _ = server
  image = seg_fixtures.random_image(72, 100, seed=3)
  query = {'classes': 'cat, dog', 'name': 'x.png', 'threshold': '0.9'}
  status, first = _post(port, query, _png_bytes(image))
  assert status == 200, first
  assert (first['width'], first['height']) == (100, 72)
  assert [c['name'] for c in first['classes']] == ['background', 'cat', 'dog']
  assert abs(sum(c['share'] for c in first['classes']) - 100.0) < 1e-3
  labels = np.asarray(Image.open(io.BytesIO(base64.b64decode(first['labels']))))
  assert labels.shape == (72, 100) and labels.max() < 3
  shares = np.bincount(labels.reshape(-1), minlength=3) / labels.size * 100
  np.testing.assert_allclose(shares, [c['share'] for c in first['classes']], atol=1e-3)
  # The same classes and an image of the same size: no text encoding, nothing compiled.
  status, again = _post(port, query, _png_bytes(seg_fixtures.random_image(72, 100, seed=4)))
  assert status == 200 and again['text_cached'] and again['compiles'] == 0, again['seconds']
  # A large upload: the pictures are shown at 1024 px at most, the label PNG keeps the full size.
  status, big = _post(port, query, _png_bytes(seg_fixtures.random_image(700, 1100, seed=5)))
  assert status == 200, big
  overlay = Image.open(io.BytesIO(base64.b64decode(big['overlay'])))
  groups = Image.open(io.BytesIO(base64.b64decode(big['groups'])))
  assert overlay.width == 1024 and groups.size == (1024, 652)
  assert Image.open(io.BytesIO(base64.b64decode(big['labels']))).size == (1100, 700)
  # The labels are the Python API's on the same image and settings.
  seg = inference.Segmenter.from_checkpoint(seg_fixtures.shared_tiny_checkpoint(), **seg_fixtures.TINY_EVAL)
  np.testing.assert_array_equal(labels, seg.segment(image, ['cat', 'dog'], background_threshold=0.9)[0])


def test_api_refuses_bad_requests(server):
  _, port, _ = server
  status, out = _post(port, {'classes': 'cat', 'name': 'broken.png'}, b'\x89PNG\r\n\x1a\n' + b'\0' * 50)
  assert status == 400 and out['error'].startswith('broken.png: '), out
  status, out = _post(port, {'classes': ''}, _png_bytes(seg_fixtures.random_image(40, 40)))
  assert status == 400 and 'at least one class' in out['error']
  status, out = _post(port, {'classes': 'cat', 'name': 'huge.png'}, _png_bytes(np.zeros((1000, 1200, 3), np.uint8)))
  assert status == 400 and 'pixel budget' in out['error'], out
  status, out = _post(port, {'classes': 'cat', 'sample': 'nope'})
  assert status == 400 and 'Unknown sample' in out['error']
  # Over the upload limit: refused from the header, before the body is read.
  conn = http.client.HTTPConnection('127.0.0.1', port, timeout=30)
  conn.putrequest('POST', '/api/segment?classes=cat')
  conn.putheader('Content-Type', 'application/octet-stream')
  conn.putheader('Content-Length', str(200 * 2**20))
  conn.endheaders()
  r = conn.getresponse()
  assert r.status == 413 and 'limited to 20 MB' in json.loads(r.read())['error']
  conn.close()
  # A cross-site form post (text/plain), another Host (DNS rebinding), paths outside the API.
  assert _request(port, 'POST', '/api/segment?classes=cat', b'x', {'Content-Type': 'text/plain'})[0] == 415
  assert _request(port, 'GET', '/api/info', headers={'Host': 'attacker.example:80'})[0] == 421
  assert _request(port, 'GET', '/../../etc/passwd')[0] == 404
  assert _request(port, 'GET', '/sample/..%2F..%2Fetc.png')[0] == 404
  status, data, kind = _request(port, 'GET', '/api/info')
  assert status == 200 and kind == 'application/json'
  assert json.loads(data)['samples'][0]['name'] == 'synthetic-1'


# ------------------------------------------------------------------------------------------------------------
# The page, in headless Chromium.
# ------------------------------------------------------------------------------------------------------------

def _browser_or_skip():
  chromium = next((p for p in map(shutil.which, ('chromium', 'chromium-browser')) if p), None)
  driver = shutil.which('chromedriver')
  if not chromium or not driver:
    pytest.skip(f'no {"chromium" if not chromium else "chromedriver"} binary (Debian packages chromium and '
                'chromium-driver; launch/test.sh installs them when apt-get works)')
  try:
    import selenium  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    pytest.skip('no selenium (pip install -r requirements-dev.txt)')
  return chromium, driver


@pytest.fixture
def browser(tmp_path, monkeypatch):
  chromium, driver_path = _browser_or_skip()
  from selenium import webdriver  # pylint: disable=g-import-not-at-top
  from selenium.webdriver.chrome.service import Service  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv('SE_OFFLINE', 'true')  # selenium-manager must not look for downloads
  opts = webdriver.ChromeOptions()
  opts.binary_location = chromium
  # The flags keep Chromium off the (closed) network: no background, component or sync traffic.
  for arg in ('--headless=new', '--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage', '--disable-quic',
              '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync',
              '--disable-extensions', '--window-size=1280,900', f'--user-data-dir={tmp_path / "profile"}'):
    opts.add_argument(arg)
  drv = webdriver.Chrome(service=Service(driver_path), options=opts)
  drv.set_script_timeout(30)
  try:
    yield drv
  finally:
    drv.quit()


def _submit(drv, timeout=120):
  """Clicks Segment and waits for the answer -> 'done' | 'error'."""
  from selenium.webdriver.common.by import By  # pylint: disable=g-import-not-at-top
  from selenium.webdriver.support.ui import WebDriverWait  # pylint: disable=g-import-not-at-top
  drv.execute_script("document.getElementById('form').dataset.state = ''")
  drv.find_element(By.ID, 'run').click()
  return WebDriverWait(drv, timeout).until(
      lambda d: d.execute_script("return document.getElementById('form').dataset.state") in ('done', 'error')
      and d.execute_script("return document.getElementById('form').dataset.state"))


def _error_text(drv) -> str:
  from selenium.webdriver.common.by import By  # pylint: disable=g-import-not-at-top
  el = drv.find_element(By.ID, 'error')
  return el.text if el.is_displayed() else ''


def _type(drv, element_id, text):
  from selenium.webdriver.common.by import By  # pylint: disable=g-import-not-at-top
  el = drv.find_element(By.ID, element_id)
  el.clear()
  el.send_keys(text)


def test_page_in_chromium(browser, server, tmp_path):
  from selenium.webdriver.common.by import By  # pylint: disable=g-import-not-at-top
  from selenium.webdriver.support.ui import Select, WebDriverWait  # pylint: disable=g-import-not-at-top
  url, _, log = server
  drv = browser
  drv.get(url)
  WebDriverWait(drv, 30).until(lambda d: len(Select(d.find_element(By.ID, 'sample')).options) > 1)

  # Upload an image, type classes, get the overlay, the group map and a legend naming the classes.
  photo = tmp_path / 'photo.png'
  Image.fromarray(seg_fixtures.random_image(96, 128, seed=5)).save(photo)
  drv.find_element(By.ID, 'file').send_keys(str(photo))
  assert Select(drv.find_element(By.ID, 'sample')).first_selected_option.get_attribute('value') == ''
  _type(drv, 'classes', 'cat, potted plant, traffic light')
  _type(drv, 'threshold', '0.5')
  assert _submit(drv) == 'done', _error_text(drv) + log.read_text()[-2000:]
  for img in ('overlay', 'groups'):
    assert drv.execute_script(f"return document.getElementById('{img}').naturalWidth") > 0, img
  rows = drv.find_elements(By.CSS_SELECTOR, '#legend tbody tr')
  names = [r.find_elements(By.TAG_NAME, 'td')[1].text for r in rows]
  assert names == ['background', 'cat', 'potted plant', 'traffic light']
  shares = [float(r.find_elements(By.TAG_NAME, 'td')[2].text.rstrip(' %')) for r in rows]
  assert abs(sum(shares) - 100) < 0.5
  assert 'photo.png, 128×96 px' in drv.find_element(By.ID, 'timing').text
  # The download link holds the label PNG of the uploaded image.
  png = drv.execute_async_script("""
      const done = arguments[arguments.length - 1];
      fetch(document.getElementById('download').href).then(r => r.arrayBuffer()).then(b => {
        let s = ''; new Uint8Array(b).forEach(c => s += String.fromCharCode(c)); done(btoa(s)); });""")
  labels = np.asarray(Image.open(io.BytesIO(base64.b64decode(png))))
  assert labels.shape == (96, 128) and labels.max() <= 3
  assert drv.find_element(By.ID, 'download').get_attribute('download') == 'labels.png'

  # Again with the same classes: the page says the text was cached and nothing was compiled.
  assert _submit(drv) == 'done'
  timing = drv.find_element(By.ID, 'timing')
  assert timing.get_attribute('data-text-cached') == 'true' and timing.get_attribute('data-compiles') == '0', \
      timing.text

  # Bad input: a visible one-line message, no stack trace.
  _type(drv, 'classes', ' , ')
  assert _submit(drv) == 'error' and 'at least one class' in _error_text(drv)
  _type(drv, 'classes', 'cat')
  _type(drv, 'threshold', '1.5')
  assert _submit(drv) == 'error' and 'between 0 and 1' in _error_text(drv)
  _type(drv, 'threshold', '')
  broken = tmp_path / 'broken.jpg'
  broken.write_bytes(b'\xff\xd8\xff\xe0 this is not a JPEG')
  drv.find_element(By.ID, 'file').send_keys(str(broken))
  assert _submit(drv) == 'error'
  assert _error_text(drv).startswith('broken.jpg: '), _error_text(drv)
  huge = tmp_path / 'huge.png'
  Image.new('RGB', (1200, 1000), (90, 120, 200)).save(huge)
  drv.find_element(By.ID, 'file').send_keys(str(huge))
  assert _submit(drv) == 'error' and 'pixel budget' in _error_text(drv)
  for text in (_error_text(drv), drv.find_element(By.TAG_NAME, 'body').text):
    assert 'Traceback' not in text

  # A built-in sample without the background class (every pixel gets a class): the README's screenshot.
  Select(drv.find_element(By.ID, 'sample')).select_by_value('synthetic-1')
  assert drv.find_element(By.ID, 'classes').get_attribute('value') == 'cat'  # typed classes are kept
  _type(drv, 'classes', 'circle, square, triangle, star, cross, ring')
  drv.find_element(By.ID, 'background').click()
  assert _submit(drv) == 'done' and not _error_text(drv)
  names = [r.find_elements(By.TAG_NAME, 'td')[1].text
           for r in drv.find_elements(By.CSS_SELECTOR, '#legend tbody tr')]
  assert names == ['circle', 'square', 'triangle', 'star', 'cross', 'ring']
  target = os.environ.get('OVSEG_DEMO_SCREENSHOT')
  if target:
    for _ in range(2):  # the window, browser frame included, just taller than the page
      extra = drv.execute_script('return document.documentElement.scrollHeight - window.innerHeight')
      drv.set_window_size(1280, min(drv.get_window_size()['height'] + extra + 8, 2000))
    drv.save_screenshot(os.path.join(ROOT, target) if not os.path.isabs(target) else target)
