"""The drift probe (CPO's figure): how far the answer moves when one concept in the chain does.

Report contract (DESIGN.md): `drift.outcome_shift` is the mean total-variation shift of the
answer distribution under synonym substitution; lower is more robust.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from cpo_jax.evaluate import chain_edits
from cpo_jax.evaluate.interference import THINKING_KINDS
from cpo_jax.evaluate.scoring import AnswerScorer
from cpo_jax.evaluate.scoring import mean_or_none
from cpo_jax.evaluate.scoring import total_variation
from cpo_jax.knowledge.graph import ConceptGraph

# Per metric, the rows it could not be measured on (report field `not_applicable`).
_METRICS = ('outcome_shift', 'counterfactual_shift', 'counterfactual_follow')


def drift_probe(
  model,
  batches: Iterable[dict],
  *,
  processors,
  graph: ConceptGraph,
  rng_seed: int = 0,
  scorer: AnswerScorer | None = None,
  source=None,
) -> dict:
  """Outcome-distribution shift when ONE concept of the gold chain is substituted.

  For every example and every concept: the answer distribution after the gold chain vs after
  the chain with that concept edited to a near-synonym (`outcome_shift`, mean total variation;
  lower is more robust) or to a value that changes the graph's decision
  (`counterfactual_shift`, should be large for a model that reasons from its chain;
  `counterfactual_follow`: the answer is the new decision, see ProbeRow.expected).
  `teacher_forced_accuracy`: the gold chain's answer is the gold decision.

  The gold chain is the graph's chain of the row's concepts, edited by whole sentences; where
  `source` gives pairs (real data) it is the record's own chain, edited in place on its concept
  mentions (chain_edits.mention_edit). Rows a metric cannot be measured on are counted in
  `not_applicable[metric]` and not scored: no chain or no such edit for any concept (the
  shifts), no labelled gold decision (teacher_forced_accuracy; -1 is never scored) or no known
  expected decision (counterfactual_follow).
  """
  scorer = scorer or AnswerScorer(model, processors, graph)
  names = graph.concept_names
  shifts = {kind: {c: [] for c in names} for kind in THINKING_KINDS}
  follow, base_correct = [], []
  not_applicable = dict.fromkeys(_METRICS + ('teacher_forced_accuracy',), 0)
  for batch in batches:
    valid = np.asarray(batch['valid'], bool)
    gold = np.asarray(batch['decision'])
    canonical = [graph.assignment_from_ids(c) for c in batch['concepts']]
    if chain_edits.uses_records(source):
      rows = chain_edits.record_rows(graph, batch, source)
    else:
      rows = [chain_edits.ProbeRow(graph.chain_text(a), a, {}) for a in canonical]
    # A row without a chain still needs one in the static batch; it is never scored.
    base = [r.chain or graph.chain_text(a) for r, a in zip(rows, canonical)]
    embeds = scorer.encode(batch)
    p0 = scorer.distributions(batch, base, embeds)
    measured = [i for i in np.flatnonzero(valid) if rows[i].chain is not None and gold[i] >= 0]
    base_correct += [int(np.argmax(p0[i])) == int(gold[i]) for i in measured]
    not_applicable['teacher_forced_accuracy'] += int(valid.sum()) - len(measured)
    edited = {metric: set() for metric in _METRICS}
    for ki, kind in enumerate(THINKING_KINDS):
      for ci, c in enumerate(names):
        edits = [
          r.edit(graph, kind, np.random.default_rng([rng_seed, ki, ci, int(idx)]), among=(c,))
          for r, idx in zip(rows, batch['index'])
        ]
        scored = [i for i in np.flatnonzero(valid) if edits[i] is not None]
        if not scored:
          continue
        p1 = scorer.distributions(
          batch, [e.chain if e is not None else b for e, b in zip(edits, base)], embeds
        )
        tv = total_variation(p0, p1)
        for i in scored:
          shifts[kind][c].append(float(tv[i]))
          edited['outcome_shift' if kind == 'synonym' else 'counterfactual_shift'].add(i)
          expected = rows[i].expected(graph, edits[i], int(gold[i]))
          if kind == 'contradict' and expected is not None:
            follow.append(int(np.argmax(p1[i])) == expected)
            edited['counterfactual_follow'].add(i)
    for metric in _METRICS:
      not_applicable[metric] += int(valid.sum()) - len(edited[metric])
  flat = {kind: [v for c in names for v in shifts[kind][c]] for kind in THINKING_KINDS}
  return {
    'outcome_shift': mean_or_none(flat['synonym']),
    'counterfactual_shift': mean_or_none(flat['contradict']),
    'counterfactual_follow': mean_or_none(follow),
    'teacher_forced_accuracy': mean_or_none(base_correct),
    'per_concept': {
      c: {
        'outcome_shift': mean_or_none(shifts['synonym'][c]),
        'counterfactual_shift': mean_or_none(shifts['contradict'][c]),
        'n_synonym': len(shifts['synonym'][c]),
        'n_counterfactual': len(shifts['contradict'][c]),
      }
      for c in names
    },
    'n': len(base_correct),
    'not_applicable': not_applicable,
    'chains': 'record' if chain_edits.uses_records(source) else 'graph',
    'scoring': scorer.tokens.scoring,
  }
