"""Preemption and crashes, on the real CLI in subprocesses: SIGTERM saves at the current step
and exits 0; kill -9 in the middle of a checkpoint save leaves an incomplete save that the rerun
ignores. Either way the resumed run ends with the parameters of an uninterrupted one, bit for
bit (CPU).

The worker is this file run as a script (see the bottom): main.py, optionally with the data
item's checkpoint save blocked at one step, so the kill lands inside that save."""

import os
import signal
import subprocess
import sys
import time

from cli_configs import cli_config
from flax import nnx
import jax
import numpy as np
import pytest

from cpo_jax import main

STEPS = 24
ARGS = (
  '--config=configs/driving.py',
  '--config.stages=sft',
  f'--config.sft.num_steps={STEPS}',
  '--config.sft.batch_size=8',
  '--config.log_every_steps=1',
  '--config.checkpoint.every_steps=8',
  '--config.data.num_examples.train=64',
)


def _start(workdir, block_save_at=0):
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_backend_optimization_level=0')
  command = [sys.executable, __file__, str(block_save_at), f'--workdir={workdir}', *ARGS]
  return subprocess.Popen(
    command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
  )


def _logged_steps(workdir):
  path = workdir / 'metrics.jsonl'
  return len(path.read_text().splitlines()) if path.exists() else 0


def _wait(proc, until, timeout=240):
  deadline = time.time() + timeout
  while not until():
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    assert time.time() < deadline, 'timed out'
    time.sleep(0.05)


def _finish(proc):
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  return err


def _params(workdir):
  cfg = cli_config('configs/driving.py', *ARGS[1:])
  model, _ = main.restore_latest(cfg, str(workdir))
  return jax.tree.leaves(nnx.state(model, nnx.Param))


def _steps(workdir):
  return sorted(
    int(p.name) for p in (workdir / 'checkpoints' / 'sft').iterdir() if p.name.isdigit()
  )


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('whole')
  _finish(_start(workdir))
  return _params(workdir)


def test_sigterm_saves_the_current_step_exits_0_and_the_rerun_ends_bit_identical(
  tmp_path, uninterrupted
):
  run = _start(tmp_path / 'cut')
  _wait(run, lambda: _logged_steps(tmp_path / 'cut') >= 11)  # between the saves at 8 and 16
  run.send_signal(signal.SIGTERM)
  err = _finish(run)  # exits 0
  saved = _steps(tmp_path / 'cut')
  assert 'preempted; saved at step' in err and saved[-1] % 8 and 11 <= saved[-1] < STEPS
  _finish(_start(tmp_path / 'cut'))
  assert _steps(tmp_path / 'cut')[-1] == STEPS
  for a, b in zip(uninterrupted, _params(tmp_path / 'cut'), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_kill_9_inside_a_save_resumes_from_the_last_complete_one_bit_identical(
  tmp_path, uninterrupted
):
  run = _start(tmp_path / 'cut', block_save_at=16)
  _wait(run, lambda: (tmp_path / 'blocked').exists())  # the save of step 16 is under way
  run.kill()
  run.wait()
  leftovers = os.listdir(tmp_path / 'cut' / 'checkpoints' / 'sft')
  assert _steps(tmp_path / 'cut') == [8] and len(leftovers) > 1, leftovers  # + the partial save
  _finish(_start(tmp_path / 'cut'))
  assert _steps(tmp_path / 'cut')[-1] == STEPS
  for a, b in zip(uninterrupted, _params(tmp_path / 'cut'), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _worker(block_save_at, argv):
  from absl import app
  import grain

  if block_save_at:
    save = grain.checkpoint.CheckpointHandler.save
    marker = os.path.join(os.path.dirname(argv[0].split('=', 1)[1]), 'blocked')

    def blocking_save(self, directory, *args, **kwargs):
      if os.path.basename(os.path.dirname(os.fspath(directory))).startswith(str(block_save_at)):
        open(marker, 'w').close()
        time.sleep(3600)  # killed here
      return save(self, directory, *args, **kwargs)

    grain.checkpoint.CheckpointHandler.save = blocking_save
  from cpo_jax.main import main as cli_main

  app.run(cli_main, argv=['cpo_jax.main', *argv])


if __name__ == '__main__':
  _worker(int(sys.argv[1]), sys.argv[2:])
