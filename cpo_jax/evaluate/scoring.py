"""The teacher-forced answer distribution: p(decision | image, prompt, chain, answer prefix).

Thinking interference and the drift probe teacher-force `prompt + chain + answer prefix`
('<think> ... </think> The decision is') and read the model's probabilities of the decisions
at that point, renormalised over the decisions. When the decisions start with distinct tokens
that is one next-token read; otherwise each decision's full token sequence (up to the
template's closing '.') is scored.

On a model sharded on a mesh the rows are split over its data-parallel axes, and each process
passes its own rows (generate's rows='process'): a probe reading only its share of a split
gets its rows' scores back, and processes passing the same rows each get them all. The
processes agree on the padded length (hosts.agreed_max), so they must make the same calls.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from cpo_jax import generate as generate_lib
from cpo_jax import sharding as sharding_lib
from cpo_jax.evaluate import hosts
from cpo_jax.knowledge import drift
from cpo_jax.knowledge.graph import ConceptGraph
from cpo_jax.models import get_rope_index  # host-side numpy, transformers' semantics.


def total_variation(p, q):
  """0.5 * sum |p - q| over the last axis: 0 for equal distributions, 1 for disjoint ones."""
  return 0.5 * np.abs(np.asarray(p, np.float64) - np.asarray(q, np.float64)).sum(-1)


def softmax(logits):
  z = np.asarray(logits, np.float64)
  z = np.exp(z - z.max(-1, keepdims=True))
  return z / z.sum(-1, keepdims=True)


def mean_or_none(values):
  # None, not NaN, for an empty set: report.json stays strict JSON.
  return float(np.mean(values)) if len(values) else None


def encode_text(tokenizer, text):
  return tuple(tokenizer(text, add_special_tokens=False)['input_ids'])


@dataclasses.dataclass(frozen=True)
class DecisionTokens:
  """Per decision (graph.decisions order), the tokens that follow the answer prefix."""

  sequences: tuple[tuple[int, ...], ...]

  @property
  def first_token_ids(self) -> tuple[int, ...] | None:
    """The first tokens if they tell the decisions apart (one next-token read), else None."""
    firsts = tuple(s[0] for s in self.sequences)
    return firsts if len(set(firsts)) == len(firsts) else None

  @property
  def scoring(self) -> str:
    return 'first_token' if self.first_token_ids is not None else 'sequence'


def decision_tokens(tokenizer, graph: ConceptGraph) -> DecisionTokens:
  """Tokenizes each answer in context and keeps what follows the prefix 'The decision is'.

  The template's text after the decision ('.') is kept too, so that no decision's sequence
  is a prefix of another's (e.g. 'slow' vs 'slow down') and sequence scores compare
  disjoint events.
  """
  prefix = drift.answer_prefix(graph)
  suffix = graph.answer_template.split('{decision}')[1]
  base = encode_text(tokenizer, prefix)
  sequences = []
  for d in graph.decisions:
    full = encode_text(tokenizer, f'{prefix} {graph.decision_texts[d]}{suffix}')
    if full[: len(base)] != base or len(full) == len(base):
      raise ValueError(
        f'{d!r}: the answer prefix {prefix!r} does not tokenize the same before '
        f'the decision ({base} vs {full}); cannot read decision tokens'
      )
    sequences.append(full[len(base) :])
  if len(set(sequences)) != len(sequences):
    raise ValueError(f'decisions tokenize identically: {dict(zip(graph.decisions, sequences))}')
  return DecisionTokens(tuple(sequences))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _encode_images(graphdef, grid_rows, state, pixel_values):
  """[B, P, D] pixel values (one image of one grid per row) -> [B, tokens, H] embeddings."""
  b = pixel_values.shape[0]
  flat = pixel_values.reshape(-1, pixel_values.shape[-1])
  embeds = nnx.merge(graphdef, state).encode_images(flat, np.asarray(grid_rows))
  return embeds.reshape(b, -1, embeds.shape[-1])


@functools.partial(jax.jit, static_argnums=(0, 1))
def _token_logps(
  graphdef, repeat, state, input_ids, attention_mask, position_ids, image_embeds, positions, targets
):
  """log p(targets [R, T, K] at sequence positions [R, T]) -> [R, T, K]; only T positions are
  projected to the vocabulary. position_ids [R, 3, L] (rows first, to split them); image
  embeddings [R / repeat, tokens, H]: each image serves `repeat` consecutive rows."""
  m = nnx.merge(graphdef, state)
  image_embeds = jnp.repeat(image_embeds, repeat, axis=0)
  h = m.hidden_states(
    input_ids,
    attention_mask,
    position_ids=jnp.swapaxes(position_ids, 0, 1),
    image_embeds=image_embeds.reshape(-1, image_embeds.shape[-1]),
  )
  h = jnp.take_along_axis(h, positions[..., None], axis=1)
  logp = jax.nn.log_softmax(m.logits_from_hidden(h).astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logp, targets, axis=-1)


class AnswerScorer:
  """Teacher-forced answer distribution p(decision | image, prompt, chain, answer prefix).

  Images are encoded once per batch and reused for every chain variant. The forward is
  jitted at module level with the model's graphdef static, so scorers of the same model
  share compilations (one per padded length, rounded up to `pad_multiple`).
  """

  def __init__(self, model, processors, graph: ConceptGraph, *, pad_multiple: int = 16):
    self.graph = graph
    self.tokenizer = processors.tokenizer
    self.pad_id = int(processors.ids['pad_token_id'])
    self.tokens = decision_tokens(self.tokenizer, graph)
    self.prefix = drift.answer_prefix(graph)
    self.pad_multiple = pad_multiple
    self.config = model.config
    self._graphdef, self._state = nnx.split(model)
    self._mesh = generate_lib.mesh_of(model)
    # Rows per call are padded to a multiple of this process's row shards.
    self._shards = 1 if self._mesh is None else generate_lib.row_groups(self._mesh).shards

  def _padded(self, n: int) -> int:
    return -(-n // self._shards) * self._shards

  def _place(self, x: np.ndarray):
    """This process's rows (a multiple of its shards) -> the global array split by rows on the
    mesh (each process's rows after the previous one's); as is without a mesh."""
    if self._mesh is None:
      return jnp.asarray(x)
    count = generate_lib.row_groups(self._mesh).count
    sharding = sharding_lib.batch_sharding(self._mesh)
    return jax.make_array_from_process_local_data(sharding, x, (len(x) * count,) + x.shape[1:])

  def _rows_back(self, x, n: int) -> np.ndarray:
    """The first n of this process's rows of a `_place`d result, on the host."""
    if self._mesh is None:
      return np.asarray(jax.device_get(x))[:n]
    return sharding_lib.process_rows(x)[:n]

  def encode(self, batch):
    """The batch's images -> embeddings [rows, tokens, H] (rows padded, placed as `_place`)."""
    grid = np.asarray(batch['image_grid_thw'])
    b = len(grid)
    pixels = np.asarray(batch['pixel_values']).reshape(b, -1, np.shape(batch['pixel_values'])[-1])
    pixels = np.concatenate([pixels, np.repeat(pixels[:1], self._padded(b) - b, axis=0)])
    placed = self._place(pixels)
    grid_rows = (tuple(int(v) for v in grid[0]),) * placed.shape[0]
    return _encode_images(self._graphdef, grid_rows, self._state, placed)

  def distributions(self, batch, chains: Sequence[str], image_embeds) -> np.ndarray:
    """[B, num_decisions] answer distribution after each row's prompt + chains[row]."""
    first = self.tokens.first_token_ids
    if first is None:  # decisions share first tokens: score each decision's whole sequence
      return softmax(self.sequence_logps(batch, chains, image_embeds, self.tokens.sequences))
    heads = self._heads(batch, chains)
    grid = np.asarray(batch['image_grid_thw'])
    reads = [[(len(h) - 1, first)] for h in heads]
    logp = self._run(heads, reads, grid, image_embeds, repeat=1)  # one read
    return softmax(logp[: len(chains), 0, :])

  def sequence_logps(self, batch, chains: Sequence[str], image_embeds, sequences) -> np.ndarray:
    """[B, K] log p(sequences[k] | row's prompt + chains[row] + the answer prefix): each
    candidate's token log-probs summed, one teacher-forced row per (example, candidate)."""
    heads = [encode_text(self.tokenizer, f'{chain} {self.prefix}') for chain in chains]
    pairs = [[(h, s) for s in sequences] for h in heads]
    return self.continuation_logps(batch, pairs, image_embeds)

  def continuation_logps(self, batch, pairs, image_embeds) -> np.ndarray:
    """[B, K] log p(target | row's prompt + context), the target's token log-probs summed, for
    pairs[row] = K (context, target) token-id tuples that follow the row's prompt (K the same
    for every row): one teacher-forced row per pair. Rows are padded as `encode` pads them."""
    ids, mask = np.asarray(batch['input_ids']), np.asarray(batch['attention_mask'])
    n = len(pairs)
    prompts = [tuple(row[m == 1]) for row, m in zip(ids[:n], mask[:n])]
    pairs = list(pairs) + list(pairs[:1]) * (self._padded(n) - n)
    prompts += prompts[:1] * (len(pairs) - n)
    rows, reads = [], []
    for prompt, row_pairs in zip(prompts, pairs):
      for context, target in row_pairs:
        head = prompt + tuple(context)
        rows.append(head + tuple(target[:-1]))
        reads.append([(len(head) - 1 + j, (t,)) for j, t in enumerate(target)])
    k = len(pairs[0])
    grid = np.asarray(batch['image_grid_thw'])
    logp = self._run(rows, reads, grid, image_embeds, repeat=k)
    lengths = np.array([len(r) for r in reads])
    used = np.arange(logp.shape[1])[None, :] < lengths[:, None]
    scores = np.where(used, logp[:, :, 0], 0.0).sum(1).reshape(len(pairs), k)
    return scores[:n]

  def _heads(self, batch, chains):
    """Per row: its prompt tokens + chain + the answer prefix; the rows padded as `encode`
    pads them (copies of the first)."""
    ids, mask = np.asarray(batch['input_ids']), np.asarray(batch['attention_mask'])
    heads = [
      tuple(row[m == 1]) + encode_text(self.tokenizer, f'{chain} {self.prefix}')
      for row, m, chain in zip(ids, mask, chains)
    ]
    return heads + heads[:1] * (self._padded(len(heads)) - len(heads))

  def _run(self, rows, reads, grid, image_embeds, repeat) -> np.ndarray:
    """Left-pads token rows, runs the jitted forward, returns log p [R, T, K] at `reads`
    (per row, a list of (position, token ids)); unused read slots point at the last token.
    On several processes the padded length and reads are the longest any process has."""
    m = self.pad_multiple
    length = -(-max(len(r) for r in rows) // m) * m
    t = max(len(r) for r in reads)
    if self._mesh is not None:
      length, t = hosts.agreed_max([length, t])
    grid = np.repeat(np.asarray(grid).reshape(-1, 3)[:1], len(rows), axis=0)  # one per batch
    input_ids = np.full((len(rows), length), self.pad_id, np.int32)
    attention_mask = np.zeros((len(rows), length), np.int32)
    k = len(reads[0][0][1])
    positions = np.full((len(rows), t), length - 1, np.int32)
    targets = np.zeros((len(rows), t, k), np.int32)
    for i, (row, read) in enumerate(zip(rows, reads)):
      pad = length - len(row)
      input_ids[i, pad:] = row
      attention_mask[i, pad:] = 1
      for j, (pos, toks) in enumerate(read):
        positions[i, j] = pad + pos
        targets[i, j] = toks

    position_ids, _ = get_rope_index(input_ids, attention_mask, grid, self.config)
    position_ids = np.ascontiguousarray(np.swapaxes(position_ids, 0, 1), np.int32)  # [R, 3, L]
    out = _token_logps(
      self._graphdef,
      repeat,
      self._state,
      *map(self._place, (input_ids, attention_mask, position_ids)),
      image_embeds,
      *map(self._place, (positions, targets)),
    )
    return np.asarray(self._rows_back(out, len(rows)), np.float64)
