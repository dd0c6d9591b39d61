"""Counterfactual preference pairs (METHOD.md section 4) from labelled records.

* thinking: same image; rejected completion = graph-rewritten chain + swapped answer.
* perception: same completion; rejected image = another image of the same split whose
  decision differs. Selection modes: `hard` (default; same nuisance value when possible,
  then fewest differing concepts: only the decisive evidence tells them apart), `far`
  (most differing concepts), `random` (any other decision), `counterfactual` (a true minimal
  pair: the SAME scene re-rendered with one concept changed so that the decision changes;
  synthetic sources only, see counterfactual_flip). Another image of the split usually differs
  in several concepts, so a model can meet that preference by reading the easiest one; the
  minimal pair can only be told apart by the flipped concept's evidence.
A pair here is still text + image bytes; tokenization and pixels happen in pipeline.py.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from cpo_jax.knowledge.graph import ConceptGraph
from cpo_jax.knowledge.rewriter import rewrite

SOURCE_IDS = {"thinking": 0, "perception": 1, "other": 2}
INDEX_MODES = ("hard", "far", "random")  # negatives picked from the split by PairIndex
PERCEPTION_MODES = INDEX_MODES + ("counterfactual",)


def as_text(x) -> str:
  """TFDS gives text as bytes, the procedural source as str."""
  return x.decode("utf-8") if isinstance(x, (bytes, np.bytes_)) else str(x)


def completion_of(record: dict[str, Any]) -> str:
  return f"{as_text(record['chain'])} {as_text(record['answer'])}"


class PairIndex:
  """Label-set index over one split for picking perception negatives (never the same index)."""

  def __init__(self, decision: np.ndarray, concepts: np.ndarray, nuisance: np.ndarray):
    self.decision = np.asarray(decision, np.int32)
    self.concepts = np.asarray(concepts, np.int32)
    self.nuisance = np.asarray(nuisance, np.int32)
    if len(set(self.decision.tolist())) < 2:
      raise ValueError("perception pairs need at least two different decisions in the split")

  @classmethod
  def from_source(cls, source) -> "PairIndex":
    if hasattr(source, "labels"):  # procedural source: labels without rendering
      return cls(*source.labels())
    recs = [source[i] for i in range(len(source))]
    return cls(np.array([r["decision"] for r in recs]), np.stack([r["concepts"] for r in recs]),
               np.array([r["nuisance"] for r in recs]))

  def __len__(self) -> int:
    return len(self.decision)

  def pick(self, i: int, mode: str, rng: np.random.Generator) -> int:
    """Index of the rejected image for chosen index i."""
    differ = self.decision != self.decision[i]
    ham = (self.concepts != self.concepts[i]).sum(-1)
    if mode == "random":
      cands = np.flatnonzero(differ)
    elif mode == "far":
      cands = np.flatnonzero(differ & (ham == ham[differ].max()))
    elif mode == "hard":
      same = differ & (self.nuisance == self.nuisance[i])
      pool = same if same.any() else differ  # fall back when the nuisance value has no other decision
      cands = np.flatnonzero(pool & (ham == ham[pool].min()))
    else:
      raise ValueError(f"perception mode {mode!r} is not an index pick; expected one of {INDEX_MODES}")
    return int(cands[rng.integers(len(cands))])


def thinking_pair(record: dict[str, Any], graph: ConceptGraph, rng: np.random.Generator) -> dict[str, Any]:
  a = graph.assignment_from_ids(record["concepts"])
  cf = rewrite(graph, a, k=1, seed=rng)[0]
  return {"chosen_image": record["image"], "rejected_image": record["image"],
          "chosen_completion": completion_of(record), "rejected_completion": cf.completion,
          "rejected_decision": graph.decision_id(cf.decision), "rejected_index": int(record["index"])}


def counterfactual_flip(graph: ConceptGraph, a: dict[str, str], rng: np.random.Generator) -> tuple[int, str]:
  """(concept index, new value) for a minimal counterfactual of assignment `a`.

  Uniform over the concepts with at least one valid other value that changes graph.decide,
  then uniform over those values. When no single change moves the decision (driving: red
  light AND a pedestrian both mean stop), uniform over all valid single changes: the chosen
  chain is then still wrong about the flipped concept on the rejected image.
  """
  d = graph.decide(a)
  valid, changing = {}, {}
  for ci, c in enumerate(graph.concepts):
    for v in c.values:
      b = {**a, c.name: v}
      if v != a[c.name] and graph.is_valid(b):
        valid.setdefault(ci, []).append(v)
        if graph.decide(b) != d:
          changing.setdefault(ci, []).append(v)
  options = changing or valid
  if not options:
    raise ValueError(f"no valid single-concept change of {a}")
  ci = sorted(options)[int(rng.integers(len(options)))]
  return ci, options[ci][int(rng.integers(len(options[ci])))]


def counterfactual_perception_pair(record: dict[str, Any], source, graph: ConceptGraph,
                                   rng: np.random.Generator) -> dict[str, Any]:
  """Same text; the rejected image is the chosen scene re-rendered with one concept flipped."""
  if not hasattr(source, "counterfactual"):
    raise ValueError(f"perception_mode='counterfactual' re-renders the chosen scene with one concept changed; "
                     f"dataset {source!r} cannot re-render its images (only synth_drive and synth_cxr can); "
                     f"use perception_mode in {INDEX_MODES}")
  a = graph.assignment_from_ids(record["concepts"])
  ci, v = counterfactual_flip(graph, a, rng)
  cf = source.counterfactual(int(record["index"]), {**a, graph.concepts[ci].name: v})
  return {"chosen_image": record["image"], "rejected_image": cf["image"],
          "chosen_completion": completion_of(record), "rejected_completion": completion_of(record),
          "rejected_decision": int(cf["decision"]), "rejected_index": int(record["index"]), "flipped_concept": ci}


def perception_pair(record: dict[str, Any], source, index: PairIndex, position: int, mode: str,
                    rng: np.random.Generator) -> dict[str, Any]:
  """`position` is the record's position in `source` (== record['index'] for synth_drive)."""
  j = index.pick(position, mode, rng)
  other = source[j]
  return {"chosen_image": record["image"], "rejected_image": other["image"],
          "chosen_completion": completion_of(record), "rejected_completion": completion_of(record),
          "rejected_decision": int(other["decision"]), "rejected_index": j}


def make_pair(record: dict[str, Any], position: int, rng: np.random.Generator, *, graph: ConceptGraph,
              source, index: PairIndex, thinking_fraction: float = 0.5, perception_mode: str = "hard",
              source_weights: Sequence[float] | None = None) -> dict[str, Any]:
  """A pair dict: chosen/rejected image bytes + completions, question, source id, weight, boxes."""
  kind = "thinking" if rng.random() < thinking_fraction else "perception"
  if kind == "thinking":
    pair = thinking_pair(record, graph, rng)
  elif perception_mode == "counterfactual":
    pair = counterfactual_perception_pair(record, source, graph, rng)
  else:
    pair = perception_pair(record, source, index, position, perception_mode, rng)
  pair.setdefault("flipped_concept", -1)  # the concept changed in a counterfactual image, else -1
  pair.update(question=as_text(record["question"]), source=SOURCE_IDS[kind],
              # per-example weight (cpo_sample_weight); per-source weights are the loss's job
              sample_weight=float(record.get("cpo_sample_weight", 1.0)),
              chosen_decision=int(record["decision"]), boxes=np.asarray(record["boxes"], np.int32),
              index=int(record["index"]))
  return pair
