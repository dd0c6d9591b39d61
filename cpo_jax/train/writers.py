"""Metric writers: one JSON object per logged step in <workdir>/metrics.jsonl (process 0)."""

import json
import os

import jax
import numpy as np

from cpo_jax import losses


class MetricsWriter:
  """Appends one JSON object per logged step to <workdir>/metrics.jsonl."""

  def __init__(self, workdir):
    self.path = os.path.join(workdir, 'metrics.jsonl')

  def write(self, row):
    if jax.process_index() != 0:
      return
    with open(self.path, 'a') as f:
      f.write(json.dumps(row) + '\n')


def metrics_row(stage, step, metrics, lr):
  row = {'stage': stage, 'step': step, 'lr': float(lr)}
  for k, v in losses.drop_absent(jax.device_get(metrics)).items():
    if not np.isfinite(v):
      raise FloatingPointError(f'{stage} step {step}: metric {k} is {v}; stopping.')
    row[k] = float(v)
  return row
