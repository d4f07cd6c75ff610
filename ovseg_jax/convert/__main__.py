"""Weight converters CLI.

  python -m ovseg_jax.convert official --src ckpt.pth --dst DIR [--config configs/vitb.py]
      the authors' checkpoint -> inference checkpoint (checkpoint.save_inference); shapes are read from the
      file, head counts from its stored config (else from --config). A stage-2 file's EMA teacher
      (img_encoder_momentum.*) is written beside it as DIR/teacher (Orbax tree {'params': img_encoder params}).
  python -m ovseg_jax.convert dino --src dino.pth --dst DIR --config configs/vitb.py
      DINO ViT -> training init (Orbax tree of the img_encoder params DINO provides; see convert/dino.py).
  python -m ovseg_jax.convert bert --src HF_DIR --dst DIR
      HF BERT folder -> text-encoder init (convert/bert.py).
Errors are one line (`error: ...`, exit status 2).
"""

import importlib.util
import os
import sys

from absl import flags

from ovseg_jax import cli


def load_config(path_arg: str):
  """`configs/x.py[:variant]` -> the locked ConfigDict of its get_config(variant)."""
  path, _, variant = path_arg.partition(':')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'config file {path} does not exist')
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  sys.path.insert(0, os.path.dirname(root))
  spec = importlib.util.spec_from_file_location('_convert_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant or None)


def _default_config() -> str:
  here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  return os.path.join(here, 'configs', 'vitb.py')


KINDS = ('official', 'dino', 'bert')


def parse_args(argv=None):
  """`KIND --src S --dst D [--config C]`: the converter is the first argument, its flags follow."""
  argv = cli.argv_or_sys(argv)
  kind = argv[0] if argv else None
  if kind not in KINDS:
    if kind in cli.HELP_FLAGS:
      print(f'usage: python -m ovseg_jax.convert {{{"|".join(KINDS)}}} [flags]\n\n{__doc__.strip()}')
      raise cli.Exit(0)
    cli.error(f'give the converter first: python -m ovseg_jax.convert {"|".join(KINDS)} --src ... --dst ...'
              + (f' (not {kind!r})' if kind else ''))
  fv = flags.FlagValues()
  flags.DEFINE_string('src', None, {'official': "the authors' checkpoint .pth", 'dino': 'DINO ViT .pth',
                                    'bert': 'HF BERT folder'}[kind], flag_values=fv)
  flags.DEFINE_string('dst', None, 'output folder', flag_values=fv)
  if kind != 'bert':
    flags.DEFINE_string('config', _default_config() if kind == 'official' else None,
                        'configs/X.py[:variant] (model shapes)', flag_values=fv)
  args = cli.parse(fv, argv[1:], prog=f'python -m ovseg_jax.convert {kind}', doc=__doc__,
                   required=('src', 'dst') + (('config',) if kind == 'dino' else ()))
  args.kind = kind
  return args


@cli.entry_point
def main(argv=None) -> int:
  args = parse_args(argv)
  try:
    if args.kind == 'official':
      from ovseg_jax import checkpoint  # pylint: disable=g-import-not-at-top
      from ovseg_jax.convert import official  # pylint: disable=g-import-not-at-top
      base = load_config(args.config).model
      model_config, variables, teacher, stored = official.load_official(args.src, base)
      meta = {'source': os.path.abspath(args.src), 'converter': 'ovseg_jax.convert.official',
              'has_teacher': teacher is not None, 'stored_config': stored}
      print(f'wrote {checkpoint.save_inference(args.dst, model_config, variables, meta, teacher=teacher)}')
    elif args.kind == 'dino':
      from ovseg_jax.convert import dino  # pylint: disable=g-import-not-at-top
      print(f'wrote {dino.save_dino_init(args.src, args.dst, load_config(args.config).model)}')
    else:
      from ovseg_jax.convert import bert  # pylint: disable=g-import-not-at-top
      print(f'wrote {bert.save_bert_init(args.src, args.dst)}')
  except (ValueError, FileNotFoundError, KeyError, OSError, MemoryError) as e:
    # One line (errors.UsageError and the readers' messages name the file); the first non-blank line if a
    # library's message spans several.
    msg = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
    print(f'error: {msg}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())
