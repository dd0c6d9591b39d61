"""The step benchmark runs on a tiny shape: the code behind the README's speed figures keeps up
with the step it measures (its own numbers are measured by running it, never here)."""

import json
import os
import subprocess
import sys

BENCH = os.path.join(os.path.dirname(__file__), '..', 'bench', 'bench_step.py')


def test_the_step_benchmark_runs_and_writes_its_results(tmp_path):
  args = ['--presets=tiny', '--seq-len=256', '--image-size=56', '--reps=1', '--matmul-n=256']
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_backend_optimization_level=0')
  done = subprocess.run(
    [sys.executable, BENCH, *args, f'--out={tmp_path}'],
    capture_output=True,
    text=True,
    env=env,
    timeout=600,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  (result,) = tmp_path.glob('bench_step_*.json')
  record = json.loads(result.read_text())
  (row,) = record['presets']
  assert row['optimized']['step_s_median'] > 0
