"""The vision tower's attention within segments (`layers.segment_attention`) equals plain
per-segment softmax attention, in one block of (segment, head) pairs or in many (lax.map),
for segments that tile the tokens (a reshape) and for ragged ones (a gather)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpo_jax.models import layers

HEADS, DIM = 3, 8


def _reference(q, k, v, cu, scale):
  """Each segment [cu[i], cu[i+1]) attends over itself alone, one at a time in numpy."""
  out = np.zeros_like(q)
  for start, end in zip(cu[:-1], cu[1:]):
    qs, ks, vs = q[start:end], k[start:end], v[start:end]
    logits = np.einsum('mhd,nhd->hmn', qs, ks) * scale
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out[start:end] = np.einsum('hmn,nhd->mhd', probs, vs)
  return out


@pytest.mark.parametrize(
  'cu',
  [(0, 6, 12, 18, 24), (0, 5, 16, 20, 24)],
  ids=['equal segments (reshape)', 'ragged segments (gather)'],
)
@pytest.mark.parametrize('score_bytes', [None, 720], ids=['one block', 'blocks'])
def test_equals_per_segment_attention(cu, score_bytes):
  # 720 bytes: 5 pairs of 6 x 6 float32 scores per block (equal: 12 pairs in 3 blocks, the last
  # padded), or 1 pair of 11 x 11 (ragged, padded to 11 keys: 12 blocks).
  rng = np.random.default_rng(0)
  n = cu[-1]
  q, k, v = (rng.standard_normal((n, HEADS, DIM)).astype(np.float32) for _ in range(3))
  plan = layers.segment_gather_plan(np.asarray(cu))
  scale = DIM**-0.5
  attend = jax.jit(lambda q, k, v: layers.segment_attention(q, k, v, plan, scale, score_bytes))
  np.testing.assert_allclose(
    np.asarray(attend(q, k, v)), _reference(q, k, v, np.asarray(cu), scale), atol=2e-6
  )
  # gradients: the blocked path against one block
  loss = lambda b: (
    lambda q, k, v: jnp.sum(jnp.sin(layers.segment_attention(q, k, v, plan, scale, b)))
  )
  got = jax.grad(loss(score_bytes), argnums=(0, 1, 2))(q, k, v)
  want = jax.grad(loss(None), argnums=(0, 1, 2))(q, k, v)
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-6)
