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

import argparse
import importlib.util
import os
import sys


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


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog='python -m ovseg_jax.convert', description=__doc__.split('\n')[0])
  sub = parser.add_subparsers(dest='kind', required=True)
  for kind in ('official', 'dino', 'bert'):
    p = sub.add_parser(kind)
    p.add_argument('--src', required=True)
    p.add_argument('--dst', required=True)
    if kind != 'bert':
      p.add_argument('--config', default=_default_config() if kind == 'official' else None,
                     required=kind == 'dino')
  args = parser.parse_args(argv)
  try:
    if args.kind == 'official':
      import jax  # pylint: disable=g-import-not-at-top
      import numpy as np  # pylint: disable=g-import-not-at-top
      import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
      from ovseg_jax import checkpoint  # pylint: disable=g-import-not-at-top
      from ovseg_jax.convert import official  # pylint: disable=g-import-not-at-top
      base = load_config(args.config).model
      model_config, variables, teacher, stored = official.load_official(args.src, base)
      meta = {'source': os.path.abspath(args.src), 'converter': 'ovseg_jax.convert.official',
              'has_teacher': teacher is not None, 'stored_config': stored}
      out = checkpoint.save_inference(args.dst, model_config, variables, meta)
      if teacher is not None:
        with ocp.StandardCheckpointer() as ckptr:
          ckptr.save(os.path.join(out, 'teacher'), {'params': jax.tree.map(np.asarray, teacher)}, force=True)
          ckptr.wait_until_finished()
      print(f'wrote {out}')
    elif args.kind == 'dino':
      from ovseg_jax.convert import dino  # pylint: disable=g-import-not-at-top
      print(f'wrote {dino.save_dino_init(args.src, args.dst, load_config(args.config).model)}')
    else:
      from ovseg_jax.convert import bert  # pylint: disable=g-import-not-at-top
      print(f'wrote {bert.save_bert_init(args.src, args.dst)}')
  except (ValueError, FileNotFoundError, KeyError, OSError) as e:
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    print(f'error: {msg}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())
