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
import argparse
import sys

from ovseg_jax import checkpoint as ckpt_lib
from ovseg_jax import fileio


def _read_workdir(workdir: str, step: int | None):
  """-> (config ConfigDict of WORKDIR/config.json, raw saved train state (numpy), step)."""
  import json  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  config_path = fileio.join(workdir, 'config.json')
  if not fileio.isfile(config_path):
    raise FileNotFoundError(f'{workdir} is not a training workdir: {config_path} is missing')
  config = ml_collections.ConfigDict(json.loads(fileio.read_text(config_path)))
  ckpt = ckpt_lib.TrainCheckpointer(ckpt_lib.train_checkpoint_dir(workdir), save_every=1, keep=0)
  step = ckpt.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f'no training checkpoint in {ckpt.directory}')
  state = ckpt.restore_params(step)
  ckpt.close()
  return config, state, int(step)


def export(workdir: str, dst: str, step: int | None = None) -> str:
  """-> the absolute path of the written inference checkpoint."""
  config, state, step = _read_workdir(workdir, step)
  variables = {'params': state['params'], 'batch_stats': state['batch_stats']}
  meta = {'source': fileio.abspath(workdir), 'step': int(step), 'exporter': 'ovseg_jax.export',
          'stage': config.get('stage'), 'recipe': config.get('recipe'),
          'eval': config.eval.to_dict() if 'eval' in config else {}}  # Segmenter's defaults for this model
  return ckpt_lib.save_inference(dst, config.model, variables, meta)


def export_official(dst: str, *, workdir: str | None = None, checkpoint: str | None = None,
                    step: int | None = None) -> str:
  """Our weights (a training workdir or an inference-checkpoint folder) -> the authors' `.pth` at `dst`.

  Returns the absolute path written. See convert/official_export.py for the layout and the filled keys.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from ovseg_jax.convert import official_export  # pylint: disable=g-import-not-at-top
  from ovseg_jax.convert import torch_save  # pylint: disable=g-import-not-at-top
  if (workdir is None) == (checkpoint is None):
    raise ValueError('give exactly one of --workdir and --checkpoint')
  if workdir is not None:
    config, state, step = _read_workdir(workdir, step)
    model_config, teacher = config.model, state.get('ema') or None
    variables = {'params': state['params'], 'batch_stats': state['batch_stats']}
    cross_threshold = config.loss.cross_threshold if 'loss' in config else 0.6
    provenance = {'source': fileio.abspath(workdir), 'step': step, 'stage': config.get('stage')}
  else:
    model_config, variables = ckpt_lib.load_inference(checkpoint)
    teacher_dir = fileio.join(fileio.abspath(checkpoint), 'teacher')
    teacher = None
    if fileio.isdir(teacher_dir):  # written by `convert official` for a stage-2 file
      with ocp.StandardCheckpointer() as ckptr:
        teacher = ckptr.restore(teacher_dir)['params']
    meta = ckpt_lib.load_meta(checkpoint)
    cross_threshold = 0.6
    provenance = {'source': fileio.abspath(checkpoint), 'step': meta.get('step')}
  to_np = lambda tree: jax.tree.map(np.asarray, tree)  # noqa: E731
  obj = official_export.checkpoint(model_config, to_np(variables), to_np(teacher) if teacher else None,
                                   cross_threshold=cross_threshold,
                                   provenance=dict(provenance, has_teacher=teacher is not None))
  return torch_save.save(obj, dst)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog='python -m ovseg_jax.export', description=__doc__.split('\n')[0])
  parser.add_argument('--format', choices=('inference', 'official'), default='inference',
                      help="inference: Orbax folder for segment / evaluate; official: the authors' PyTorch .pth")
  src = parser.add_mutually_exclusive_group(required=True)
  src.add_argument('--workdir', help='training workdir (config.json + checkpoints/)')
  src.add_argument('--checkpoint', help='inference-checkpoint folder (export / convert official); '
                   '--format official only')
  parser.add_argument('--dst', required=True,
                      help='output inference-checkpoint folder, or the .pth file for --format official')
  parser.add_argument('--step', type=int, default=None, help='checkpoint step (default: the latest)')
  args = parser.parse_args(argv)
  try:
    if args.format == 'official':
      path = export_official(args.dst, workdir=args.workdir, checkpoint=args.checkpoint, step=args.step)
    elif args.checkpoint is not None:
      raise ValueError('--checkpoint is already an inference checkpoint; use it with --format official')
    else:
      path = export(args.workdir, args.dst, args.step)
    print(f'wrote {path}')
  except (FileNotFoundError, ValueError, KeyError) as e:
    print(f'error: {str(e).splitlines()[0] if str(e) else type(e).__name__}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())
