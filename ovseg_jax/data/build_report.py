"""What a dataset build reports: dropped records by reason, where they were, and the caption token lengths.

  counts = new_counts()                          # per shard, filled by shard_writer.process_task
  report = {..., **merge(markers)}                # over all shards: counts, dropped, examples, warnings,
                                                  # caption_tokens (histogram + suggested padding buckets)
  print(format_report(report))

Every input record is counted once: `seen = kept + sum(dropped)`. A record is dropped for the first problem
found: first one the reader found while taking the record apart (a break in the input, a duplicate, a bad
row, an unreadable file, a caption field over the cap, a .json that does not give a text caption), then, in
this order, missing_image, the caption, the entities, the image. The reasons:

  unreadable_input    the input shard breaks here (a truncated tar member, a damaged member header, a file
                      that is no tar): counted once per break; the records after it cannot be read (see warnings)
  duplicate_key       a key already seen in this shard (webdataset / files: a repeated key or a second image /
                      caption member of one key; table: a repeated (image, caption) row). The first is kept.
  unterminated_quote  a CSV row whose quote never closes; the row is dropped and the lines after it are read as
                      rows again (named with file and line in warnings)
  malformed_row       a table row with too few columns, or one the csv module cannot parse
  unreadable_file     an image / caption file that exists but cannot be read (permissions, a folder, I/O error)
  missing_image       no image member / the table's image path does not exist
  caption_too_long    a caption (or a table row) over MAX_CAPTION_BYTES: not a caption
  invalid_json        a `.json` member (without a `.txt`) that is not a JSON object
  caption_not_text    a `.json` caption that is not a string (a number, null, a list, an object)
  undecodable_text    a caption that is not UTF-8
  empty_caption       no caption, or only white space
  no_entity           the caption names no entity of the vocabulary (paper Sec. 3.1.2)
  image_too_large     over the pixel budget (ovseg_jax/images.py) or over MAX_IMAGE_BYTES, refused from the
                      header alone
  corrupt_image       not an image, or truncated / damaged pixel data
  image_too_small     shorter side below --min_side
  unexpected_error    processing the record raised something else (a bug): counted, named in warnings

Caption lengths: the kept captions tokenised with the project's tokenizer (`tokenizer.get_tokenizer`), counted
with [CLS] and [SEP] and untruncated up to TOKEN_CAP. `caption_tokens.suggested_buckets` is the standard
ladder BUCKET_LADDER up to its smallest entry at or above the 99th percentile: padding each batch to the
smallest of these buckets that holds it truncates no more than 1 % of captions.
"""

import numpy as np

REASONS = ('unreadable_input', 'duplicate_key', 'unterminated_quote', 'malformed_row', 'unreadable_file',
           'missing_image', 'caption_too_long', 'invalid_json', 'caption_not_text', 'undecodable_text',
           'empty_caption', 'no_entity', 'image_too_large', 'corrupt_image', 'image_too_small',
           'unexpected_error')
# reasons whose every occurrence is also a warning line (they point at a broken input, not a bad web record)
WARN_REASONS = ('unreadable_input', 'unterminated_quote', 'unexpected_error')
MAX_EXAMPLES = 5          # locations kept per reason (per shard, and in the report)
MAX_WARNINGS = 20         # warning lines kept per shard
MAX_PRINTED_WARNINGS = 30

BUCKET_LADDER = (16, 24, 32, 48, 64, 77)   # 77: the model's text ceiling (model.text.max_length)
COVERAGE = 0.99
TOKEN_CAP = 512           # lengths are measured up to this; longer captions count as TOKEN_CAP


def new_counts() -> dict:
  return dict.fromkeys(('seen', 'kept', 're_encoded') + REASONS, 0)


def add_lengths(total: dict, lengths: dict) -> None:
  """total {length: count} += lengths {length: count} (JSON makes the keys strings; `total`'s are ints)."""
  for n, c in lengths.items():
    total[int(n)] = total.get(int(n), 0) + int(c)


def caption_length_summary(lengths: dict, ladder=BUCKET_LADDER, coverage: float = COVERAGE) -> dict:
  """{length: count} of tokenised captions -> histogram over the ladder, percentiles, suggested buckets.

  Percentiles are nearest-rank (the smallest length L with at least p of the captions <= L).
  suggested_buckets: the ladder up to its smallest entry >= the `coverage` percentile (the whole ladder when
  the percentile is above its top, whose share is then below `coverage`: those captions are truncated).
  """
  items = sorted((int(k), int(v)) for k, v in lengths.items() if int(v) > 0)
  total = sum(v for _, v in items)
  if not total:
    return {'count': 0}
  values = np.asarray([k for k, _ in items])
  cum = np.cumsum([v for _, v in items])

  def pct(p):
    return int(values[np.searchsorted(cum, p * total - 1e-9)])

  def share_le(n):
    return float(sum(v for k, v in items if k <= n)) / total

  top = next((b for b in ladder if b >= pct(coverage)), ladder[-1])
  edges = [0] + list(ladder)
  hist = {}
  for lo, hi in zip(edges[:-1], edges[1:]):
    hist[f'{lo + 1}-{hi}'] = sum(v for k, v in items if lo < k <= hi)
  hist[f'{ladder[-1] + 1}+'] = sum(v for k, v in items if k > ladder[-1])
  return {
      'count': total,
      'mean': float(sum(k * v for k, v in items)) / total,
      'max': int(values[-1]),
      'percentiles': {'50': pct(0.5), '90': pct(0.9), '95': pct(0.95), '99': pct(0.99)},
      'histogram': hist,
      'lengths': {str(k): v for k, v in items},
      'suggested_buckets': [b for b in ladder if b <= top],
      'suggested_coverage': share_le(top),
      'over_ceiling': sum(v for k, v in items if k > ladder[-1]),
      'ladder': list(ladder),
      'token_cap': TOKEN_CAP,
  }


class LengthMeter:
  """Token lengths of kept captions, tokenised in batches inside a shard worker; never fails the build."""

  def __init__(self, batch: int = 256):
    self.batch, self.pending, self.lengths, self.error = batch, [], {}, None

  def add(self, caption: str) -> None:
    if self.error is None:
      self.pending.append(caption)
      if len(self.pending) >= self.batch:
        self.flush()

  def flush(self) -> None:
    if self.pending and self.error is None:
      try:
        from ovseg_jax import tokenizer  # pylint: disable=g-import-not-at-top  (only builds need it)
        _, mask = tokenizer.get_tokenizer(max_length=TOKEN_CAP)(self.pending, padding='longest')
        n, c = np.unique(mask.sum(1), return_counts=True)
        add_lengths(self.lengths, dict(zip(n.tolist(), c.tolist())))
      except Exception as e:  # pylint: disable=broad-except  (e.g. the vocabulary package is missing)
        self.error = f'caption lengths not measured ({type(e).__name__}: {e})'
    self.pending = []


def merge(markers) -> dict:
  """Per-shard results (shard_writer.process_task markers) -> counts, dropped, examples, warnings, tokens."""
  counts, examples, warnings, lengths, measured = new_counts(), {}, [], {}, 0
  for d in markers:
    for k in counts:
      counts[k] += d['counts'].get(k, 0)   # markers of an older build may lack newer reasons
    for reason, where in d.get('examples', {}).items():
      room = MAX_EXAMPLES - len(examples.setdefault(reason, []))
      examples[reason] += where[:max(room, 0)]
    warnings += d.get('warnings') or ([d['warning']] if d.get('warning') else [])
    if d.get('token_lengths') is not None:
      measured += 1
      add_lengths(lengths, d['token_lengths'])
  tokens = caption_length_summary(lengths)
  tokens['shards_measured'] = measured
  return {'counts': counts, 'dropped': {r: counts[r] for r in REASONS}, 'examples': examples,
          'warnings': warnings, 'caption_tokens': tokens}


def _length_lines(tokens: dict) -> list:
  if not tokens.get('count'):
    return []
  p = tokens['percentiles']
  lines = [f'caption length in tokens (with [CLS]/[SEP]) of {tokens["count"]} kept captions: mean '
           f'{tokens["mean"]:.1f}, p50 {p["50"]}, p90 {p["90"]}, p99 {p["99"]}, max {tokens["max"]}'
           + ('+' if tokens['max'] >= tokens.get('token_cap', TOKEN_CAP) else '')]
  width = max(len(k) for k in tokens['histogram'])
  peak = max(tokens['histogram'].values()) or 1
  for k, v in tokens['histogram'].items():
    bar = '#' * round(40 * v / peak)
    lines.append(f'  {k:>{width}} {v:>10} {100 * v / tokens["count"]:6.2f}%  {bar}'.rstrip())
  buckets = tokens['suggested_buckets']
  lines.append(f'suggested text padding buckets: {tuple(buckets)} (the largest, {buckets[-1]}, holds '
               f'{100 * tokens["suggested_coverage"]:.2f}% of captions untruncated)')
  return lines


def format_report(report: dict) -> str:
  """The kept/dropped table (non-zero reasons), warnings and the caption-length histogram."""
  c = report['counts']
  seen = max(c['seen'], 1)
  rows = [('kept', c['kept'])] + [(f'dropped: {r}', c.get(r, 0)) for r in REASONS if c.get(r, 0)]
  width = max(len(r[0]) for r in rows)
  lines = [f'{"":{width}}  {"records":>10}  {"share":>7}']
  for k, v in rows:
    lines.append(f'{k:{width}}  {v:>10}  {100 * v / seen:6.2f}%')
  lines.append(f'{"total":{width}}  {c["seen"]:>10}')
  lines.append(f're-encoded (longer side > {report["options"]["max_side"]}): {c["re_encoded"]}')
  for reason, where in report.get('examples', {}).items():
    if c.get(reason, 0):
      lines.append(f'  {reason}: e.g. {", ".join(where)}')
  warnings = report.get('warnings', [])
  for w in warnings[:MAX_PRINTED_WARNINGS]:
    lines.append(f'warning: {w}')
  if len(warnings) > MAX_PRINTED_WARNINGS:
    lines.append(f'warning: ... and {len(warnings) - MAX_PRINTED_WARNINGS} more (see the report file)')
  lines += _length_lines(report.get('caption_tokens', {}))
  return '\n'.join(lines)
