"""Metric writers (process 0): one JSON object per logged step in <workdir>/metrics.jsonl, and
the same scalars as TensorBoard event files under <workdir>/tensorboard (tensorboardX: no
TensorFlow), tagged '<stage>/<metric>' at the stage's step, and to W&B when the run names a
project (`wandb_writer.py`).

The workdir may be gs://: Cloud Storage has no append, so there both files are rewritten whole
at each write (the rows so far are kept; a resumed run reads them back first). tensorboardX's own
gs:// writer re-uploads from `__del__` after close; ours goes through epath and closes once.
"""

import io
import json

import jax
import numpy as np
import tensorboardX
from tensorboardX import record_writer

from cpo_jax import losses
from cpo_jax import paths


class _WholeFileWriter:
  """A TensorBoard event file on object storage: buffered, uploaded whole on flush."""

  def __init__(self, path):
    self._path, self._buffer, self._dirty, self._closed = (
      paths.path(path),
      io.BytesIO(),
      False,
      False,
    )

  def write(self, data):
    self._buffer.write(data)
    self._dirty = True

  def flush(self):
    if self._dirty and not self._closed:
      self._path.write_bytes(self._buffer.getvalue())
      self._dirty = False

  def close(self):
    self.flush()
    self._closed = True


class _WholeFileFactory:
  def open(self, path):
    return _WholeFileWriter(path)

  def directory_check(self, path):
    del path  # object stores need no directories


record_writer.register_writer_factory('gs', _WholeFileFactory())


class MetricsWriter:
  """Writes one JSON object per logged step to <workdir>/metrics.jsonl and its scalars to
  TensorBoard and, given a `wandb_writer.WandbWriter`, to W&B."""

  def __init__(self, workdir, wandb=None):
    self.path = paths.path(workdir) / 'metrics.jsonl'
    self.tensorboard_dir = paths.join(workdir, 'tensorboard')
    self._events = None  # opened at the first row: only process 0 writes
    self._text = None  # gs:// only: the file's content so far
    self._wandb = wandb

  def write(self, row):
    if jax.process_index() != 0:
      return
    line = json.dumps(row) + '\n'
    if paths.is_remote(self.path):
      if self._text is None:
        self._text = self.path.read_text() if self.path.exists() else ''
      self._text += line
      self.path.write_text(self._text)
    else:
      self.path.parent.mkdir(parents=True, exist_ok=True)
      with self.path.open('a') as f:
        f.write(line)
    if self._events is None:
      self._events = tensorboardX.SummaryWriter(self.tensorboard_dir)
    for key, value in row.items():
      if key not in ('stage', 'step') and value is not None:  # None: not measured (JSON only)
        self._events.add_scalar(f'{row["stage"]}/{key}', value, row['step'])
    self._events.flush()  # a run may stop at any step; what was logged is stored
    if self._wandb is not None:
      self._wandb.write(row)

  def close(self):
    try:
      if self._events is not None:
        self._events.close()
        self._events = None
    finally:
      if self._wandb is not None:
        self._wandb.close()


def metrics_row(stage, step, metrics, lr):
  row = {'stage': stage, 'step': step, 'lr': float(lr)}
  for k, v in losses.drop_absent(jax.device_get(metrics)).items():
    if not np.isfinite(v):
      raise FloatingPointError(f'{stage} step {step}: metric {k} is {v}; stopping.')
    row[k] = float(v)
  return row
