"""Grouped-query attention of the text decoder: in one shot, or in blocks of query rows.

One shot materialises float32 scores [B, kv, group, L, S]: at 7B's 28 heads and L = S = 2048
that is 470 MB per row of the batch per tensor, the largest activation of a layer. Both paths
are rematerialised: the backward pass recomputes the probabilities from the queries and keys
instead of storing them per layer. In query blocks (`chunk` rows at a time) each block takes
its softmax over all keys, exactly the one-shot math per row, so scores exist for one block
at a time.

Why query blocks and not an online softmax over key blocks (flash attention): a query block
already holds every key, so the row's max and sum are those of the one-shot path (no
rescaling, same numbers), and the mask stays an arbitrary bool [B, L, S] (causal + padding,
the shared-prefix layout, a KV cache). At L = 2048 and chunk 512 a block's scores (117 MB per
row at 7B) are about one MLP activation, and `--mode=plan` for 7B on one device shows the same
peak at chunk 256 as at 512: the peak is elsewhere, so key blocks would buy nothing there.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def check_chunk(chunk):
  """A clear error for a `model.attention_chunk` that is not an int >= 0."""
  if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 0:
    raise ValueError(f'model.attention_chunk={chunk!r}; expected an int >= 0 (0 = one shot).')


def gqa_attention(q, k, v, mask, scale, chunk: int = 0):
  """q [B, L, nH, d], k/v [B, S, nKV, d], mask bool [B, L, S] -> [B, L, nH, d].

  chunk > 0: queries in blocks of at most `chunk` rows (when L > chunk); 0: in one shot.
  """
  if chunk <= 0 or q.shape[1] <= chunk:
    return _rematerialised(q, k, v, mask, scale)
  return attend_in_query_blocks(q, k, v, mask, scale, chunk)


def _rematerialised(q, k, v, mask, scale):
  """`attend` whose backward pass recomputes the scores and probabilities from q and k
  instead of storing them for every layer (flash attention's trade: stored, they are the
  largest residuals of a scanned decoder, and on a CPU writing and reading them cost more
  than the two products that remake them; the small model's CPO++ step: 0.405 -> 0.375 s).
  Without a gradient (decoding, scoring) it is `attend` itself."""
  # prevent_cse=False: the layers run in a scan, where XLA cannot merge the recomputation away.
  block = jax.checkpoint(lambda q, k, v, mask: attend(q, k, v, mask, scale), prevent_cse=False)
  return block(q, k, v, mask)


def attend(q, k, v, mask, scale):
  """The one-shot path: float32 scores for all L x S pairs; softmax over the keys.

  A kv head's query heads are stacked as rows ([B, kv, group * L, d]), so both products are
  plain batched matmuls whose [.., group * L, S] results are already in the softmax's layout:
  only q, k, v and the output ([.., d] wide) are transposed, never the scores (transposing
  the scores and probabilities cost more than the products on a CPU).
  """
  b, seq, nh, d = q.shape
  s, nkv = k.shape[1], k.shape[2]
  group = nh // nkv
  q = q.reshape(b, seq, nkv, group, d).transpose(0, 2, 3, 1, 4).reshape(b, nkv, group * seq, d)
  k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, kv, S, d]
  logits = jnp.einsum('bkqd,bksd->bkqs', q, k).astype(jnp.float32) * scale
  logits = logits.reshape(b, nkv, group, seq, s)
  logits = jnp.where(mask[:, None, None], logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype).reshape(b, nkv, group * seq, s)
  out = jnp.einsum('bkqs,bksd->bkqd', probs, v).reshape(b, nkv, group, seq, d)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, seq, nh, d)


def attend_causal_blocks(q, k, v, mask, scale, rows: int):
  """`attend` for self-attention under a causal mask (a prompt's prefill), in blocks of at most
  `rows` query rows, each block against the keys up to its own last row only: the later keys
  are masked for every row of the block, so they would add weights of exactly 0 (at L = 290
  and 128 rows, 30% fewer scores; about half at long prompts).

  q [B, L, nH, d], k/v [B, L, nKV, d] (key i at query i's position), mask bool [B, L, L]
  causal (and any key padding). One difference from one shot, on padding rows only: a row
  whose keys are all masked (a left-padding row) averages its block's values instead of all
  of them; no real row reads it (its key is masked for them).
  """
  seq = q.shape[1]
  if rows <= 0 or seq <= rows:
    return attend(q, k, v, mask, scale)
  blocks = [(start, min(start + rows, seq)) for start in range(0, seq, rows)]
  out = [attend(q[:, s:e], k[:, :e], v[:, :e], mask[:, s:e, :e], scale) for s, e in blocks]
  return jnp.concatenate(out, axis=1)


def attend_in_query_blocks(q, k, v, mask, scale, chunk: int):
  """`attend` in blocks of at most `chunk` query rows (lax.map), each block rematerialised.

  The rows are split into ceil(L / chunk) blocks of equal size (L = 768, chunk 512: two
  blocks of 384), so at most blocks - 1 rows are padding: zero queries whose keys are all
  masked (a finite, uniform softmax), dropped at the end. Their outputs take no gradient, so
  nothing leaks into the real rows.
  """
  b, seq, nh, d = q.shape
  blocks = -(-seq // chunk)
  rows = -(-seq // blocks)
  pad = blocks * rows - seq
  q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
  mask = jnp.pad(mask, ((0, 0), (0, pad), (0, 0)))
  q_blocks = jnp.moveaxis(q.reshape(b, blocks, rows, nh, d), 1, 0)
  mask_blocks = jnp.moveaxis(mask.reshape(b, blocks, rows, mask.shape[-1]), 1, 0)
  # prevent_cse=False: inside a loop XLA cannot merge the recomputation away anyway.
  block = jax.checkpoint(
    lambda q_block, mask_block, k, v: attend(q_block, k, v, mask_block, scale), prevent_cse=False
  )
  out = jax.lax.map(lambda qm: block(qm[0], qm[1], k, v), (q_blocks, mask_blocks))
  return jnp.moveaxis(out, 0, 1).reshape(b, blocks * rows, nh, d)[:, :seq]
