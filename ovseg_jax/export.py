"""Training workdir -> inference checkpoint (the format `segment` / `evaluate` / `Segmenter` load), or our
weights -> the authors' PyTorch checkpoint layout (`--format official`).

  python -m ovseg_jax.export --workdir runs/vitb --dst exported/vitb [--step N]
  python -m ovseg_jax.export --format official --dst ckpt.pth (--workdir runs/vitb [--step N] | --checkpoint DIR)

Inference format: writes the online model only: params {img_encoder, text_encoder, img/text/bridge_projector,
decoder, logit_scale} + the projectors' BN running statistics (`batch_stats`). The EMA teacher, the optimizer
state and the step counter are training-only and are left out. model_config = `config.model` of the workdir's
config.json (written by the trainer).

Official format (convert/official_export.py): a torch zip `.pth` {'model': state_dict, 'config': plain dict,
'epoch': 0, 'optimizer': {}, 'lr_scheduler': {}} with every key, shape and dtype of the authors' stage-2 model
(official_checkpoint_keys.txt), loadable by their code and by `torch.load(weights_only=True)`; written without
torch (convert/torch_save.py). `img_encoder_momentum.*` is the EMA teacher (the workdir's, or DIR/teacher of a
`convert official` folder) when there is one, else the online img_encoder. `python -m ovseg_jax.convert
official --src ckpt.pth` reads it back to the same arrays.
"""
import sys

from absl import flags

from ovseg_jax import checkpoint as ckpt_lib
from ovseg_jax import cli
from ovseg_jax import fileio


def _check_fit(model_config, variables, what: str) -> None:
  """The weights must build the model the config describes (one UsageError listing every misfit)."""
  from ovseg_jax import inference  # pylint: disable=g-import-not-at-top  (jax + the model: only when exporting)
  target = inference.checked_abstract_variables(model_config, f'the model config of {what}')
  ckpt_lib.check_tree(variables, target, what, limit=6)


def export(workdir: str, dst: str, step: int | None = None) -> str:
  """-> the absolute path of the written inference checkpoint.

  Reads the newest step that reads unless `step` is given (an unreadable newer one is named in a warning),
  with the config that saved it (its meta; WORKDIR/config.json for older checkpoints), and checks that the
  weights fit that config's model before writing anything.
  """
  config, state, step = ckpt_lib.read_workdir(workdir, step)
  variables = {'params': state['params'], 'batch_stats': state['batch_stats']}
  _check_fit(config.model, variables, f'step {step} of {workdir}')
  meta = {'source': fileio.abspath(workdir), 'step': int(step), 'exporter': 'ovseg_jax.export',
          'stage': config.stage, 'recipe': config.recipe,
          'eval': config.eval.to_dict()}  # Segmenter's defaults for this model
  return ckpt_lib.save_inference(dst, config.model, variables, meta)


def export_official(dst: str, *, workdir: str | None = None, checkpoint: str | None = None,
                    step: int | None = None) -> str:
  """Our weights (a training workdir or an inference-checkpoint folder) -> the authors' `.pth` at `dst`.

  Returns the absolute path written. See convert/official_export.py for the layout and the filled keys.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from ovseg_jax.convert import official_export  # pylint: disable=g-import-not-at-top
  from ovseg_jax.convert import torch_save  # pylint: disable=g-import-not-at-top
  if (workdir is None) == (checkpoint is None):
    raise ValueError('give exactly one of --workdir and --checkpoint')
  if workdir is not None:
    config, state, step = ckpt_lib.read_workdir(workdir, step)
    model_config, teacher = config.model, state.get('ema') or None
    variables = {'params': state['params'], 'batch_stats': state['batch_stats']}
    _check_fit(model_config, variables, f'step {step} of {workdir}')
    cross_threshold = config.loss.cross_threshold
    provenance = {'source': fileio.abspath(workdir), 'step': step, 'stage': config.stage}
  else:
    model_config, variables = ckpt_lib.load_inference(checkpoint)
    _check_fit(model_config, variables, checkpoint)
    teacher = ckpt_lib.load_teacher(checkpoint)  # written by `convert official` for a stage-2 file
    meta = ckpt_lib.load_meta(checkpoint)
    cross_threshold = 0.6
    provenance = {'source': fileio.abspath(checkpoint), 'step': meta.get('step')}
  to_np = lambda tree: jax.tree.map(np.asarray, tree)  # noqa: E731
  obj = official_export.checkpoint(model_config, to_np(variables), to_np(teacher) if teacher else None,
                                   cross_threshold=cross_threshold,
                                   provenance=dict(provenance, has_teacher=teacher is not None))
  return torch_save.save(obj, dst)


@cli.entry_point
def main(argv=None) -> int:
  fv = flags.FlagValues()
  flags.DEFINE_enum('format', 'inference', ['inference', 'official'],
                    "inference: Orbax folder for segment / evaluate; official: the authors' PyTorch .pth",
                    flag_values=fv)
  flags.DEFINE_string('workdir', None, 'training workdir (config.json + checkpoints/)', flag_values=fv)
  flags.DEFINE_string('checkpoint', None, 'inference-checkpoint folder (export / convert official); '
                      '--format official only', flag_values=fv)
  flags.DEFINE_string('dst', None, 'output inference-checkpoint folder, or the .pth file for --format official',
                      flag_values=fv)
  flags.DEFINE_integer('step', None, 'checkpoint step (default: the latest)', flag_values=fv)
  args = cli.parse(fv, argv, prog='python -m ovseg_jax.export', doc=__doc__, required=('dst',),
                   one_of=[('workdir', 'checkpoint')])
  try:
    if args.format == 'official':
      path = export_official(args.dst, workdir=args.workdir, checkpoint=args.checkpoint, step=args.step)
    elif args.checkpoint is not None:
      raise ValueError('--checkpoint is already an inference checkpoint; use it with --format official')
    else:
      path = export(args.workdir, args.dst, args.step)
    print(f'wrote {path}')
  except (OSError, ValueError, KeyError) as e:   # OSError: e.g. --dst under a regular file (names the path)
    print(f'error: {next((x for x in str(e).splitlines() if x.strip()), type(e).__name__)}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())
