"""`python -m ovseg_jax.train`, plus one final line on EVERY process: `final: {"process": i, "step": s, ...}`.

launch/local_multihost.sh and tests/test_multihost.py run this instead of the bare trainer, because the trainer
prints progress on process 0 only, while the multi-host check is that every process ends with the same loss.
Same flags as the trainer (it defines them): --config=configs/X.py[:variant] --workdir=DIR [--config.KEY=VALUE ...].
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from ovseg_jax import errors  # noqa: E402
from ovseg_jax import train  # noqa: E402  (defines --config and --workdir)

REPORTED = ('loss', 'loss_contrast', 'loss_entity', 'loss_mask', 'lr', 'grad_norm')


def main(argv):
  del argv
  config, workdir = flags.FLAGS.config, flags.FLAGS.workdir
  if config is None or not workdir:
    print('error: --config and --workdir are required: python launch/train_and_report.py '
          '--config=configs/X.py[:variant] --workdir=DIR [--config.KEY=VALUE ...]', file=sys.stderr)
    return 2
  try:
    out = train.train(config, workdir)
  except KeyboardInterrupt as e:   # as the trainer's CLI: one line, 130
    print(train.interrupt_message(e, workdir), file=sys.stderr)
    return 130
  except (errors.UsageError, train.TrainingDiverged, FileNotFoundError) as e:
    print(f'error: {str(e).splitlines()[0]}', file=sys.stderr)
    return 1
  import jax  # pylint: disable=g-import-not-at-top
  report = {'process': jax.process_index(), 'process_count': jax.process_count(),
            'devices': jax.device_count(), 'local_devices': jax.local_device_count(), 'step': out['step']}
  report.update({k: float(out[k]) for k in REPORTED if k in out})
  print('final: ' + json.dumps(report), flush=True)
  return 0


if __name__ == '__main__':
  app.run(main, flags_parser=train.parse_flags)  # the trainer's one-line flag errors and --help
