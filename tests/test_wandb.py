"""W&B (log.wandb_project): an offline run, read back from its .wandb file, holds what
metrics.jsonl holds, each stage against its own step; a restarted run continues the same W&B
run; a named project without the wandb package stops the run at start-up."""

import json
import pathlib
import struct
import sys
import time
import zlib

from cli_configs import SMALL_RUN
from cli_configs import cli_config
import numpy as np
import pytest
from wandb.proto import wandb_internal_pb2

from cpo_jax import main
from cpo_jax.train import wandb_writer
from cpo_jax.train import writers

_HEADER = b':W&B\xe1\xbe\x00'  # magic, 0xBEE1 little-endian, version 0
_BLOCK, _CHUNK_HEADER = 32768, 7
_FULL, _LAST = 1, 4


def _records(path):
  """The wandb_internal_pb2.Record messages of a .wandb file. wandb 0.31 reads these files in
  its Go core only, so the framing is read here: LevelDB's log format (32 KiB blocks of chunks,
  each `crc32(type + data) <I, length <H, type <B, data`; under 7 bytes left in a block is
  padding) after W&B's 7-byte header."""
  raw = pathlib.Path(path).read_bytes()
  assert raw[: len(_HEADER)] == _HEADER, raw[: len(_HEADER)]
  pos, pending, out = len(_HEADER), b'', []
  while pos + _CHUNK_HEADER <= len(raw):
    left = _BLOCK - pos % _BLOCK
    if left < _CHUNK_HEADER:
      pos += left
      continue
    crc, length, kind = struct.unpack('<IHB', raw[pos : pos + _CHUNK_HEADER])
    data = raw[pos + _CHUNK_HEADER : pos + _CHUNK_HEADER + length]
    assert crc == zlib.crc32(bytes([kind]) + data), f'{path}: bad chunk at byte {pos}'
    pos += _CHUNK_HEADER + length
    pending += data
    if kind in (_FULL, _LAST):
      record = wandb_internal_pb2.Record()
      record.ParseFromString(pending)
      out.append(record)
      pending = b''
  return out


def _finished_records(path, timeout_s=60):
  """The records of a run's .wandb file once its `exit` record is there: wandb-core may still
  be writing the file when `run.finish()` returns."""
  deadline = time.monotonic() + timeout_s
  while True:
    records = _records(path)
    if records and records[-1].WhichOneof('record_type') == 'exit':
      return records
    assert time.monotonic() < deadline, f'{path}: no exit record after {timeout_s} s'
    time.sleep(0.1)


def _offline_run(wandb_dir, run_id):
  """The records of the offline run directories of `run_id` (a restart within the same second
  gets a '-1' suffix), oldest first, by kind."""
  files = sorted(
    pathlib.Path(wandb_dir, 'wandb').glob(f'offline-run-*-{run_id}*/run-{run_id}.wandb')
  )
  by_kind = {}
  for r in (r for f in files for r in _finished_records(f)):
    kind = r.WhichOneof('record_type')
    by_kind.setdefault(kind, []).append(getattr(r, kind))
  return len(files), by_kind


def _history(by_kind):
  # A key comes as `key` or as `nested_key` (one part: ours are flat, '/' inside the name).
  return [
    {i.key or '/'.join(i.nested_key): json.loads(i.value_json) for i in h.item}
    for h in by_kind.get('history', [])
  ]


def _config(workdir, *overrides):
  return cli_config(
    'configs/driving.py',
    f'--workdir={workdir}',
    *SMALL_RUN,
    '--config.log.wandb_project=cpo-test',
    '--config.log.wandb_mode=online',  # WANDB_MODE (offline here) overrides it
    *overrides,
  )


@pytest.fixture
def offline(tmp_path, monkeypatch):
  wandb_dir = tmp_path / 'wandb_dir'
  wandb_dir.mkdir()
  monkeypatch.setenv('WANDB_MODE', 'offline')
  monkeypatch.setenv('WANDB_DIR', str(wandb_dir))
  monkeypatch.setenv('WANDB_SILENT', 'true')
  return wandb_dir


def _log(workdir, cfg, rows):
  """Writes `rows` as the loop does: MetricsWriter with the run's W&B writer."""
  writer = writers.MetricsWriter(str(workdir), wandb_writer.from_config(cfg, str(workdir)))
  try:
    for row in rows:
      writer.write(row)
  finally:
    writer.close()


def _train_row(stage, step, **metrics):
  return writers.metrics_row(stage, step, metrics, lr=1e-3 * step)


def test_offline_run_holds_the_metrics_jsonl_rows_per_stage_step(tmp_path, offline):
  workdir = tmp_path / 'run_a'
  cfg = _config(workdir)
  rng = np.random.default_rng(0)
  rows = [_train_row('sft', s, loss=rng.uniform(1, 5), grad_norm=rng.uniform()) for s in (1, 2)]
  # An eval row (eval.every_steps); None = not measured: kept in JSON, left out elsewhere.
  rows.append({'stage': 'sft', 'step': 2, 'eval/test/accuracy': 0.5, 'eval/test/unparsed': None})
  # Steps restart at 1 in the second stage, as the loop logs them.
  rows += [
    _train_row('cpo_plus', s, loss=rng.uniform(), **{'rewards/margins': 0.1}) for s in (1, 2)
  ]
  _log(workdir, cfg, rows)

  run_id = (workdir / wandb_writer.RUN_ID_FILE).read_text()
  n_files, by_kind = _offline_run(offline, run_id)
  assert n_files == 1
  (run,) = by_kind['run']
  assert run.display_name == 'run_a' and run.project == 'cpo-test'
  config = {u.key: json.loads(u.value_json) for u in run.config.update}
  assert config['cpo']['beta'] == cfg.cpo.beta and config['log']['wandb_project'] == 'cpo-test'
  assert {(m.glob_name, m.step_metric) for m in by_kind['metric'] if m.glob_name} == {
    ('sft/*', 'sft/step'),
    ('cpo_plus/*', 'cpo_plus/step'),
  }

  logged = [json.loads(line) for line in open(workdir / 'metrics.jsonl')]
  history = _history(by_kind)
  assert len(logged) == len(rows) and len(history) == len(logged)
  for row, point in zip(logged, history):
    stage = row['stage']
    assert point[f'{stage}/step'] == row['step']
    measured = {k: v for k, v in row.items() if k not in ('stage', 'step') and v is not None}
    assert {k for k in point if not k.startswith('_')} == {f'{stage}/step'} | {
      f'{stage}/{k}' for k in measured
    }
    for key, value in measured.items():
      np.testing.assert_allclose(point[f'{stage}/{key}'], value, rtol=1e-12, err_msg=key)
  assert [r['loss'] for r in logged if 'loss' in r] == [
    p[f'{r["stage"]}/loss'] for r, p in zip(logged, history) if 'loss' in r
  ]


def test_a_restarted_run_continues_the_same_wandb_run(tmp_path, offline, monkeypatch):
  monkeypatch.delenv('WANDB_DIR')  # W&B's files then go to the workdir
  workdir = tmp_path / 'run_b'
  cfg = _config(workdir)
  _log(workdir, cfg, [_train_row('sft', 1, loss=2.0), _train_row('sft', 2, loss=1.5)])
  run_id = (workdir / wandb_writer.RUN_ID_FILE).read_text()
  # Restarted after a preemption: step 2 (after the last checkpoint) is logged again.
  _log(workdir, cfg, [_train_row('sft', 2, loss=1.5), _train_row('sft', 3, loss=1.0)])
  assert not list(offline.iterdir())
  n_files, by_kind = _offline_run(workdir, run_id)
  assert n_files == 2 and [r.run_id for r in by_kind['run']] == [run_id, run_id]
  assert by_kind['run'][1].resume
  assert [(p['sft/step'], p['sft/loss']) for p in _history(by_kind)] == [
    (1, 2.0),
    (2, 1.5),
    (2, 1.5),
    (3, 1.0),
  ]


def test_a_project_without_the_wandb_package_stops_at_start_up(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, 'wandb', None)  # `import wandb` raises ImportError
  with pytest.raises(ImportError, match="log.wandb_project='cpo-test'.*pip install 'cpo_jax"):
    main.run(_config(tmp_path), str(tmp_path))
  assert not (tmp_path / 'data').exists()  # before any data was prepared
  # Without a project nothing imports wandb; eval and export never need it.
  assert wandb_writer.from_config(_config(tmp_path, '--config.log.wandb_project='), 'x') is None
  with pytest.raises(ValueError, match="wandb_mode='upload'"):
    wandb_writer.from_config(_config(tmp_path, '--config.log.wandb_mode=upload'), str(tmp_path))
