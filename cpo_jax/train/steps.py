"""The jitted train step: a stage's loss, its gradient and the optimizer update, on the mesh.

The model is an nnx.Module; the step is a pure function of (trainable state, frozen state,
optimizer state, batch), made by `nnx.split`ting the model once into a `Stage`.
"""

import dataclasses
from typing import Any
from typing import Callable
from typing import NamedTuple

from flax import nnx
import jax
import jax.numpy as jnp
import optax

from cpo_jax import sharding
from cpo_jax.models import lora
from cpo_jax.train import optimizer


@dataclasses.dataclass
class Stage:
  """What one training stage needs: a model split into trainable / frozen, and a loss."""

  name: str
  graphdef: Any
  trainable: Any
  frozen: Any
  loss_fn: Callable  # (model, batch) -> (loss, metrics)
  tx: optax.GradientTransformation
  schedule: Callable
  # cpo.reference='precomputed': (model, batch) -> [n, 2 + k] reference log-probs, and what
  # they depend on besides the batch and the model (a stored table must match it).
  reference_fn: Callable | None = None
  reference_settings: str = ''
  # grad_accum_steps > 1: an accumulation.Accumulation; the step then takes micro-batches.
  accumulation: Any = None


class StepResult(NamedTuple):
  """What one train step returns (the inputs' trainable and optimizer state are donated)."""

  trainable: Any
  opt_state: Any
  metrics: dict


def split_model(model, trainable):
  """`trainable` is 'all' (every Param) or 'lora' (adapters only)."""
  wanted = {'all': nnx.Param, 'lora': lora.LoRAParam}[trainable]
  return nnx.split(model, wanted, ...)


def make_train_step(stage, mesh, state_shardings):
  """A jitted (trainable, frozen, opt_state, batch) -> StepResult. With `stage.accumulation`
  the batch holds its micro-batches ([steps, rows / steps, ...], `accumulation.split_micro`)."""
  graphdef, tx, accumulation = stage.graphdef, stage.tx, stage.accumulation

  def value_and_grad(loss_fn, trainable, frozen, batch):
    def compute(tr):
      # copy: fresh Variables at this trace level (nnx.scan inside checks it).
      model = nnx.merge(graphdef, tr, frozen, copy=True)
      lora.start_dropout_step(model, batch['step'])  # fresh LoRA dropout masks per step
      return loss_fn(model, batch)

    return jax.value_and_grad(compute, has_aux=True)(trainable)

  def gradients(trainable, frozen, batch):
    if accumulation is None:
      (_, metrics), grads = value_and_grad(stage.loss_fn, trainable, frozen, batch)
      return grads, metrics
    batch = dict(batch)
    step_count = batch.pop('step')  # a scalar: the rest has a leading micro-batch axis
    totals = accumulation.totals_fn(batch)
    micro_loss = lambda model, micro: accumulation.micro_loss_fn(model, micro, totals)

    def one(grads, micro):
      (_, rows), g = value_and_grad(micro_loss, trainable, frozen, dict(micro, step=step_count))
      return jax.tree.map(lambda a, b: a + b.astype(jnp.float32), grads, g), rows

    # Summed in float32 whatever the parameters' dtype, then back to it.
    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), trainable)
    grads, rows = jax.lax.scan(one, zeros, batch)  # one micro-batch at a time
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, trainable)
    return grads, accumulation.finish_fn(rows, batch)[1]

  def step(trainable, frozen, opt_state, batch):
    # The number of updates so far (traced, checkpointed with the optimizer): losses that
    # draw random numbers fold it into their key, deterministic and resumable.
    batch = dict(batch, step=optimizer.update_count(opt_state))
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):  # sharding.rows_over_data
      grads, metrics = gradients(trainable, frozen, batch)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    metrics['grad_norm'] = optax.tree.norm(grads)
    return StepResult(trainable, opt_state, metrics)

  trainable_sh, frozen_sh, opt_sh = state_shardings
  data_sh = sharding.batch_sharding(mesh, micro=accumulation is not None)
  return jax.jit(
    step,
    in_shardings=(trainable_sh, frozen_sh, opt_sh, data_sh),
    out_shardings=StepResult(trainable_sh, opt_sh, sharding.replicated(mesh)),
    donate_argnums=(0, 2),
  )
