"""Chain edits that the concept graph can judge: whole concept sentences replaced.

synonym     another sentence for the same value: the answer should not move;
contradict  other valid values for which the graph's rule gives another decision: the answer
            should follow the chain.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Mapping
from typing import Sequence

import numpy as np

from cpo_jax.knowledge.graph import THINK_CLOSE
from cpo_jax.knowledge.graph import ConceptGraph
from cpo_jax.knowledge.graph import GraphError
from cpo_jax.knowledge.graph import _norm as _norm_sentence  # the graph's own sentence matching.


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
