"""CC4M builder (data/build_cc4m.py): webdataset tar, img2dataset files folder and TSV inputs with planted bad
records; exact report counts, byte-exact round trip, re-encoding, entity index, resume, CLI errors."""

import io
import json
import os
import tarfile

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from ovseg_jax import errors
from ovseg_jax.data import build_cc4m
from ovseg_jax.data import shard_writer
from ovseg_jax.data import tfds_builder

MAX_SIDE, MIN_SIDE = 128, 64


def _jpeg(w, h, seed, fmt='JPEG'):
  rng = np.random.default_rng(seed)
  out = io.BytesIO()
  Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(out, fmt, quality=90)
  return out.getvalue()


def _records():
  """key -> (image bytes | None, caption bytes | None, extra json | None, expected outcome)."""
  return {
      'good_small': (_jpeg(100, 80, 0), b'Two dogs and a man on a bench.', None, 'kept'),
      'good_large': (_jpeg(200, 150, 1), None, {'caption': 'A cat on a TV'}, 'kept_reencoded'),
      'good_png': (_jpeg(90, 90, 2, 'PNG'), b'a red bus', None, 'kept_reencoded'),
      'no_entity': (_jpeg(100, 80, 3), b'a view of the mountains at dusk', None, 'no_entity'),
      'corrupt': (_jpeg(100, 80, 4)[:300], b'a dog', None, 'corrupt_image'),
      'garbage': (b'not an image at all', b'a cat', None, 'corrupt_image'),
      'no_image': (None, b'a horse', None, 'missing_image'),
      'empty_caption': (_jpeg(100, 80, 5), b'   ', None, 'empty_caption'),
      'too_small': (_jpeg(40, 100, 6), b'a dog', None, 'image_too_small'),
      'bad_text': (_jpeg(100, 80, 7), b'a dog \xff\xfe', None, 'undecodable_text'),
  }


EXPECTED = {'kept': 3, 'no_entity': 1, 'corrupt_image': 2, 'missing_image': 1, 'empty_caption': 1,
            'image_too_small': 1, 'undecodable_text': 1}


def _members(recs, prefix=''):
  for key, (img, cap, js, _) in recs.items():
    if img is not None:
      yield f'{prefix}{key}.jpg', img
    if cap is not None:
      yield f'{prefix}{key}.txt', cap
    if js is not None:
      yield f'{prefix}{key}.json', json.dumps(js).encode()


def write_tar(path, recs):
  with tarfile.open(path, 'w') as tar:
    for name, data in _members(recs):
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


def write_files(folder, recs):
  os.makedirs(folder, exist_ok=True)
  for name, data in _members(recs):
    with open(os.path.join(folder, name), 'wb') as f:
      f.write(data)


def write_tsv(root, recs):
  os.makedirs(os.path.join(root, 'images'), exist_ok=True)
  lines = [b'filepath\tcaption']
  for key, (img, cap, js, _) in recs.items():
    if img is not None:
      with open(os.path.join(root, 'images', key + '.jpg'), 'wb') as f:
        f.write(img)
    cap = cap if cap is not None else js['caption'].encode()
    lines.append(b'images/' + key.encode() + b'.jpg\t' + cap)
  path = os.path.join(root, 'pairs.tsv')
  with open(path, 'wb') as f:
    f.write(b'\n'.join(lines) + b'\n')
  return path


def _build(inputs, out, **kw):
  tasks = build_cc4m.discover_tasks(inputs, shard_size=kw.pop('shard_size', 4))
  opts = shard_writer.Options(max_side=MAX_SIDE, min_side=MIN_SIDE)
  return shard_writer.run_build(tasks, build_cc4m.iter_task, output=str(out), name='cc4m', split='train',
                                opts=opts, num_workers=kw.pop('num_workers', 0), **kw)


def _read_back(vdir):
  src = tfds.builder_from_directory(vdir).as_data_source('train',
                                                         decoders={'image': tfds.decode.SkipDecoding()})
  # keys: the img2dataset key, or the image path for a table row ('images/good_small.jpg')
  return {os.path.splitext(os.path.basename(src[i]['key'].decode()))[0]: (i, src[i]) for i in range(len(src))}


def _check_round_trip(vdir, recs):
  back = _read_back(vdir)
  kept = {k for k, v in recs.items() if v[3].startswith('kept')}
  assert set(back) == kept
  for key in kept:
    img, cap, js, outcome = recs[key]
    rec = back[key][1]
    assert rec['caption'].decode() == (cap.decode() if cap is not None else js['caption'])
    if outcome == 'kept':
      assert rec['image'] == img                          # byte-exact
    else:
      im = Image.open(io.BytesIO(rec['image']))
      assert im.format == 'JPEG'
      src = Image.open(io.BytesIO(img))
      assert max(im.size) == min(MAX_SIDE, max(src.size))
  small = back['good_small'][1]
  assert [e.decode() for e in small['entities']] == ['dog', 'man', 'bench']
  assert [e.decode() for e in small['canonical']] == ['dog', 'people', 'bench']
  # the entity index points at records that hold the entity
  index = tfds_builder.load_entity_index(vdir, 'train', 'canonical')
  assert set(index) == {'dog', 'people', 'bench', 'cat', 'tv', 'bus'}
  by_id = {i: r for i, r in back.values()}
  for ent, ids in index.items():
    for i in ids:
      assert ent in [e.decode() for e in by_id[int(i)]['canonical']]


def _check_counts(report, scale=1):
  for reason, n in EXPECTED.items():
    assert report['counts'][reason] == n * scale, reason
  assert report['counts']['seen'] == sum(EXPECTED.values()) * scale
  assert report['counts']['re_encoded'] == 2 * scale


def test_webdataset_tar(tmp_path):
  recs = _records()
  write_tar(tmp_path / 'shard-00000.tar', recs)
  report = _build([str(tmp_path / '*.tar')], tmp_path / 'out')
  _check_counts(report)
  _check_round_trip(report['dataset_dir'], recs)
  table = shard_writer.format_report(report)
  assert 'dropped: corrupt_image' in table and '3' in table.splitlines()[1]


def test_files_folder(tmp_path):
  recs = _records()
  write_files(tmp_path / 'files' / '00000', recs)
  report = _build([str(tmp_path / 'files')], tmp_path / 'out')
  _check_counts(report)
  _check_round_trip(report['dataset_dir'], recs)


def test_tsv_with_parallel_workers(tmp_path):
  recs = _records()
  path = write_tsv(tmp_path / 'tsv', recs)
  report = _build([path], tmp_path / 'out', shard_size=3, num_workers=2)
  assert report['num_shards_in'] == 4                       # 10 rows / 3 per shard
  _check_counts(report)
  _check_round_trip(report['dataset_dir'], recs)
  with open(os.path.join(report['dataset_dir'], 'build_report-train.json')) as f:
    assert json.load(f)['counts'] == report['counts']


def test_resume_skips_finished_shards(tmp_path, monkeypatch):
  recs = _records()
  for i in range(3):
    write_tar(tmp_path / f'shard-{i:05d}.tar', recs)
  real = shard_writer.process_task
  calls = []

  def crash_on_second(args):
    calls.append(args[0].index)
    if args[0].index == 1:
      raise KeyboardInterrupt('simulated kill')
    return real(args)

  monkeypatch.setattr(shard_writer, 'process_task', crash_on_second)
  with pytest.raises(KeyboardInterrupt):
    _build([str(tmp_path)], tmp_path / 'out')
  assert calls == [0, 1]
  calls.clear()
  monkeypatch.setattr(shard_writer, 'process_task', lambda args: calls.append(args[0].index) or real(args))
  report = _build([str(tmp_path)], tmp_path / 'out')
  assert calls == [1, 2]                                      # shard 0 was not redone
  assert report['shards_skipped_on_resume'] == 1
  _check_counts(report, scale=3)
  assert len(_read_back(report['dataset_dir'])) == 3          # same keys in 3 shards: 9 records, 3 keys
  src = tfds.builder_from_directory(report['dataset_dir']).as_data_source('train')
  assert len(src) == 9
  # a finished split: the same build is a no-op, another one needs --overwrite
  calls.clear()
  again = _build([str(tmp_path)], tmp_path / 'out')
  assert again['up_to_date'] and again['counts'] == report['counts'] and calls == []
  tasks = build_cc4m.discover_tasks([str(tmp_path)], shard_size=4)
  with pytest.raises(errors.UsageError, match='--overwrite'):
    shard_writer.run_build(tasks, build_cc4m.iter_task, output=str(tmp_path / 'out'), name='cc4m',
                           split='train', opts=shard_writer.Options(max_side=256), num_workers=0)


def test_resume_with_other_options_is_refused(tmp_path, monkeypatch):
  recs = _records()
  for i in range(2):
    write_tar(tmp_path / f'shard-{i:05d}.tar', recs)
  real = shard_writer.process_task

  def crash(args):
    if args[0].index == 1:
      raise KeyboardInterrupt
    return real(args)

  monkeypatch.setattr(shard_writer, 'process_task', crash)
  with pytest.raises(KeyboardInterrupt):
    _build([str(tmp_path)], tmp_path / 'out')
  monkeypatch.setattr(shard_writer, 'process_task', real)
  tasks = build_cc4m.discover_tasks([str(tmp_path)], shard_size=4)
  with pytest.raises(errors.UsageError, match='other inputs/options'):
    shard_writer.run_build(tasks, build_cc4m.iter_task, output=str(tmp_path / 'out'), name='cc4m',
                           split='train', opts=shard_writer.Options(max_side=256), num_workers=0)


def test_official_entity_mode_filters_case_sensitively(tmp_path):
  recs = {'a': (_jpeg(100, 80, 0), b'Dogs on a bench', None, ''), 'b': (_jpeg(100, 80, 1), b'Dogs', None, '')}
  write_tar(tmp_path / 's.tar', recs)
  tasks = build_cc4m.discover_tasks([str(tmp_path / 's.tar')], shard_size=4)
  report = shard_writer.run_build(tasks, build_cc4m.iter_task, output=str(tmp_path / 'out'), name='cc4m',
                                  split='train', opts=shard_writer.Options(entity_mode='official'), num_workers=0)
  assert report['counts']['kept'] == 1 and report['counts']['no_entity'] == 1


def test_cli_errors_are_one_line(tmp_path, capsys):
  assert build_cc4m.main(['--input', str(tmp_path / 'nope'), '--output', str(tmp_path / 'o')]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err == [f'error: --input {tmp_path / "nope"} does not exist']
  rc = build_cc4m.main(['--input', str(tmp_path), '--output', str(tmp_path / 'o'), '--min_side', '900'])
  assert rc == 2
  assert 'larger than --max_side' in capsys.readouterr().err


def test_cli_end_to_end(tmp_path, capsys):
  write_tar(tmp_path / 'a.tar', _records())
  rc = build_cc4m.main(['--input', str(tmp_path / 'a.tar'), '--output', str(tmp_path / 'o'), '--max_side',
                        str(MAX_SIDE), '--num_workers', '1'])
  assert rc == 0
  out = capsys.readouterr().out
  assert 'kept' in out and 'dropped: no_entity' in out
  assert len(tfds.builder_from_directory(str(tmp_path / 'o' / 'cc4m' / '1.0.0')).as_data_source('train')) == 3


def test_tfds_download_and_prepare_path(tmp_path):
  """The builder's own (in-process) writer yields the same layout, entity index and meta."""
  exs = [(str(i), {'image': _jpeg(80, 80, i), 'caption': cap, 'entities': ents, 'canonical': canon,
                   'key': str(i)})
         for i, (cap, ents, canon) in enumerate([('a dog', ['dog'], ['dog']),
                                                 ('men and a dog', ['men', 'dog'], ['people', 'dog']),
                                                 ('a cat', ['cat'], ['cat'])])]
  cls = tfds_builder.builder_class('tiny_caps')
  builder = cls(data_dir=str(tmp_path), examples=exs, vocab={'name': 'cc4m'})
  builder.download_and_prepare()
  src = tfds.builder_from_directory(builder.data_dir).as_data_source('train')
  assert len(src) == 3
  index = tfds_builder.load_entity_index(builder.data_dir, 'train', 'canonical')
  assert {k: len(v) for k, v in index.items()} == {'dog': 2, 'people': 1, 'cat': 1}
  for i in index['dog']:
    assert b'dog' in list(src[int(i)]['canonical'])
  assert tfds_builder.read_meta(builder.data_dir)['vocab'] == {'name': 'cc4m'}
  with pytest.raises(ValueError, match='lower_snake_case'):
    tfds_builder.builder_class('Bad-Name')
