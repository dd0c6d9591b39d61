"""AdamW's weight decay reaches the weight matrices by name, never norm scales or biases."""

from flax import nnx
import jax
import ml_collections
import numpy as np
import pytest

from cpo_jax import models
from cpo_jax.models import lora
from cpo_jax.train import optimizer


def _opt(weight_decay):
  return ml_collections.ConfigDict(
    dict(
      lr=1.0,
      end_lr_ratio=1.0,
      warmup_frac=0.0,
      b1=0.9,
      b2=0.98,
      weight_decay=weight_decay,
      grad_clip=1.0,
    )
  )


def _one_update_with_zero_gradients(params, weight_decay=0.5):
  tx, _ = optimizer.make_optimizer(_opt(weight_decay), num_steps=10)
  state = tx.init(params)
  zeros = jax.tree.map(np.zeros_like, params)
  _, state = tx.update(zeros, state, params)  # step 0 of the warm-up has lr 0
  updates, _ = tx.update(zeros, state, params)
  return updates


def _flat(state):
  return {'/'.join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}


def test_decay_by_name_in_scanned_layers():
  model = models.Qwen2_5_VL(models.get_config('tiny'), rngs=nnx.Rngs(0))
  lora.apply_lora(model, rank=2, alpha=4.0, rngs=nnx.Rngs(1))
  params = nnx.state(model, nnx.Param)
  updates = _flat(_one_update_with_zero_gradients(params))
  seen = set()
  for path, u in updates.items():
    name = path.rsplit('/', 1)[-1]
    seen.add(name)
    if name in ('weight', 'bias'):  # norm scales (stacked: 2-D in scanned layers) and biases
      assert not u.any(), path
    elif name in ('kernel', 'embed_tokens', 'lora_a'):
      assert u.any(), path  # decayed: with zero gradients the update is -lr * wd * p
  assert {'weight', 'bias', 'kernel', 'embed_tokens', 'lora_a', 'lora_b'} <= seen
  stacked_norm = updates['layers/input_layernorm/weight']
  assert stacked_norm.ndim == 2  # the case the old ndim >= 2 rule decayed


def test_a_parameter_of_unknown_kind_is_an_error():
  params = nnx.State({'layer': {'scale_factor': nnx.Param(np.ones((2, 2), np.float32))}})
  with pytest.raises(ValueError, match='layer/scale_factor'):
    _one_update_with_zero_gradients(params)
