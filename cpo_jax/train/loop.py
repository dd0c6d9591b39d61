"""The stage loop: data iterator, jitted steps, Orbax checkpoints with resume, progress bar.

The side effects of training live here: a rerun resumes from the latest checkpoint with the
exact data order it would have seen (the Grain iterator state is saved with every checkpoint).
"""

import contextlib
import copy
import functools
import json

from absl import logging
from flax import nnx
import grain
import jax
import orbax.checkpoint as ocp
import tqdm

from cpo_jax import paths
from cpo_jax import sharding
from cpo_jax.train import accumulation
from cpo_jax.train import compile_watch
from cpo_jax.train import early_stop
from cpo_jax.train import optimizer
from cpo_jax.train import preemption
from cpo_jax.train import steps
from cpo_jax.train import throughput
from cpo_jax.train import writers
from cpo_jax.train.reference_table import ReferenceTable
from cpo_jax.train.reference_table import batch_fingerprint


def checkpoint_dir(workdir, stage_name):
  return paths.path(workdir) / 'checkpoints' / stage_name


def has_checkpoint(workdir, stage_name):
  return latest_step(workdir, stage_name) is not None


def latest_step(workdir, stage_name):
  """The step of the stage's latest finished checkpoint (Orbax names it by its step only once
  it is complete), or None."""
  path = checkpoint_dir(workdir, stage_name)
  done = [int(p.name) for p in path.iterdir() if p.name.isdigit()] if path.is_dir() else []
  return max(done, default=None)


def stage_finished(workdir, stage_name, num_steps):
  """Whether the stage ran all `num_steps`, or stopped early (sft.early_stop) at its latest
  checkpoint."""
  return early_stop.finished(workdir, stage_name, num_steps, latest_step(workdir, stage_name))


def _ranking_metric(metrics):
  return next(iter(metrics.values()))  # the first eval metric ranks the steps


def _best_manager(workdir, stage_name, read_only=False):
  """checkpoints/<stage>_best/: the trained params of the stage's best evaluated step only."""
  return ocp.CheckpointManager(
    checkpoint_dir(workdir, f'{stage_name}_best'),
    options=ocp.CheckpointManagerOptions(
      max_to_keep=1, best_fn=_ranking_metric, best_mode='max', read_only=read_only
    ),
  )


def best_checkpoint(workdir, stage_name):
  """(step, metrics) of the stage's best evaluated step: the eval metrics it was ranked by
  (the first one ranks; None where the split had no labelled row)."""
  path = checkpoint_dir(workdir, f'{stage_name}_best')
  if not (path.is_dir() and any(p.name.isdigit() for p in path.iterdir())):
    raise FileNotFoundError(
      f"eval.checkpoint='best': no best checkpoint of stage {stage_name!r} under {path}; one is "
      "kept only when the stage trains with eval.every_steps > 0. Use eval.checkpoint='last', or "
      'check --workdir.'
    )
  manager = _best_manager(workdir, stage_name, read_only=True)
  try:
    step = manager.best_step()
    metrics = manager.metrics(step)
  finally:
    manager.close()
  return step, {k: None if v == -float('inf') else v for k, v in metrics.items()}


def restore_best(workdir, stage_name, like):
  """The stage's best trained params (`best_checkpoint`), in the shardings of `like`."""
  step, _ = best_checkpoint(workdir, stage_name)
  manager = _best_manager(workdir, stage_name, read_only=True)
  try:
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    return manager.restore(step, args=ocp.args.StandardRestore(target))
  finally:
    manager.close()


# Replicated arrays are written in slices by their replicas only when a slice is this large:
# below it the slicing buys nothing, and its first save compiles a program per array (136 for
# the tiny model, half the wall time of a short run on a CPU).
MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL = 64 * 2**20


@functools.cache  # once per process
def _register_array_handler():
  handler = ocp.type_handlers.ArrayHandler(
    min_slice_bytes_for_replica_parallel=MIN_SLICE_BYTES_FOR_REPLICA_PARALLEL
  )
  ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)


class ReadAhead:
  """Batch s + 1 is read, prepared and put on the devices right after step s is dispatched, so
  that host work overlaps the step (logging, which waits for the step, comes after it). A
  checkpoint saves the iterator state from before the batch read ahead: a resumed run starts
  at the first batch not trained on. An error while reading ahead (bad data, a preempted
  host) is raised when that batch is taken, after step s has been logged and saved."""

  def __init__(self, batches, load):
    self.batches, self.load = batches, load
    self.pending = None  # (step, iterator state before its batch, batch or the error)

  def read(self, step):
    state = copy.deepcopy(self.batches.get_state())  # the iterator may update it in place
    try:
      self.pending = (step, state, self.load(step))
    except Exception as e:  # noqa: BLE001 - re-raised by take()
      self.pending = (step, state, e)

  def take(self, step):
    if self.pending is None or self.pending[0] != step:
      self.read(step)
    batch, self.pending = self.pending[2], None
    if isinstance(batch, Exception):
      raise batch
    return batch

  def saved_state(self):
    """What grain.checkpoint.CheckpointSave writes: the state before the untrained batch."""
    return self.batches if self.pending is None else _State(self.pending[1])


class _State:
  """A Grain iterator state as CheckpointSave takes it (an object with get_state() -> bytes)."""

  def __init__(self, state):
    self.state = state

  def get_state(self):
    return json.dumps(self.state, indent=4).encode()


def run_stage(
  stage,
  *,
  mesh,
  num_steps,
  make_batches,
  prepare,
  workdir,
  checkpoint_cfg,
  log_every,
  writer,
  restore_only=False,
  evaluate=None,
  eval_every=0,
  returns='last',
  validation=None,
):
  """Trains `stage` for `num_steps`, resuming from its latest checkpoint in the workdir.

  `make_batches()` returns a Grain iterator of numpy batches; its state is saved with every
  checkpoint, so a resumed run sees exactly the batches an uninterrupted one would.
  `prepare(batch)` turns a pipeline batch into the step's input. Returns the trained
  (trainable, frozen); with `restore_only`, the latest checkpoint as it is (--mode=eval).
  With `evaluate(model) -> {'eval/<split>/<metric>': value}` and `eval_every`, the model is
  evaluated every `eval_every` steps (logged) and the trained params of the best step by the
  first metric are kept apart, in checkpoints/<stage>_best/. With returns='best' the stage
  returns those params (`restore_best`) in place of its last ones (eval.checkpoint).
  With `validation` (an `early_stop.Validation`) the held-out loss is measured as it says (each
  time with a checkpoint), the stage may stop before `num_steps`, and it returns the params of
  the lowest held-out loss (`early_stop.py`).
  """
  _register_array_handler()
  if returns not in ('last', 'best'):
    raise ValueError(f"returns={returns!r}; expected 'last' or 'best'.")
  if returns == 'best' and validation is not None:
    raise ValueError(
      f'stage {stage.name!r} keeps the params of its lowest held-out loss (early stopping); '
      "it cannot also return its best evaluated ones (eval.checkpoint='best')."
    )

  def _returned(trainable, frozen):
    if returns == 'best':
      trainable = restore_best(workdir, stage.name, trainable)
    if validation is not None:
      trainable = early_stop.restore_best(workdir, stage.name, trainable)
    return trainable, frozen

  trainable_sh = sharding.state_shardings(stage.trainable, mesh)
  frozen_sh = sharding.state_shardings(stage.frozen, mesh)
  trainable = jax.device_put(stage.trainable, trainable_sh)
  frozen = jax.device_put(stage.frozen, frozen_sh)
  opt_sh = optimizer.opt_state_shardings(stage.tx, trainable, trainable_sh, mesh)
  opt_state = jax.jit(stage.tx.init, out_shardings=opt_sh)(trainable)

  manager = ocp.CheckpointManager(
    checkpoint_dir(workdir, stage.name),
    options=ocp.CheckpointManagerOptions(max_to_keep=checkpoint_cfg.max_to_keep),
  )
  start = manager.latest_step() or 0
  stopped = validation is not None and start and early_stop.stopped_at(workdir, stage.name) == start
  if start >= num_steps or restore_only or stopped:
    if start:
      target = jax.tree.map(ocp.utils.to_shape_dtype_struct, trainable)
      trainable = manager.restore(
        start, args=ocp.args.Composite(params=ocp.args.StandardRestore(target))
      )['params']
    manager.close()
    return _returned(trainable, frozen)

  batches = make_batches()
  if start:
    abstract = functools.partial(jax.tree.map, ocp.utils.to_shape_dtype_struct)
    restored = manager.restore(
      start,
      args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract(trainable)),
        opt_state=ocp.args.StandardRestore(abstract(opt_state)),
        data=grain.checkpoint.CheckpointRestore(batches),
      ),
    )
    trainable, opt_state = restored['params'], restored['opt_state']
    logging.info('%s: resumed from step %d.', stage.name, start)

  table = None
  if stage.reference_fn is not None:  # cpo.reference='precomputed': a pass before training.
    table = ReferenceTable.load_or_compute(
      stage,
      trainable,
      frozen,
      mesh=mesh,
      num_steps=num_steps,
      make_batches=make_batches,
      prepare=prepare,
      workdir=workdir,
      save_every=checkpoint_cfg.every_steps,
    )
  step_fn = steps.make_train_step(stage, mesh, (trainable_sh, frozen_sh, opt_sh))
  bar = tqdm.tqdm(
    range(start, num_steps),
    initial=start,
    total=num_steps,
    desc=stage.name,
    unit='step',
    dynamic_ncols=True,
    disable=jax.process_index() != 0,
  )

  def save(step):
    manager.save(
      step,
      args=ocp.args.Composite(
        params=ocp.args.StandardSave(trainable),
        opt_state=ocp.args.StandardSave(opt_state),
        data=grain.checkpoint.CheckpointSave(ahead.saved_state()),
      ),
    )

  def load(step):  # the pipeline batch of `step`, checked and placed on the mesh
    raw = next(batches)
    batch = prepare(raw)
    meter.add(batch)
    if table is not None:
      batch = table.attach(batch, step, batch_fingerprint(raw))
    if stage.accumulation is not None:
      acc = stage.accumulation
      rows = accumulation.batch_rows(batch) * jax.process_count()
      accumulation.check_micro_rows(rows, acc.steps, mesh)
      batch = accumulation.split_micro(batch, acc.steps, acc.group)
    return sharding.global_batch(batch, mesh, micro=stage.accumulation is not None)

  meter = throughput.Meter(stage, mesh)
  # Compilations of the step after its first call in this run (0 on a healthy run; logged).
  recompiles = compile_watch.CompileCounter()
  ahead = ReadAhead(batches, load)
  best = None
  if evaluate is not None and eval_every:
    best = _best_manager(workdir, stage.name)
  monitor = None
  if validation is not None:
    monitor = early_stop.Monitor(
      validation, stage, mesh, (trainable_sh, frozen_sh), workdir, writer, start
    )
  try:
    with preemption.Watch() as watch:
      for step in bar:
        batch = ahead.take(step)
        seen = recompiles.total
        with recompiles if step > start else contextlib.nullcontext():
          trainable, opt_state, metrics = step_fn(trainable, frozen, opt_state, batch)
        if recompiles.total > seen:
          logging.warning(
            '%s: the train step compiled again at step %d (%d times after its first call): '
            'a batch shape, dtype or sharding changed; each costs a compilation.',
            stage.name,
            step + 1,
            recompiles.total,
          )
        done = step + 1
        if done < num_steps:  # while the step runs (dispatch is asynchronous)
          ahead.read(done)
        if done % log_every == 0 or done == num_steps:
          row = writers.metrics_row(stage.name, done, metrics, stage.schedule(step))
          row['perf/step_recompiles'] = recompiles.total
          writer.write(dict(row, **meter.report()))
          bar.set_postfix({k: f'{row[k]:.4g}' for k in ('loss', 'rewards/accuracies') if k in row})
        if best is not None and (done % eval_every == 0 or done == num_steps):
          scores = evaluate(nnx.merge(stage.graphdef, trainable, frozen))
          writer.write({'stage': stage.name, 'step': done, **scores})
          # None (no labelled row) ranks last.
          ranked = {k: -float('inf') if v is None else v for k, v in scores.items()}
          best.save(done, args=ocp.args.StandardSave(trainable), metrics=ranked)
          meter.restart()  # the evaluation's time is not the training's
        measured = monitor is not None and monitor.due(done, num_steps)
        stop = measured and monitor.measure(done, trainable, frozen)
        if measured:
          meter.restart()
        periodic = done % checkpoint_cfg.every_steps == 0 or done == num_steps or measured
        if periodic:
          save(done)
        if stop:  # no lower held-out loss for `patience` measurements: the stage ends here
          monitor.mark_stopped(done)
          break
        if watch.reached(done):  # every host at the same step: save there and stop
          if not periodic:
            save(done)
          raise preemption.Preempted(stage.name, done)
  finally:
    # Also on an interrupt or preemption: let the last (async) save land so a rerun resumes
    # from it.
    manager.wait_until_finished()
    manager.close()
    if best is not None:
      best.wait_until_finished()
      best.close()
    if monitor is not None:
      monitor.close()
  return _returned(trainable, frozen)
