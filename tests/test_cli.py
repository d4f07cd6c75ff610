"""The one command-line style (ovseg_jax/cli.py): absl flags per tool, `--eval.KEY=VALUE`, one-line errors,
`--help`, and the deprecated spellings that still work for one release."""

import os
import subprocess
import sys

import pytest

from ovseg_jax import cli
from ovseg_jax import evaluate
from ovseg_jax import export
from ovseg_jax import segment
from ovseg_jax import sweep
from ovseg_jax import visualize
from ovseg_jax.convert import __main__ as convert_main
from ovseg_jax.data import build_cc4m
from ovseg_jax.data import coco_object
from ovseg_jax.data import entities
from ovseg_jax.data import synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVAL_KEYS = ('background, bg_prompt_margin, bg_threshold, long_side, pamr, pamr_dilations, pamr_downsample, '
             'pamr_iterations, short_side, stride, templates, top_k, window, window_batch')


def _eval_argv(*extra):
  return ['--checkpoint', 'ckpt', '--dataset', 'folder', '--data_dir', 'd', '--output', 'm.json', *extra]


def _one_error_line(capsys) -> str:
  err = capsys.readouterr().err
  assert err.startswith('error: ') and err.count('\n') == 1 and 'Traceback' not in err, err
  return err.strip()


# ------------------------------------------------------------------------------------------------------------
# One-line usage errors, exit code 2.
# ------------------------------------------------------------------------------------------------------------

def test_unknown_flag(capsys):
  assert evaluate.main(_eval_argv('--nope', '1')) == 2
  assert _one_error_line(capsys) == 'error: unknown flag --nope'
  assert coco_object.main(['--coco_dir', 'x', '--no_crowdd']) == 2
  assert _one_error_line(capsys) == 'error: unknown flag --no_crowdd (did you mean: no_crowd?)'


def test_missing_required_flag(capsys):
  assert coco_object.main([]) == 2
  assert _one_error_line(capsys) == ('error: --coco_dir is required '
                                     '(python -m ovseg_jax.data.coco_object --help lists the flags)')
  assert build_cc4m.main(['--output', 'o']) == 2   # a repeatable flag given zero times
  assert _one_error_line(capsys).startswith('error: --input is required')
  assert synthetic.main(['--output', 'o']) == 2
  assert _one_error_line(capsys).startswith('error: --num_images is required')


def test_bad_enum_and_bad_number(capsys):
  assert evaluate.main(['--predictions', 'p', '--dataset', 'vocc', '--data_dir', 'd', '--output', 'o']) == 2
  assert _one_error_line(capsys) == ('error: flag --dataset=vocc: value should be one of '
                                     '<voc|voc20|context|context59|coco_object|coco_stuff|cityscapes|ade20k|folder>')
  assert export.main(['--format', 'onnx', '--workdir', 'w', '--dst', 'd']) == 2
  assert 'value should be one of <inference|official>' in _one_error_line(capsys)
  assert visualize.main(['--checkpoint', 'c', '--data_dir', 'd', '--output', 'o', '--num_images', 'six']) == 2
  assert _one_error_line(capsys) == "error: flag --num_images=six: invalid literal for int() with base 10: 'six'"


def test_exactly_one_of(capsys):
  base = ['--dataset', 'folder', '--data_dir', 'd', '--output', 'o']
  assert evaluate.main(base) == 2
  assert _one_error_line(capsys) == 'error: give one of --checkpoint or --predictions'
  assert evaluate.main(base + ['--checkpoint', 'c', '--predictions', 'p']) == 2
  assert _one_error_line(capsys) == 'error: give only one of --checkpoint or --predictions, not both'
  assert export.main(['--dst', 'd']) == 2
  assert _one_error_line(capsys) == 'error: give one of --workdir or --checkpoint'
  assert segment.main(['--checkpoint', 'c', '--classes', 'cat', '--output', 'o.png', '--image', 'a.png',
                       '--images', 'folder']) == 2
  assert _one_error_line(capsys) == 'error: give only one of --image or --images, not both'


def test_stray_positional_argument(capsys):
  assert coco_object.main(['--coco_dir', 'x', 'val2017']) == 2
  assert _one_error_line(capsys).startswith("error: unexpected argument 'val2017'")


def test_convert_subcommand(capsys):
  assert convert_main.main([]) == 2
  assert _one_error_line(capsys).startswith('error: give the converter first: python -m ovseg_jax.convert '
                                            'official|dino|bert')
  assert convert_main.main(['tflite', '--src', 's', '--dst', 'd']) == 2
  assert _one_error_line(capsys).endswith("(not 'tflite')")
  assert convert_main.main(['dino', '--src', 's', '--dst', 'd']) == 2   # dino has no default config
  assert _one_error_line(capsys).startswith('error: --config is required')
  assert convert_main.main(['bert', '--src', 's', '--dst', 'd', '--config', 'c']) == 2   # bert takes none
  assert _one_error_line(capsys) == 'error: unknown flag --config'
  args = convert_main.parse_args(['official', '--src', 's', '--dst=d'])
  assert (args.kind, args.src, args.dst) == ('official', 's', 'd') and args.config.endswith('configs/vitb.py')


def test_absl_reads_both_value_forms_and_bool_negation():
  a = evaluate.parse_args(['--predictions=p', '--dataset', 'voc', '--data_dir=d', '--output', 'o',
                           '--max_images', '3', '--background_threshold=0.5'])
  assert (a.predictions, a.dataset, a.data_dir, a.max_images, a.background_threshold) == ('p', 'voc', 'd', 3, 0.5)
  a = segment.parse_args(['--checkpoint', 'c', '--classes', 'cat', '--output', 'o', '--image', 'a.png',
                          '--image=b.png', '--no_background'])
  assert a.image == ['a.png', 'b.png'] and a.no_background and a.images is None
  assert not segment.parse_args(['--checkpoint', 'c', '--classes', 'cat', '--output', 'o', '--images', 'f',
                                 '--nono_background']).no_background


# ------------------------------------------------------------------------------------------------------------
# --help: the tool's docstring and its flags, exit 0.
# ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('main, argv, listed', [
    (evaluate.main, ['--help'], ['--checkpoint=VALUE', '--eval.KEY=VALUE', 'short_side=448', '--suite=VALUE',
                                 '--dataset=voc|voc20|context|context59|coco_object|coco_stuff|cityscapes|'
                                 'ade20k|folder']),
    (segment.main, ['-h'], ['--image=VALUE', '--[no]no_background', '--eval.KEY=VALUE']),
    (visualize.main, ['--help'], ['--num_images=INT', '(default: 6)', '--eval.KEY=VALUE']),
    (export.main, ['--help'], ['--format=inference|official', '--step=INT']),
    (convert_main.main, ['official', '--help'], ['--src=VALUE', '--config=VALUE']),
    (convert_main.main, ['--help'], ['official|dino|bert']),
    (sweep.main, ['--help'], ['--sweep=VALUE', '--run=print|dry|local', '--config.KEY=VALUE']),
    (build_cc4m.main, ['--help'], ['--input=VALUE', 'repeat this option', '--vocab=']),
    (synthetic.main, ['--help'], ['--format=tfds|voc', '--[no]overwrite']),
    (coco_object.main, ['--help'], ['--[no]no_crowd', '(default: val2017)']),
    (entities.main, ['--help'], ['--captions=VALUE', '--limit=INT']),
])
def test_help_lists_the_flags(capsys, main, argv, listed):
  assert main(argv) == 0
  out = capsys.readouterr().out
  assert out.startswith('usage: python -m ovseg_jax.')
  for text in listed:
    assert text in out, (text, out)


# ------------------------------------------------------------------------------------------------------------
# --eval.KEY=VALUE.
# ------------------------------------------------------------------------------------------------------------

def test_eval_override_is_typed_and_only_the_given_keys(capsys):
  a = evaluate.parse_args(_eval_argv('--eval.short_side=448', '--eval.templates', 'imagenet80',
                                     '--eval.bg_threshold=1'))
  assert a.eval == {'short_side': 448, 'templates': 'imagenet80', 'bg_threshold': 1.0}
  assert isinstance(a.eval['bg_threshold'], float)
  assert evaluate.parse_args(_eval_argv()).eval == {}
  assert capsys.readouterr().err == ''


def test_eval_override_over_the_checkpoints_saved_settings(tmp_path):
  """Saved eval block < --eval.KEY=VALUE, key by key; the keys not given keep the checkpoint's values."""
  from ovseg_jax import checkpoint
  from ovseg_jax import inference
  from tests import seg_fixtures
  mc = seg_fixtures.tiny_model_config()
  ckpt = checkpoint.save_inference(str(tmp_path / 'ckpt'), mc, seg_fixtures.tiny_variables(mc),
                                   {'eval': {'short_side': 64, 'window': 64, 'stride': 32}})
  a = segment.parse_args(['--checkpoint', ckpt, '--classes', 'cat', '--output', 'o.png', '--image', 'a.png',
                          '--eval.stride=16'])
  ev = inference.Segmenter.from_checkpoint(ckpt, **a.eval).eval_config
  assert (ev.short_side, ev.window, ev.stride, ev.window_batch) == (64, 64, 16, 4)


def test_unknown_eval_key_is_one_line_naming_it(capsys):
  assert evaluate.main(_eval_argv('--eval.nope=1')) == 2
  assert _one_error_line(capsys) == f'error: unknown eval setting --eval.nope; valid keys: {EVAL_KEYS}'
  assert segment.main(['--checkpoint', 'c', '--classes', 'cat', '--output', 'o', '--image', 'a',
                       '--eval.shortside', '448']) == 2
  assert _one_error_line(capsys).startswith('error: unknown eval setting --eval.shortside; valid keys: ')
  assert evaluate.main(_eval_argv('--eval.short_side=big')) == 2
  assert _one_error_line(capsys) == "error: flag --eval.short_side=big: invalid literal for int() with base 10: 'big'"


# ------------------------------------------------------------------------------------------------------------
# Deprecated spellings: still work until cli.REMOVED_IN, with one line on stderr each.
# ------------------------------------------------------------------------------------------------------------

def test_set_still_works_with_a_deprecation_line(capsys):
  a = evaluate.parse_args(_eval_argv('--set', 'short_side=448', '--set=window=64'))
  assert a.eval == {'short_side': 448, 'window': 64}
  err = capsys.readouterr().err
  assert err == (f'warning: --set KEY=VALUE is deprecated and will be removed in {cli.REMOVED_IN}; '
                 'use --eval.KEY=VALUE\n')
  a = segment.parse_args(['--checkpoint', 'c', '--classes', 'cat', '--output', 'o', '--image', 'a',
                          '--templates', 'imagenet80', '--window_batch=2'])
  assert a.eval == {'templates': 'imagenet80', 'window_batch': 2}
  err = capsys.readouterr().err.splitlines()
  assert err == [f'warning: --templates VALUE is deprecated and will be removed in {cli.REMOVED_IN}; '
                 'use --eval.templates=VALUE',
                 f'warning: --window_batch VALUE is deprecated and will be removed in {cli.REMOVED_IN}; '
                 'use --eval.window_batch=VALUE']
  assert evaluate.main(_eval_argv('--set', 'short_side')) == 2
  assert capsys.readouterr().err.strip().splitlines()[-1] == (
      "error: --set 'short_side' must look like KEY=VALUE (better: --eval.KEY=VALUE)")
  assert evaluate.main(_eval_argv('--set', 'shortside=448')) == 2   # the rewritten key is checked as well
  assert 'unknown eval setting --eval.shortside' in capsys.readouterr().err


def test_sweep_set_is_config_override(capsys):
  new = sweep.parse_args(['--config=configs/tiny.py', '--sweep=s.py', '--config.train.total_steps=3',
                          "--config.mesh=(('data', -1), ('fsdp', 2))", '--config.seed', '1'])
  assert capsys.readouterr().err == ''
  old = sweep.parse_args(['--config=configs/tiny.py', '--sweep=s.py', '--set', 'train.total_steps=3',
                          "--set=mesh=(('data', -1), ('fsdp', 2))", '--set', 'seed=1'])
  assert old.overrides == new.overrides == ['train.total_steps=3', "mesh=(('data', -1), ('fsdp', 2))", 'seed=1']
  assert old.config == new.config == 'configs/tiny.py'
  assert capsys.readouterr().err == (f'warning: --set KEY=VALUE is deprecated and will be removed in '
                                     f'{cli.REMOVED_IN}; use --config.KEY=VALUE\n')


def test_sweep_cli_with_set_prints_the_same_commands(tmp_path):
  spec = tmp_path / 'two.py'
  spec.write_text("from ovseg_jax import sweep\ndef get_sweep():\n  return sweep.grid({'seed': [0, 1]})\n")
  run = lambda *a: subprocess.run([sys.executable, '-m', 'ovseg_jax.sweep', '--config=configs/tiny.py',
                                   f'--sweep={spec}', '--workdir_root=/w', *a], cwd=ROOT, capture_output=True,
                                  text=True, timeout=300)
  new, old = run('--config.train.total_steps=3'), run('--set', 'train.total_steps=3')
  assert new.returncode == old.returncode == 0, new.stderr + old.stderr
  assert new.stdout == old.stdout and new.stdout.splitlines()[0] == (
      'python -m ovseg_jax.train --config=configs/tiny.py --workdir=/w/seed=0 --config.train.total_steps=3 '
      '--config.seed=0')
  assert new.stderr == '' and old.stderr.startswith('warning: --set KEY=VALUE is deprecated')
  bad = run('--config.train.total_stpes=3')
  assert bad.returncode == 1 and bad.stderr.startswith('sweep: error: ') and 'total_stpes' in bad.stderr


# ------------------------------------------------------------------------------------------------------------
# cli helpers; real exit codes of `python -m`.
# ------------------------------------------------------------------------------------------------------------

def test_rewrite_and_pop_leave_everything_else_alone(capsys):
  argv = ['--config=configs/x.py:a=1', '--config.b=2', '--config.c', '3', '--other', '--', '--config.d=4']
  assert cli.pop_overrides(argv, '--config.') == (['--config=configs/x.py:a=1', '--other', '--', '--config.d=4'],
                                                  ['b=2', 'c=3'])
  assert cli.rewrite_deprecated(['--x', '1', '--', '--set', 'a=1'], {'--set': '--eval.'}) == [
      '--x', '1', '--', '--set', 'a=1']
  assert capsys.readouterr().err == ''


def test_python_m_exit_codes(tmp_path):
  def run(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
  bad = run('-m', 'ovseg_jax.data.coco_object', '--coco_dir')
  assert bad.returncode == 2 and bad.stderr == 'error: Missing value for flag --coco_dir\n'
  ok = run('-m', 'ovseg_jax.data.entities', '--help')
  assert ok.returncode == 0 and '--captions=VALUE' in ok.stdout
  # The trainer keeps the global FLAGS (config_flags' --config); same help and error style.
  helped = run('-m', 'ovseg_jax.train', '--help')
  assert helped.returncode == 0 and '--config=VALUE' in helped.stdout and '--workdir=VALUE' in helped.stdout
  typo = run('-m', 'ovseg_jax.train', '--config=configs/tiny.py', f'--workdri={tmp_path}')
  assert typo.returncode == 2
  assert [line for line in typo.stderr.splitlines() if line.startswith('error:')] == [
      'error: unknown flag --workdri (did you mean: workdir?)']
  assert 'Traceback' not in typo.stderr
  missing = run('-m', 'ovseg_jax.train', '--config=configs/tiny.py')
  assert missing.returncode == 2 and 'error: --config and --workdir are required' in missing.stderr
  # A variant the config file rejects: its own message, one line, not config_flags' wrapped traceback.
  variant = run('-m', 'ovseg_jax.train', '--config=configs/tiny.py:grounding=x', f'--workdir={tmp_path}')
  assert variant.returncode == 2 and 'Traceback' not in variant.stderr
  assert [line for line in variant.stderr.splitlines() if line.startswith('error:')] == [
      "error: --config=configs/tiny.py:grounding=x: ValueError: grounding='x': expected 'patch' or 'none'"]
