"""The drift probe (CPO's figure): how far the answer moves when one concept in the chain does.

Report contract (DESIGN.md): `drift.outcome_shift` is the mean total-variation shift of the
answer distribution under synonym substitution; lower is more robust.
"""

from __future__ import annotations

from typing import Callable
from typing import Iterable

import numpy as np

from cpo_jax.evaluate import chain_edits
from cpo_jax.evaluate import hosts
from cpo_jax.evaluate.interference import THINKING_KINDS
from cpo_jax.evaluate.scoring import AnswerScorer
from cpo_jax.evaluate.scoring import mean_or_none
from cpo_jax.evaluate.scoring import total_variation
from cpo_jax.knowledge.graph import ConceptGraph

# What a row records per concept: the two shifts, and whether the answer followed.
_PER_CONCEPT = (*THINKING_KINDS, 'follow')


def drift_probe(
  model,
  batches: Iterable[dict],
  *,
  processors,
  graph: ConceptGraph,
  rng_seed: int = 0,
  scorer: AnswerScorer | None = None,
  source=None,
  blank: Callable[[], dict] | None = None,
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

  `batches`: without `blank`, the whole probe split (every process passes the same batches);
  with it, this process's share (data-parallel over hosts, as answers.predict_split reads):
  a process that runs out feeds `blank()` until all have, and the rows' results are gathered
  in record order, so every process returns what one process reading the whole split would.
  """
  scorer = scorer or AnswerScorer(model, processors, graph)
  if blank is not None:
    batches = hosts.lockstep(batches, lambda: hosts.probe_blank(blank(), len(graph.concepts)))
  rows = [
    r
    for batch in batches
    for r in _probe_batch(batch, scorer=scorer, graph=graph, source=source, rng_seed=rng_seed)
  ]
  return _summary(hosts.rows_by_index(rows, gather=blank is not None), graph, source, scorer)


def _probe_batch(batch, *, scorer, graph, source, rng_seed) -> list[dict]:
  """What each valid row of the batch measured: `base_correct` (None: not measured), and per
  concept the synonym and contradict shifts and whether the answer followed the contradiction.
  Every process makes the same scorer calls (a concept no row can edit anywhere is skipped)."""
  names = graph.concept_names
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
  out = {
    i: {'index': int(batch['index'][i]), 'base_correct': None, **{k: {} for k in _PER_CONCEPT}}
    for i in np.flatnonzero(valid).tolist()
  }
  for i in out:
    if rows[i].chain is not None and gold[i] >= 0:
      out[i]['base_correct'] = int(np.argmax(p0[i])) == int(gold[i])
  cells = [
    (ki, kind, ci, c) for ki, kind in enumerate(THINKING_KINDS) for ci, c in enumerate(names)
  ]
  edits = {
    cell: [
      r.edit(
        graph,
        cell[1],
        np.random.default_rng([rng_seed, cell[0], cell[2], int(idx)]),
        among=(cell[3],),
      )
      if keep
      else None  # filler and blank rows (index -1) are never edited
      for r, idx, keep in zip(rows, batch['index'], valid)
    ]
    for cell in cells
  }
  scored = {cell: [i for i in out if edits[cell][i] is not None] for cell in cells}
  needed = hosts.any_process([bool(scored[cell]) for cell in cells])
  for cell, need in zip(cells, needed):
    if not need:
      continue
    _, kind, _, c = cell
    chains = [e.chain if e is not None else b for e, b in zip(edits[cell], base)]
    p1 = scorer.distributions(batch, chains, embeds)
    tv = total_variation(p0, p1)
    for i in scored[cell]:
      out[i][kind][c] = float(tv[i])
      expected = rows[i].expected(graph, edits[cell][i], int(gold[i]))
      if kind == 'contradict' and expected is not None:
        out[i]['follow'][c] = int(np.argmax(p1[i])) == expected
  return list(out.values())


def _summary(rows: list[dict], graph: ConceptGraph, source, scorer) -> dict:
  """The probe's report from every row's results, in record order."""
  names = graph.concept_names
  shifts = {
    kind: {c: [r[kind][c] for r in rows if c in r[kind]] for c in names} for kind in THINKING_KINDS
  }
  flat = {kind: [v for c in names for v in shifts[kind][c]] for kind in THINKING_KINDS}
  base_correct = [r['base_correct'] for r in rows if r['base_correct'] is not None]
  measured = {
    'outcome_shift': 'synonym',
    'counterfactual_shift': 'contradict',
    'counterfactual_follow': 'follow',
  }
  not_applicable = {metric: sum(not r[key] for r in rows) for metric, key in measured.items()}
  not_applicable['teacher_forced_accuracy'] = len(rows) - len(base_correct)
  return {
    'outcome_shift': mean_or_none(flat['synonym']),
    'counterfactual_shift': mean_or_none(flat['contradict']),
    'counterfactual_follow': mean_or_none([v for r in rows for v in r['follow'].values()]),
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
