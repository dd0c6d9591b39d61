"""Weights & Biases beside metrics.jsonl and TensorBoard, when `log.wandb_project` is set.

Every row `writers.MetricsWriter` writes (process 0 only) goes to W&B as '<stage>/<metric>',
TensorBoard's tags, against the stage's own x-axis '<stage>/step': each stage counts its steps
from 1 again, and W&B's own step may only grow. The run's id is kept in
<workdir>/wandb_run_id, so a run restarted after a preemption continues the same W&B run.
"""

import importlib
import json
import os
import tempfile

import jax

from cpo_jax import paths

WANDB_MODES = ('online', 'offline', 'disabled')
RUN_ID_FILE = 'wandb_run_id'


def from_config(cfg, workdir):
  """The run's `WandbWriter`, or None when `log.wandb_project` is ''.

  Called at start-up, so that a named project without the wandb package, or that W&B refuses
  (no login, no such entity), stops the run before any work rather than after the data and
  the compilation: process 0 opens the W&B run here. The WANDB_MODE environment variable,
  when set, overrides `log.wandb_mode` (W&B's own convention)."""
  log = cfg.log
  if not log.wandb_project:
    return None
  if log.wandb_mode not in WANDB_MODES:
    raise ValueError(f'config.log.wandb_mode={log.wandb_mode!r}; expected one of {WANDB_MODES}.')
  try:
    wandb = importlib.import_module('wandb')
  except ImportError as e:
    raise ImportError(
      f'config.log.wandb_project={log.wandb_project!r} logs to Weights & Biases, but the wandb '
      "package is not installed: pip install 'cpo_jax[wandb]' (or set "
      "--config.log.wandb_project='' to log to metrics.jsonl and TensorBoard only)."
    ) from e
  writer = WandbWriter(
    wandb,
    workdir,
    project=log.wandb_project,
    entity=log.wandb_entity or None,
    mode=os.environ.get('WANDB_MODE') or log.wandb_mode,
    config=json.loads(cfg.to_json_best_effort()),
  )
  if jax.process_index() == 0:
    writer.open()
  return writer


class WandbWriter:
  """One W&B run per workdir, opened by `open` or at the first row (only process 0 writes)."""

  def __init__(self, wandb, workdir, *, project, entity, mode, config):
    self._wandb, self.workdir = wandb, workdir
    self._init = dict(project=project, entity=entity, mode=mode, config=config)
    self._run = None
    self._stages = set()  # stages whose x-axis is defined in this process

  def write(self, row):
    self.open()
    stage = row['stage']
    if stage not in self._stages:
      self._run.define_metric(f'{stage}/step')
      self._run.define_metric(f'{stage}/*', step_metric=f'{stage}/step')
      self._stages.add(stage)
    values = {
      f'{stage}/{k}': v for k, v in row.items() if k not in ('stage', 'step') and v is not None
    }
    self._run.log({f'{stage}/step': row['step'], **values})

  def open(self):
    if self._run is not None:
      return
    workdir = paths.path(self.workdir)
    id_file = workdir / RUN_ID_FILE
    run_id = id_file.read_text().strip() if id_file.exists() else None
    # W&B keeps its local files (the whole run, in offline mode) in WANDB_DIR when set, else
    # in the workdir; for a gs:// workdir in a temporary directory (a run on a bucket writes
    # nothing under the current directory). Passed each time: W&B reads its environment once
    # per process.
    local_dir = os.environ.get('WANDB_DIR') or (
      tempfile.mkdtemp(prefix='cpo_jax_wandb_') if paths.is_remote(workdir) else workdir
    )
    paths.makedirs(local_dir)
    run = self._wandb.init(
      name=workdir.name,
      id=run_id,
      resume='allow' if run_id else None,
      dir=str(local_dir),
      reinit='create_new',  # this writer's own run, never one left open in the process
      **self._init,
    )
    if run_id is None and self._init['mode'] != 'disabled':
      paths.write_text(id_file, run.id)
    self._run = run

  def close(self):
    if self._run is not None:
      self._run.finish()
      self._run = None
      self._stages.clear()
