"""The concept readout: which concept a chain misreads, and under which nuisance.

The `ood` errors of an SFT model follow its own chain, and the chain misreads a concept (the
traffic light read off the sky). This probe measures that reading directly: for every record
and concept, the teacher-forced distribution over the concept's values' sentences,

    p(value v of concept i | image, prompt, '<think>', the gold sentences of concepts 0..i-1)

(the chain order of graph.chain_text; each sentence's token log-probs summed, normalised over
the concept's values). A concept is `misread` on a record when its gold value is not the most
probable. The figures are split by whether the record's nuisance agrees with its decision (the
decision is one the nuisance value predicts, `ShortcutMap` read from the train split's labels)
and given per (concept, nuisance value, gold value): what the preference pairs have to teach.
"""

from __future__ import annotations

from typing import Iterable
from typing import Sequence

import numpy as np

from cpo_jax.data.thinking_pairs import ShortcutMap
from cpo_jax.data.thinking_pairs import split_labels
from cpo_jax.evaluate import hosts
from cpo_jax.evaluate.scoring import AnswerScorer
from cpo_jax.evaluate.scoring import encode_text
from cpo_jax.evaluate.scoring import mean_or_none
from cpo_jax.knowledge.graph import THINK_OPEN
from cpo_jax.knowledge.graph import ConceptGraph

AGREEMENT = ('agrees', 'disagrees')


def shortcut_map(train_source, graph: ConceptGraph) -> ShortcutMap | None:
  """What each nuisance value predicts in the split the model learned from (its labels, read
  without rendering where the source can); None without a source."""
  if train_source is None:
    return None
  decision, nuisance = split_labels(train_source)
  return ShortcutMap.from_labels(
    decision, nuisance, len(graph.decisions), len(graph.nuisance_values)
  )


def readout_rows(
  model,
  batches: Iterable[dict],
  *,
  processors,
  graph: ConceptGraph,
  scorer: AnswerScorer | None = None,
  blank=None,
) -> list[dict]:
  """Per record, in record order: index, nuisance, decision, gold value ids, and `p` (per
  concept, the distribution over its values' sentences).

  `batches`: without `blank`, the whole split; with it, this process's share (data-parallel
  over hosts, as drift_probe reads): every process returns what one reading the whole split
  would.
  """
  scorer = scorer or AnswerScorer(model, processors, graph)
  if blank is not None:
    batches = hosts.lockstep(batches, lambda: hosts.probe_blank(blank(), len(graph.concepts)))
  pairs_of = _ReadoutPairs(processors.tokenizer, graph)
  rows = [r for batch in batches for r in _readout_batch(batch, scorer, graph, pairs_of)]
  return hosts.rows_by_index(rows, gather=blank is not None)


class _ReadoutPairs:
  """Per gold assignment, the (context, target) token pairs of every concept's values, in
  concept order then value order (tokenized once per assignment)."""

  def __init__(self, tokenizer, graph: ConceptGraph):
    self.tokenizer, self.graph, self._cache = tokenizer, graph, {}

  def __call__(self, gold_ids: Sequence[int]) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    key = tuple(int(i) for i in gold_ids)
    if key not in self._cache:
      gold = self.graph.assignment_from_ids(key)
      out, text = [], THINK_OPEN
      for concept in self.graph.concepts:
        context = encode_text(self.tokenizer, text)
        for value in concept.values:
          full = encode_text(self.tokenizer, f'{text} {concept.phrases[value]}')
          if full[: len(context)] != context or len(full) == len(context):
            # Only then is the sentence's score the probability of the text that follows.
            raise ValueError(
              f'concept readout: {text!r} does not tokenize the same before the sentence of '
              f'{concept.name}={value!r} ({context} vs {full}); cannot score that sentence'
            )
          out.append((context, full[len(context) :]))
        text = f'{text} {concept.phrases[gold[concept.name]]}'
      self._cache[key] = out
    return self._cache[key]


def _readout_batch(batch, scorer: AnswerScorer, graph: ConceptGraph, pairs_of) -> list[dict]:
  """Per valid row: its index, nuisance, decision, gold value ids and, per concept, the
  distribution over the concept's values. One scorer call per batch on every process."""
  concepts = np.asarray(batch['concepts'])
  logps = scorer.continuation_logps(batch, [pairs_of(c) for c in concepts], scorer.encode(batch))
  splits = np.cumsum([len(c.values) for c in graph.concepts])[:-1]
  valid = np.asarray(batch['valid'], bool)
  rows = []
  for i in np.flatnonzero(valid):
    dists = [_normalised(s) for s in np.split(logps[i], splits)]
    rows.append(
      {
        'index': int(batch['index'][i]),
        'nuisance': int(batch['nuisance'][i]),
        'decision': int(batch['decision'][i]),
        'gold': [int(v) for v in concepts[i]],
        'p': [d.tolist() for d in dists],
      }
    )
  return rows


def _normalised(logps: np.ndarray) -> np.ndarray:
  p = np.exp(logps - logps.max())
  return p / p.sum()


def summarize(rows: Sequence[dict], graph: ConceptGraph, shortcut: ShortcutMap | None) -> dict:
  """The report's `concept_readout` from the rows (pure).

  `misread`: the mean over concepts of the share of records whose gold value is not the most
  probable (lower is better). Per concept: `p_gold` (mean p(gold value)), `misread`, `n`; where
  records carry a nuisance, `by_nuisance[value][gold value]` = {p_gold, misread, n,
  mean_p (the mean distribution: what the gold value is read as)}; with a `shortcut` map also
  `agrees` / `disagrees` (the record's decision is / is not one its nuisance predicts).
  Records without a nuisance (-1) count in `no_nuisance` and only in the unsplit figures.
  """
  known = [r for r in rows if r['nuisance'] >= 0]
  out = {
    'n': len(rows),
    'misread': None,
    'per_concept': {},
    'no_nuisance': len(rows) - len(known),
  }
  if shortcut is not None and known:
    out['shortcut'] = shortcut.describe(graph)
  for ci, concept in enumerate(graph.concepts):
    read = [(r, r['p'][ci], r['gold'][ci]) for r in rows]
    section = _figures([(p, g) for _, p, g in read])
    if known:
      section['by_nuisance'] = {
        graph.nuisance_values[v]: {
          concept.values[g]: dict(
            _figures([(p, gold) for r, p, gold in read if (r['nuisance'], gold) == (v, g)]),
            mean_p=_mean_distribution(
              [p for r, p, gold in read if (r['nuisance'], gold) == (v, g)], concept.values
            ),
          )
          for g in sorted({gold for r, _, gold in read if r['nuisance'] == v})
        }
        for v in sorted({r['nuisance'] for r in known})
      }
    if shortcut is not None and known:
      for name in AGREEMENT:
        section[name] = _figures([(p, g) for r, p, g in read if _agreement(r, shortcut) == name])
    out['per_concept'][concept.name] = section
  out['misread'] = mean_or_none(
    [s['misread'] for s in out['per_concept'].values() if s['misread'] is not None]
  )
  return out


def _agreement(row: dict, shortcut: ShortcutMap) -> str | None:
  """'agrees' when the row's decision is one its nuisance predicts, 'disagrees' when the
  nuisance predicts others, None when it predicts nothing or the decision is unlabelled."""
  predicted = shortcut.decisions_for(row['nuisance'])
  if not predicted or row['decision'] < 0:
    return None
  return 'agrees' if row['decision'] in predicted else 'disagrees'


def _figures(reads: Sequence[tuple[Sequence[float], int]]) -> dict:
  """{p_gold, misread, n} of (distribution, gold value id) reads."""
  return {
    'p_gold': mean_or_none([p[g] for p, g in reads]),
    'misread': mean_or_none([float(int(np.argmax(p)) != g) for p, g in reads]),
    'n': len(reads),
  }


def _mean_distribution(dists: Sequence[Sequence[float]], values: Sequence[str]) -> dict:
  return dict(zip(values, np.mean(np.asarray(dists, np.float64), axis=0).tolist()))


def misread_by_nuisance(section: dict) -> tuple[list[str], list[str], np.ndarray]:
  """(concepts, nuisance values, [concepts, values] misread share over all gold values; NaN
  where no record) from a report's `concept_readout` with `by_nuisance` (for the heat map)."""
  concepts = [c for c, s in section['per_concept'].items() if 'by_nuisance' in s]
  values = list(
    dict.fromkeys(v for c in concepts for v in section['per_concept'][c]['by_nuisance'])
  )
  table = np.full((len(concepts), len(values)), np.nan)
  for i, c in enumerate(concepts):
    for j, v in enumerate(values):
      cells = section['per_concept'][c]['by_nuisance'].get(v, {}).values()
      n = sum(cell['n'] for cell in cells)
      if n:
        table[i, j] = sum(cell['misread'] * cell['n'] for cell in cells) / n
  return concepts, values, table
