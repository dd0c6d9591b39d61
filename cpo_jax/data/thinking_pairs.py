"""Thinking pairs that carry signal the SFT model lacks (issue 12): aimed at the shortcut, or
picked by the reference model. The default thinking pair (`pairs.thinking_pair`) rewrites a
chain toward a random other decision; these modes choose WHICH counterfactual.

`data.thinking_target`:
* `random`: the default rewrite.
* `shortcut`: the rejected chain says what a model reading the nuisance (sky colour, corner
  marker) would say: it misreads the fewest evidence concepts needed to reach a decision the
  record's nuisance predicts (`ShortcutMap`), on the record's own image. A record whose
  nuisance predicts only its own decision (90% of train: there the shortcut answers right)
  keeps the random rewrite, and so does a record without a known nuisance; both are counted
  and logged once with their share (`ThinkingPlan.counts`), never silent.
* `shortcut_rerender`: as `shortcut`, but a record whose nuisance predicts its own decision
  becomes the case the shortcut gets wrong: its scene is re-rendered (same sky, same layout and
  noise) with the fewest evidence concepts changed so that the decision leaves the nuisance's;
  the chosen side is that scene's true chain, the rejected side the record's own chain (the
  shortcut's reading of the new scene). Synthetic sources only (they can re-render).
* `balanced`: re-renders only as many agreeing records (a fixed share, chosen by position) as
  make the nuisance predict nothing among the chosen scenes (the share that agrees with it
  falls to the share of decisions it predicts: chance), each toward a decision drawn uniformly
  from the others, and every pair rejects a random rewrite of its own scene. Why not the
  shortcut's answer as the negative: whatever tells chosen from rejected, the preference
  learns; if the rejected side names what the sky suggests on most pairs, "answer against the
  sky" is the new shortcut (measured: thinking-only `shortcut_rerender` pairs lower `test`
  accuracy by 55 points). Balanced on both sides, only the evidence separates them.
Why re-render: `ood` errors are nearly all "the decision the nuisance suggests" on scenes whose
evidence disagrees with it. In train only ~10% of scenes disagree, so `shortcut` aims only
that tenth; aiming the agreeing 90% at "the decision of another nuisance value" would be a
random rewrite in all but name (the sky argues for the truth there). Re-rendering turns every
such record into a disagreeing scene with the shortcut's answer as the negative, the case the
SFT model never had to get right, at the price of images SFT did not see (compare the arms).

`data.thinking_select='reference'` with `data.thinking_candidates=K`: the rejected chain is one
of the 2 counterfactuals ("the 2 most relevant per instance", METHOD.md section 4) that the
reference (SFT) model finds most probable among up to K minimal rewrites
(`rewriter.candidate_rewrites`), scored once before the stage by
`train/counterfactual_selection.py` and read here from its `SelectionTable`. With
`thinking_target='balanced'` the two combine: 'balanced' picks the scene (a record's own, or its
re-rendering, drawn by position so that the selection pass scores the candidates on the very
scene the pair shows) and the reference picks which rewrite of that scene is rejected.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from absl import logging
import numpy as np

from cpo_jax.data import pairs as pairs_lib
from cpo_jax.data.bad_records import BadRecordError
from cpo_jax.knowledge.graph import ConceptGraph
from cpo_jax.knowledge.graph import GraphError
from cpo_jax.knowledge.rewriter import nearest_rewrites
from cpo_jax.knowledge.rewriter import rewrite
from cpo_jax.knowledge.rewriter import validate_counterfactual

THINKING_TARGETS = ("random", "shortcut", "shortcut_rerender", "balanced")
THINKING_SELECTS = ("random", "reference")
SELECTED_PER_RECORD = 2  # the paper keeps the 2 most relevant counterfactuals per instance

# What a record's thinking pair becomes under a shortcut target (ThinkingPlan.counts keys).
AIMED = "aimed"  # rejected chain reaches a decision the nuisance predicts
RERENDERED = "rerendered"  # the scene re-rendered to disagree with its nuisance
AGREES = "agrees_random"  # nuisance predicts only the record's decision: random rewrite
NO_SHORTCUT = "no_shortcut_random"  # nuisance unknown or predicting nothing: random rewrite
DISAGREES = "disagrees_random"  # 'balanced': already disagrees with its nuisance: random rewrite


@dataclasses.dataclass(frozen=True)
class ShortcutMap:
  """Nuisance value -> the decision ids it predicts in one split, estimated from its labels.

  A value predicts the decisions a model reading only the nuisance would answer: the most
  frequent under that value and any at least half as frequent, provided the value makes them
  more likely than they are overall. Read from the data, not from how a renderer assigns
  the nuisance, so it holds for any split with a nuisance field (synth_drive: one decision per
  sky; synth_cxr: one or two findings per marker).
  """

  predicts: tuple[tuple[int, ...], ...]  # [num nuisance values] -> decision ids

  @classmethod
  def from_labels(cls, decision, nuisance, num_decisions: int, num_values: int) -> "ShortcutMap":
    decision, nuisance = np.asarray(decision, np.int64), np.asarray(nuisance, np.int64)
    known = (nuisance >= 0) & (nuisance < num_values)
    counts = np.zeros((num_values, num_decisions))
    np.add.at(counts, (nuisance[known], decision[known]), 1)
    overall = counts.sum(0) / max(counts.sum(), 1)
    predicts = []
    for row in counts:
      if not row.sum():
        predicts.append(())
        continue
      p = row / row.sum()
      keep = (p >= 0.5 * p.max()) & (p > overall)
      predicts.append(tuple(int(d) for d in np.flatnonzero(keep)))
    return cls(tuple(predicts))

  def decisions_for(self, nuisance: int) -> tuple[int, ...]:
    """The decisions value `nuisance` predicts; () for an unknown value (-1 or out of range)."""
    return self.predicts[nuisance] if 0 <= nuisance < len(self.predicts) else ()

  def describe(self, graph: ConceptGraph) -> str:
    return ", ".join(
      f"{v} -> {'/'.join(graph.decisions[d] for d in ds) or 'nothing'}"
      for v, ds in zip(graph.nuisance_values, self.predicts)
    )


def split_labels(source) -> tuple[np.ndarray, np.ndarray]:
  """(decision [N], nuisance [N], -1 where a record has none) of a split, without rendering
  where the source offers `labels()`, else by reading its records."""
  if hasattr(source, "labels"):
    decision, _, nuisance = source.labels()
    return np.asarray(decision, np.int64), np.asarray(nuisance, np.int64)
  recs = [source[i] for i in range(len(source))]
  return (
    np.array([int(r["decision"]) for r in recs], np.int64),
    np.array([int(r.get("nuisance", -1)) for r in recs], np.int64),
  )


@dataclasses.dataclass(frozen=True)
class SelectionTable:
  """Per record position of the split (this process's shard): the counterfactuals the reference
  picked, as concept value ids. Made by `train/counterfactual_selection.py`; numpy only, so
  the pipeline's worker processes can hold it.

  positions [M] (sorted), record_concepts [M, C] (the scene each row was made for: a guard),
  chosen [M, SELECTED_PER_RECORD, C] (-1 rows where fewer were scored), candidates [M, K, C] and
  scores [M, K] (all candidates and their reference log-probs; -1 / NaN padded), path (or '').
  """

  positions: np.ndarray
  record_concepts: np.ndarray
  chosen: np.ndarray
  candidates: np.ndarray
  scores: np.ndarray
  path: str = ""

  def choices(self, position: int, concepts, graph: ConceptGraph) -> list[dict]:
    """The picked assignments for the scene at `position` (concept ids `concepts`: the record's,
    or its re-rendering's under 'balanced'), checked to be the scene the table was made for."""
    rid = f"record {position}"
    r = int(np.searchsorted(self.positions, position))
    if r == len(self.positions) or self.positions[r] != position:
      raise ValueError(
        f"{rid} is not in the counterfactual selection {self.path or '(in memory)'} (made for "
        "another split, size or shard); delete it to select again"
      )
    if not np.array_equal(self.record_concepts[r], np.asarray(concepts)):
      raise ValueError(
        f"{rid}: the counterfactual selection {self.path or '(in memory)'} was made for another "
        f"scene there (concepts {self.record_concepts[r].tolist()} vs "
        f"{np.asarray(concepts).tolist()}: data, seed or thinking_target changed); delete it to "
        "select again"
      )
    picked = [graph.assignment_from_ids(ids) for ids in self.chosen[r] if ids[0] >= 0]
    if not picked:
      raise BadRecordError(
        "no_counterfactual", rid, "no candidate counterfactual could be scored for it"
      )
    return picked


@dataclasses.dataclass(frozen=True)
class ThinkingPlan:
  """How a split's thinking pairs pick their counterfactual (module doc); `pair` makes one.
  counts: records of the split per kind (AIMED, RERENDERED, AGREES, NO_SHORTCUT), or under
  selection {'selected': N}."""

  target: str
  shortcut: ShortcutMap | None = None
  selection: SelectionTable | None = None
  counts: dict[str, int] = dataclasses.field(default_factory=dict)
  rerender_share: float = 1.0  # 'balanced': the share of agreeing records re-rendered

  def kind_of(
    self, decision: int, nuisance: int, graph: ConceptGraph, position: int
  ) -> tuple[str, tuple]:
    """(kind, decision ids the counterfactual must reach) for a record under a shortcut target."""
    predicted = self.shortcut.decisions_for(int(nuisance))
    if not predicted:
      return NO_SHORTCUT, ()
    aimed = tuple(d for d in predicted if d != decision)
    if aimed:
      return (DISAGREES, ()) if self.target == "balanced" else (AIMED, aimed)
    others = tuple(d for d in range(len(graph.decisions)) if d not in predicted)
    rerender = self.target == "shortcut_rerender" or (
      self.target == "balanced" and _position_uniform(position) < self.rerender_share
    )
    if rerender and others:
      return RERENDERED, others
    return AGREES, ()

  def balanced_scene(
    self, decision: int, nuisance: int, concepts, position: int, graph: ConceptGraph
  ) -> dict | None:
    """Under 'balanced', the assignment the scene at `position` is re-rendered with (None: the
    record's own scene): a decision drawn uniformly from those its nuisance does not predict,
    reached with the fewest evidence concepts changed. Drawn by position, so every arm and the
    selection pass (which scores the counterfactuals of this very scene) see the same scene."""
    if self.target != "balanced":
      return None
    kind, goal = self.kind_of(decision, nuisance, graph, position)
    if kind != RERENDERED:
      return None
    rng = np.random.default_rng((int(position), 0xBA1A, 1))
    goal = goal[int(rng.integers(len(goal)))]
    near = nearest_rewrites(graph, graph.assignment_from_ids(concepts), [graph.decisions[goal]])
    return near[int(rng.integers(len(near)))]

  def balanced_scene_of(self, record: dict[str, Any], position: int, graph: ConceptGraph):
    """`balanced_scene` of a record."""
    decision, nuisance = int(record["decision"]), int(record.get("nuisance", -1))
    return self.balanced_scene(decision, nuisance, record["concepts"], position, graph)

  def pair(
    self,
    record: dict[str, Any],
    position: int,
    graph: ConceptGraph,
    source,
    rng: np.random.Generator,
  ) -> dict[str, Any]:
    decision, nuisance = int(record["decision"]), int(record.get("nuisance", -1))
    if self.target == "balanced":
      b = self.balanced_scene(decision, nuisance, record["concepts"], position, graph)
      scene = graph.assignment_from_ids(record["concepts"]) if b is None else b
      if self.selection is not None:
        picked = self.selection.choices(position, graph.value_ids(scene), graph)
        negative = picked[int(rng.integers(len(picked)))]
      elif b is not None:  # a random rewrite of the new scene, not the sky's answer
        negative = rewrite(graph, b, k=1, seed=rng)[0].assignment
      else:
        return pairs_lib.thinking_pair(record, graph, rng)
      if b is None:
        return rewritten_pair(record, graph, negative)
      pair = rerendered_pair(record, position, graph, source, b)
      completion, rejected = counterfactual_completion(graph, scene, negative, f"record {position}")
      return dict(pair, rejected_completion=completion, rejected_decision=rejected)
    if self.selection is not None:
      picked = self.selection.choices(position, record["concepts"], graph)
      return rewritten_pair(record, graph, picked[int(rng.integers(len(picked)))])
    kind, goal = self.kind_of(decision, nuisance, graph, position)
    if kind in (AIMED, RERENDERED):
      a = graph.assignment_from_ids(record["concepts"])
      near = nearest_rewrites(graph, a, [graph.decisions[d] for d in goal])
      if not near:  # cannot happen on a validated graph (every decision is reachable)
        raise GraphError(f"{graph.domain}: no decision of {goal} is reachable from {a}")
      b = near[int(rng.integers(len(near)))]
      if kind == AIMED:
        return rewritten_pair(record, graph, b)
      return rerendered_pair(record, position, graph, source, b)
    return pairs_lib.thinking_pair(record, graph, rng)


def rewritten_pair(record: dict[str, Any], graph: ConceptGraph, b: dict) -> dict[str, Any]:
  """Same image; the rejected completion states assignment `b` and its decision (validated)."""
  a = graph.assignment_from_ids(record["concepts"])
  completion, rejected = counterfactual_completion(graph, a, b, f"record {record['index']}")
  return {
    "chosen_image": record["image"],
    "rejected_image": record["image"],
    "chosen_completion": pairs_lib.completion_of(record),
    "rejected_completion": completion,
    "rejected_decision": rejected,
    "rejected_index": int(record["index"]),
  }


def counterfactual_completion(graph: ConceptGraph, a: dict, b: dict, rid: str) -> tuple[str, int]:
  """(completion stating `b` and its decision, that decision's id): the counterfactual of the
  scene `a`, validated (its decision differs from a's and follows from its chain)."""
  target = graph.decide(b)
  completion = graph.completion_text(b, target)
  ok, why = validate_counterfactual(
    graph, completion, original_decision=graph.decide(a), target=target
  )
  if not ok:
    raise GraphError(f"invalid counterfactual for {rid} ({why}): {completion!r}")
  return completion, graph.decision_id(target)


def rerendered_pair(
  record: dict[str, Any], position: int, graph: ConceptGraph, source, b: dict
) -> dict[str, Any]:
  """The scene at `position` of `source` re-rendered with assignment `b` (same nuisance, layout
  and noise); chosen = its true chain, rejected = the record's own chain (what the nuisance
  suggests)."""
  cf = source.counterfactual(position, b)
  return {
    "chosen_image": cf["image"],
    "rejected_image": cf["image"],
    "chosen_completion": graph.completion_text(b),
    "rejected_completion": pairs_lib.completion_of(record),
    "chosen_decision": int(cf["decision"]),
    "rejected_decision": int(record["decision"]),
    "rejected_index": int(record["index"]),
    "boxes": np.asarray(cf["boxes"], np.int32),
  }


def _position_uniform(position: int) -> float:
  # why: which records 'balanced' re-renders must not depend on the worker or the epoch
  return float(np.random.default_rng((int(position), 0xBA1A)).random())


def balancing_share(shortcut: ShortcutMap, decision, nuisance, num_decisions: int) -> float:
  """The share of agreeing records to re-render so that the share of records whose decision
  their nuisance predicts falls to chance (the mean share of decisions it predicts)."""
  predicted = [shortcut.decisions_for(int(v)) for v in nuisance]
  agree = np.mean([int(d) in p for d, p in zip(decision, predicted)]) if len(decision) else 0.0
  chance = np.mean([len(p) / num_decisions for p in predicted]) if len(decision) else 0.0
  return float(max(0.0, 1.0 - chance / agree)) if agree > 0 else 0.0


def check_choice(target: str, select: str, negative: str = "counterfactual") -> None:
  """Raises on a combination of data.thinking_target / thinking_select / thinking_negative
  that does not say which counterfactual a thinking pair rejects."""
  if target not in THINKING_TARGETS:
    raise ValueError(f"data.thinking_target={target!r}; expected one of {THINKING_TARGETS}")
  if select not in THINKING_SELECTS:
    raise ValueError(f"data.thinking_select={select!r}; expected one of {THINKING_SELECTS}")
  if target not in ("random", "balanced") and select != "random":
    raise ValueError(
      f"data.thinking_target={target!r} and data.thinking_select={select!r} both choose the "
      "counterfactual; set one of them to 'random' (or thinking_target to 'balanced', which "
      "picks only the scenes)"
    )
  if negative != "counterfactual" and (target != "balanced" or select != "random"):
    raise ValueError(
      f"data.thinking_negative={negative!r} makes no counterfactual for data.thinking_target / "
      "thinking_select to choose; leave it 'counterfactual' or them 'random' (or thinking_target "
      "'balanced', which picks only the scenes)"
    )


def plan_for(
  source,
  graph: ConceptGraph,
  *,
  target: str = "random",
  select: str = "random",
  negative: str = "counterfactual",
  selection: SelectionTable | None = None,
) -> ThinkingPlan | None:
  """The plan of a split's thinking pairs from the config's data.thinking_target /
  thinking_select (None: the default random rewrite). Logs the shares once."""
  check_choice(target, select, negative)
  if target == "random" and select == "random":
    return None
  if select == "reference":
    if selection is None:
      raise ValueError(
        "data.thinking_select='reference' needs the selection pass's table "
        "(train/counterfactual_selection.py, run by main before the cpo_plus stage)"
      )
    n = int((selection.chosen[:, 0, 0] >= 0).sum())
    logging.warning(
      "data.thinking_select='reference': %d of %d records have their %d counterfactuals picked "
      "by the reference from up to %d candidates (%s)",
      n,
      len(selection.positions),
      SELECTED_PER_RECORD,
      selection.candidates.shape[1],
      selection.path or "in memory",
    )
    if target == "random":
      return ThinkingPlan("random", selection=selection, counts={"selected": n})
    scenes = plan_for(source, graph, target=target)  # the scenes the selection was made on
    return dataclasses.replace(scenes, selection=selection, counts={**scenes.counts, "selected": n})
  if target in ("shortcut_rerender", "balanced") and not hasattr(source, "counterfactual"):
    raise ValueError(
      f"data.thinking_target={target!r} re-renders scenes; dataset {source!r} cannot "
      "(only synth_drive and synth_cxr can); use 'shortcut'"
    )
  decision, nuisance = split_labels(source)
  shortcut = ShortcutMap.from_labels(
    decision, nuisance, len(graph.decisions), len(graph.nuisance_values)
  )
  plan = ThinkingPlan(target, shortcut)
  if target == "balanced":
    share = balancing_share(shortcut, decision, nuisance, len(graph.decisions))
    plan = dataclasses.replace(plan, rerender_share=share)
  counts = {k: 0 for k in (AIMED, RERENDERED, AGREES, DISAGREES, NO_SHORTCUT)}
  for position, (d, v) in enumerate(zip(decision, nuisance)):
    counts[plan.kind_of(int(d), int(v), graph, position)[0]] += 1
  n = max(len(decision), 1)
  logging.warning(
    "data.thinking_target=%r on %s (nuisance predicts: %s; re-rendering %.1f%% of the records "
    "that agree with it): %s",
    target,
    source,
    shortcut.describe(graph),
    100 * plan.rerender_share if target != "shortcut" else 0.0,
    "; ".join(f"{k} {c} ({c / n:.1%})" for k, c in counts.items() if c or k != DISAGREES),
  )
  return dataclasses.replace(plan, counts=counts)
