"""Counterfactual preference pairs (METHOD.md section 4) from labelled records.

* thinking: same image; rejected completion = graph-rewritten chain + swapped answer
  (`thinking_negative='counterfactual'`), or with `'random'` another record's chain and answer
  (the paper's DPO baseline with random negatives: a negative that is not a counterfactual).
  Which counterfactual (aimed at the shortcut, or picked by the reference model): the
  `thinking_pairs.ThinkingPlan` passed as `thinking`.
* perception: same completion; rejected image = another image of the same split whose
  decision differs (and, where scene ids are known, of another scene). Selection modes: `hard`
  (default; same nuisance value when possible, then the nearest image by `thumbnail` where
  thumbnails are known (real data), else the fewest differing concepts: only the decisive
  evidence tells them apart), `far` (most differing concepts), `random` (any other decision),
  `counterfactual` (a true minimal pair: the SAME scene re-rendered with one concept changed so
  that the decision changes; synthetic sources only, see counterfactual_flip). Another image of
  the split usually differs in several concepts, so a model can meet that preference by reading
  the easiest one; the minimal pair can only be told apart by the flipped concept's evidence.
A pair here is still text + image bytes; tokenization and pixels happen in examples.py.
"""

from __future__ import annotations

import io
from typing import Any
from typing import Sequence

import numpy as np
from PIL import Image

from cpo_jax.knowledge.graph import ConceptGraph
from cpo_jax.knowledge.rewriter import rewrite

SOURCE_IDS = {"thinking": 0, "perception": 1, "other": 2}
INDEX_MODES = ("hard", "far", "random")  # negatives picked from the split by PairIndex
PERCEPTION_MODES = INDEX_MODES + ("counterfactual",)
THINKING_NEGATIVES = ("counterfactual", "random")  # how a thinking pair's rejected chain is made
RANDOM_NEGATIVE_DRAWS = 64  # draws for another record whose completion differs, then an error


def as_text(x) -> str:
  """TFDS gives text as bytes, the procedural source as str."""
  return x.decode("utf-8") if isinstance(x, (bytes, np.bytes_)) else str(x)


def completion_of(record: dict[str, Any]) -> str:
  return f"{as_text(record['chain'])} {as_text(record['answer'])}"


THUMB = 8  # thumbnail side in pixels


def thumbnail(image) -> np.ndarray:
  """[THUMB, THUMB, 3] uint8: the image box-averaged to 8x8 RGB (JPEG/PNG bytes or an array).

  The cheap embedding for `hard` negatives on real data. Why this one: what a shortcut reads is
  global (exposure, colour cast, view and patient positioning, time of day, layout), what the
  decision needs is small and local (a thin pleural line, a traffic-light lamp). An 8x8 thumbnail
  keeps the first and is blind to the second, so the nearest thumbnail among images with other
  labels is the image that agrees in the nuisance and differs in the evidence. Raw values (no
  per-image normalisation) so exposure counts; no model weights, deterministic, and a JPEG is
  decoded at 1/8 scale (`draft`), so it costs little next to reading the file.
  """
  if isinstance(image, (bytes, np.bytes_)):
    img = Image.open(io.BytesIO(image))
    img.draft("RGB", (4 * THUMB, 4 * THUMB))  # JPEG: decode at a reduced scale (no-op for PNG)
  else:
    img = Image.fromarray(np.asarray(image, np.uint8))
  return np.asarray(img.convert("RGB").resize((THUMB, THUMB), Image.Resampling.BOX), np.uint8)


class PairIndex:
  """Label index over one split for picking perception negatives (never the same index).

  decision [N]: the decisive label (a decision id, or a code of a multi-label set); concepts
  [N, C]: the labels behind it (for `far` and the label-distance fallback); nuisance [N] or
  None (unknown); thumbnails [N, THUMB, THUMB, 3] or None; group [N] or None: scene ids (a
  study, an image and its regions), never paired with each other. Synthetic sources give labels
  and nuisance; mimic_ccf and codalm labels, thumbnails (stored when their files are prepared)
  and scene ids; swift_jsonl records bring their own rejected image (no index).
  """

  def __init__(
    self,
    decision: np.ndarray,
    concepts: np.ndarray,
    nuisance: np.ndarray | None = None,
    *,
    thumbnails: np.ndarray | None = None,
    group: np.ndarray | None = None,
    pool_size: int = 1024,
    seed: int = 0,
  ):
    self.decision = np.asarray(decision, np.int64)
    self.concepts = np.asarray(concepts, np.int32).reshape(len(self.decision), -1)
    self.nuisance = None if nuisance is None else np.asarray(nuisance, np.int64)
    self.embedding = (
      None
      if thumbnails is None
      else np.asarray(thumbnails, np.float32).reshape(len(self.decision), -1) / 255.0
    )
    self.group = None if group is None else np.asarray(group)
    self.pool_size, self.seed, self._hard = pool_size, seed, None
    if len(set(self.decision.tolist())) < 2:
      raise ValueError("perception pairs need at least two different decisions in the split")

  @classmethod
  def from_source(cls, source) -> "PairIndex":
    if hasattr(source, "labels"):  # procedural source: labels without rendering
      return cls(*source.labels())
    recs = [source[i] for i in range(len(source))]
    return cls(
      np.array([r["decision"] for r in recs]),
      np.stack([r["concepts"] for r in recs]),
      np.array([r["nuisance"] for r in recs]),
    )

  def __len__(self) -> int:
    return len(self.decision)

  def pick(self, i: int, mode: str, rng: np.random.Generator) -> int:
    """Index of the rejected image for chosen index i (`hard` with thumbnails: `hard_negatives`)."""
    if mode not in INDEX_MODES:
      raise ValueError(
        f"perception mode {mode!r} is not an index pick; expected one of {INDEX_MODES}"
      )
    j = (
      int(self.hard_negatives()[i])
      if mode == "hard" and self.embedding is not None
      else self._pick_by_labels(i, mode, rng)
    )
    if j < 0:
      raise ValueError(
        f"record {i} has no perception negative (every other decision is from its own scene)"
      )
    return j

  def _pick_by_labels(self, i: int, mode: str, rng: np.random.Generator) -> int:
    differ = self.decision != self.decision[i]
    if self.group is not None:
      differ &= self.group != self.group[i]
    if not differ.any():
      return -1
    ham = (self.concepts != self.concepts[i]).sum(-1)
    if mode == "random":
      cands = np.flatnonzero(differ)
    elif mode == "far":
      cands = np.flatnonzero(differ & (ham == ham[differ].max()))
    else:  # hard
      same = differ if self.nuisance is None else differ & (self.nuisance == self.nuisance[i])
      # Fall back when the nuisance value has no other decision.
      pool = same if same.any() else differ
      cands = np.flatnonzero(pool & (ham == ham[pool].min()))
    return int(cands[rng.integers(len(cands))])

  def hard_negatives(self) -> np.ndarray:
    """[N] the `hard` negative of every record by thumbnail distance, -1 where there is none.

    Records are bucketed by (nuisance, decision). A bucket's candidates are the records with the
    same nuisance and another decision (all other decisions when its nuisance has none); each
    bucket draws at most `pool_size` of them, seeded by (seed, bucket), and each member takes the
    nearest of that pool that is not from its own scene. Cost O(N * pool_size * THUMB^2 * 3), memory
    O(pool_size * chunk): never an N x N matrix. With N <= pool_size the pick is the exact nearest;
    beyond, the nearest of pool_size random candidates (top 1/pool_size of them in expectation).
    Ties go to the earlier draw. Computed once, then cached.
    """
    if self._hard is not None:
      return self._hard
    if self.embedding is None:
      raise ValueError("hard_negatives needs thumbnails")
    n, e = len(self), self.embedding
    nuis = np.zeros(n, np.int64) if self.nuisance is None else self.nuisance
    # Sorted orders in which a bucket, a nuisance block and a decision are contiguous runs, so a
    # bucket's candidates are two ranges of one order and a draw from them costs O(pool_size).
    order = np.lexsort((self.decision, nuis))
    sn, sd = nuis[order], self.decision[order]
    starts = np.flatnonzero(np.r_[True, (sn[1:] != sn[:-1]) | (sd[1:] != sd[:-1])])
    ends = np.r_[starts[1:], n]
    block_lo, block_hi = (
      np.searchsorted(sn, sn[starts], "left"),
      np.searchsorted(sn, sn[starts], "right"),
    )
    by_dec = np.argsort(self.decision, kind="stable")
    dec_sorted = self.decision[by_dec]
    sq = (e * e).sum(-1)
    out = np.full(n, -1, np.int64)
    chunk = max(1, (1 << 22) // self.pool_size)  # queries per distance block: ~16 MB of float32
    for b, (s, t) in enumerate(zip(starts, ends)):
      if block_hi[b] - block_lo[b] > t - s:  # same nuisance, another decision
        base, lo, hi, skip_lo, skip_hi = order, block_lo[b], block_hi[b], s, t
      else:  # the nuisance value has no other decision: any other decision
        d_lo, d_hi = (
          np.searchsorted(dec_sorted, sd[s], "left"),
          np.searchsorted(dec_sorted, sd[s], "right"),
        )
        base, lo, hi, skip_lo, skip_hi = by_dec, 0, n, d_lo, d_hi
      n_cands = hi - lo - (skip_hi - skip_lo)
      r = lo + np.random.default_rng([self.seed, b]).choice(
        n_cands, min(n_cands, self.pool_size), replace=False
      )
      cands = base[np.where(r >= skip_lo, r + (skip_hi - skip_lo), r)]  # step over the skipped run
      ec, sqc = e[cands], sq[cands]
      for q0 in range(s, t, chunk):
        q = order[q0 : min(q0 + chunk, t)]
        d = sqc[None] - 2.0 * (e[q] @ ec.T)  # + |q|^2, the same along a row
        if self.group is not None:  # scene ids rarely collide: compare only the rows that have one
          rows = np.flatnonzero(np.isin(self.group[q], self.group[cands]))
          d[rows] = np.where(
            self.group[q[rows]][:, None] == self.group[cands][None], np.inf, d[rows]
          )
        best = d.argmin(1)
        out[q] = np.where(np.isfinite(d[np.arange(len(q)), best]), cands[best], -1)
    self._hard = out
    return out


def thinking_pair(
  record: dict[str, Any], graph: ConceptGraph, rng: np.random.Generator
) -> dict[str, Any]:
  a = graph.assignment_from_ids(record["concepts"])
  cf = rewrite(graph, a, k=1, seed=rng)[0]
  return {
    "chosen_image": record["image"],
    "rejected_image": record["image"],
    "chosen_completion": completion_of(record),
    "rejected_completion": cf.completion,
    "rejected_decision": graph.decision_id(cf.decision),
    "rejected_index": int(record["index"]),
  }


def random_negative_pair(
  record: dict[str, Any], source, position: int, rng: np.random.Generator
) -> dict[str, Any]:
  """Same image; the rejected completion is another record's chain and answer (DPO with random
  negatives, "same data size": METHOD.md section 3). Uniform over the split's other records,
  redrawn while the completion equals the chosen one (a pair with nothing to prefer); not
  targeted, so it may even name the same decision with other evidence. `position` is the
  record's position in `source`."""
  chosen = completion_of(record)
  return {
    "chosen_image": record["image"],
    "rejected_image": record["image"],
    "chosen_completion": chosen,
    **random_rejected(chosen, source, position, rng),
  }


def random_rejected(chosen: str, source, position: int, rng: np.random.Generator) -> dict:
  """The rejected side of a random-negative pair: another record's completion that differs
  from `chosen` (its decision and index beside it)."""
  if len(source) < 2:
    raise ValueError(f"random negatives need two records; {source!r} has {len(source)}")
  for _ in range(RANDOM_NEGATIVE_DRAWS):
    j = int(rng.integers(len(source) - 1))
    j += j >= position  # any position but the record's own
    other = source[j]
    if completion_of(other) != chosen:
      return {
        "rejected_completion": completion_of(other),
        "rejected_decision": int(other["decision"]),
        "rejected_index": j,
      }
  raise ValueError(
    f"record {position} of {source!r}: no record with another chain and answer in "
    f"{RANDOM_NEGATIVE_DRAWS} random draws (is every completion of the split the same?)"
  )


def counterfactual_flip(
  graph: ConceptGraph, a: dict[str, str], rng: np.random.Generator
) -> tuple[int, str]:
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


def counterfactual_perception_pair(
  record: dict[str, Any],
  source,
  graph: ConceptGraph,
  rng: np.random.Generator,
  position: int,
  scene: dict | None = None,
) -> dict[str, Any]:
  """Same text; the rejected image is the chosen scene re-rendered with one concept flipped.
  `position`: the record's position in `source` (what `source.counterfactual` takes; a source
  of later scenes, data.cpo_scenes='fresh', numbers its records' `index` from its first).
  `scene`: an assignment the chosen scene is re-rendered with first (thinking_target
  'balanced'; None: the record's own scene)."""
  if not hasattr(source, "counterfactual"):
    raise ValueError(
      f"perception_mode='counterfactual' re-renders the chosen scene with one concept changed; "
      f"dataset {source!r} cannot re-render its images (only synth_drive and synth_cxr can); "
      f"use perception_mode in {INDEX_MODES}"
    )
  chosen = {}
  if scene is None:
    a = graph.assignment_from_ids(record["concepts"])
  else:
    a, shown = scene, source.counterfactual(position, scene)
    chosen = dict(
      chosen_image=shown["image"],
      chosen_completion=graph.completion_text(scene),
      chosen_decision=int(shown["decision"]),
      boxes=np.asarray(shown["boxes"], np.int32),
    )
  ci, v = counterfactual_flip(graph, a, rng)
  cf = source.counterfactual(position, {**a, graph.concepts[ci].name: v})
  pair = {
    "chosen_image": record["image"],
    "chosen_completion": completion_of(record),
    **chosen,
    "rejected_image": cf["image"],
    "rejected_decision": int(cf["decision"]),
    "rejected_index": int(record["index"]),
    "flipped_concept": ci,
  }
  pair["rejected_completion"] = pair["chosen_completion"]
  return pair


def perception_pair(
  record: dict[str, Any],
  source,
  index: PairIndex,
  position: int,
  mode: str,
  rng: np.random.Generator,
) -> dict[str, Any]:
  """`position` is the record's position in `source` (== record['index'] for synth_drive)."""
  j = index.pick(position, mode, rng)
  other = source[j]
  return {
    "chosen_image": record["image"],
    "rejected_image": other["image"],
    "chosen_completion": completion_of(record),
    "rejected_completion": completion_of(record),
    "rejected_decision": int(other["decision"]),
    "rejected_index": j,
  }


def make_pair(
  record: dict[str, Any],
  position: int,
  rng: np.random.Generator,
  *,
  graph: ConceptGraph,
  source,
  index: PairIndex,
  thinking_fraction: float = 0.5,
  perception_mode: str = "hard",
  source_weights: Sequence[float] | None = None,
  thinking_negative: str = "counterfactual",
  thinking=None,
) -> dict[str, Any]:
  """A pair dict: chosen/rejected image bytes + completions, question, source id, weight, boxes.

  `thinking_negative='random'` makes the thinking pairs random-negative pairs (still tagged
  thinking: same image, another text), the DPO baseline of `random_negative_pair`. `thinking`:
  a `thinking_pairs.ThinkingPlan` choosing which counterfactual a thinking pair rejects (aimed
  at the shortcut, or picked by the reference); None = the random rewrite."""
  if thinking_negative not in THINKING_NEGATIVES:
    raise ValueError(
      f"thinking_negative {thinking_negative!r}; expected one of {THINKING_NEGATIVES}"
    )
  kind = "thinking" if rng.random() < thinking_fraction else "perception"
  if kind == "thinking" and thinking is not None:
    pair = thinking.pair(record, position, graph, source, rng)
    if thinking_negative == "random":  # the plan picked the scene only ('balanced')
      pair.update(random_rejected(pair["chosen_completion"], source, position, rng))
  elif kind == "thinking" and thinking_negative == "random":
    pair = random_negative_pair(record, source, position, rng)
  elif kind == "thinking":
    pair = thinking_pair(record, graph, rng)
  elif perception_mode == "counterfactual":  # on the balanced scene ('balanced' picks it)
    scene = None if thinking is None else thinking.balanced_scene_of(record, position, graph)
    pair = counterfactual_perception_pair(record, source, graph, rng, position, scene)
  else:
    pair = perception_pair(record, source, index, position, perception_mode, rng)
  pair.setdefault("flipped_concept", -1)  # the concept changed in a counterfactual image, else -1
  pair.update(
    question=as_text(record["question"]),
    source=SOURCE_IDS[kind],
    # per-example weight (cpo_sample_weight); per-source weights are the loss's job
    sample_weight=float(record.get("cpo_sample_weight", 1.0)),
    index=int(record["index"]),
  )
  # A re-rendered chosen scene (thinking_target='shortcut_rerender') brings its own.
  pair.setdefault("chosen_decision", int(record["decision"]))
  pair.setdefault("boxes", np.asarray(record["boxes"], np.int32))
  return pair
