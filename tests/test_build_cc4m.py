"""CC4M builder (data/build_cc4m.py): webdataset tar, img2dataset files folder and TSV/CSV inputs with planted bad
records; exact report counts by reason, byte-exact round trip, re-encoding, entity index, resume after a crash,
the caption-length histogram, damaged datasets, CLI exit codes."""

import io
import json
import os
import struct
import tarfile
import zlib

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from ovseg_jax import errors
from ovseg_jax.data import build_cc4m
from ovseg_jax.data import build_report
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


def _interrupt_second_shard(monkeypatch, calls=None):
  """Makes the build stop with KeyboardInterrupt (a Ctrl-C or kill) when it starts shard 1; `calls` (a list)
  records the index of every shard started. -> the real process_task (to patch back or wrap)."""
  real = shard_writer.process_task

  def crash_on_second(args):
    if calls is not None:
      calls.append(args[0].index)
    if args[0].index == 1:
      raise KeyboardInterrupt('simulated kill')
    return real(args)

  monkeypatch.setattr(shard_writer, 'process_task', crash_on_second)
  return real


def _interrupted_build(tmp_path, monkeypatch, num_tars, calls=None):
  """Builds `num_tars` tars of `_records()` (in tmp_path) into tmp_path/out until shard 1 is interrupted, then
  puts the real process_task back (still recording into `calls`)."""
  recs = _records()
  for i in range(num_tars):
    write_tar(tmp_path / f'shard-{i:05d}.tar', recs)
  real = _interrupt_second_shard(monkeypatch, calls)
  with pytest.raises(KeyboardInterrupt):
    _build([str(tmp_path)], tmp_path / 'out')
  monkeypatch.setattr(shard_writer, 'process_task',
                      real if calls is None else lambda args: calls.append(args[0].index) or real(args))


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
  calls = []
  _interrupted_build(tmp_path, monkeypatch, 3, calls)
  assert calls == [0, 1]
  calls.clear()
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
  _interrupted_build(tmp_path, monkeypatch, 2)
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


# ------------------------------------------------------------------------------------ bad records (issue 19)
def _members_tar(path, members):
  """A tar of [(member name, bytes)] in this order (duplicates allowed)."""
  with tarfile.open(path, 'w') as tar:
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


def _counts(report):
  """The non-zero counts of a report (seen, kept and every dropped reason)."""
  return {k: v for k, v in report['counts'].items() if v and k != 're_encoded'}


def test_bad_webdataset_records_are_counted_by_reason(tmp_path):
  jpg = {k: _jpeg(100, 80, i) for i, k in enumerate(('g1', 'g1b', 'two', 'twopng', 'txtwins', 'x'))}
  members = [
      ('g1.jpg', jpg['g1']), ('g1.txt', b'a dog on a bench'),
      ('num.jpg', jpg['x']), ('num.json', b'{"caption": 123}'),
      ('null.jpg', jpg['x']), ('null.json', b'{"caption": null}'),
      ('list.jpg', jpg['x']), ('list.json', b'{"caption": ["a dog"]}'),
      ('nested.jpg', jpg['x']), ('nested.json', b'{"caption": {"text": "a dog"}}'),
      ('g1.jpg', jpg['g1b']), ('g1.txt', b'a horse'),                    # the key again: duplicate_key
      ('badjson.jpg', jpg['x']), ('badjson.json', b'{"caption": "a dog"'),
      ('array.jpg', jpg['x']), ('array.json', b'["a dog"]'),
      ('deep.jpg', jpg['x']), ('deep.json', b'[' * 100000),             # RecursionError in json
      ('latin.jpg', jpg['x']), ('latin.json', b'{"caption": "caf\xe9 dog"}'),
      ('nocap.jpg', jpg['x']), ('nocap.json', b'{"url": "http://x"}'),
      ('long.jpg', jpg['x']), ('long.txt', b'a dog ' * 30000),         # 180 KB: over csv's 128 KiB too
      ('txtwins.jpg', jpg['txtwins']), ('txtwins.txt', b'a cat'), ('txtwins.json', b'{"caption": 5}'),
      ('two.jpg', jpg['two']), ('two.png', jpg['twopng']), ('two.txt', b'a bus'),  # 2nd image: duplicate
  ]
  _members_tar(tmp_path / 'shard.tar', members)
  report = _build([str(tmp_path / 'shard.tar')], tmp_path / 'out')
  assert _counts(report) == {'seen': 15, 'kept': 3, 'caption_not_text': 4, 'invalid_json': 3,
                             'undecodable_text': 1, 'empty_caption': 1, 'caption_too_long': 1,
                             'duplicate_key': 2}
  assert report['examples']['caption_not_text'] == ['shard.tar:num', 'shard.tar:null', 'shard.tar:list',
                                                    'shard.tar:nested']
  assert report['examples']['duplicate_key'] == ['shard.tar:g1', 'shard.tar:two']
  back = _read_back(report['dataset_dir'])
  assert set(back) == {'g1', 'txtwins', 'two'}
  assert back['g1'][1]['caption'] == b'a dog on a bench' and back['g1'][1]['image'] == jpg['g1']  # the first
  assert back['two'][1]['image'] == jpg['two'] and back['txtwins'][1]['caption'] == b'a cat'
  table = shard_writer.format_report(report)
  assert 'dropped: caption_not_text' in table and 'caption_not_text: e.g. shard.tar:num' in table


def _tar_of_dogs(path, n):
  _members_tar(path, [m for i in range(n) for m in ((f'{i:03d}.jpg', _jpeg(100, 80, i)),
                                                    (f'{i:03d}.txt', b'a dog'))])
  with tarfile.open(path) as tar:
    return tar.getmembers()


def test_truncated_damaged_and_non_tar_shards(tmp_path):
  members = _tar_of_dogs(tmp_path / 'cut.tar', 4)
  raw = (tmp_path / 'cut.tar').read_bytes()
  (tmp_path / 'cut.tar').write_bytes(raw[:members[4].offset_data + 100])      # inside 002.jpg's data
  members = _tar_of_dogs(tmp_path / 'flip.tar', 4)
  raw = bytearray((tmp_path / 'flip.tar').read_bytes())
  raw[members[4].offset + 148] ^= 0x11                                       # 002.jpg's header checksum
  (tmp_path / 'flip.tar').write_bytes(bytes(raw))
  (tmp_path / 'junk.tar').write_bytes(b'this is no tar file' * 100)
  report = _build([str(tmp_path / '*.tar'), str(tmp_path / 'cut.tar')], tmp_path / 'out')  # cut.tar: read once
  assert _counts(report) == {'seen': 7, 'kept': 4, 'unreadable_input': 3}
  w = report['warnings']
  assert len(w) == 3
  assert w[0].startswith(f'{tmp_path / "cut.tar"}: unreadable at member 002.jpg (ReadError')
  assert w[1].startswith(f'{tmp_path / "flip.tar"}: stops at byte {members[4].offset} of ')
  assert w[2].startswith(f'{tmp_path / "junk.tar"}: unreadable at its start')
  assert all(x.endswith('the rest of this shard is not read') for x in w)
  assert sorted(_read_back(report['dataset_dir'])) == ['000', '001']         # 2 + 2 records, same keys


def test_table_bad_rows_are_counted_by_reason(tmp_path):
  root = tmp_path / 't'
  (root / 'images' / 'adir.jpg').mkdir(parents=True)
  for k, seed in (('good1', 0), ('good2', 1)):
    (root / 'images' / f'{k}.jpg').write_bytes(_jpeg(100, 80, seed))
  (root / 'images' / 'bad.jpg').write_bytes(b'not a jpeg')
  lines = [b'filepath\tcaption',                            # line 1
           b'images/good1.jpg\ta dog on a bench',           # 2 kept
           b'images/good2.jpg\ta red bus',                  # 3 kept
           b'images/good2.jpg\t' + b'a dog ' * 30000,       # 4 caption_too_long (180 KB, csv's limit 128 KiB)
           b'images/good1.jpg\ta dog on a bench',           # 5 duplicate_key
           b'images/good1.jpg\ta cat on a bench',           # 6 kept: another caption of the same image
           b'images/nope.jpg\ta dog',                       # 7 missing_image
           b'images/adir.jpg\ta dog',                       # 8 unreadable_file (a folder)
           b'images/good2.jpg',                             # 9 malformed_row
           b'images/good2.jpg\tcaf\xe9 dog',                # 10 undecodable_text
           b'images/bad.jpg\ta dog',                        # 11 corrupt_image
           b'',                                             # 12 blank: no record
           b'images/good2.jpg\t   ']                        # 13 empty_caption
  (root / 'pairs.tsv').write_bytes(b'\n'.join(lines) + b'\n')
  report = _build([str(root / 'pairs.tsv')], tmp_path / 'out', shard_size=5)
  assert report['num_shards_in'] == 3
  assert _counts(report) == {'seen': 11, 'kept': 3, 'caption_too_long': 1, 'duplicate_key': 1,
                             'missing_image': 1, 'unreadable_file': 1, 'malformed_row': 1,
                             'undecodable_text': 1, 'corrupt_image': 1, 'empty_caption': 1}
  ex = report['examples']
  assert (ex['caption_too_long'], ex['duplicate_key'], ex['malformed_row'], ex['empty_caption']) == (
      ['pairs.tsv:4'], ['pairs.tsv:5'], ['pairs.tsv:9'], ['pairs.tsv:13'])
  src = tfds.builder_from_directory(report['dataset_dir']).as_data_source(
      'train', decoders={'image': tfds.decode.SkipDecoding()})
  assert sorted(src[i]['caption'].decode() for i in range(len(src))) == [
      'a cat on a bench', 'a dog on a bench', 'a red bus']


def test_csv_unterminated_quote_is_reported_and_swallows_nothing(tmp_path):
  root = tmp_path / 'c'
  (root / 'img').mkdir(parents=True)
  for i, k in enumerate('abcefgh'):
    (root / 'img' / f'{k}.jpg').write_bytes(_jpeg(100, 80, i))
  text = ('image,caption\n'                    # 1
          'img/a.jpg,"a dog, on a bench"\n'    # 2 kept
          'img/b.jpg,"a cat\n'                 # 3 unterminated_quote (the next line is a row)
          'img/c.jpg,a red bus\n'              # 4 kept
          'img/e.jpg,"two men,\n'              # 5 kept: a quoted caption over two lines
          'and a dog"\n'                       # 6
          'img/f.jpg,a train"\n'               # 7 kept: a quote inside an unquoted field opens nothing
          'img/g.jpg,"a horse\n'               # 8 unterminated_quote: line 9 closes it, but not as valid CSV
          'near "the barn\n'                   # 9 malformed_row (one field)
          'img/h.jpg,"a bird\n')               # 10 unterminated_quote at the end of the file
  (root / 'pairs.csv').write_text(text)
  report = _build([str(root / 'pairs.csv')], tmp_path / 'out', shard_size=3)
  assert _counts(report) == {'seen': 8, 'kept': 4, 'unterminated_quote': 3, 'malformed_row': 1}
  assert report['examples']['unterminated_quote'] == ['pairs.csv:3', 'pairs.csv:8', 'pairs.csv:10']
  assert report['examples']['malformed_row'] == ['pairs.csv:9']
  path = str(root / 'pairs.csv')
  assert report['warnings'] == [f'{path} line {n}: a quote opened in this row never closes; the row is '
                                'skipped and the lines after it are read as rows' for n in (3, 8, 10)]
  src = tfds.builder_from_directory(report['dataset_dir']).as_data_source(
      'train', decoders={'image': tfds.decode.SkipDecoding()})
  assert sorted(src[i]['caption'].decode() for i in range(len(src))) == [
      'a dog, on a bench', 'a red bus', 'a train"', 'two men,\nand a dog']


def _png_header(w, h):
  """A PNG whose header declares w x h (a decompression bomb's header; the pixel data is a few bytes)."""
  def chunk(kind, data):
    return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))
  return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', struct.pack('>IIBBBBB', w, h, 8, 2, 0, 0, 0)) +
          chunk(b'IDAT', zlib.compress(b'\x00' * 16)) + chunk(b'IEND', b''))


def test_files_folder_unreadable_duplicate_and_oversized_images(tmp_path):
  d = tmp_path / 'files' / '00000'
  d.mkdir(parents=True)
  (d / 'ok.jpg').write_bytes(_jpeg(100, 80, 0))
  (d / 'ok.txt').write_bytes(b'a dog')
  (d / 'ok.png').write_bytes(_jpeg(90, 90, 1, 'PNG'))      # a second image of key 'ok': duplicate_key
  (d / 'dir.jpg').mkdir()                                    # a folder where the image should be
  (d / 'dir.txt').write_bytes(b'a dog')
  (d / 'bomb.png').write_bytes(_png_header(50000, 50000))   # over the pixel budget: never decoded
  (d / 'bomb.txt').write_bytes(b'a dog')
  (d / 'big.jpg').write_bytes(_jpeg(120, 100, 2))           # over max_pixels=8000 below
  (d / 'big.txt').write_bytes(b'a cat')
  (d / 'nocap.jpg').write_bytes(_jpeg(100, 80, 3))          # no .txt / .json: empty_caption
  tasks = build_cc4m.discover_tasks([str(tmp_path / 'files')], shard_size=4)
  opts = shard_writer.Options(max_side=MAX_SIDE, min_side=MIN_SIDE, max_pixels=100 * 80)
  report = shard_writer.run_build(tasks, build_cc4m.iter_task, output=str(tmp_path / 'out'), name='cc4m',
                                  split='train', opts=opts, num_workers=0)
  assert _counts(report) == {'seen': 6, 'kept': 1, 'duplicate_key': 1, 'unreadable_file': 1,
                             'image_too_large': 2, 'empty_caption': 1}
  assert report['options']['max_pixels'] == 8000
  assert report['examples']['image_too_large'] == [str(d / 'big'), str(d / 'bomb')]
  assert _read_back(report['dataset_dir'])['ok'][1]['image'] == (d / 'ok.jpg').read_bytes()


def test_unexpected_error_in_one_record_is_counted(tmp_path, monkeypatch):
  write_tar(tmp_path / 's.tar', _records())
  real = shard_writer.filter_record

  def buggy(rec, *args):
    if rec.key == 'good_png':
      raise KeyError('simulated bug')
    return real(rec, *args)

  monkeypatch.setattr(shard_writer, 'filter_record', buggy)
  report = _build([str(tmp_path / 's.tar')], tmp_path / 'out')
  assert report['counts']['unexpected_error'] == 1 and report['counts']['kept'] == 2
  assert report['warnings'] == ["s.tar:good_png: KeyError: 'simulated bug'"]


def test_rerun_after_a_crash_that_left_partial_files(tmp_path, monkeypatch):
  calls = []
  _interrupted_build(tmp_path, monkeypatch, 3, calls)
  assert calls == [0, 1]
  calls.clear()
  work = tmp_path / 'out' / 'cc4m' / '_build_train'
  # what a kill -9 can leave: a half-written part, a part without its marker, a marker cut short,
  # and (killed while finalizing) a shard file already in the dataset folder
  (work / 'part-00001.array_record.tmp').write_bytes(b'\x00' * 1000)
  (work / 'part-00002.array_record').write_bytes(b'half a shard')
  marker = (work / 'part-00000.json').read_text()
  (work / 'part-00000.json').write_text(marker[:len(marker) // 2])
  vdir = tmp_path / 'out' / 'cc4m' / '1.0.0'
  vdir.mkdir(parents=True)
  (vdir / 'cc4m-train.array_record-00000-of-00007').write_bytes(b'stale')
  report = _build([str(tmp_path)], tmp_path / 'out')
  assert calls == [0, 1, 2]                                 # the cut marker makes shard 0 redone
  _check_counts(report, scale=3)
  assert sorted(f for f in os.listdir(vdir) if 'array_record' in f) == [
      f'cc4m-train.array_record-0000{i}-of-00003' for i in range(3)]
  assert not work.exists()
  assert len(tfds_builder.open_source(str(vdir), 'train')) == 9


def test_unreadable_signature_discards_the_partial_build(tmp_path, monkeypatch):
  write_tar(tmp_path / 'a.tar', _records())
  write_tar(tmp_path / 'b.tar', _records())
  real = _interrupt_second_shard(monkeypatch)
  with pytest.raises(KeyboardInterrupt):
    _build([str(tmp_path / '*.tar')], tmp_path / 'out')
  (tmp_path / 'out' / 'cc4m' / '_build_train' / 'signature.json').write_text('{"sig')
  monkeypatch.setattr(shard_writer, 'process_task', real)
  log = io.StringIO()
  report = _build([str(tmp_path / '*.tar')], tmp_path / 'out', log=log)
  assert 'signature.json is unreadable: that partial build is discarded' in log.getvalue()
  assert report['shards_skipped_on_resume'] == 0
  _check_counts(report, scale=2)


# ------------------------------------------------------------------------ caption lengths (issue 21 item 3)
def test_caption_length_summary():
  s = build_report.caption_length_summary({10: 90, 20: 9, 40: 1})
  assert s['count'] == 100 and s['mean'] == pytest.approx(11.2) and s['max'] == 40
  assert s['percentiles'] == {'50': 10, '90': 10, '95': 20, '99': 20}
  assert s['histogram'] == {'1-16': 90, '17-24': 9, '25-32': 0, '33-48': 1, '49-64': 0, '65-77': 0, '78+': 0}
  assert s['suggested_buckets'] == [16, 24] and s['suggested_coverage'] == 0.99 and s['over_ceiling'] == 0
  # 99 % fit the smallest bucket
  s = build_report.caption_length_summary({5: 99, 70: 1})
  assert s['percentiles']['99'] == 5 and s['suggested_buckets'] == [16] and s['suggested_coverage'] == 0.99
  # the 99th percentile above the ceiling: the whole ladder, and how many are truncated
  s = build_report.caption_length_summary({12: 50, 100: 50})
  assert s['suggested_buckets'] == [16, 24, 32, 48, 64, 77] and s['suggested_coverage'] == 0.5
  assert s['over_ceiling'] == 50 and s['histogram']['78+'] == 50
  assert build_report.caption_length_summary({}) == {'count': 0}


def test_build_reports_caption_token_lengths(tmp_path, capsys):
  # 'dog ' * n is n + 2 tokens with [CLS] / [SEP]: 16 captions of 10 tokens, 3 of 30, 1 of 60
  recs = {f'k{i:02d}': (_jpeg(80, 80, i), ('dog ' * n).encode(), None, 'kept')
          for i, n in enumerate([8] * 16 + [28] * 3 + [58])}
  recs['drop'] = (_jpeg(80, 80, 99), ('sky ' * 100).encode(), None, 'no_entity')  # dropped: not counted
  write_tar(tmp_path / 'a.tar', recs)
  rc = build_cc4m.main(['--input', str(tmp_path / 'a.tar'), '--output', str(tmp_path / 'o'), '--max_side',
                        str(MAX_SIDE), '--num_workers', '1'])
  assert rc == 0
  out = capsys.readouterr().out
  path = tmp_path / 'o' / 'cc4m' / '1.0.0' / 'build_report-train.json'
  assert f'dataset: {path.parent}  (report: {path})' in out
  tokens = json.loads(path.read_text())['caption_tokens']
  assert tokens['lengths'] == {'10': 16, '30': 3, '60': 1}
  assert tokens['percentiles'] == {'50': 10, '90': 30, '95': 30, '99': 60}
  assert tokens['suggested_buckets'] == [16, 24, 32, 48, 64] and tokens['suggested_coverage'] == 1.0
  assert tokens['histogram']['1-16'] == 16 and tokens['histogram']['25-32'] == 3
  assert '  25-32          3  15.00%  ########\n' in out
  assert ('caption length in tokens (with [CLS]/[SEP]) of 20 kept captions: mean 15.5, p50 10, p90 30, '
          'p99 60, max 60') in out
  assert 'suggested text padding buckets: (16, 24, 32, 48, 64) (the largest, 64, holds 100.00% of captions' in out


# ------------------------------------------------------------------------------- reading a damaged dataset
def test_deleted_or_truncated_shard_is_one_line(tmp_path):
  for i in range(3):
    write_tar(tmp_path / f's{i}.tar', _records())
  report = _build([str(tmp_path / '*.tar')], tmp_path / 'out')
  vdir = report['dataset_dir']
  assert len(tfds_builder.open_source(vdir, 'train')) == 9
  shard = os.path.join(vdir, 'cc4m-train.array_record-00001-of-00003')
  data = open(shard, 'rb').read()
  os.remove(shard)
  with pytest.raises(errors.UsageError) as e:
    tfds_builder.open_source(vdir, 'train')
  assert str(e.value) == (f'dataset {vdir}: shard file cc4m-train.array_record-00001-of-00003 of split '
                          "'train' is missing; rebuild the split (build_cc4m / synthetic with --overwrite)")
  with open(shard, 'wb') as f:
    f.write(data[:len(data) // 2])
  with pytest.raises(errors.UsageError, match=r'^dataset .*: shard file cc4m-train.array_record-00001-of-00003 '
                     r"of split 'train' is truncated or damaged \(.*\); rebuild the split") as e:
    tfds_builder.open_source(vdir, 'train')
  assert '\n' not in str(e.value)
  with pytest.raises(errors.UsageError, match=r"has no split 'val' \(it has \['train'\]\)"):
    tfds_builder.check_split(vdir, 'val')
  # the same build again notices the damage and rebuilds the split
  log = io.StringIO()
  again = _build([str(tmp_path / '*.tar')], tmp_path / 'out', log=log)
  assert 'is truncated or damaged' in log.getvalue() and 'rebuilding the split' in log.getvalue()
  assert not again.get('up_to_date') and len(tfds_builder.open_source(vdir, 'train')) == 9


# ------------------------------------------------------------------------------------- CLI exit codes
def test_cli_user_errors_and_a_build_that_keeps_nothing(tmp_path, capsys):
  write_tar(tmp_path / 'a.tar', _records())
  (tmp_path / 'file.txt').write_text('x')
  base = ['--input', str(tmp_path / 'a.tar'), '--num_workers', '1']
  cases = [
      (['--output', str(tmp_path / 'file.txt' / 'out')],
       f'error: --output {tmp_path / "file.txt" / "out"}: {tmp_path / "file.txt"} is a file, not a folder'),
      (['--output', str(tmp_path / 'o'), '--split', 'a/b'], "error: --split 'a/b' must be letters, digits and _"),
      (['--output', str(tmp_path / 'o'), '--name', 'Bad-Name'],
       "error: --name: dataset name 'Bad-Name' must be lower_snake_case (letters, digits, _)"),
      (['--output', str(tmp_path / 'o'), '--image_root', str(tmp_path / 'nope')],
       f'error: --image_root {tmp_path / "nope"} is not a folder'),
      (['--output', str(tmp_path / 'o'), '--max_pixels', '-1'],
       'error: --shard_size and --max_side must be positive, --min_side and --max_pixels >= 0'),
  ]
  for argv, msg in cases:
    assert build_cc4m.main(base + argv) == 2, argv
    assert capsys.readouterr().err.strip().splitlines() == [msg]
  # every record dropped: exit 2, one line that names the report, which exists
  only_bad = {k: v for k, v in _records().items() if not v[3].startswith('kept')}
  write_tar(tmp_path / 'bad.tar', only_bad)
  assert build_cc4m.main(['--input', str(tmp_path / 'bad.tar'), '--output', str(tmp_path / 'o2'),
                          '--num_workers', '1', '--max_side', str(MAX_SIDE)]) == 2
  err = capsys.readouterr().err.strip().splitlines()[-1]
  path = tmp_path / 'o2' / 'cc4m' / 'build_report-train.json'
  assert err == (f"error: no record of split 'train' was kept: all 7 were dropped (corrupt_image 2, "
                 f'undecodable_text 1, no_entity 1); report: {path}')
  assert json.loads(path.read_text())['counts']['seen'] == 7
  assert sorted(os.listdir(tmp_path / 'o2' / 'cc4m')) == ['build_report-train.json']
  # a damaged dataset_info.json: one line, with or without --overwrite
  good = ['--input', str(tmp_path / 'a.tar'), '--output', str(tmp_path / 'o3'), '--num_workers', '1']
  assert build_cc4m.main(good) == 0
  vdir = tmp_path / 'o3' / 'cc4m' / '1.0.0'
  (vdir / 'dataset_info.json').write_text('{"name": "cc')
  capsys.readouterr()
  for extra in ([], ['--overwrite']):
    assert build_cc4m.main(good + extra) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f'error: {vdir}: dataset_info.json / features.json cannot be read (ParseError: Failed to load JSON: '
        'Unterminated string starting at: line 1 column 10 (char 9).); delete that folder and build the '
        'dataset again')


def _dies_in_second_shard(task):
  """A reader whose worker process is killed (as by the OOM killer) in shard 1."""
  if task.index == 1:
    os._exit(9)
  return build_cc4m.iter_task(task)


def test_a_dead_worker_is_one_error_and_the_rerun_resumes(tmp_path):
  for i in range(2):
    write_tar(tmp_path / f's{i}.tar', _records())
  tasks = build_cc4m.discover_tasks([str(tmp_path / '*.tar')], shard_size=4)
  kw = dict(output=str(tmp_path / 'out'), name='cc4m', split='train',
            opts=shard_writer.Options(max_side=MAX_SIDE, min_side=MIN_SIDE), num_workers=2)
  with pytest.raises(RuntimeError, match=r'^a worker process died \(killed, or out of memory\?\); the shards '
                     'finished so far are kept: rerun to resume'):
    shard_writer.run_build(tasks, _dies_in_second_shard, **kw)
  report = shard_writer.run_build(tasks, build_cc4m.iter_task, **kw)
  _check_counts(report, scale=2)


def test_cli_ctrl_c_is_one_line_and_the_rerun_resumes(tmp_path, capsys, monkeypatch):
  for i in range(2):
    write_tar(tmp_path / f's{i}.tar', _records())
  argv = ['--input', str(tmp_path / '*.tar'), '--output', str(tmp_path / 'o'), '--num_workers', '1',
          '--max_side', str(MAX_SIDE)]
  real = _interrupt_second_shard(monkeypatch)
  assert build_cc4m.main(argv) == 130
  assert capsys.readouterr().err.strip().splitlines()[-1] == (
      f'interrupted: finished shards are kept in {tmp_path / "o" / "cc4m" / "_build_train"}; rerun the same '
      'command to resume')
  monkeypatch.setattr(shard_writer, 'process_task', real)
  assert build_cc4m.main(argv) == 0
  assert 'resuming: 1/2 shards already finished, 1 to go' in capsys.readouterr().err
