"""Batched KV-cache sampling for Qwen2_5_VL (eval, probes, later rollouts).

Prompts are LEFT padded (so every row's next token goes to the same cache slot); the
cache has a fixed size prompt_len + max_new_tokens, so one compiled program serves every
batch of the same shapes. Positions follow transformers: the prompt gets 3D M-RoPE ids
from get_rope_index; generated token t sits at (max prompt position + 1 + t) on all axes.

On a mesh (a model whose parameters are sharded on one) the batch rows are split over the
mesh's data-parallel axes ('data', 'fsdp'): either every process passes the same whole batch
(`rows='all'`), or each process passes its own rows (`rows='process'`, data-parallel eval
over hosts: `row_groups` says which share of the data a process reads). Rows are padded to a
multiple of the data-parallel shards with inactive rows, which start as ended, so they never
keep the loop going, and are cut off again.

A call is one jitted program: the prefill (the vision tower, the prompt through the decoder,
the first token) and a while loop of decode steps that stops when every row has ended
(models/decode.py: per-layer heads-major caches, the layers unrolled on a CPU). The model is
split once per call and the program takes its arrays and gives back tokens only (nnx.jit
would hand every parameter back out of the program, a copy of the model per call).
"""

from __future__ import annotations

import collections
import functools
from typing import NamedTuple
import weakref

from flax import nnx
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
from jax.sharding import NamedSharding
import numpy as np

from cpo_jax import sharding as sharding_lib
from cpo_jax.models import decode
from cpo_jax.models import layers
from cpo_jax.models import lora
from cpo_jax.models.qwen2_5_vl import causal_padding_mask
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


@functools.partial(
  jax.jit,
  static_argnames=(
    'graphdef',
    'grid',
    'max_new_tokens',
    'pad',
    'greedy',
    'rows_sharding',
    'unroll_layers',
    'vision_score_bytes',
  ),
)
def _generate(
  state,
  input_ids,
  attention_mask,
  pixel_values,
  position_ids,
  next_position,
  active,
  temperature,
  top_p,
  eos,
  rng,
  *,
  graphdef,
  grid,
  max_new_tokens,
  pad,
  greedy,
  rows_sharding,
  unroll_layers,
  vision_score_bytes,
  decode_weights=None,
):
  model = nnx.merge(graphdef, state)
  b, p = input_ids.shape
  s = p + max_new_tokens
  grid_np = None if grid is None else np.asarray(grid, np.int64).reshape(-1, 3)
  if pixel_values is not None:  # [B, patches, D] when the rows are sharded: the HF layout
    pixel_values = pixel_values.reshape(-1, pixel_values.shape[-1])
  if pixel_values is None:
    x = model.embed(input_ids)
  else:
    image_embeds = model.encode_images(pixel_values, grid_np, vision_score_bytes)
    x = model.embed(input_ids, image_embeds=image_embeds)
  cos, sin = model.rotary(jnp.swapaxes(position_ids, 0, 1))  # given batch-major [B, 3, L]
  h, caches = decode.prefill(model, x, cos, sin, causal_padding_mask(attention_mask), s)
  logits = model.logits_from_hidden(h)
  rngs = jax.random.split(rng, max_new_tokens)

  # An inactive row (filler) holds pad and counts as ended from the start.
  tok = jnp.where(active, sample_token(logits, rngs[0], temperature, top_p, greedy), pad)
  done = jnp.isin(tok, eos) | ~active
  out = jnp.full((b, max_new_tokens), pad, jnp.int32).at[:, 0].set(tok)
  if max_new_tokens == 1:  # the first token is all: no loop, no caches laid out for one
    return _rows_stay(out, rows_sharding), jnp.int32(1)
  kv_valid = jnp.concatenate(
    [attention_mask.astype(bool), jnp.zeros((b, max_new_tokens), bool)], axis=1
  )
  # The loop reads the weights from this closure (loop invariants) and carries only what
  # changes: the heads-major caches (see models/decode.py).
  dec = decode.prepare(model, caches, unroll_layers, after=logits, weights=decode_weights)

  def step(carry):
    t, tok, done, out, caches, kv_valid = carry
    slot = p + t - 1  # cache slot of the token being fed
    kv_valid = jax.lax.dynamic_update_slice(kv_valid, jnp.ones((b, 1), bool), (0, slot))
    pos = jnp.broadcast_to((next_position + t - 1)[None, :, None], (3, b, 1))
    c, s_ = model.rotary(pos)
    x, caches = decode.step(dec.layers, model.embed(tok[:, None]), c, s_, caches, slot, kv_valid)
    nxt = sample_token(dec.head(model.norm(x)[:, -1]), rngs[t], temperature, top_p, greedy)
    nxt = jnp.where(done, pad, nxt)
    out = jax.lax.dynamic_update_slice(out, nxt[:, None], (0, t))
    return t + 1, nxt, done | jnp.isin(nxt, eos), out, caches, kv_valid

  # Stops as soon as every row has ended (rows that ended hold pad from then on anyway); on a
  # mesh `all` is a reduction over every shard's rows, so all devices leave the loop together.
  going = lambda carry: (carry[0] < max_new_tokens) & ~jnp.all(carry[2])
  carry = (jnp.int32(1), tok, done, out, dec.caches, kv_valid)
  steps, _, _, out, _, _ = jax.lax.while_loop(going, step, carry)
  return _rows_stay(out, rows_sharding), steps


# The unrolled step's per-layer copies of the decoder's weights (decode.unrolled_weights) for
# the last model generated with, made once per set of weights instead of in every call (in
# the call, the copy pushed the `small` preset's 64-token program over glibc's mmap threshold:
# 10,000 fresh pages per call, about 2% of it). Weak references to the weights they copy: a
# weight replaced (a training step, nnx.update) or freed makes the entry stale. Costs one copy
# of the decoder's weights while held (CPU only: accelerators run the scanned step).
_UNROLLED = {'sources': (), 'weights': None}


@functools.partial(jax.jit, static_argnames=('count', 'dtype'))
def _unrolled_weights_program(layers_state, table, count, dtype):
  return decode.unrolled_weights(layers_state, table, count, dtype)


def _unrolled_weights(model):
  """decode.UnrolledWeights of the model's current weights (made, or the held copy)."""
  layers_state = nnx.state(model.layers)
  table = None if model.lm_head is not None else model.embed_tokens[...]
  sources = jax.tree.leaves((layers_state, table))
  held = _UNROLLED['sources']
  if len(held) == len(sources) and all(ref() is x for ref, x in zip(held, sources)):
    return _UNROLLED['weights']
  _UNROLLED['weights'] = None  # the stale copy goes before the new one is made
  weights = _unrolled_weights_program(
    layers_state, table, count=model.num_layers, dtype=jnp.dtype(model.dtype)
  )
  _UNROLLED.update(sources=tuple(weakref.ref(x) for x in sources), weights=weights)
  return weights


def _rows_stay(out, rows_sharding):
  """The tokens stay where their rows are (on a mesh)."""
  if rows_sharding is None:
    return out
  return jax.lax.with_sharding_constraint(out, rows_sharding)


def mesh_of(model):
  """The mesh the model's parameters are sharded on (None: not on a mesh). Generation puts
  its batch on the same mesh."""
  return _mesh_of_state(nnx.state(model))


def _mesh_of_state(state):
  meshes = {
    x.sharding.mesh
    for x in jax.tree.leaves(state)
    if isinstance(getattr(x, 'sharding', None), NamedSharding)
  }
  if len(meshes) > 1:
    raise ValueError(f'the model\'s parameters lie on {len(meshes)} different meshes')
  return next(iter(meshes), None)


class RowGroups(NamedTuple):
  """How this process's devices split a batch's rows over the mesh's data-parallel axes.

  Processes whose devices hold the same row shards (replicas: e.g. tensor parallel across
  hosts) form one group and must feed the same rows; `index` of `count` groups is the share
  of the data this process reads, `shards` the row shards its devices hold (its rows per call
  are padded to a multiple of it)."""

  index: int
  count: int
  shards: int


def row_groups(mesh) -> RowGroups:
  if mesh is None:
    return RowGroups(0, 1, 1)
  parts = mesh.shape['data'] * mesh.shape['fsdp']
  starts = collections.defaultdict(set)  # process -> first row of each shard it holds
  for device, (rows,) in sharding_lib.batch_sharding(mesh).devices_indices_map((parts,)).items():
    starts[device.process_index].add(rows.start or 0)
  groups = sorted({tuple(sorted(s)) for s in starts.values()})
  held = [r for g in groups for r in g]
  if len(held) != len(set(held)) or len({len(g) for g in groups}) != 1:
    raise ValueError(
      f'mesh {dict(mesh.shape)}: the processes hold overlapping or unequal shares of the '
      f'batch rows ({groups}); order the devices so each host holds whole data-parallel shards.'
    )
  mine = tuple(sorted(starts[jax.process_index()]))
  return RowGroups(groups.index(mine), len(groups), len(mine))


def _on_cpu(state):
  """Whether the model's weights lie on CPU devices."""
  leaf = jax.tree.leaves(state)[0]
  return all(d.platform == 'cpu' for d in leaf.devices())


def _eos_ids(eos_token_id):
  """The end ids, repeated to a multiple of 8: one compiled program for up to 8 of them."""
  eos = np.atleast_1d(np.asarray(eos_token_id, np.int32))
  return np.resize(eos, -(-len(eos) // 8) * 8)


def _pad_rows(x, n):
  """x with its first row repeated up to n rows (None stays None)."""
  if x is None or len(x) == n:
    return x
  return np.concatenate([x, np.repeat(x[:1], n - len(x), axis=0)])


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
  active=None,
  rows: str = 'all',
  unroll_layers: bool | None = None,
):
  """New tokens [B, max_new_tokens] for left-padded prompts; after EOS a row holds pad_token_id.

  eos_token_id: an int or a sequence of ints. Greedy when temperature == 0. return_steps: also
  the number of tokens decoded (fewer than max_new_tokens when every row ended earlier).
  active: [B] bool, False for filler rows: they hold pad_token_id and never keep the loop going.

  On a model sharded on a mesh (`mesh_of`) the rows are split over its data-parallel axes and a
  host numpy array comes back. rows='all': every process passes the same whole batch and gets
  all its rows back; rows='process': each process passes its own rows (the same number on
  every process; processes of one `row_groups` group the same rows) and gets those back, so
  one call decodes every host's rows. Images: one per row, all of one grid (the eval layout).
  Without a mesh the batch goes to the default device (a jax array comes back).

  unroll_layers: how the decode step runs the layers (models/decode.py): unrolled over a
  per-layer copy of the weights (True), or scanned over the stack (False); None: unrolled
  where the weights lie on a CPU, scanned on accelerators.
  """
  if rows not in ('all', 'process'):
    raise ValueError(f"rows={rows!r}; expected 'all' or 'process'")
  input_ids = np.asarray(input_ids)
  attention_mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask)
  b = len(input_ids)
  active = np.ones(b, bool) if active is None else np.asarray(active, bool).reshape(b)
  if np.any(attention_mask[active, -1] == 0):
    raise ValueError(
      'generate expects LEFT-padded prompts (attention_mask[:, -1] must be 1 for every row)'
    )
  if max_new_tokens < 1:
    raise ValueError('max_new_tokens must be >= 1')
  position_ids, deltas = get_rope_index(input_ids, attention_mask, image_grid_thw, model.config)
  inputs = dict(
    input_ids=input_ids.astype(np.int32),
    attention_mask=attention_mask.astype(np.int32),
    pixel_values=None if pixel_values is None else np.asarray(pixel_values),
    position_ids=np.ascontiguousarray(np.swapaxes(position_ids, 0, 1), np.int32),  # [B, 3, L]
    next_position=(deltas[:, 0] + attention_mask.sum(-1)).astype(np.int32),  # max prompt pos + 1
    active=active,
  )
  with lora.deterministic(model):  # no LoRA dropout while sampling
    graphdef, state = nnx.split(model)  # one walk of the model per call (jit takes arrays)
  mesh = _mesh_of_state(state)
  on_cpu = _on_cpu(state)
  unroll_layers = on_cpu if unroll_layers is None else unroll_layers
  grid = None if image_grid_thw is None else np.asarray(image_grid_thw, np.int64).reshape(-1, 3)
  if mesh is None:
    sharding, placed = (
      None,
      {k: None if v is None else jax.device_put(v) for k, v in inputs.items()},
    )
  else:
    sharding = sharding_lib.batch_sharding(mesh)
    placed, grid = place_rows(inputs, grid, mesh, rows)
  grid = None if grid is None else tuple(grid.reshape(-1).tolist())
  greedy = temperature == 0.0
  rng = jax.random.key(0) if rng is None else rng
  out, steps = _generate(
    state,
    placed['input_ids'],
    placed['attention_mask'],
    placed['pixel_values'],
    placed['position_ids'],
    placed['next_position'],
    placed['active'],
    np.float32(temperature if not greedy else 1.0),
    np.float32(top_p),
    _eos_ids(eos_token_id),
    rng,
    graphdef=graphdef,
    grid=grid,
    max_new_tokens=int(max_new_tokens),
    pad=int(pad_token_id),
    greedy=greedy,
    rows_sharding=sharding,
    unroll_layers=bool(unroll_layers),
    vision_score_bytes=layers.CPU_SEGMENT_SCORE_BYTES if on_cpu else None,
    decode_weights=_unrolled_weights(model) if unroll_layers and max_new_tokens > 1 else None,
  )
  if mesh is not None:
    if rows == 'process':
      out = sharding_lib.process_rows(out)[:b]
    elif jax.process_count() > 1:
      out = multihost_utils.process_allgather(out, tiled=True)[:b]
    else:
      out = np.asarray(out)[:b]
  steps = int(np.asarray(steps.addressable_data(0)))
  return (out, steps) if return_steps else out


def place_rows(inputs, grid, mesh, rows='all'):
  """Host arrays of a batch (rows first) -> global arrays split by rows over the mesh's
  data-parallel axes, and the grid of the global batch. Rows are padded with inactive copies
  of the first to whole shards: of all shards (rows='all': every process holds the whole
  batch), of this process's (rows='process': each holds its own rows)."""
  b = len(inputs['input_ids'])
  inputs, grid = _rows_layout(inputs, grid, b)
  groups = row_groups(mesh)
  multiple = mesh.shape['data'] * mesh.shape['fsdp'] if rows == 'all' else groups.shards
  n = -(-b // multiple) * multiple
  inputs = {k: _pad_rows(v, n) for k, v in inputs.items()}
  inputs['active'][b:] = False
  global_rows = n if rows == 'all' else n * groups.count
  sharding = sharding_lib.batch_sharding(mesh)
  # With the global shape equal to the local one, each process holds the whole array.
  placed = {
    k: None
    if v is None
    else jax.make_array_from_process_local_data(sharding, v, (global_rows,) + v.shape[1:])
    for k, v in inputs.items()
  }
  return placed, None if grid is None else np.repeat(grid[:1], global_rows, axis=0)


def _rows_layout(inputs, grid, b):
  """Pixel values batch-major [B, patches, D] (one image per row, all of one grid), so every
  input splits over rows; the grid of one row."""
  pv = inputs['pixel_values']
  if pv is None:
    return inputs, grid
  if grid is None or len(grid) != b or np.any(grid != grid[:1]):
    raise ValueError(
      'generate on a mesh splits the batch by rows: it needs one image per row, all with one '
      f'grid; got image_grid_thw {None if grid is None else grid.tolist()} for {b} rows'
    )
  return dict(inputs, pixel_values=pv.reshape(b, -1, pv.shape[-1])), grid[:1]
