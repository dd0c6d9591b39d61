"""The text decoder for generation: the prompt once (`prefill`), then one token at a time
against a KV cache (`step`, the body of the generation loop).

The cache is heads-major, [B, kv, S, hd] per layer: `prefill` writes the prompt's keys and
values there directly, the step writes each new key and value in place, and both attention
products read the cache as it lies (the training path's [B, S, kv, hd] layout would be
transposed at every token).

The layers run one of two ways (`DecodeLayers`):
* unrolled (for CPUs): the scanned stack is unstacked into one module per layer
  (`unrolled_weights`), and the step runs them in sequence, each with its own cache. A CPU's
  dot cannot read a slice of the stack in place, so a scanned step would copy every layer's
  weights (and caches) at every token; the unrolled step reads them where they lie, at the
  price of one copy of the decoder's weights and a loop body that grows with depth. A tied
  output head is likewise transposed once instead of repacked per token. `generate` makes
  the copy once per set of weights and keeps it beside the model (not in every call).
* scanned (for accelerators, which fuse the slice into the matmul): the step scans the
  stack, the caches stacked [layers, B, kv, S, hd], updated in place at (layer, slot).

The math is the layer's own (`DecoderLayer.project` / `finish`), and the attention is
`attention.attend`'s for one query row: float32 scores, masked keys at the float32 minimum,
softmax over the keys. The prefill's attention runs in causal query blocks
(`attention.attend_causal_blocks`): a block skips the keys after its last row.
"""

from __future__ import annotations

from typing import Any
from typing import NamedTuple

from flax import nnx
import jax
import jax.numpy as jnp

from cpo_jax.models import attention

# The prefill's attention runs in blocks of this many query rows (or the model's
# attention_chunk when set), each against the keys up to its last row only (causal): the
# `small` preset's text prefill of 4 x 290 tokens took 74 ms against one shot's 86 (2-core
# CPU, interleaved medians).
PREFILL_QUERY_ROWS = 128


class DecodeLayers(NamedTuple):
  """What the loop reads (`layers`, `head`) and the caches it starts from.

  layers: a list of per-layer modules (unrolled), or the stack as nnx.split's (graphdef,
  state) (scanned: the step merges a layer inside its scan, as an nnx transform of a module
  closed over from outside the loop is refused); caches: a list of per-layer (k, v)
  [B, kv, S, hd] (unrolled) or one stacked (k, v) [layers, B, kv, S, hd]; head: h [B, H] ->
  logits [B, V]."""

  layers: Any
  caches: Any
  head: Any


def prefill(model, x, cos, sin, mask, length: int):
  """The prompt through the decoder: x [B, P, H] embeddings, cos/sin [B, P, hd], mask bool
  [B, P, P] -> (the last position's final-normed hidden [B, H], caches (k, v) stacked
  heads-major [layers, B, kv, length, hd], the prompt's keys and values in the first P slots).

  Every layer but the last runs every position (scanned). Of the last layer only the keys and
  values of every position are needed (for the cache) and its output at the last position
  (for the first new token): the rest of its attention and MLP is not computed.
  """
  b, p, _ = x.shape
  graphdef, state = nnx.split(model.layers)
  count = model.num_layers
  layer_at = lambda i: nnx.merge(
    graphdef, jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), state)
  )
  shape = (count, b, model.num_kv_heads, length, model.head_dim)
  caches = (jnp.zeros(shape, model.dtype), jnp.zeros(shape, model.dtype))

  def write(caches, i, k, v):  # [B, P, kv, hd] into layer i's first P slots
    return tuple(
      jax.lax.dynamic_update_slice(c, jnp.swapaxes(n, 1, 2).astype(c.dtype)[None], (i, 0, 0, 0, 0))
      for c, n in zip(caches, (k, v))
    )

  def attend(layer, q, k, v, mask):  # in causal query blocks (see PREFILL_QUERY_ROWS)
    rows = layer.attention_chunk or PREFILL_QUERY_ROWS
    return attention.attend_causal_blocks(q, k, v, mask, layer.head_dim**-0.5, rows)

  def body(carry, i):
    x, caches = carry
    layer = layer_at(i)
    q, k, v = layer.project(x, cos, sin)
    return (layer.finish(x, attend(layer, q, k, v, mask)), write(caches, i, k, v)), None

  (x, caches), _ = jax.lax.scan(body, (x, caches), jnp.arange(count - 1))
  last = layer_at(count - 1)
  q, k, v = last.project(x, cos, sin)
  h = last.finish(x[:, -1:], attend(last, q[:, -1:], k, v, mask[:, -1:]))
  return model.norm(h)[:, 0], write(caches, count - 1, k, v)


class UnrolledWeights(NamedTuple):
  """What the unrolled step reads: one state per layer (the stack's slices) and the tied
  output head transposed to [H, V] (None: the model has its own lm_head)."""

  layers: list
  head: Any


def unrolled_weights(layers_state, table, count: int, dtype) -> UnrolledWeights:
  """The unrolled step's copies of the decoder's weights: the stacked layers' state (as
  nnx.split gives it) sliced per layer, and the tied embedding table (None: an own lm_head)
  transposed once, not repacked by every token's dot. `generate` makes them once per set of
  weights, outside its program, and passes them in."""
  layers = [jax.tree.map(lambda x, i=i: x[i], layers_state) for i in range(count)]
  return UnrolledWeights(layers, None if table is None else jnp.transpose(table.astype(dtype)))


def prepare(model, caches, unrolled: bool, after=None, weights=None) -> DecodeLayers:
  """The decode step's layers, head and caches, from `prefill`'s stacked caches.

  weights: the unrolled step's `UnrolledWeights`, made beforehand (None: made here, in the
  program, at every call). after: an array the unstacking here waits for (the prefill's
  logits), so the per-layer copies do not coexist with the prefill's activations."""
  graphdef, state = nnx.split(model.layers)
  if not unrolled:
    return DecodeLayers((graphdef, state), caches, model.logits_from_hidden)
  if weights is None:
    table = None if model.lm_head is not None else model.embed_tokens[...]
    if after is not None:
      state, table, _ = jax.lax.optimization_barrier((state, table, after))
    weights = unrolled_weights(state, table, model.num_layers, model.dtype)
  layers = [nnx.merge(graphdef, layer_state) for layer_state in weights.layers]
  if weights.head is None:
    head = model.logits_from_hidden
  else:
    head = lambda h: h.astype(model.dtype) @ weights.head
  k, v = caches
  return DecodeLayers(layers, [(k[i], v[i]) for i in range(len(layers))], head)


def attend_cache(q, k_cache, v_cache, key_valid, scale):
  """One query row per batch row against a heads-major cache.

  q [B, nH, d]; k_cache/v_cache [B, kv, S, d]; key_valid bool [B, S] -> [B, nH, d].
  A kv head's query heads are the rows of one product, so neither product moves the cache.
  """
  b, nh, d = q.shape
  nkv = k_cache.shape[1]
  q = q.reshape(b, nkv, nh // nkv, d)
  logits = jnp.einsum('bkgd,bksd->bkgs', q, k_cache).astype(jnp.float32) * scale
  logits = jnp.where(key_valid[:, None, None], logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v_cache.dtype)
  return jnp.einsum('bkgs,bksd->bkgd', probs, v_cache).reshape(b, nh, d)


def _heads_major(x, dtype):
  """[B, 1, heads, hd] -> [B, heads, 1, hd]: a new key or value in the cache's layout."""
  return jnp.swapaxes(x, 1, 2).astype(dtype)


def decode_layer(layer, x, cos, sin, k_cache, v_cache, slot, key_valid):
  """One layer for one new token per row: x [B, 1, H]; cos/sin [B, 1, hd]; the layer's cache
  (k_cache, v_cache) [B, kv, S, hd], the new key and value written at `slot`; key_valid bool
  [B, S] (the new slot included). Returns (x, k_cache, v_cache)."""
  q, k, v = layer.project(x, cos, sin)  # [B, 1, heads, hd]
  k_cache = jax.lax.dynamic_update_slice(k_cache, _heads_major(k, k_cache.dtype), (0, 0, slot, 0))
  v_cache = jax.lax.dynamic_update_slice(v_cache, _heads_major(v, v_cache.dtype), (0, 0, slot, 0))
  o = attend_cache(
    q[:, 0], k_cache.astype(q.dtype), v_cache.astype(q.dtype), key_valid, layer.head_dim**-0.5
  )
  return layer.finish(x, o[:, None]), k_cache, v_cache


def step(layers, x, cos, sin, caches, slot, key_valid):
  """Every layer for one new token per row (see `decode_layer`); layers and caches as
  `prepare` made them. Returns (x, caches)."""
  if isinstance(layers, list):
    out = []
    for layer, (k_cache, v_cache) in zip(layers, caches):
      x, k_cache, v_cache = decode_layer(layer, x, cos, sin, k_cache, v_cache, slot, key_valid)
      out.append((k_cache, v_cache))
    return x, out

  graphdef, stack = layers

  def body(carry, layer_state):
    x, k_all, v_all, i = carry
    layer = nnx.merge(graphdef, layer_state)
    q, k, v = layer.project(x, cos, sin)
    k_all = jax.lax.dynamic_update_slice(
      k_all, _heads_major(k, k_all.dtype)[None], (i, 0, 0, slot, 0)
    )
    v_all = jax.lax.dynamic_update_slice(
      v_all, _heads_major(v, v_all.dtype)[None], (i, 0, 0, slot, 0)
    )
    o = attend_cache(
      q[:, 0], k_all[i].astype(q.dtype), v_all[i].astype(q.dtype), key_valid, layer.head_dim**-0.5
    )
    return (layer.finish(x, o[:, None]), k_all, v_all, i + 1), None

  (x, k_all, v_all, _), _ = jax.lax.scan(body, (x, *caches, jnp.int32(0)), stack)
  return x, (k_all, v_all)
