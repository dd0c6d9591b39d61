"""One prefix pass + K continuations against its cache == K full forwards (values and grads)."""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from cpo_jax.models import Qwen2_5_VL
from cpo_jax.models import get_config
from cpo_jax.models import get_rope_index
from cpo_jax.models import testing


def test_shared_prefix_equals_full_sequences():
  # one vision block, full attention: keeps the compiled program small
  cfg = get_config(
    'tiny',
    vocab_size=testing.VOCAB,
    image_token_id=testing.IMAGE,
    vision_config={'depth': 1, 'fullatt_block_indexes': [0]},
  )
  model = Qwen2_5_VL(cfg, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  pre = testing.make_inputs([[(1, 4, 4)], [(1, 4, 4)]], [(3, 1), (1, 1)], rng)  # left padded
  k, s = 2, 5
  suffix = rng.integers(1, testing.IMAGE, (k, 2, s))
  smask = np.ones((k, 2, s), np.int64)
  smask[0, 1, 3:] = 0  # right padding
  smask[1, 0, 4:] = 0
  grid = pre['image_grid_thw']
  ppos, _ = get_rope_index(pre['input_ids'], pre['attention_mask'], grid, cfg)
  # reference: each prefix ++ suffix_k as one sequence
  full_ids = np.concatenate([np.tile(pre['input_ids'], (k, 1)), suffix.reshape(k * 2, s)], 1)
  full_mask = np.concatenate([np.tile(pre['attention_mask'], (k, 1)), smask.reshape(k * 2, s)], 1)
  full_grid = np.tile(grid, (k, 1))
  fpos, _ = get_rope_index(full_ids, full_mask, full_grid, cfg)
  pix = np.tile(
    pre['pixel_values'].reshape(2, -1, pre['pixel_values'].shape[-1]), (k, 1, 1)
  ).reshape(-1, pre['pixel_values'].shape[-1])

  def shared(m):
    _, h = m.hidden_states_shared_prefix(
      pre['input_ids'], pre['attention_mask'], suffix, smask, pre['pixel_values'], grid, ppos
    )
    return h

  def reference(m):
    h = m.hidden_states(full_ids, full_mask, pix, full_grid, fpos)[:, -s:]
    return h.reshape(k, 2, s, -1)

  def loss(f):
    def fn(m):
      h = f(m)
      return jnp.sum(h * jnp.asarray(smask)[..., None]), h

    return fn

  @nnx.jit
  def both(m):
    return (
      nnx.value_and_grad(loss(shared), has_aux=True)(m),
      nnx.value_and_grad(loss(reference), has_aux=True)(m),
    )

  ((_, h_shared), g_shared), ((_, h_ref), g_ref) = both(model)
  valid = smask.astype(bool)
  np.testing.assert_allclose(np.asarray(h_shared)[valid], np.asarray(h_ref)[valid], atol=2e-5)
  for a, b in zip(jax.tree.leaves(g_shared), jax.tree.leaves(g_ref)):
    a, b = np.asarray(a), np.asarray(b)
    assert np.abs(a - b).max() <= 1e-3 * max(np.abs(b).max(), 1e-3)  # float32 summation order only
