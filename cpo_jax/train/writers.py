"""Metric writers (process 0): one JSON object per logged step in <workdir>/metrics.jsonl, and
the same scalars as TensorBoard event files under <workdir>/tensorboard (tensorboardX: no
TensorFlow), tagged '<stage>/<metric>' at the stage's step."""

import json
import os

import jax
import numpy as np
import tensorboardX

from cpo_jax import losses


class MetricsWriter:
  """Appends one JSON object per logged step to <workdir>/metrics.jsonl and its scalars to
  TensorBoard."""

  def __init__(self, workdir):
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self.tensorboard_dir = os.path.join(workdir, 'tensorboard')
    self._events = None  # opened at the first row: only process 0 writes

  def write(self, row):
    if jax.process_index() != 0:
      return
    with open(self.path, 'a') as f:
      f.write(json.dumps(row) + '\n')
    if self._events is None:
      self._events = tensorboardX.SummaryWriter(self.tensorboard_dir)
    for key, value in row.items():
      if key not in ('stage', 'step'):
        self._events.add_scalar(f'{row["stage"]}/{key}', value, row['step'])
    self._events.flush()  # a run may stop at any step; what was logged is on disk


def metrics_row(stage, step, metrics, lr):
  row = {'stage': stage, 'step': step, 'lr': float(lr)}
  for k, v in losses.drop_absent(jax.device_get(metrics)).items():
    if not np.isfinite(v):
      raise FloatingPointError(f'{stage} step {step}: metric {k} is {v}; stopping.')
    row[k] = float(v)
  return row
