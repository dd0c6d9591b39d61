"""Thinking interference for the drift probe (METHOD.md section 5): edit ONE concept's sentence.

* `synonym`: the sentence is replaced by a near-synonym with the same value: a robust model's
  outcome distribution should not move (CPO's 'opacity' -> 'lung opacity' experiment).
* `contradict`: the sentence states another value of the concept; the expected decision is
  what the graph's rule gives for the edited chain (it may or may not change).
Deterministic from the seed.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from cpo_jax.knowledge.graph import Assignment
from cpo_jax.knowledge.graph import ConceptGraph


@dataclasses.dataclass(frozen=True)
class ChainEdit:
  chain: str  # '<think> ... </think>' (no answer)
  concept: str
  kind: str  # 'synonym' | 'contradict'
  expected_decision: str  # the rule's decision for the edited chain


def edit_chain(g: ConceptGraph, a: Assignment, kind: str, seed=0) -> ChainEdit:
  rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
  if kind == "synonym":
    cands = [c for c in g.concepts if c.synonyms.get(a[c.name])]
    c = cands[int(rng.integers(len(cands)))]
    syn = c.synonyms[a[c.name]]
    return ChainEdit(
      g.chain_text(a, {c.name: syn[int(rng.integers(len(syn)))]}), c.name, kind, g.decide(a)
    )
  if kind == "contradict":
    for i in rng.permutation(len(g.concepts)):
      c = g.concepts[i]
      others = [v for v in c.values if v != a[c.name] and g.is_valid(dict(a, **{c.name: v}))]
      if others:
        b = dict(a, **{c.name: others[int(rng.integers(len(others)))]})
        return ChainEdit(g.chain_text(b), c.name, kind, g.decide(b))
    raise ValueError(f"no valid contradiction for {dict(a)}")
  raise ValueError(f"kind {kind!r}; expected 'synonym' or 'contradict'")


def answer_prefix(g: ConceptGraph) -> str:
  """Text before the decision in the answer ('The decision is'): the probe reads the next token."""
  return g.answer_template.split("{decision}")[0].rstrip()
