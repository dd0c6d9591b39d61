"""A run whose workdir and data_dir are gs:// (a real local Cloud Storage server): every file
lands in the bucket, nothing under the current directory, and a rerun resumes from there."""

import json
import os

from cli_configs import SMALL_RUN
from cli_configs import cli_config
from conftest import bucket_files
from etils import epath
from flax import nnx
import jax
import numpy as np

from cpo_jax import main
from cpo_jax import models


def test_a_run_on_gs_writes_everything_to_the_bucket_and_resumes(
  gcs_server, tmp_path, tmp_path_factory, monkeypatch
):
  workdir, data_dir = 'gs://bucket/run', 'gs://bucket/data'
  cfg = cli_config(
    'configs/driving.py',
    *SMALL_RUN,
    f'--config.data.data_dir={data_dir}',
    '--config.eval.robustness=False',
  )
  monkeypatch.chdir(tmp_path)  # anything written to a local path would land here
  report = main.run(cfg, workdir)
  files = bucket_files(workdir)
  for name in ('config.json', 'metrics.jsonl', 'eval/report.json', 'eval/accuracy.png'):
    assert name in files, files
  assert any(f.startswith('tensorboard/events.out.tfevents') for f in files)
  for stage in ('sft', 'cpo_plus'):
    assert f'checkpoints/{stage}/4/commit_success.txt' in files or any(
      f.startswith(f'checkpoints/{stage}/') and f.endswith('commit_success.txt') for f in files
    )
  assert any(f.startswith('synth_drive/') for f in bucket_files(data_dir))
  assert 'tokenizer/tokenizer.json' in bucket_files(data_dir)
  assert os.listdir(tmp_path) == []  # nothing written locally

  rows = epath.Path(workdir, 'metrics.jsonl').read_text().splitlines()
  assert [json.loads(r)['stage'] for r in rows] == ['sft'] * 4 + ['cpo_plus'] * 2
  stored = json.loads(epath.Path(workdir, 'eval', 'report.json').read_text())
  assert stored['splits']['test']['accuracy'] == report['splits']['test']['accuracy']

  # A rerun finds both stages finished in the bucket: no step is trained again.
  again = main.run(cfg, workdir)
  assert epath.Path(workdir, 'metrics.jsonl').read_text().splitlines() == rows
  assert again['splits'] == report['splits']

  export_dir = 'gs://bucket/export'
  main.export(cfg, workdir, export_dir)
  assert {'config.json', 'model.safetensors', 'tokenizer.json'} <= set(bucket_files(export_dir))
  assert os.listdir(tmp_path) == []
  local_export = tmp_path_factory.mktemp('export')
  main.export(cfg, workdir, str(local_export))  # the same export, written to a local disk
  for name in ('model.safetensors', 'config.json'):
    assert epath.Path(export_dir, name).read_bytes() == (local_export / name).read_bytes()
  exported = models.load_hf(export_dir)  # ranged reads from the bucket
  local = models.load_hf(str(local_export))
  for a, b in zip(jax.tree.leaves(nnx.state(exported)), jax.tree.leaves(nnx.state(local))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
