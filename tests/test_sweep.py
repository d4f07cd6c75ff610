"""Sweeps: expansion, validation against the locked config, one workdir per run, printed commands, summary.

The end-to-end test trains a two-run sweep (two values of `seed`) with `--run local` on a shrunken
configs/tiny.py for 1 step each, and checks that the two workdirs' config.json (written by the trainer) differ in
exactly that key; the dry-run tests do the same for loss.cross_threshold without training.
"""

import json
import os
import shlex
import subprocess
import sys

import pytest

from ovseg_jax import sweep
from tests import train_fixtures as tf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = tf.CLI_SMALL  # tiny.py shrunk so that a 1-step run compiles in seconds


def _cli(*args, env=None):
  return subprocess.run([sys.executable, '-m', 'ovseg_jax.sweep', *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=600, env=env)


def _write_sweep(tmp_path, body: str) -> str:
  path = tmp_path / 'my_sweep.py'
  path.write_text(body)
  return str(path)


def _flat(d, prefix=''):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def _differing(a: dict, b: dict) -> dict:
  fa, fb = _flat(a), _flat(b)
  assert fa.keys() == fb.keys()
  return {k: (fa[k], fb[k]) for k in fa if fa[k] != fb[k]}


TWO_DELTAS = ('from ovseg_jax import sweep\n'
              'def get_sweep():\n'
              "  return sweep.grid({'loss.cross_threshold': [0.3, 0.9]})\n")

# ---------------------------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------------------------


def test_grid_product_with_base():
  g = sweep.grid({'a.x': [1, 2], 'b': ['u', 'v']})
  assert g == [{'a.x': 1, 'b': 'u'}, {'a.x': 1, 'b': 'v'}, {'a.x': 2, 'b': 'u'}, {'a.x': 2, 'b': 'v'}]
  p = sweep.product([{'a': 1}, {'a': 2}], [{'config_arg': 'stage=2'}, {'c': True}])
  assert p == [{'a': 1, 'config_arg': 'stage=2'}, {'a': 1, 'c': True}, {'a': 2, 'config_arg': 'stage=2'},
               {'a': 2, 'c': True}]
  assert sweep.with_base({'a': 0, 'config_arg': 'x=1,y=2'}, [{'config_arg': 'y=3'}, {'a': 5}]) == [
      {'a': 0, 'config_arg': 'x=1,y=3'}, {'a': 5, 'config_arg': 'x=1,y=2'}]
  with pytest.raises(sweep.SweepError, match=r"key\(s\) \['a'\] set by two"):
    sweep.product([{'a': 1}], [{'a': 2}])
  with pytest.raises(sweep.SweepError, match='must be a list'):
    sweep.grid({'a': 'abc'})


def test_run_names_from_the_varying_keys():
  runs = [{'config_arg': 'ablation=all', 'loss.group_ratio': 0.5, 'model.binding.num_output_groups': 8},
          {'config_arg': 'ablation=all', 'loss.group_ratio': 0.25, 'model.binding.num_output_groups': 16,
           'loss.matcher': 'scipy'}]
  assert sweep.run_names(runs) == ['group_ratio=0.5,num_output_groups=8',
                                   'group_ratio=0.25,num_output_groups=16,matcher=scipy']
  assert sweep.run_names([{'name': 'a', 'x': 1}, {'name': 'b', 'x': 1}]) == ['a', 'b']
  assert sweep.run_names([{'mesh': (('data', -1), ('fsdp', 2)), 'x.mesh': 1},
                          {'mesh': (('data', -1), ('fsdp', 4)), 'x.mesh': 2}]) == [
                              "mesh=data_-1_fsdp_2,x.mesh=1", "mesh=data_-1_fsdp_4,x.mesh=2"]
  with pytest.raises(sweep.SweepError, match="both named 'x=1'"):
    sweep.run_names([{'x': 1}, {'x': 1}, {'x': 2}])


@pytest.mark.parametrize('key, value', [
    ('loss.cross_threshold', 0.35), ('train.total_steps', 7), ('distributed', True),
    ('loss.mask_cost', 'neg_cos'), ('mesh', (('data', 2), ('fsdp', 4))), ('optim.frozen', ('text_encoder/.*',)),
    ('loss.entity_weight', 0),   # an int for a float key: config_flags converts it
])
def test_override_round_trip(key, value, tmp_path):
  run = sweep.expand('configs/tiny.py', [{key: value}], str(tmp_path))[0]
  config = sweep.resolve(run)
  got = config
  for part in key.split('.'):
    got = got[part]
  assert got == value and type(got) is (float if key == 'loss.entity_weight' else type(value))


# ---------------------------------------------------------------------------------------------------------------
# The CLI
# ---------------------------------------------------------------------------------------------------------------


def test_dry_run_two_values_two_workdirs_one_differing_key(tmp_path):
  root = tmp_path / 'sweep'
  p = _cli('--config=configs/tiny.py', f'--sweep={_write_sweep(tmp_path, TWO_DELTAS)}', '--run=dry',
           f'--workdir_root={root}')
  assert p.returncode == 0, p.stderr
  assert sorted(os.listdir(root)) == ['cross_threshold=0.3', 'cross_threshold=0.9']
  configs = [json.loads((root / name / sweep.RESOLVED_CONFIG).read_text())
             for name in ('cross_threshold=0.3', 'cross_threshold=0.9')]
  assert _differing(*configs) == {'loss.cross_threshold': (0.3, 0.9)}


def test_print_mode_commands_parse_back_to_the_resolved_configs(tmp_path):
  root = tmp_path / 'sweep'
  spec = _write_sweep(tmp_path, TWO_DELTAS)
  p = _cli('--config=configs/tiny.py:binding=paper', f'--sweep={spec}', f'--workdir_root={root}',
           '--config.train.total_steps=3', "--config.mesh=(('data', -1), ('fsdp', 2))")
  assert p.returncode == 0, p.stderr
  mesh = shlex.quote("--config.mesh=(('data', -1), ('fsdp', 2))")
  assert p.stdout.splitlines() == [
      f'python -m ovseg_jax.train --config=configs/tiny.py:binding=paper --workdir={root}/cross_threshold=0.3 '
      f'--config.train.total_steps=3 {mesh} --config.loss.cross_threshold=0.3',
      f'python -m ovseg_jax.train --config=configs/tiny.py:binding=paper --workdir={root}/cross_threshold=0.9 '
      f'--config.train.total_steps=3 {mesh} --config.loss.cross_threshold=0.9',
  ]
  assert not root.exists()  # print writes nothing
  # What the trainer would parse from each printed line == what --run=dry resolves for the run.
  assert _cli('--config=configs/tiny.py:binding=paper', f'--sweep={spec}', f'--workdir_root={root}',
              '--config.train.total_steps=3', "--config.mesh=(('data', -1), ('fsdp', 2))",
              '--run=dry').returncode == 0
  for line in p.stdout.splitlines():
    argv = shlex.split(line)[3:]
    parsed = sweep._parse_config_flags([a for a in argv if not a.startswith('--workdir=')])
    workdir = next(a for a in argv if a.startswith('--workdir=')).split('=', 1)[1]
    resolved = json.loads(open(os.path.join(workdir, sweep.RESOLVED_CONFIG)).read())
    assert sweep.config_to_dict(parsed) == resolved
    assert resolved['mesh'] == [['data', -1], ['fsdp', 2]] and resolved['train']['total_steps'] == 3
    assert resolved['model']['binding']['mode'] == 'paper'


def test_launcher_forms(tmp_path):
  spec = _write_sweep(tmp_path, TWO_DELTAS)
  tpu = _cli('--config=configs/vitb.py', f'--sweep={spec}', '--workdir_root=gs://b/s', '--launcher=tpu_pod')
  assert tpu.stdout.splitlines()[0] == ('bash launch/tpu_pod.sh --config=configs/vitb.py '
                                        '--workdir=gs://b/s/cross_threshold=0.3 -- --config.loss.cross_threshold=0.3')
  # The printed tpu_pod.sh line starts the trainer with the same flags as the plain python form.
  argv = shlex.split(tpu.stdout.splitlines()[0])
  dry = subprocess.run([*argv[:2], '--dry-run', *argv[2:]], cwd=ROOT, capture_output=True, text=True,
                       env={k: v for k, v in os.environ.items() if not k.startswith(('TPU_', 'TRAIN_'))})
  remote = shlex.split(dry.stdout.strip().splitlines()[-1][2:])[-1].removeprefix('--command=')
  direct = _cli('--config=configs/vitb.py', f'--sweep={spec}', '--workdir_root=gs://b/s').stdout.splitlines()[0]
  direct = shlex.split(direct)
  assert shlex.split(remote) == ['cd', 'ovseg_jax', '&&', '.venv/bin/python', *direct[1:5],
                                 '--config.distributed=True', *direct[5:]]
  assert direct[5:] == ['--config.loss.cross_threshold=0.3']
  slurm = _cli('--config=configs/vitb.py', f'--sweep={spec}', '--workdir_root=/shared/s', '--launcher=slurm')
  assert slurm.stdout.splitlines()[1] == ('sbatch launch/gpu_slurm.sh --config=configs/vitb.py '
                                          '--workdir=/shared/s/cross_threshold=0.9 -- '
                                          '--config.loss.cross_threshold=0.9')


@pytest.mark.parametrize('body, message', [
    ("def get_sweep():\n  return [{'loss.cross_threshold': 0.3}, {'loss.cross_treshold': 0.4}]\n",
     "run 'cross_treshold=0.4': unknown config key 'loss.cross_treshold': no 'cross_treshold' in loss"),
    ("def get_sweep():\n  return [{'los.cross_threshold': 0.3}]\n",
     "unknown config key 'los.cross_threshold': no 'los' in the top level"),
    ("def get_sweep():\n  return [{'loss': 0.3}]\n", "config key 'loss' is a group, not a value"),
    ("def get_sweep():\n  return [{'train.total_steps': 'many'}]\n",
     "flag --config.train.total_steps=many: invalid literal for int()"),
    ("def get_sweep():\n  return [{'config_arg': 'ablaton=mask'}]\n", "unknown config variant key 'ablaton'"),
    ("def get_sweep():\n  return []\n", 'must return a non-empty list'),
])
def test_bad_sweeps_fail_in_one_line_before_anything_runs(tmp_path, body, message):
  root = tmp_path / 'sweep'
  p = _cli('--config=configs/tiny.py', f'--sweep={_write_sweep(tmp_path, body)}', '--run=local',
           f'--workdir_root={root}')
  assert p.returncode == 1
  assert p.stderr.startswith('sweep: error: ') and len(p.stderr.strip().splitlines()) == 1, p.stderr
  assert message in p.stderr
  assert not root.exists()  # the valid first run was not started either


def test_summarise_table(tmp_path):
  runs = sweep.expand('configs/tiny.py', sweep.grid({'loss.cross_threshold': [0.3, 0.9]}), str(tmp_path))
  os.makedirs(runs[0].workdir)
  with open(os.path.join(runs[0].workdir, 'metrics.jsonl'), 'w') as f:
    f.write(json.dumps({'step': 1, 'loss': 9.0, 'lr': 1e-3}) + '\n')
    f.write(json.dumps({'step': 2, 'loss': 7.123456, 'loss_mask': 0.5, 'lr': 1e-3}) + '\n')
    f.write('{"step": 3, "lo')  # a line being written
  os.makedirs(os.path.join(runs[0].workdir, 'eval'))
  with open(os.path.join(runs[0].workdir, 'eval', 'metrics.json'), 'w') as f:
    json.dump({'voc': {'miou': 0.4567}, 'name': 'x'}, f)
  assert sweep.summarise(runs) == (
      'run                  step  loss   loss_mask  eval/voc.miou\n'
      'cross_threshold=0.3  2     7.123  0.5        0.4567\n'
      'cross_threshold=0.9  -     -      -          -')
  assert sweep.summarise(runs, ['lr'], fmt='markdown') == (
      '| run | lr |\n|---|---|\n| cross_threshold=0.3 | 0.001 |\n| cross_threshold=0.9 | - |')


# ---------------------------------------------------------------------------------------------------------------
# The shipped sweep files (paper Tables 3, 4, 5, 9)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize('config, spec, n', [
    ('configs/vitb.py', 'ablations.py', 4), ('configs/tiny.py', 'ablations.py:form=variants', 4),
    ('configs/tiny.py', 'ablations.py:recipe=config', 4), ('configs/vitb.py', 'masking.py', 6),
    ('configs/vitb.py', 'masking.py:part=objective,recipe=two_stage', 4), ('configs/vitb.py', 'groups.py', 8),
    ('configs/tiny.py', 'groups.py:binding=paper,recipe=config', 8), ('configs/vitb.py', 'threshold.py', 7),
    ('configs/vits.py', 'threshold.py:recipe=two_stage', 7),
])
def test_shipped_sweeps_resolve(config, spec, n, tmp_path):
  runs = sweep.expand(config, sweep.load_sweep(f'configs/sweeps/{spec}'), str(tmp_path))
  assert len(runs) == n
  resolved = [sweep.resolve(run) for run in runs]
  assert len({json.dumps(sweep.config_to_dict(c), sort_keys=True) for c in resolved}) == n  # all distinct


def test_paper_table_mappings():
  t3 = sweep.load_sweep('configs/sweeps/ablations.py')
  runs = {r['name']: sweep.resolve(r2) for r, r2 in zip(t3, sweep.expand('configs/vitb.py', t3, '/tmp/x'))}
  table3 = {'contrast': (0.0, 0.0, 1), 'entity': (1.0, 0.0, 1), 'mask': (0.0, 0.1, 2), 'all': (1.0, 0.1, 2)}
  for name, (entity, mask, stage) in table3.items():
    c = runs[name]
    assert (c.loss.entity_weight, c.loss.mask_weight, c.stage) == (entity, mask, stage)
    assert (c.recipe, c.train.total_epochs, c.train.global_batch_size) == ('paper_single', 40.0, 2048)
  # tiny's own variants set the same keys as the key form.
  tiny_variants = sweep.expand('configs/tiny.py', sweep.load_sweep('configs/sweeps/ablations.py:form=variants'),
                               '/tmp/x')
  tiny_keys = sweep.expand('configs/tiny.py', sweep.load_sweep('configs/sweeps/ablations.py:recipe=config'),
                           '/tmp/x')
  for a, b in zip(tiny_variants, tiny_keys):
    assert sweep.config_to_dict(sweep.resolve(a)) == sweep.config_to_dict(sweep.resolve(b)), a.name
  # Table 5: K x r, with the host matcher past the DP limit.
  t5 = [sweep.resolve(r) for r in sweep.expand('configs/vitb.py', sweep.load_sweep('configs/sweeps/groups.py'),
                                               '/tmp/x')]
  assert sorted((c.model.binding.num_output_groups, c.loss.group_ratio, c.loss.matcher) for c in t5) == sorted(
      [(8, r, 'dp') for r in (0.25, 0.5, 0.75, 1.0)] + [(16, r, 'scipy') for r in (0.25, 0.5, 0.75, 1.0)])
  t9 = [sweep.resolve(r) for r in sweep.expand('configs/vitb.py', sweep.load_sweep('configs/sweeps/threshold.py'),
                                               '/tmp/x')]
  assert [c.loss.cross_threshold for c in t9] == [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]


def test_sweep_file_argument_errors():
  with pytest.raises(sweep.SweepError, match="unknown config variant key 'fomr'"):
    sweep.load_sweep('configs/sweeps/ablations.py:fomr=keys')
  with pytest.raises(sweep.SweepError, match='recipe=two_stage'):
    sweep.load_sweep('configs/sweeps/ablations.py:recipe=two_stage')
  with pytest.raises(sweep.SweepError, match='not found'):
    sweep.load_sweep('configs/sweeps/nope.py')


# ---------------------------------------------------------------------------------------------------------------
# End to end: --run local trains each run with ovseg_jax.train
# ---------------------------------------------------------------------------------------------------------------


SEEDS = ('from ovseg_jax import sweep\n'
         'def get_sweep():\n'
         "  return sweep.grid({'seed': [0, 1]})\n")


def test_local_sweep_trains_two_runs(tmp_path):
  """Sweeps `seed`, a key the compiled step does not depend on, so with JAX's persistent compilation cache the
  second run reuses the first one's executables (this test's time is mostly compilation)."""
  data = tmp_path / 'data'
  subprocess.run([sys.executable, '-m', 'ovseg_jax.data.synthetic', '--output', str(data), '--split', 'train',
                  '--num_images', '32', '--seed', '0', '--format', 'tfds'],
                 cwd=ROOT, check=True, capture_output=True, timeout=120)
  root = tmp_path / 'sweep'
  sets = [f'--config.{s}' for s in SMALL + [f'data.data_dir={data}', 'train.total_steps=1']]
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=2',
             JAX_COMPILATION_CACHE_DIR=str(tmp_path / 'jax_cache'), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
  p = _cli('--config=configs/tiny.py', f'--sweep={_write_sweep(tmp_path, SEEDS)}', '--run=local',
           f'--workdir_root={root}', '--summarise', *sets, env=env)
  assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
  names = ['seed=0', 'seed=1']
  assert sorted(os.listdir(root)) == names
  trained = [json.loads((root / n / 'config.json').read_text()) for n in names]  # written by the trainer
  assert _differing(*trained) == {'seed': (0, 1)}
  for n, c in zip(names, trained):
    assert c == json.loads((root / n / sweep.RESOLVED_CONFIG).read_text())
  table = p.stdout.splitlines()[-3:]
  assert table[0].split()[:3] == ['run', 'step', 'loss']
  losses = []
  for n, row in zip(names, table[1:]):
    last = [json.loads(line) for line in (root / n / 'metrics.jsonl').read_text().splitlines()][-1]
    assert row.split()[:3] == [n, '1', f"{last['loss']:.4g}"]
    losses.append(last['loss'])
  assert losses[0] != losses[1]  # two different initialisations really ran
