"""The teacher-forced answer distribution: p(decision | image, prompt, chain, answer prefix).

Thinking interference and the drift probe teacher-force `prompt + chain + answer prefix`
('<think> ... </think> The decision is') and read the model's probabilities of the decisions
at that point, renormalised over the decisions. When the decisions start with distinct tokens
that is one next-token read; otherwise each decision's full token sequence (up to the
template's closing '.') is scored.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

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
  return nnx.merge(graphdef, state).encode_images(pixel_values, np.asarray(grid_rows))


@functools.partial(jax.jit, static_argnums=0)
def _token_logps(
  graphdef, state, input_ids, attention_mask, position_ids, image_embeds, positions, targets
):
  """log p(targets [R, T, K] at sequence positions [R, T]) -> [R, T, K]; only T positions are
  projected to the vocabulary."""
  m = nnx.merge(graphdef, state)
  h = m.hidden_states(
    input_ids, attention_mask, position_ids=position_ids, image_embeds=image_embeds
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

  def encode(self, batch):
    grid_rows = tuple(tuple(int(v) for v in row) for row in np.asarray(batch['image_grid_thw']))
    return _encode_images(
      self._graphdef, grid_rows, self._state, jnp.asarray(batch['pixel_values'])
    )

  def distributions(self, batch, chains: Sequence[str], image_embeds) -> np.ndarray:
    """[B, num_decisions] answer distribution after each row's prompt + chains[row]."""
    first = self.tokens.first_token_ids
    if first is None:  # decisions share first tokens: score each decision's whole sequence
      return softmax(self.sequence_logps(batch, chains, image_embeds, self.tokens.sequences))
    heads = self._heads(batch, chains)
    grid = np.asarray(batch['image_grid_thw'])
    logp = self._run(heads, [[(len(h) - 1, first)] for h in heads], grid, image_embeds)  # one read
    return softmax(logp[:, 0, :])

  def sequence_logps(self, batch, chains: Sequence[str], image_embeds, sequences) -> np.ndarray:
    """[B, K] log p(sequences[k] | row's prompt + chains[row] + the answer prefix): each
    candidate's token log-probs summed, one teacher-forced row per (example, candidate)."""
    heads = self._heads(batch, chains)
    rows, reads = [], []
    for h in heads:
      for s in sequences:
        rows.append(h + tuple(s[:-1]))
        reads.append([(len(h) - 1 + j, (t,)) for j, t in enumerate(s)])
    d = len(sequences)
    embeds = jnp.repeat(image_embeds.reshape(len(heads), -1, image_embeds.shape[-1]), d, axis=0)
    grid = np.repeat(np.asarray(batch['image_grid_thw']), d, axis=0)
    logp = self._run(rows, reads, grid, embeds.reshape(-1, embeds.shape[-1]))
    lengths = np.array([len(r) for r in reads])
    used = np.arange(logp.shape[1])[None, :] < lengths[:, None]
    return np.where(used, logp[:, :, 0], 0.0).sum(1).reshape(len(heads), d)

  def _heads(self, batch, chains):
    """Per row: its prompt tokens + chain + the answer prefix."""
    ids, mask = np.asarray(batch['input_ids']), np.asarray(batch['attention_mask'])
    return [
      tuple(row[m == 1]) + encode_text(self.tokenizer, f'{chain} {self.prefix}')
      for row, m, chain in zip(ids, mask, chains)
    ]

  def _run(self, rows, reads, grid, image_embeds) -> np.ndarray:
    """Left-pads token rows, runs the jitted forward, returns log p [R, T, K] at `reads`
    (per row, a list of (position, token ids)); unused read slots point at the last token."""
    m = self.pad_multiple
    length = -(-max(len(r) for r in rows) // m) * m
    input_ids = np.full((len(rows), length), self.pad_id, np.int32)
    attention_mask = np.zeros((len(rows), length), np.int32)
    t = max(len(r) for r in reads)
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
    out = _token_logps(
      self._graphdef,
      self._state,
      input_ids,
      attention_mask,
      np.asarray(position_ids, np.int32),
      image_embeds,
      positions,
      targets,
    )
    return np.asarray(jax.device_get(out), np.float64)
