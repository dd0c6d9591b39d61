"""Optimizer: AdamW with warm-up and cosine decay, its update count and its shardings."""

import jax
import optax

from cpo_jax import sharding


def make_optimizer(opt, num_steps):
  """AdamW with linear warm-up and cosine decay; weight decay by parameter name (`decay_mask`)."""
  warmup = max(1, int(opt.warmup_frac * num_steps))
  schedule = optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=opt.lr,
    warmup_steps=warmup,
    decay_steps=max(num_steps, warmup + 1),
    end_value=opt.lr * opt.end_lr_ratio,
  )
  tx = optax.chain(
    optax.clip_by_global_norm(opt.grad_clip),
    optax.adamw(schedule, b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay, mask=decay_mask),
  )
  return tx, schedule


# Weight decay by what a parameter is, not its rank: scanned layers stack norm scales and
# biases into 2-D arrays. As transformers' Trainer: matrices and embeddings decay, biases and
# norm scales do not. A name in neither set is an error, never a silent choice.
DECAYED = ('kernel', 'embed_tokens', 'lora_a', 'lora_b')
NOT_DECAYED = ('bias', 'weight')  # 'weight' is an RMSNorm scale in this model


def decay_mask(params):
  """A tree of bools like `params`: True where AdamW's weight decay applies."""

  def decays(path, _):
    names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    if names and names[-1] in DECAYED:
      return True
    if names and names[-1] in NOT_DECAYED:
      return False
    raise ValueError(
      f'parameter {"/".join(map(str, names))}: no weight-decay rule for its name; add it to '
      f'optimizer.DECAYED or optimizer.NOT_DECAYED.'
    )

  return jax.tree_util.tree_map_with_path(decays, params)


def update_count(opt_state):
  """The optimizer's update count (optax's `count` leaves all equal it; the first is taken)."""
  counts = optax.tree_utils.tree_get_all_with_path(opt_state, 'count')
  if not counts:
    raise ValueError('the optimizer state has no update count.')
  return counts[0][1]


def opt_state_shardings(tx, trainable, trainable_sh, mesh):
  """Optimizer moments shard like their params; everything else (the step count) is
  replicated on the mesh, or jit rejects it as living on incompatible devices."""
  abstract = jax.eval_shape(tx.init, trainable)
  return optax.tree_utils.tree_map_params(
    tx,
    lambda _, sh: sh,
    abstract,
    trainable_sh,
    transform_non_params=lambda _: sharding.replicated(mesh),
    is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding),
  )
