"""Robustness measurements (METHOD.md section 5): interference curves and the drift probe.

Perception interference transforms the eval batches' pixel_values (the masks of
cpo_jax.perturb, or part of another eval image whose gold decision differs) and decodes
greedily through `answers.predict_decisions`, so accuracy is measured exactly as for the
clean splits.

Thinking interference and the drift probe teacher-force `prompt + chain + answer prefix`
('<think> ... </think> The decision is') and read the answer distribution: the model's
probabilities of the decisions at that point, renormalised over the decisions. When the
decisions start with distinct tokens that is one next-token read; otherwise each decision's
full token sequence (up to the template's closing '.') is scored. Chain edits replace whole
concept sentences, so the graph can judge them:
  synonym     another sentence for the same value: the answer should not move;
  contradict  other valid values for which the graph's rule gives another decision: the answer
              should follow the chain.

Report contract (DESIGN.md): `interference.<kind>.<severity>` is an accuracy (the return of
`interference_report`) and `drift.outcome_shift` the mean total-variation shift of the answer
distribution under synonym substitution (`drift_probe`).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Callable
from typing import Iterable
from typing import Mapping
from typing import Sequence

from flax import nnx
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

from cpo_jax import answers
from cpo_jax import perturb
from cpo_jax.knowledge import drift
from cpo_jax.knowledge.graph import THINK_CLOSE
from cpo_jax.knowledge.graph import ConceptGraph
from cpo_jax.knowledge.graph import GraphError
from cpo_jax.knowledge.graph import _norm as _norm_sentence  # the graph's own sentence matching.

matplotlib.use('Agg')  # files only; no display on servers and TPU VMs.
from matplotlib import pyplot as plt  # noqa: E402

PERCEPTION_KINDS = ('occlude', 'mask_patches', 'noise', 'blur', 'image_swap')
THINKING_KINDS = ('synonym', 'contradict')
# Perception severities are in [0, 1] (see perturb.py; image_swap: share of image tokens taken
# from the other image). Thinking severities are the number of concept sentences edited.
DEFAULT_SEVERITIES = {
  'occlude': (0.5, 1.0),
  'mask_patches': (0.25, 0.5),
  'noise': (0.1, 0.3),
  'blur': (0.5, 1.0),  # sigma 2 and 4 px: synth_drive's colour cues survive less blur
  'image_swap': (0.5, 1.0),
  'synonym': (1, 2),
  'contradict': (1,),
}


# ----------------------------------------------------------------------------- pure helpers


def total_variation(p, q):
  """0.5 * sum |p - q| over the last axis: 0 for equal distributions, 1 for disjoint ones."""
  return 0.5 * np.abs(np.asarray(p, np.float64) - np.asarray(q, np.float64)).sum(-1)


def _softmax(logits):
  z = np.asarray(logits, np.float64)
  z = np.exp(z - z.max(-1, keepdims=True))
  return z / z.sum(-1, keepdims=True)


def _mean(values):
  # None, not NaN, for an empty set: report.json stays strict JSON.
  return float(np.mean(values)) if len(values) else None


def _encode(tokenizer, text):
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
  base = _encode(tokenizer, prefix)
  sequences = []
  for d in graph.decisions:
    full = _encode(tokenizer, f'{prefix} {graph.decision_texts[d]}{suffix}')
    if full[: len(base)] != base or len(full) == len(base):
      raise ValueError(
        f'{d!r}: the answer prefix {prefix!r} does not tokenize the same before '
        f'the decision ({base} vs {full}); cannot read decision tokens'
      )
    sequences.append(full[len(base) :])
  if len(set(sequences)) != len(sequences):
    raise ValueError(f'decisions tokenize identically: {dict(zip(graph.decisions, sequences))}')
  return DecisionTokens(tuple(sequences))


# ----------------------------------------------------------------------------- chain edits


@dataclasses.dataclass(frozen=True)
class ChainEdit:
  chain: str  # '<think> ... </think>' with the edited sentence(s)
  assignment: dict  # the concept values the edited chain states
  concepts: tuple[str, ...]  # the edited concepts
  kind: str  # 'synonym' | 'contradict'
  expected_decision: str  # the graph's decision for the edited chain


def synonym_edit(
  graph: ConceptGraph,
  assignment: Mapping[str, str],
  rng: np.random.Generator,
  *,
  num_edits: int = 1,
  sentences: Mapping[str, str] | None = None,
  among: Sequence[str] | None = None,
) -> ChainEdit | None:
  """Rewords `num_edits` concept sentences with another sentence for the same value.

  `sentences` is the current wording per concept (e.g. from parse_chain; canonical if absent);
  `among` restricts which concepts may be edited. None when too few concepts have another
  wording.
  """
  sentences = dict(sentences or {})
  options = {}
  for c in graph.concepts:
    if among is not None and c.name not in among:
      continue
    current = _norm_sentence(sentences.get(c.name, c.phrases[assignment[c.name]]))
    alternatives = [s for s in c.sentences(assignment[c.name]) if _norm_sentence(s) != current]
    if alternatives:
      options[c.name] = alternatives
  if len(options) < num_edits:
    return None
  names = list(options)
  chosen = tuple(names[i] for i in sorted(rng.choice(len(names), num_edits, replace=False)))
  for c in chosen:
    sentences[c] = options[c][int(rng.integers(len(options[c])))]
  return ChainEdit(
    graph.chain_text(assignment, sentences),
    dict(assignment),
    chosen,
    'synonym',
    graph.decide(assignment),
  )


def contradict_edit(
  graph: ConceptGraph,
  assignment: Mapping[str, str],
  rng: np.random.Generator,
  *,
  num_edits: int = 1,
  sentences: Mapping[str, str] | None = None,
  among: Sequence[str] | None = None,
) -> ChainEdit | None:
  """States other values for exactly `num_edits` concepts such that the decision changes.

  Chosen uniformly among all valid such edits (graphs are small: enumeration is exact).
  Edited concepts get their canonical sentence, the others keep `sentences`. None when no
  such edit exists (e.g. red light AND a crossing pedestrian: one edit still gives stop).
  """
  names = [c for c in graph.concept_names if among is None or c in among]
  before = graph.decide(assignment)
  candidates = []
  for combo in itertools.combinations(names, num_edits):
    others = [[v for v in graph.concept(c).values if v != assignment[c]] for c in combo]
    for values in itertools.product(*others):
      b = dict(assignment, **dict(zip(combo, values)))
      if graph.is_valid(b) and graph.decide(b) != before:
        candidates.append((combo, b))
  if not candidates:
    return None
  combo, b = candidates[int(rng.integers(len(candidates)))]
  kept = {c: s for c, s in (sentences or {}).items() if c not in combo}
  return ChainEdit(graph.chain_text(b, kept), b, combo, 'contradict', graph.decide(b))


EDITS = {'synonym': synonym_edit, 'contradict': contradict_edit}


def base_chain(graph: ConceptGraph, text: str, gold: Mapping[str, str]) -> tuple[dict, dict, bool]:
  """(assignment, sentences, own): the model's own chain when it is closed and states every
  concept consistently, else the gold assignment in canonical wording (own=False)."""
  try:
    found, used = graph.parse_chain(text) if THINK_CLOSE in text else ({}, {})
  except GraphError:  # a chain that contradicts itself
    found, used = {}, {}
  if set(found) == set(graph.concept_names) and graph.is_valid(found):
    return dict(found), dict(used), True
  return dict(gold), {}, False


# ----------------------------------------------------------------------------- perception


def perturb_batch(batch, kind: str, severity: float, rng, *, layout: perturb.PatchLayout):
  """The eval batch with masked pixel_values (kinds of perturb.PERCEPTION_MASKS).

  occlude uses the batch's evidence boxes, in pixels of the processed image (the pipeline
  rescales them when it resizes an image).
  """
  grid = perturb.grid_of(batch['image_grid_thw'])
  pixels = jnp.asarray(batch['pixel_values'])
  if kind == 'occlude':
    boxes = jnp.asarray(batch['boxes'], jnp.float32)
    out = perturb.occlude_boxes(rng, pixels, grid, boxes, severity, layout=layout)
  elif kind in ('mask_patches', 'noise', 'blur'):
    out = perturb.PERCEPTION_MASKS[kind](rng, pixels, grid, None, severity, layout=layout)
  else:
    raise ValueError(
      f'perturb_batch: kind {kind!r}; expected one of '
      f'{("occlude", "mask_patches", "noise", "blur")} (image_swap: swap_images)'
    )
  return dict(batch, pixel_values=np.asarray(out))


def swap_images(
  batch, severity: float, rng: np.random.Generator, pool: dict, *, layout: perturb.PatchLayout
):
  """Replaces a `severity` share of each image's tokens (merge windows, random) by the same
  tokens of a donor image whose gold decision differs; 1.0 swaps the whole image.

  Donors come from the batch, else from `pool` (decision -> one image's rows from earlier
  batches; updated here). Rows with no donor yet are marked invalid (not scored).
  Returns (batch, donor decision per row, -1 where none).
  """
  grid = perturb.grid_of(batch['image_grid_thw'])
  decision = np.asarray(batch['decision'])
  valid = np.asarray(batch['valid'], bool)
  b = len(decision)
  x = np.asarray(batch['pixel_values']).reshape(b, -1, layout.patch_dim)
  donors, donor_decision, keep = x.copy(), np.full(b, -1, np.int64), valid.copy()
  for i in range(b):
    in_batch = [j for j in range(b) if valid[j] and decision[j] != decision[i]]
    pooled = [d for d in sorted(pool) if d != decision[i]]
    if in_batch:
      j = in_batch[int(rng.integers(len(in_batch)))]
      donors[i], donor_decision[i] = x[j], decision[j]
    elif pooled:
      d = pooled[int(rng.integers(len(pooled)))]
      donors[i], donor_decision[i] = pool[d], d
    else:
      keep[i] = False
  for j in np.flatnonzero(valid):
    pool[int(decision[j])] = x[j].copy()
  group = layout.merge_size**2  # one LLM image token = merge_size**2 consecutive rows
  units = int(np.prod(grid)) // group
  k = int(round(float(np.clip(severity, 0.0, 1.0)) * units))
  chosen = np.stack([rng.permutation(units) < k for _ in range(b)])
  chosen = np.repeat(chosen, group, axis=1)[:, :, None]
  out = np.where(chosen, donors, x).reshape(np.shape(batch['pixel_values']))
  return dict(batch, pixel_values=out.astype(np.float32), valid=keep), donor_decision


# ----------------------------------------------------------------------------- answer distribution


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
    ids, mask = np.asarray(batch['input_ids']), np.asarray(batch['attention_mask'])
    grid = np.asarray(batch['image_grid_thw'])
    heads = [
      tuple(row[m == 1]) + _encode(self.tokenizer, f'{chain} {self.prefix}')
      for row, m, chain in zip(ids, mask, chains)
    ]
    first = self.tokens.first_token_ids
    if first is not None:  # one read at the last position
      logp = self._run(heads, [[(len(h) - 1, first)] for h in heads], grid, image_embeds)
      return _softmax(logp[:, 0, :])
    # Sequence scoring: one row per (example, decision); sum the decision tokens' log-probs.
    seqs = self.tokens.sequences
    rows, reads = [], []
    for h in heads:
      for s in seqs:
        rows.append(h + s[:-1])
        reads.append([(len(h) - 1 + j, (t,)) for j, t in enumerate(s)])
    d = len(seqs)
    embeds = jnp.repeat(image_embeds.reshape(len(heads), -1, image_embeds.shape[-1]), d, axis=0)
    logp = self._run(rows, reads, np.repeat(grid, d, axis=0), embeds.reshape(-1, embeds.shape[-1]))
    lengths = np.array([len(r) for r in reads])
    used = np.arange(logp.shape[1])[None, :] < lengths[:, None]
    totals = np.where(used, logp[:, :, 0], 0.0).sum(1)
    return _softmax(totals.reshape(len(heads), d))

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
    from cpo_jax.models import get_rope_index  # host-side numpy, transformers' semantics.

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


# ----------------------------------------------------------------------------- interference


def _perturbed_batches(batches, kind, severity, key, *, layout, donors):
  """Applies one interference to every batch; collects the swap donors' decisions of scored rows."""
  pool = {}
  swap_rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).astype(np.uint64).tolist())
  for i, batch in enumerate(batches):
    if kind == 'image_swap':
      batch, donor = swap_images(batch, severity, swap_rng, pool, layout=layout)
      donors.extend(donor[np.asarray(batch['valid'], bool)].tolist())
    else:
      batch = perturb_batch(batch, kind, severity, jax.random.fold_in(key, i), layout=layout)
    yield batch


def _accuracy_cell(predicted, gold):
  return {
    'accuracy': float(np.mean(predicted == gold)) if len(gold) else None,
    'n': int(len(gold)),
    'unparsed': int((predicted < 0).sum()),
  }


def interference_details(
  model,
  batches_fn: Callable[[], Iterable[dict]],
  *,
  processors,
  graph: ConceptGraph,
  kinds_and_severities: Mapping[str, Sequence] | None = None,
  max_new_tokens: int,
  rng_seed: int = 0,
  scorer=None,
):
  """Every interference cell with its diagnostics: {kind: {str(severity): cell}}.

  'none' -> {'0': clean greedy accuracy}. Perception cells: accuracy (vs the original gold),
  n, unparsed; image_swap adds `follows_donor` (answers the donor image's decision).
  Thinking cells (model's own chain when parseable, else the gold chain, edited and
  teacher-forced): accuracy = the answer is the graph's decision for the edited chain,
  `unchanged` = same answer as for the unedited chain, `own_chain` = share of rows whose
  own chain was used, `skipped` = rows with no such edit.
  `batches_fn()` must give the same eval batches (make_eval_batches format) on every call.
  `scorer`: an AnswerScorer to reuse (e.g. the one given to drift_probe).
  """
  kinds = dict(DEFAULT_SEVERITIES if kinds_and_severities is None else kinds_and_severities)
  unknown = [k for k in kinds if k not in PERCEPTION_KINDS + THINKING_KINDS]
  if unknown:
    raise ValueError(
      f'unknown interference kinds {unknown}; known: {PERCEPTION_KINDS + THINKING_KINDS}'
    )
  layout = perturb.PatchLayout.from_processor(processors.image_processor)
  decode = functools.partial(
    answers.predict_decisions,
    model,
    tokenizer=processors.tokenizer,
    graph=graph,
    max_new_tokens=max_new_tokens,
  )
  predicted, gold, texts = decode(batches_fn(), desc='interference: none')
  report = {'none': {'0': _accuracy_cell(predicted, gold)}}
  key = jax.random.key(rng_seed)
  for kind in (k for k in kinds if k in PERCEPTION_KINDS):
    report[kind] = {}
    for severity in kinds[kind]:
      # The key depends on (kind, severity) only: a cell does not change with the others asked.
      cell_key = jax.random.fold_in(
        jax.random.fold_in(key, PERCEPTION_KINDS.index(kind)), int(round(1000 * float(severity)))
      )
      donors = []
      batches = _perturbed_batches(
        batches_fn(), kind, severity, cell_key, layout=layout, donors=donors
      )
      predicted, gold, _ = decode(batches, desc=f'interference: {kind} {severity}')
      cell = _accuracy_cell(predicted, gold)
      if kind == 'image_swap':
        cell['follows_donor'] = _mean(predicted == np.asarray(donors)) if donors else None
      report[kind][str(severity)] = cell
  thinking = {k: v for k, v in kinds.items() if k in THINKING_KINDS}
  if thinking:
    scorer = scorer or AnswerScorer(model, processors, graph)
    report.update(_thinking_interference(scorer, batches_fn(), texts, thinking, graph, rng_seed))
  return report


def _thinking_interference(scorer, batches, texts, kinds, graph, rng_seed):
  cells = {
    (kind, s): {'hit': [], 'unchanged': [], 'own': [], 'skipped': 0}
    for kind, sevs in kinds.items()
    for s in sevs
  }
  text_iter = iter(texts)
  for batch in batches:
    valid = np.asarray(batch['valid'], bool)
    bases = []
    for concepts, keep in zip(batch['concepts'], valid):
      gold = graph.assignment_from_ids(concepts)
      # texts hold only the valid rows, in order; filler rows reuse the gold chain.
      bases.append(base_chain(graph, next(text_iter), gold) if keep else (gold, {}, False))
    embeds = scorer.encode(batch)
    p0 = scorer.distributions(batch, [graph.chain_text(a, s) for a, s, _ in bases], embeds)
    for (kind, severity), cell in cells.items():
      edits = [
        EDITS[kind](
          graph,
          a,
          np.random.default_rng([rng_seed, THINKING_KINDS.index(kind), int(severity), int(idx)]),
          num_edits=int(severity),
          sentences=s,
        )
        for (a, s, _), idx in zip(bases, batch['index'])
      ]
      scored = [i for i in np.flatnonzero(valid) if edits[i] is not None]
      cell['skipped'] += int(valid.sum()) - len(scored)
      if not scored:
        continue
      chains = [
        e.chain if e is not None else graph.chain_text(a, s) for e, (a, s, _) in zip(edits, bases)
      ]
      p1 = scorer.distributions(batch, chains, embeds)
      for i in scored:
        answer = int(np.argmax(p1[i]))
        cell['hit'].append(answer == graph.decision_id(edits[i].expected_decision))
        cell['unchanged'].append(answer == int(np.argmax(p0[i])))
        cell['own'].append(bases[i][2])
  out = {}
  for (kind, severity), cell in cells.items():
    out.setdefault(kind, {})[str(severity)] = {
      'accuracy': _mean(cell['hit']),
      'n': len(cell['hit']),
      'unchanged': _mean(cell['unchanged']),
      'own_chain': _mean(cell['own']),
      'skipped': cell['skipped'],
    }
  return out


def interference_report(
  model,
  batches_fn: Callable[[], Iterable[dict]],
  *,
  processors,
  graph: ConceptGraph,
  kinds_and_severities: Mapping[str, Sequence] | None = None,
  max_new_tokens: int,
  rng_seed: int = 0,
) -> dict:
  """{kind: {str(severity): accuracy}} (report.json's `interference`); see interference_details."""
  details = interference_details(
    model,
    batches_fn,
    processors=processors,
    graph=graph,
    kinds_and_severities=kinds_and_severities,
    max_new_tokens=max_new_tokens,
    rng_seed=rng_seed,
  )
  return accuracies(details)


def accuracies(details: Mapping) -> dict:
  """{kind: {severity: cell}} -> {kind: {severity: accuracy}}."""
  return {
    kind: {s: cell['accuracy'] for s, cell in cells.items()} for kind, cells in details.items()
  }


# ----------------------------------------------------------------------------- drift probe


def drift_probe(
  model,
  batches: Iterable[dict],
  *,
  processors,
  graph: ConceptGraph,
  rng_seed: int = 0,
  scorer: AnswerScorer | None = None,
) -> dict:
  """Outcome-distribution shift when ONE concept sentence of the gold chain is substituted.

  For every example and every concept: the answer distribution after the gold chain vs after
  the chain with that concept's sentence replaced by a near-synonym (`outcome_shift`, mean
  total variation; lower is more robust) or by a value that changes the graph's decision
  (`counterfactual_shift`, should be large for a model that reasons from its chain;
  `counterfactual_follow`: the answer is the new decision). `teacher_forced_accuracy`: the
  gold chain's answer is the gold decision.
  """
  scorer = scorer or AnswerScorer(model, processors, graph)
  names = graph.concept_names
  shifts = {kind: {c: [] for c in names} for kind in THINKING_KINDS}
  follow, base_correct = [], []
  for batch in batches:
    valid = np.asarray(batch['valid'], bool)
    golds = [graph.assignment_from_ids(c) for c in batch['concepts']]
    embeds = scorer.encode(batch)
    p0 = scorer.distributions(batch, [graph.chain_text(a) for a in golds], embeds)
    base_correct += (np.argmax(p0, -1) == np.asarray(batch['decision']))[valid].tolist()
    for ki, kind in enumerate(THINKING_KINDS):
      for ci, c in enumerate(names):
        edits = [
          EDITS[kind](graph, a, np.random.default_rng([rng_seed, ki, ci, int(idx)]), among=(c,))
          for a, idx in zip(golds, batch['index'])
        ]
        scored = [i for i in np.flatnonzero(valid) if edits[i] is not None]
        if not scored:
          continue
        chains = [e.chain if e is not None else graph.chain_text(a) for e, a in zip(edits, golds)]
        p1 = scorer.distributions(batch, chains, embeds)
        tv = total_variation(p0, p1)
        for i in scored:
          shifts[kind][c].append(float(tv[i]))
          if kind == 'contradict':
            follow.append(int(np.argmax(p1[i])) == graph.decision_id(edits[i].expected_decision))
  flat = {kind: [v for c in names for v in shifts[kind][c]] for kind in THINKING_KINDS}
  return {
    'outcome_shift': _mean(flat['synonym']),
    'counterfactual_shift': _mean(flat['contradict']),
    'counterfactual_follow': _mean(follow),
    'teacher_forced_accuracy': _mean(base_correct),
    'per_concept': {
      c: {
        'outcome_shift': _mean(shifts['synonym'][c]),
        'counterfactual_shift': _mean(shifts['contradict'][c]),
        'n_synonym': len(shifts['synonym'][c]),
        'n_counterfactual': len(shifts['contradict'][c]),
      }
      for c in names
    },
    'n': len(base_correct),
    'scoring': scorer.tokens.scoring,
  }


# ----------------------------------------------------------------------------- plot


def plot_robustness(report_section: Mapping, path: str) -> None:
  """Accuracy vs severity per interference kind (perception; thinking by number of edited
  sentences) and the drift bars. `report_section` holds 'interference' and/or 'drift' (e.g.
  the whole report)."""
  interference = report_section.get('interference', {})
  drift_result = report_section.get('drift')
  clean = interference.get('none', {}).get('0')
  fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
  for ax, kinds, xlabel in (
    (axes[0], PERCEPTION_KINDS, 'severity'),
    (axes[1], THINKING_KINDS, 'edited concept sentences'),
  ):
    for kind in (k for k in kinds if k in interference):
      points = sorted((float(s), a) for s, a in interference[kind].items() if a is not None)
      if kind in PERCEPTION_KINDS and clean is not None:
        points = [(0.0, clean)] + points  # severity 0 is the clean image.
      if points:
        ax.plot(*zip(*points), marker='o', label=kind)
    if clean is not None:
      ax.axhline(clean, color='gray', ls=':', lw=1)
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel(xlabel)
    ax.set_ylabel('decision accuracy')
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=7)
  axes[0].set_title('perception interference')
  axes[1].set_title('thinking interference (teacher-forced)')
  ax = axes[2]
  if drift_result:
    labels = ['all'] + list(drift_result.get('per_concept', {}))
    rows = [drift_result] + list(drift_result.get('per_concept', {}).values())
    x = np.arange(len(labels))
    for offset, key, name in (
      (-0.2, 'outcome_shift', 'synonym (outcome_shift)'),
      (0.2, 'counterfactual_shift', 'contradict'),
    ):
      ax.bar(x + offset, [r.get(key) or 0.0 for r in rows], width=0.4, label=name)
    ax.set_xticks(x, labels, rotation=30, ha='right', fontsize=7)
    ax.legend(fontsize=7)
  ax.set_ylim(0, 1.05)
  ax.set_ylabel('total variation')
  ax.set_title('drift probe')
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
