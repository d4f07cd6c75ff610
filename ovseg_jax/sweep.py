"""Config sweeps: expand a sweep file into runs, check each against the locked config, then print, run or summarise.

  python -m ovseg_jax.sweep --config=configs/vitb.py --sweep=configs/sweeps/ablations.py              # print
  python -m ovseg_jax.sweep --config=configs/tiny.py --sweep=configs/sweeps/ablations.py:form=variants \\
      --workdir_root=runs/sweeps/tiny_t3 --run=local --summarise
  python -m ovseg_jax.sweep --config=configs/vitb.py --sweep=configs/sweeps/groups.py --launcher=tpu_pod
  python -m ovseg_jax.sweep --config=... --sweep=... --workdir_root=... --summarise                   # table only
  python -m ovseg_jax.sweep --config=configs/tiny.py --config.train.total_steps=100 --sweep=...       # every run

A sweep file exports `get_sweep(arg=None)` (arg is the text after `path.py:`, as for configs) and returns a list
of runs. A run is a dict of config overrides with dotted keys (`{'loss.cross_threshold': 0.3}`), plus two
optional reserved keys:
  * `config_arg`: a config variant string (`'ablation=contrast'`), merged into the one of `--config`;
  * `name`: the run's workdir name. Without it the name is built from the overrides that differ between runs
    (`cross_threshold=0.3`), so it is stable and readable.
`grid` (cartesian product of values), `product` (of lists of runs) and `with_base` build such lists; a plain
list of dicts is the list form.

Every run is resolved before anything starts: its variant string is parsed by the config file, each override
key must exist in the locked config (an unknown key is a one-line error naming it), and the full flag list is
parsed by `ml_collections.config_flags` exactly as `ovseg_jax.train` parses it, so a bad value fails here too.

--run modes:
  print  (default) the launch command of each run, one per line;
  dry    writes each run's resolved config to WORKDIR/resolved_config.json and trains nothing;
  local  the same, then runs `python -m ovseg_jax.train` for each run, one after another.
--summarise prints a table of final metrics: the last record of each WORKDIR/metrics.jsonl and the numbers of any
WORKDIR/metrics.json or WORKDIR/*/metrics.json (evaluation results).
"""

import dataclasses
import fnmatch
import importlib.util
import inspect
import itertools
import json
import math
import os
import re
import shlex
import subprocess
import sys
from typing import Any, Iterable, Mapping, Sequence

from absl import flags

from ovseg_jax import cli
from ovseg_jax import fileio

RESERVED_KEYS = ('config_arg', 'name')
RESOLVED_CONFIG = 'resolved_config.json'
LAUNCHERS = ('python', 'tpu_pod', 'slurm')


class SweepError(ValueError):
  """A sweep that cannot run as written; the message says which run and key."""


# ---------------------------------------------------------------------------------------------------------------
# Building sweeps (used by configs/sweeps/*.py)
# ---------------------------------------------------------------------------------------------------------------

def grid(axes: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
  """Cartesian product: `grid({'a': [1, 2], 'b': [3]})` -> `[{'a': 1, 'b': 3}, {'a': 2, 'b': 3}]`.

  The first key varies slowest, like nested for-loops in the order written.
  """
  keys = list(axes)
  for k in keys:
    if isinstance(axes[k], (str, bytes)) or not isinstance(axes[k], Sequence):
      raise SweepError(f'grid axis {k!r} must be a list of values, got {axes[k]!r}')
  return [dict(zip(keys, values)) for values in itertools.product(*(axes[k] for k in keys))]


def merge(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
  """`b` over `a`; two `config_arg` strings are joined (`b`'s keys win when the config parses them)."""
  out = dict(a)
  for k, v in b.items():
    if k == 'config_arg' and out.get('config_arg'):
      out[k] = merge_config_args(out[k], v)
    else:
      out[k] = v
  return out


def product(*sweeps: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """Every combination of one run from each list, merged left to right. A key set by two lists is an error."""
  out = []
  for combo in itertools.product(*sweeps):
    run: dict[str, Any] = {}
    for part in combo:
      clash = (set(run) & set(part)) - {'config_arg'}
      if clash:
        raise SweepError(f'product: key(s) {sorted(clash)} set by two of the combined sweeps')
      run = merge(run, part)
    out.append(run)
  return out


def with_base(base: Mapping[str, Any], sweep: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """`base` under every run of `sweep` (the run's own values win)."""
  return [merge(base, run) for run in sweep]


# ---------------------------------------------------------------------------------------------------------------
# Expansion: sweep file + config -> runs with names, workdirs and flags
# ---------------------------------------------------------------------------------------------------------------

def split_spec(spec: str) -> tuple[str, str | None]:
  """'configs/x.py:a=1,b=2' -> ('configs/x.py', 'a=1,b=2'); 'configs/x.py' -> ('configs/x.py', None)."""
  path, sep, arg = spec.partition(':')
  return path, (arg if sep else None)


def _parse_pairs(arg: str | None) -> dict[str, str]:
  out = {}
  for item in filter(None, (arg or '').split(',')):
    if '=' not in item:
      raise SweepError(f'config variant {item!r} must look like key=value')
    k, v = item.split('=', 1)
    out[k] = v
  return out


def merge_config_args(base: str | None, run: str | None) -> str | None:
  """Joins two variant strings key by key; the run's value replaces the base's for the same key."""
  pairs = _parse_pairs(base)
  pairs.update(_parse_pairs(run))
  return ','.join(f'{k}={v}' for k, v in pairs.items()) or None


def format_value(value: Any) -> str:
  """A Python value as the text `--config.key=TEXT` that config_flags parses back into the same value."""
  if isinstance(value, bool):
    return 'True' if value else 'False'
  if isinstance(value, str):
    return value
  if isinstance(value, (int, float)):
    return repr(value)
  if isinstance(value, (tuple, list)):
    return repr(tuple(value))
  raise SweepError(f'cannot pass {value!r} ({type(value).__name__}) as a config override; use a bool, number, '
                   'string or tuple')


def load_sweep(spec: str) -> list[dict[str, Any]]:
  """Imports the sweep file and returns `get_sweep(arg)` (or `get_sweep()` when the spec has no `:arg`)."""
  path, arg = split_spec(spec)
  if not os.path.isfile(path):
    raise SweepError(f'--sweep={spec}: file {path} not found (sweep files live in configs/sweeps/)')
  module_spec = importlib.util.spec_from_file_location(f'_sweep_{os.path.basename(path)[:-3]}', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, 'get_sweep'):
    raise SweepError(f'{path} defines no get_sweep()')
  takes_arg = bool(inspect.signature(module.get_sweep).parameters)
  if arg is not None and not takes_arg:
    raise SweepError(f'{path}: get_sweep() takes no argument, but the spec passes {arg!r}')
  try:
    runs = module.get_sweep(arg) if takes_arg else module.get_sweep()
  except (ValueError, TypeError, KeyError) as e:  # the sweep file's own argument checks
    raise SweepError(f'--sweep={spec}: {_one_line(e)}') from e
  if not isinstance(runs, (list, tuple)) or not runs or not all(isinstance(r, Mapping) for r in runs):
    raise SweepError(f'{path}: get_sweep() must return a non-empty list of override dicts')
  return [dict(r) for r in runs]


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run of a sweep."""
  name: str
  config: str                          # 'configs/x.py[:variant]' as passed to --config
  overrides: tuple[tuple[str, str], ...]  # (dotted key, flag text), --config.KEY=VALUE ones first
  workdir: str

  def train_flags(self) -> list[str]:
    return ([f'--config={self.config}', f'--workdir={self.workdir}'] +
            [f'--config.{k}={v}' for k, v in self.overrides])


def _label(value: Any) -> str:
  text = format_value(value)
  return re.sub(r'[^A-Za-z0-9._+-]+', '_', text).strip('_') or 'empty'


def _short_keys(keys: Sequence[str]) -> dict[str, str]:
  """Last dotted component, or the full key where two keys share that component."""
  last = [k.rsplit('.', 1)[-1] for k in keys]
  return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def run_names(runs: Sequence[Mapping[str, Any]]) -> list[str]:
  """Workdir names from the keys whose values differ between runs (config variants count as keys)."""
  flat = []
  for run in runs:
    items = {f'{k}': v for k, v in _parse_pairs(run.get('config_arg')).items()}
    items.update({k: v for k, v in run.items() if k not in RESERVED_KEYS})
    flat.append(items)
  order: list[str] = []
  for items in flat:
    order += [k for k in items if k not in order]
  missing = object()
  varying = [k for k in order if len({repr(items.get(k, missing)) for items in flat}) > 1]
  short = _short_keys(varying)
  names = []
  for i, (run, items) in enumerate(zip(runs, flat)):
    if run.get('name'):
      name = str(run['name'])
      if not re.fullmatch(r'[A-Za-z0-9._=,+-]+', name):
        raise SweepError(f'run name {name!r} may only hold letters, digits and . _ = , + -')
    else:
      name = ','.join(f'{short[k]}={_label(items[k])}' for k in varying if k in items) or f'run{i}'
    names.append(name)
  seen = {}
  for i, name in enumerate(names):
    if name in seen:
      raise SweepError(f'runs {seen[name]} and {i} are both named {name!r} (identical overrides?); '
                       "give them distinct 'name' keys")
    seen[name] = i
  return names


def parse_overrides(items: Iterable[str]) -> list[tuple[str, str]]:
  """`KEY=VALUE` texts of `--config.KEY=VALUE` flags -> [(key, text)]."""
  out = []
  for item in items:
    key, sep, value = item.partition('=')
    key = key.removeprefix('--').removeprefix('config.')
    if not sep or not key:
      raise SweepError(f'--config.{item} must look like --config.KEY=VALUE, e.g. --config.train.total_steps=3')
    out.append((key, value))
  return out


def expand(config_spec: str, sweep: Sequence[Mapping[str, Any]], workdir_root: str,
           base_overrides: Sequence[tuple[str, str]] = ()) -> list[Run]:
  """Sweep entries -> Runs (names, workdirs, flag texts). Nothing is checked against the config yet."""
  config_path, config_arg = split_spec(config_spec)
  names = run_names(sweep)
  base_keys = {k for k, _ in base_overrides}
  out = []
  for name, entry in zip(names, sweep):
    arg = merge_config_args(config_arg, entry.get('config_arg'))
    overrides = [(k, format_value(v)) for k, v in entry.items() if k not in RESERVED_KEYS]
    clash = base_keys & {k for k, _ in overrides}
    if clash:
      raise SweepError(f'run {name!r}: --config.{sorted(clash)[0]} collides with a key the sweep sets itself')
    config = config_path + (f':{arg}' if arg else '')
    out.append(Run(name=name, config=config, overrides=tuple(base_overrides) + tuple(overrides),
                   workdir=join_path(workdir_root, name)))
  return out


def join_path(root: str, name: str) -> str:
  return fileio.join(root, name)


# ---------------------------------------------------------------------------------------------------------------
# Validation: resolve each run's config exactly as the trainer's flags would
# ---------------------------------------------------------------------------------------------------------------

def _parse_config_flags(argv: Sequence[str]):
  """Parses `--config=... --config.k=v` with a private FlagValues, as `ovseg_jax.train` does with its own."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  fv = flags.FlagValues()
  # sys_argv: config_flags reads --config from it at definition time to register the --config.* flags.
  holder = config_flags.DEFINE_config_file('config', flag_values=fv, lock_config=True, sys_argv=['sweep', *argv])
  fv(['sweep', *argv])
  return holder.value


def _check_key(config, key: str) -> None:
  """Raises a one-line SweepError unless `key` names a leaf of the locked config."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  node, path = config, []
  for part in key.split('.'):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      where = '.'.join(path) or 'the top level'
      known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      raise SweepError(f'unknown config key {key!r}: no {part!r} in {where}' +
                       (f' (known: {", ".join(known)})' if known else ''))
    node, path = node[part], path + [part]
  if isinstance(node, ml_collections.ConfigDict):
    raise SweepError(f'config key {key!r} is a group, not a value; override its leaves '
                     f'({", ".join(sorted(node.keys()))})')


def resolve(run: Run):
  """The locked config `ovseg_jax.train` would see for this run; SweepError (one line) if it cannot."""
  try:
    base = _parse_config_flags([f'--config={run.config}'])
  except Exception as e:  # the config file's own error (e.g. an unknown variant key)
    raise SweepError(f'run {run.name!r}: --config={run.config}: {_one_line(e)}') from e
  for key, _ in run.overrides:
    try:
      _check_key(base, key)
    except SweepError as e:
      raise SweepError(f'run {run.name!r}: {e}') from e
  try:
    return _parse_config_flags([f'--config={run.config}'] + [f'--config.{k}={v}' for k, v in run.overrides])
  except Exception as e:  # a value config_flags cannot convert to the key's type
    raise SweepError(f'run {run.name!r}: {_one_line(e)}') from e


def _one_line(e: BaseException) -> str:
  """The innermost cause's message on one line (config_flags wraps the config file's own error)."""
  while e.__cause__ is not None and str(e.__cause__):
    e = e.__cause__
  lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
  if any(line.startswith('Traceback') for line in lines):
    lines = lines[-1:]  # config_flags pastes the config file's traceback; its last line is the error
  return ' '.join(lines) or type(e).__name__


def config_to_dict(config) -> dict[str, Any]:
  """A resolved config as plain JSON data (tuples become lists)."""
  return json.loads(config.to_json_best_effort(sort_keys=True))


def write_resolved(run: Run, config) -> str:
  fileio.makedirs(run.workdir)
  path = fileio.join(run.workdir, RESOLVED_CONFIG)
  fileio.write_text(path, json.dumps(config_to_dict(config), indent=2, sort_keys=True) + '\n')
  return path


# ---------------------------------------------------------------------------------------------------------------
# Launch commands
# ---------------------------------------------------------------------------------------------------------------

def command(run: Run, launcher: str = 'python', python: str = 'python') -> list[str]:
  """The argv that launches `run`: directly, on a TPU pod (launch/tpu_pod.sh) or as a SLURM job."""
  if launcher == 'python':
    return [python, '-m', 'ovseg_jax.train', *run.train_flags()]
  overrides = [f'--config.{k}={v}' for k, v in run.overrides]
  head = {'tpu_pod': ['bash', 'launch/tpu_pod.sh'], 'slurm': ['sbatch', 'launch/gpu_slurm.sh']}[launcher]
  return [*head, f'--config={run.config}', f'--workdir={run.workdir}', '--', *overrides]


def shell_line(argv: Sequence[str]) -> str:
  return ' '.join(shlex.quote(a) for a in argv)


def run_local(runs: Sequence[Run], keep_going: bool = False) -> list[str]:
  """Trains the runs one after another in subprocesses; returns the names of failed runs."""
  failed = []
  for i, run in enumerate(runs):
    argv = command(run, 'python', python=sys.executable)
    print(f'[sweep {i + 1}/{len(runs)}] {run.name}: {shell_line(argv)}', flush=True)
    rc = subprocess.call(argv)
    if rc != 0:
      failed.append(run.name)
      msg = f'run {run.name!r} failed with exit code {rc} (workdir {run.workdir})'
      if not keep_going:
        raise SweepError(msg + '; --keep_going runs the remaining ones anyway')
      print(f'[sweep] {msg}', file=sys.stderr, flush=True)
  return failed


# ---------------------------------------------------------------------------------------------------------------
# Summary table
# ---------------------------------------------------------------------------------------------------------------

def _flatten(d: Mapping[str, Any], prefix: str = '') -> dict[str, float]:
  out = {}
  for k, v in d.items():
    key = f'{prefix}{k}'
    if isinstance(v, Mapping):
      out.update(_flatten(v, key + '.'))
    elif isinstance(v, (int, float)) and not isinstance(v, bool):
      out[key] = v
  return out


def final_metrics(workdir: str) -> dict[str, float]:
  """The last training record (metrics.jsonl) plus evaluation numbers (metrics.json files) of one workdir.

  Evaluation keys found in a subfolder are prefixed with it (`eval/voc.miou`).
  """
  out: dict[str, float] = {}
  jsonl = fileio.join(workdir, 'metrics.jsonl')
  if fileio.exists(jsonl):
    last = None
    for line in fileio.read_text(jsonl).splitlines():
      line = line.strip()
      if not line:
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue  # a line cut short by a run that is still writing
      if isinstance(record, dict) and 'step' in record:
        last = record
    if last is not None:
      out.update(_flatten(last))
  if fileio.isdir(workdir):
    subdirs = [name for name in fileio.listdir(workdir) if fileio.isdir(fileio.join(workdir, name))]
    for prefix, folder in [('', workdir)] + [(f'{name}/', fileio.join(workdir, name)) for name in subdirs]:
      path = fileio.join(folder, 'metrics.json')
      if fileio.exists(path):
        out.update(_flatten(json.loads(fileio.read_text(path)), prefix))
  return out


DEFAULT_COLUMNS = ('step', '*loss*', '*/*', '*miou*', '*mIoU*')


def summarise(runs: Sequence[Run], patterns: Sequence[str] = DEFAULT_COLUMNS, fmt: str = 'text') -> str:
  """A table with one row per run and one column per metric matching `patterns` (fnmatch, in order)."""
  metrics = {run.name: final_metrics(run.workdir) for run in runs}
  columns: list[str] = []
  for pattern in patterns:
    for run in runs:
      columns += [k for k in sorted(metrics[run.name]) if fnmatch.fnmatchcase(k, pattern) and k not in columns]

  def cell(value):
    if value is None:
      return '-'
    if isinstance(value, float) and not math.isfinite(value):
      return str(value)
    if isinstance(value, int) or float(value).is_integer() and abs(value) < 1e15:
      return str(int(value))
    return f'{value:.4g}'

  header = ['run'] + columns
  rows = [[run.name] + [cell(metrics[run.name].get(c)) for c in columns] for run in runs]
  if fmt == 'markdown':
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '|'.join('---' for _ in header) + '|']
    lines += ['| ' + ' | '.join(r) + ' |' for r in rows]
    return '\n'.join(lines)
  widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
  return '\n'.join('  '.join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip() for r in [header] + rows)


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------

def default_workdir_root(config_spec: str, sweep_spec: str) -> str:
  config = os.path.basename(split_spec(config_spec)[0]).removesuffix('.py')
  sweep = os.path.basename(split_spec(sweep_spec)[0]).removesuffix('.py')
  return os.path.join('runs', 'sweeps', f'{config}_{sweep}')


def parse_args(argv: Sequence[str] | None = None):
  """Flags -> namespace; `.overrides` holds the `KEY=VALUE` texts of every `--config.KEY=VALUE`.

  `--config` is handed on to the trainer as text, so its `--config.KEY=VALUE` overrides are taken out of argv
  here (config_flags checks them against the locked config in `resolve`). `--set KEY=VALUE` is their
  deprecated spelling.
  """
  fv = flags.FlagValues()
  flags.DEFINE_string('config', None, 'base config, e.g. configs/vitb.py or configs/tiny.py:steps=50; '
                      '--config.KEY=VALUE overrides a key in every run', flag_values=fv)
  flags.DEFINE_string('sweep', None, 'sweep file, e.g. configs/sweeps/ablations.py[:arg]', flag_values=fv)
  flags.DEFINE_enum('run', None, ['print', 'dry', 'local'],
                    'print: launch commands; dry: write each resolved config only; local: train one after another',
                    flag_values=fv)
  flags.DEFINE_string('workdir_root', None, 'parent of the runs\' workdirs (local path or gs://); '
                      'default runs/sweeps/<config>_<sweep>', flag_values=fv)
  flags.DEFINE_enum('launcher', 'python', list(LAUNCHERS),
                    'command form printed by --run=print: python -m ovseg_jax.train, launch/tpu_pod.sh, or '
                    'sbatch launch/gpu_slurm.sh', flag_values=fv)
  flags.DEFINE_bool('keep_going', False, '--run=local: run the remaining runs after one fails', flag_values=fv)
  flags.DEFINE_bool('summarise', False, 'print a table of each run\'s final metrics', flag_values=fv)
  flags.DEFINE_list('metrics', [], 'summary columns as fnmatch patterns (default: step, *loss*, eval numbers)',
                    flag_values=fv)
  flags.DEFINE_enum('summary_format', 'text', ['text', 'markdown'], 'summary table format', flag_values=fv)
  argv = cli.rewrite_deprecated(cli.argv_or_sys(argv), {'--set': '--config.'})
  argv, overrides = cli.pop_overrides(argv, '--config.')
  args = cli.parse(fv, argv, prog='python -m ovseg_jax.sweep', doc=__doc__, required=('config', 'sweep'))
  args.overrides = overrides
  return args


@cli.entry_point
def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  try:
    return _main(args)
  except SweepError as e:
    print(f'sweep: error: {e}', file=sys.stderr)
    return 1


def _main(args) -> int:
  config_spec, sweep_spec = args.config, args.sweep
  mode = args.run or ('print' if not args.summarise else None)
  root = args.workdir_root or default_workdir_root(config_spec, sweep_spec)
  runs = expand(config_spec, load_sweep(sweep_spec), root, parse_overrides(args.overrides))

  failed: list[str] = []
  if mode is not None:
    resolved = [resolve(run) for run in runs]  # every run is checked before the first one starts
    if mode == 'print':
      for run in runs:
        print(shell_line(command(run, args.launcher)))
    else:
      for run, config in zip(runs, resolved):
        print(f'{run.name}: {write_resolved(run, config)}', flush=True)
      if mode == 'local':
        failed = run_local(runs, keep_going=args.keep_going)
        if failed:
          print(f'[sweep] {len(failed)} of {len(runs)} runs failed: {", ".join(failed)}', file=sys.stderr)
  if args.summarise:
    print(summarise(runs, args.metrics or DEFAULT_COLUMNS, args.summary_format))
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main())
