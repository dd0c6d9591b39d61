"""Generation's own shortcuts are exact: the prefill's causal attention blocks equal one shot
on every real row, and the unrolled step's weights, made once per set of weights and held,
follow the model when its weights change."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpo_jax import generate as generate_lib
from cpo_jax import models
from cpo_jax.models import attention
from cpo_jax.models.qwen2_5_vl import causal_padding_mask


@pytest.mark.parametrize('rows', [4, 7, 64], ids=['4 rows', '7 rows (ragged)', 'one block'])
def test_causal_blocks_equal_one_shot_on_real_rows(rows):
  rng = np.random.default_rng(0)
  b, length, heads, kv, dim = 3, 19, 4, 2, 8
  q = rng.standard_normal((b, length, heads, dim)).astype(np.float32)
  k, v = (rng.standard_normal((b, length, kv, dim)).astype(np.float32) for _ in range(2))
  lengths = np.array([19, 12, 5])  # left padded
  attention_mask = (np.arange(length)[None] >= length - lengths[:, None]).astype(np.int32)
  mask = causal_padding_mask(jnp.asarray(attention_mask))
  want = attention.attend(q, k, v, mask, dim**-0.5)
  got = attention.attend_causal_blocks(q, k, v, mask, dim**-0.5, rows)
  real = attention_mask.astype(bool)
  np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=1e-6)


def _tokens(model, ids, **kw):
  out = generate_lib.generate(
    model,
    ids,
    None,
    None,
    None,
    max_new_tokens=6,
    eos_token_id=[-1],
    pad_token_id=0,
    unroll_layers=True,
    **kw,
  )
  return np.asarray(out)


def test_held_unrolled_weights_follow_the_model():
  model = models.Qwen2_5_VL(models.get_config('tiny'), rngs=nnx.Rngs(0))
  ids = np.random.default_rng(1).integers(5, 200, (2, 7)).astype(np.int32)
  first = _tokens(model, ids)
  held = generate_lib._UNROLLED['weights']
  assert held is not None
  np.testing.assert_array_equal(_tokens(model, ids), first)
  assert generate_lib._UNROLLED['weights'] is held  # reused, not made again
  # A step of training replaces the stacked weights: the held copy must not be used.
  state = nnx.state(model.layers)
  nnx.update(model.layers, jax.tree.map(lambda x: x * 1.5 + 0.01, state))
  changed = _tokens(model, ids)
  assert generate_lib._UNROLLED['weights'] is not held
  # ... and the result is the in-program unstacking's (no held copy at all).
  saved = generate_lib._unrolled_weights
  try:
    generate_lib._unrolled_weights = lambda model: None
    np.testing.assert_array_equal(changed, _tokens(model, ids))
  finally:
    generate_lib._unrolled_weights = saved
  assert not np.array_equal(changed, first)  # the update did change the greedy tokens
