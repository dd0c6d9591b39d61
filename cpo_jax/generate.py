"""Batched KV-cache sampling for Qwen2_5_VL (eval, probes, later rollouts).

Prompts are LEFT padded (so every row's next token goes to the same cache slot); the
cache has a fixed size prompt_len + max_new_tokens, so one compiled program serves every
batch of the same shapes. Positions follow transformers: the prompt gets 3D M-RoPE ids
from get_rope_index; generated token t sits at (max prompt position + 1 + t) on all axes.
"""

from __future__ import annotations

import functools

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from cpo_jax.models import lora
from cpo_jax.models.qwen2_5_vl import get_rope_index


def sample_token(logits, rng, temperature, top_p, greedy: bool):
  """logits [B, V] -> token ids [B]. Greedy argmax, else temperature + nucleus (top-p; traced)."""
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  if not (isinstance(top_p, (int, float)) and top_p >= 1.0):
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # keep the smallest prefix whose mass reaches top_p (always at least the best token)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    n_keep = jnp.sum(mass_before < top_p, axis=-1, keepdims=True)
    threshold = jnp.take_along_axis(sorted_logits, n_keep - 1, axis=-1)
    logits = jnp.where((logits < threshold) & (top_p < 1.0), -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(nnx.jit, static_argnames=('grid', 'max_new_tokens', 'pad', 'greedy'))
def _generate(
  model,
  input_ids,
  attention_mask,
  pixel_values,
  position_ids,
  next_position,
  temperature,
  top_p,
  eos,
  rng,
  *,
  grid,
  max_new_tokens,
  pad,
  greedy,
):
  b, p = input_ids.shape
  s = p + max_new_tokens
  grid_np = None if grid is None else np.asarray(grid, np.int64).reshape(-1, 3)
  x = model.embed(input_ids, pixel_values, grid_np)
  cos, sin = model.rotary(position_ids)
  kv_valid = jnp.concatenate(
    [attention_mask.astype(bool), jnp.zeros((b, max_new_tokens), bool)], axis=1
  )
  k_idx = jnp.arange(s)
  mask = (k_idx[None, :] <= jnp.arange(p)[:, None])[None] & kv_valid[:, None, :]
  cache = model.init_cache(b, s)
  h, cache = model.decoder(x, cos, sin, mask, cache=cache, cache_index=0)
  logits = model.logits_from_hidden(h[:, -1])
  eos_ids = eos
  rngs = jax.random.split(rng, max_new_tokens)

  tok = sample_token(logits, rngs[0], temperature, top_p, greedy)
  done = jnp.isin(tok, eos_ids)
  out = jnp.full((b, max_new_tokens), pad, jnp.int32).at[:, 0].set(tok)
  graphdef, state = nnx.split(model)

  def step(carry):
    t, tok, done, out, cache, kv_valid, state = carry
    m = nnx.merge(graphdef, state)  # params ride in the carry: nnx needs them at this trace level
    slot = p + t - 1  # cache slot of the token being fed
    kv_valid = jax.lax.dynamic_update_slice(kv_valid, jnp.ones((b, 1), bool), (0, slot))
    pos = jnp.broadcast_to((next_position + t - 1)[None, :, None], (3, b, 1))
    c, s_ = m.rotary(pos)
    step_mask = (k_idx <= slot)[None, None, :] & kv_valid[:, None, :]
    h, cache = m.decoder(m.embed(tok[:, None]), c, s_, step_mask, cache=cache, cache_index=slot)
    nxt = sample_token(m.logits_from_hidden(h[:, -1]), rngs[t], temperature, top_p, greedy)
    nxt = jnp.where(done, pad, nxt)
    out = jax.lax.dynamic_update_slice(out, nxt[:, None], (0, t))
    return t + 1, nxt, done | jnp.isin(nxt, eos_ids), out, cache, kv_valid, state

  # Stops as soon as every row has ended (rows that ended hold pad from then on anyway).
  going = lambda carry: (carry[0] < max_new_tokens) & ~jnp.all(carry[2])
  carry = (jnp.int32(1), tok, done, out, cache, kv_valid, state)
  steps, *_, out, _, _, _ = jax.lax.while_loop(going, step, carry)
  return out, steps


def generate(
  model,
  input_ids,
  attention_mask,
  pixel_values,
  image_grid_thw,
  *,
  max_new_tokens: int,
  eos_token_id,
  pad_token_id: int,
  temperature: float = 0.0,
  top_p: float = 1.0,
  rng=None,
  return_steps: bool = False,
):
  """New tokens [B, max_new_tokens] for left-padded prompts; after EOS a row holds pad_token_id.

  eos_token_id: an int or a sequence of ints. Greedy when temperature == 0. return_steps: also
  the number of tokens decoded (fewer than max_new_tokens when every row ended earlier).
  """
  input_ids = np.asarray(input_ids)
  attention_mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask)
  if np.any(attention_mask[:, -1] == 0):
    raise ValueError(
      'generate expects LEFT-padded prompts (attention_mask[:, -1] must be 1 for every row)'
    )
  if max_new_tokens < 1:
    raise ValueError('max_new_tokens must be >= 1')
  position_ids, deltas = get_rope_index(input_ids, attention_mask, image_grid_thw, model.config)
  next_position = deltas[:, 0] + attention_mask.sum(-1)  # = max prompt position + 1
  eos = tuple(int(e) for e in np.atleast_1d(eos_token_id))
  grid = (
    None
    if image_grid_thw is None
    else tuple(np.asarray(image_grid_thw, np.int64).reshape(-1).tolist())
  )
  greedy = temperature == 0.0
  rng = jax.random.key(0) if rng is None else rng
  with lora.deterministic(model):  # no LoRA dropout while sampling
    out, steps = _generate(
      model,
      jnp.asarray(input_ids, jnp.int32),
      jnp.asarray(attention_mask, jnp.int32),
      None if pixel_values is None else jnp.asarray(pixel_values),
      jnp.asarray(position_ids, jnp.int32),
      jnp.asarray(next_position, jnp.int32),
      jnp.float32(temperature if not greedy else 1.0),
      jnp.float32(top_p),
      jnp.asarray(eos, jnp.int32),
      rng,
      grid=grid,
      max_new_tokens=int(max_new_tokens),
      pad=int(pad_token_id),
      greedy=greedy,
    )
  return (out, int(steps)) if return_steps else out
