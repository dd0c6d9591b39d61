"""Attention in query blocks (`model.attention_chunk`) equals the one-shot path.

Lengths are chosen so that no sequence is a multiple of the chunk: the padded last block
is exercised everywhere (13-token prompts, 5-token continuations, chunk 3).
"""

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpo_jax import config_defaults
from cpo_jax.generate import generate
from cpo_jax.models import Qwen2_5_VL
from cpo_jax.models import attention
from cpo_jax.models import get_config
from cpo_jax.models import testing

CHUNK = 3


def _assert_trees_close(got, want, atol, rtol=0.0):
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol, rtol=rtol)


def test_blocks_equal_one_shot_for_any_mask():
  rng = np.random.default_rng(0)
  b, seq, keys, heads, kv_heads, d = 2, 10, 13, 4, 2, 8
  q, k, v = (
    jnp.asarray(rng.standard_normal(shape), jnp.float32)
    for shape in ((b, seq, heads, d), (b, keys, kv_heads, d), (b, keys, kv_heads, d))
  )
  mask = jnp.asarray(rng.random((b, seq, keys)) < 0.6).at[0, 3].set(False)  # a row with no key

  def loss(chunk):
    return lambda q, k, v: jnp.sum(jnp.sin(attention.gqa_attention(q, k, v, mask, 0.3, chunk)))

  # 10 rows in blocks of 4: the last block padded by 2 rows
  want, got = jax.jit(lambda *qkv: [jax.value_and_grad(loss(c), (0, 1, 2))(*qkv) for c in (0, 4)])(
    q, k, v
  )
  _assert_trees_close(got, want, atol=1e-5, rtol=1e-6)  # rtol: the summed loss value


def test_blocks_hold_a_fraction_of_the_scores():
  # Forward + backward at 512 x 512: one-shot keeps [B, heads, L, S] scores, probabilities
  # and their gradient; four blocks of 128 rows keep about a quarter of that.
  q = jax.ShapeDtypeStruct((1, 512, 8, 16), jnp.float32)
  kv = jax.ShapeDtypeStruct((1, 512, 2, 16), jnp.float32)
  mask = jax.ShapeDtypeStruct((1, 512, 512), bool)

  def scratch(chunk):
    def loss(q, k, v, m):
      return jnp.sum(attention.gqa_attention(q, k, v, m, 0.25, chunk))

    step = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv, mask).compile()
    return step.memory_analysis().temp_size_in_bytes

  scores = 8 * 512 * 512 * 4  # one float32 [heads, L, S]
  one_shot, blocks = scratch(0), scratch(128)
  assert one_shot >= 2 * scores, one_shot
  assert blocks < 0.5 * one_shot, (blocks, one_shot)


@pytest.fixture(scope='module')
def setup():
  # Text only: the chunk changes the decoder alone, and the vision tower would only add
  # compile time.
  cfg = get_config('tiny', vocab_size=testing.VOCAB, image_token_id=testing.IMAGE)
  one_shot = Qwen2_5_VL(cfg, rngs=nnx.Rngs(0))
  # larger weights than the init's 0.02: logits worth comparing, peaked next-token choices
  rng = np.random.default_rng(1)
  params = nnx.state(one_shot, nnx.Param)
  noise = lambda x: jnp.asarray(np.asarray(x) + 0.1 * rng.standard_normal(x.shape), x.dtype)
  nnx.update(one_shot, jax.tree.map(noise, params))  # numpy: no compile per shape
  chunked = Qwen2_5_VL(cfg, rngs=nnx.Rngs(0), attention_chunk=CHUNK)
  nnx.update(chunked, nnx.state(one_shot))
  # two prompts of 13 tokens, the second left padded to 13 from 9
  ids = rng.integers(1, testing.IMAGE, (2, 13))
  mask = np.ones_like(ids)
  mask[1, :4] = 0
  ids[1, :4] = testing.PAD
  return one_shot, chunked, ids, mask


def _both(fn, a, b):
  """fn(model) for the one-shot and the chunked model, in one compiled program."""
  return nnx.jit(lambda a, b: (fn(a), fn(b)))(a, b)


def test_logits_and_gradients_causal_and_padded(setup, monkeypatch):
  one_shot, chunked, ids, mask = setup
  valid = mask.astype(bool)  # padded query rows hold no meaning
  traced = []  # the chunked model really takes the block path (the knob reaches the layers)
  blocks = attention.attend_in_query_blocks
  monkeypatch.setattr(
    attention, 'attend_in_query_blocks', lambda *a: traced.append(a[-1]) or blocks(*a)
  )

  def loss(m):
    logits = m(ids, mask)
    return jnp.sum(jnp.where(valid[..., None], jnp.tanh(logits), 0.0)) / logits.size, logits

  grad = nnx.value_and_grad(loss, has_aux=True)
  ((_, want), g_want), ((_, got), g_got) = _both(grad, one_shot, chunked)
  assert traced and set(traced) == {CHUNK}, traced
  assert np.abs(np.asarray(want)[valid]).max() > 0.5  # logits large enough to compare
  np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(want)[valid], atol=1e-5)
  assert max(np.abs(np.asarray(g)).max() for g in jax.tree.leaves(nnx.state(g_want))) > 1e-3
  _assert_trees_close(nnx.state(g_got), nnx.state(g_want), atol=1e-5)


def test_shared_prefix_path(setup):
  # The prefix runs against an empty KV cache, its continuations against the filled one with
  # the shared-prefix mask layout. Values only: the gradients of the blocks under an arbitrary
  # mask are compared above, and a backward pass of this path doubles the compile time.
  one_shot, chunked, ids, mask = setup
  rng = np.random.default_rng(2)
  suffix = rng.integers(1, testing.IMAGE, (2, 2, 5))  # 2 continuations of 5 tokens
  smask = np.ones_like(suffix)
  smask[0, 1, 3:] = 0  # right padding
  smask[1, 0, 4:] = 0
  positions = np.broadcast_to(np.where(mask > 0, np.cumsum(mask, -1) - 1, 0), (3, *mask.shape))

  def run(m):
    return m.hidden_states_shared_prefix(ids, mask, suffix, smask, prefix_position_ids=positions)

  (want_prefix, want), (got_prefix, got) = _both(run, one_shot, chunked)
  valid, prefix_valid = smask.astype(bool), mask.astype(bool)
  np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(want)[valid], atol=1e-5)
  np.testing.assert_allclose(
    np.asarray(got_prefix)[prefix_valid], np.asarray(want_prefix)[prefix_valid], atol=1e-5
  )


def test_generation_tokens_identical(setup):
  # The 13-token prompts are prefilled in blocks; each new token (one query row) in one shot.
  one_shot, chunked, ids, mask = setup

  def tokens(model):
    return np.asarray(
      generate(model, ids, mask, None, None, max_new_tokens=12, eos_token_id=-1, pad_token_id=0)
    )

  want = tokens(one_shot)
  assert len(set(want[0].tolist())) > 3  # not a degenerate repeat
  np.testing.assert_array_equal(tokens(chunked), want)


def test_bad_chunk_is_a_clear_error():
  cfg = get_config('tiny')
  for bad in (-1, 2.5, True):
    with pytest.raises(ValueError, match='model.attention_chunk'):
      Qwen2_5_VL(cfg, rngs=nnx.Rngs(0), attention_chunk=bad)


def test_presets_chunk_long_sequences():
  for preset in ('tiny', 'small', *config_defaults.REAL_PRESETS):
    cfg = config_defaults.base_config(f'model={preset}', domain='x', data='y')
    assert cfg.model.attention_chunk == 512, preset
