"""The drift probe (CPO's figure): how far the answer moves when one concept in the chain does.

Report contract (DESIGN.md): `drift.outcome_shift` is the mean total-variation shift of the
answer distribution under synonym substitution; lower is more robust.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from cpo_jax.evaluate.chain_edits import EDITS
from cpo_jax.evaluate.interference import THINKING_KINDS
from cpo_jax.evaluate.scoring import AnswerScorer
from cpo_jax.evaluate.scoring import mean_or_none
from cpo_jax.evaluate.scoring import total_variation
from cpo_jax.knowledge.graph import ConceptGraph


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
    'scoring': scorer.tokens.scoring,
  }
