"""Graph-guided counterfactual rewriter and its validator (METHOD.md section 4, thinking pairs).

Given a chain's concept assignment and its decision, make a chain that supports another
decision by the graph's relations: (1) evidence that *excludes* the target is replaced by
the neutral value or a value irrelevant to the decision (so 'the lead vehicle is near'
may become 'far', not only 'none'), (2) if the target still does not follow, evidence
*associated* with the target is inserted, (3) the answer is swapped. Minimal edits keep the
rejected chain close to the chosen one, so the preference is about the decisive evidence.
Deterministic from the seed. A brute-force minimal-edit search is the fallback when a
graph's relations are incomplete; the validator (the graph's rule) is the final judge.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping
from typing import Sequence

import numpy as np

from cpo_jax.knowledge.graph import Assignment
from cpo_jax.knowledge.graph import ConceptGraph
from cpo_jax.knowledge.graph import GraphError


@dataclasses.dataclass(frozen=True)
class Counterfactual:
  assignment: dict[str, str]
  decision: str  # the target decision the chain now supports
  completion: str  # '<think> ... </think> The decision is X.'
  changed: tuple[str, ...]  # concepts whose value was changed
  used_fallback: bool


def _rng(seed) -> np.random.Generator:
  return seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)


def counterfactual_assignment(
  g: ConceptGraph, a: Assignment, target: str, seed=0
) -> tuple[dict[str, str], bool]:
  """Assignment supporting `target`, edited from `a` along the relations. Returns (a', used_fallback)."""
  rng = _rng(seed)
  out = dict(a)
  irrelevant = {}
  for c, v in g.irrelevance:
    irrelevant.setdefault(c, []).append(v)
  excl = {(c, v) for c, v, d in g.exclusion if d == target}
  # (1) remove evidence exclusive of the target.
  for c in g.concepts:
    if (c.name, out[c.name]) in excl:
      options = [v for v in [c.neutral] + irrelevant.get(c.name, []) if (c.name, v) not in excl]
      options = sorted(set(options), key=options.index)
      if options:
        out[c.name] = options[int(rng.integers(len(options)))]
  # (2) insert evidence associated with the target, in a seeded order.
  if not (g.is_valid(out) and g.decide(out) == target):
    assoc = [(c, v) for c, v, d in g.association if d == target]
    for i in rng.permutation(len(assoc)):
      c, v = assoc[i]
      trial = dict(out, **{c: v})
      # inserted evidence may exclude other evidence (e.g. hyperinflation vs volume loss)
      for c1, v1, c2, v2 in g.concept_exclusion:
        if trial[c1] == v1 and trial[c2] == v2:
          other = c2 if (c1, v1) == (c, v) else c1
          trial[other] = g.concept(other).neutral
      if g.is_valid(trial) and g.decide(trial) == target:
        out = trial
        break
  if g.is_valid(out) and g.decide(out) == target:
    return out, False
  # Fallback: nearest valid assignment (Hamming) with the target decision, seeded tie-break.
  cands = [b for b in g.all_assignments() if g.decide(b) == target]
  if not cands:
    raise GraphError(f"{g.domain}: decision {target!r} is unreachable")
  dist = np.array([sum(b[k] != a[k] for k in g.concept_names) for b in cands])
  best = np.flatnonzero(dist == dist.min())
  return dict(cands[int(best[rng.integers(len(best))])]), True


def nearest_rewrites(
  g: ConceptGraph, a: Assignment, decisions: Sequence[str]
) -> list[dict[str, str]]:
  """The valid assignments whose decision is in `decisions` at the fewest changed concepts
  from `a` (the minimal counterfactuals toward those decisions), in the graph's enumeration
  order; [] when none of them is reachable. Graphs are small by design: an exhaustive search."""
  cached = getattr(g, "_decided_assignments", None)
  if cached is None:  # (assignment, decision) of every valid assignment, once per graph
    cached = [(b, g.decide(b)) for b in g.all_assignments()]
    object.__setattr__(g, "_decided_assignments", cached)
  wanted = set(decisions)
  cands = [dict(b) for b, d in cached if d in wanted and b != dict(a)]
  if not cands:
    return []
  dist = [sum(b[k] != a[k] for k in g.concept_names) for b in cands]
  return [b for b, d in zip(cands, dist) if d == min(dist)]


def candidate_rewrites(g: ConceptGraph, a: Assignment, *, k: int, seed=0) -> list[dict[str, str]]:
  """Up to k distinct minimal counterfactuals of `a`: the nearest rewrites toward each other
  decision, pooled (enumeration order); more than k -> a seeded choice of k, order kept."""
  if k < 1:
    raise ValueError(f"k={k}: at least one candidate rewrite is needed")
  orig = g.decide(a)
  pool = [b for t in g.decisions if t != orig for b in nearest_rewrites(g, a, [t])]
  if len(pool) > k:
    keep = np.sort(_rng(seed).choice(len(pool), k, replace=False))
    pool = [pool[i] for i in keep]
  return pool


def rewrite(
  g: ConceptGraph,
  a: Assignment,
  *,
  k: int = 1,
  seed=0,
  targets: Sequence[str] | None = None,
  sentences: Mapping[str, str] | None = None,
) -> list[Counterfactual]:
  """k counterfactuals for distinct other decisions (seeded choice), each validated.

  `sentences` (concept -> sentence, e.g. from `ConceptGraph.parse_chain`) keeps the
  original wording of concepts that are not changed, so synonym chains stay synonym chains.
  """
  rng = _rng(seed)
  orig = g.decide(a)
  if targets is None:
    others = [d for d in g.decisions if d != orig]
    targets = [others[i] for i in rng.permutation(len(others))[:k]]
  out = []
  for t in targets:
    if t == orig:
      raise ValueError(f"target {t!r} equals the original decision")
    b, fb = counterfactual_assignment(g, a, t, rng)
    changed = tuple(c for c in g.concept_names if b[c] != a[c])
    keep = {c: s for c, s in (sentences or {}).items() if c not in changed}
    cf = Counterfactual(b, t, g.completion_text(b, t, keep), changed, fb)
    ok, why = validate_counterfactual(g, cf.completion, original_decision=orig, target=t)
    if not ok:  # cannot happen unless the graph and the rule disagree; never emit a bad pair
      raise GraphError(f"rewriter produced an invalid counterfactual ({why}): {cf.completion!r}")
    out.append(cf)
  return out


def rewrite_chain(g: ConceptGraph, completion: str, *, k: int = 1, seed=0) -> list[Counterfactual]:
  """Text in, text out: parse a (canonical or synonym) chain, rewrite it, keep the format."""
  a, sents = g.parse_chain(completion)
  missing = [c for c in g.concept_names if c not in a]
  if missing:  # an unmentioned concept is taken as its neutral value
    a = dict(a, **{c: g.concept(c).neutral for c in missing})
  return rewrite(g, a, k=k, seed=seed, sentences=sents)


def validate_counterfactual(
  g: ConceptGraph, completion: str, *, original_decision: str, target: str
) -> tuple[bool, str]:
  """Does `completion` support `target` (by the rule on its parsed chain) and not the original?"""
  if target == original_decision:
    return False, "target equals the original decision"
  try:
    a, _ = g.parse_chain(completion)
  except GraphError as e:
    return False, str(e)
  missing = [c for c in g.concept_names if c not in a]
  if missing:
    return False, f"chain does not state {missing}"
  if not g.is_valid(a):
    return False, f"chain states an impossible combination {a}"
  d = g.decide(a)
  if d != target:
    return False, f"chain supports {d!r}, not the target {target!r}"
  ans = g.parse_decision(completion)
  if ans != target:
    return False, f"answer names {ans!r}, not {target!r}"
  return True, "ok"
