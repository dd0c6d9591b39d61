"""LoRA adapters on the model's Linear layers.

With adapters the reference policy is the same base weights with adapters switched off
(`adapters_disabled`), so CPO needs no second copy of the model. Adapters are
`LoRAParam` variables: train them with `nnx.DiffState(0, LoRAParam)` / an optimizer on
`LoRAParam`, and filter the frozen base with `nnx.All(nnx.Param, nnx.Not(LoRAParam))`.
"""

from __future__ import annotations

import contextlib
import math

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from cpo_jax.models import layers

DEFAULT_TARGETS = ('q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj')


class LoRAParam(nnx.Param):
  """Variable type of LoRA adapter matrices."""


class LoRADropoutRng(nnx.Variable):
  """Seed and call counter of LoRA dropout (not trained; advances on every training call).

  Dropout is active while the model is in training mode; `model.eval()` (or
  `deterministic(model)`) turns it off. A train step built on nnx.split/merge calls
  `start_dropout_step` so that masks change from step to step.
  """


def _targets(model, targets, include_vision):
  for path, node in nnx.iter_graph(model):
    if not isinstance(node, layers.Linear) or not path:
      continue
    name = path[-1]
    in_vision = 'visual' in path
    if name in targets and (include_vision or not in_vision):
      yield path, node


def apply_lora(
  model,
  *,
  rank: int,
  alpha: float,
  dropout: float = 0.0,
  targets=DEFAULT_TARGETS,
  include_vision: bool = False,
  param_dtype=None,
  rngs: nnx.Rngs,
):
  """Adds adapters in place: A ~ U(-1/sqrt(in), 1/sqrt(in)) (as PEFT), B = 0, scale alpha / rank.

  Stacked (scanned) layers get stacked adapters with the same leading 'layers' axis. The
  adapters are stored in `param_dtype` (None: the base kernel's; float32 keeps small updates
  to a bf16 model) and computed in the layer's compute dtype. Returns the adapted module paths.
  """
  if not 0.0 <= dropout < 1.0:
    raise ValueError(f'LoRA dropout must be in [0, 1), got {dropout}')
  if rank <= 0:
    raise ValueError(f'LoRA rank must be positive, got {rank}')
  adapted = []
  for path, lin in _targets(model, tuple(targets), include_vision):
    if lin.lora_a is not None:
      raise ValueError(f'{"/".join(map(str, path))} already has a LoRA adapter')
    kshape = lin.kernel.shape
    lead, (d_in, d_out) = kshape[:-2], kshape[-2:]
    names = tuple(lin.kernel.get_metadata().get('out_sharding') or (None,) * len(kshape))
    dtype = param_dtype or lin.kernel[...].dtype
    blocks = lin.kernel.get_metadata().get('shard_blocks') or (1,) * len(kshape)
    a = _uniform(rngs, (*lead, d_in, rank), 1.0 / math.sqrt(d_in), dtype)
    lin.lora_a = layers.param(a, names[:-1] + (None,), LoRAParam, blocks[:-1] + (1,))
    lin.lora_b = layers.param(
      jnp.zeros((*lead, rank, d_out), dtype),
      names[:-2] + (None, names[-1]),
      LoRAParam,
      blocks[:-2] + (1, blocks[-1]),
    )
    lin.lora_scale = float(alpha) / float(rank)
    lin.lora_dropout = float(dropout)
    if dropout > 0.0:
      seeds = _uniform(rngs, lead, 2.0**31 - 1, jnp.float32)
      lin.lora_seed = LoRADropoutRng(jnp.abs(seeds).astype(jnp.uint32))
      lin.lora_count = LoRADropoutRng(jnp.zeros(lead, jnp.uint32))
    adapted.append('/'.join(map(str, path)))
  if not adapted:
    raise ValueError(
      f'no Linear layer matched LoRA targets {tuple(targets)} (include_vision={include_vision})'
    )
  return adapted


# A jitted train step does not carry the dropout counters out, so each step restarts them
# from step * DROPOUT_CALLS_PER_STEP (`start_dropout_step`): a step's masks are a pure function
# of (layer seed, update count, call index within the step), fresh every step and the same
# for a resumed run. A step may call each layer up to this many times.
DROPOUT_CALLS_PER_STEP = 256


def start_dropout_step(model, step):
  """Points every adapter's dropout counter at `step` (the optimizer's update count)."""
  for lin in adapted_layers(model):
    if lin.lora_dropout > 0.0:
      count = jnp.asarray(step, jnp.uint32) * DROPOUT_CALLS_PER_STEP
      lin.lora_count[...] = jnp.full(lin.lora_count.shape, count, jnp.uint32)


def _uniform(rngs, shape, bound, dtype):
  key = rngs.params()
  if isinstance(key, jax.core.Tracer):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  seed = np.asarray(jax.random.key_data(key)).astype(np.uint64).tolist()  # numpy: no compile
  return jnp.asarray(np.random.default_rng(seed).uniform(-bound, bound, shape), dtype)


def adapted_layers(model):
  return [
    node
    for _, node in nnx.iter_graph(model)
    if isinstance(node, layers.Linear) and node.lora_a is not None
  ]


@contextlib.contextmanager
def _flag_set(mods, attr, value):
  """Sets a Python attribute on `mods` for the block and restores each one's own value after."""
  prev = [getattr(m, attr) for m in mods]
  for m in mods:
    setattr(m, attr, value)
  try:
    yield
  finally:
    for m, p in zip(mods, prev):
      setattr(m, attr, p)


@contextlib.contextmanager
def adapters_disabled(model):
  """Within the block the model computes with its base weights only (the reference policy).

  A Python flag, so it also works inside a traced (jit/grad) function.
  """
  with _flag_set(adapted_layers(model), 'lora_enabled', False):
    yield model


@contextlib.contextmanager
def deterministic(model):
  """Within the block LoRA dropout is off (eval, generation, reference log-probs)."""
  with _flag_set([m for m in adapted_layers(model) if m.lora_dropout > 0.0], 'deterministic', True):
    yield model


def _merged_kernel(kernel, a, b, scale):
  """kernel + a @ b * scale, summed in float32 and cast back; a stacked kernel is updated in
  place one layer at a time, so no float32 delta of the whole stack (at 3B: 3 GB for the MLP
  projections) and no second copy of the kernel ever exists."""

  def merge(k, a, b):
    delta = jnp.einsum('ir,ro->io', a.astype(jnp.float32), b.astype(jnp.float32)) * scale
    return (k.astype(jnp.float32) + delta).astype(k.dtype)

  if kernel.ndim == 2:
    return merge(kernel, a, b)
  layer = lambda i, k: k.at[i].set(merge(k[i], a[i], b[i]))
  return jax.lax.fori_loop(0, kernel.shape[0], layer, kernel)


# A clone shares its arrays with the original: only an in-place merge may donate the kernel.
_merge_copy = jax.jit(_merged_kernel)


def merged_kernel(kernel, a, b, scale):
  """One kernel with its adapters' update (what merge_lora writes), e.g. one layer at export."""
  return _merge_copy(kernel, a, b, jnp.float32(scale))


_merge_in_place = jax.jit(_merged_kernel, donate_argnums=0)


def merge_lora(model, copy=True):
  """A model whose base kernels include the adapters' update and that has no adapters: a new
  one, or with copy=False `model` itself (its adapters-on weights are then gone; at scale a
  second copy of the model may not fit)."""
  merged = nnx.clone(model) if copy else model
  merge = _merge_copy if copy else _merge_in_place
  for lin in adapted_layers(merged):
    # set_value, not [...] =: the latter reads the old (donated) value back.
    lin.kernel.set_value(
      merge(lin.kernel[...], lin.lora_a[...], lin.lora_b[...], jnp.float32(lin.lora_scale))
    )
    lin.lora_a = None
    lin.lora_b = None
    lin.lora_scale = 0.0
    lin.lora_dropout = 0.0
    lin.lora_seed = None
    lin.lora_count = None
  return merged


def lora_state(model):
  """The adapter variables (what a LoRA run trains and checkpoints)."""
  return nnx.state(model, LoRAParam)
