"""What the synthetic datasets share: shortcut-label sampling, the record format, the source.

A synthetic domain (synth_drive, synth_cxr) is a concept graph plus a renderer. Labels are
drawn here, the same way for every domain: a balanced decision, then an assignment of the
concepts that yields it, then the nuisance, which equals `decision id mod #nuisance values`
with probability `agreement` in train/test (the shortcut) and is uniform in ood.
Every example is a pure function of (seed, split, index) and the domain's `stream`.
"""

from __future__ import annotations

import dataclasses
import functools
import io
from typing import Any
from typing import Callable

import numpy as np
from PIL import Image

from cpo_jax.knowledge.graph import ConceptGraph
from cpo_jax.knowledge.graph import load_graph

SPLITS = ("train", "test", "ood")
SPLIT_IDS = {s: i for i, s in enumerate(SPLITS)}
SHORTCUT_AGREEMENT = {"train": 0.9, "test": 0.9, "ood": 0.25}  # P(nuisance == decision's value)

# render(assignment, nuisance value, rng) -> (uint8 image [S,S,3], boxes int32 [C,4] in concept order)
Renderer = Callable[[dict, str, np.random.Generator], tuple[np.ndarray, np.ndarray]]


@functools.lru_cache(maxsize=None)
def _graph(name: str) -> ConceptGraph:
  return load_graph(name)


@functools.lru_cache(maxsize=None)
def _assignments_by_decision(name: str) -> dict[str, list[dict[str, str]]]:
  g = _graph(name)
  out: dict[str, list] = {d: [] for d in g.decisions}
  for a in g.all_assignments():
    out[g.decide(a)].append(a)
  return out


def png_bytes(arr: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, format="PNG", optimize=False, compress_level=1)
  return buf.getvalue()


@dataclasses.dataclass(frozen=True)
class Synth:
  """One synthetic domain: `graph_name` (also the pipeline's `domain`), rng stream, renderer."""

  graph_name: str
  stream: int  # added to the split id in the rng seed: keeps the domains' random streams apart
  render: Renderer

  def graph(self) -> ConceptGraph:
    return _graph(self.graph_name)

  def sample_labels(
    self, seed: int, split: str, index: int, agreement: float | None = None
  ) -> tuple[dict[str, str], str, int, np.random.Generator]:
    """(assignment, decision, nuisance id, rng for rendering) for one example.

    agreement: P(nuisance == the decision's value) in train/test (default 0.9); ood is uniform.
    """
    if split not in SPLIT_IDS:
      raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    g = self.graph()
    rng = np.random.default_rng([seed, self.stream + SPLIT_IDS[split], index])
    d = int(rng.integers(len(g.decisions)))  # balanced decisions
    pool = _assignments_by_decision(self.graph_name)[g.decisions[d]]
    a = pool[int(rng.integers(len(pool)))]
    n_vals = len(g.nuisance_values)
    target = d % n_vals  # more decisions than nuisance values: several share one value
    if split == "ood":
      nuis = int(rng.integers(n_vals))
    elif rng.random() < (SHORTCUT_AGREEMENT[split] if agreement is None else agreement):
      nuis = target
    else:
      nuis = int((target + 1 + rng.integers(n_vals - 1)) % n_vals)
    return dict(a), g.decisions[d], nuis, rng

  def make_example(
    self,
    seed: int,
    split: str,
    index: int,
    *,
    encode_png: bool = True,
    agreement: float | None = None,
  ) -> dict[str, Any]:
    """One record (the TFDS feature dict): image PNG bytes (or uint8 array), texts, labels, boxes.

    boxes[i] is the evidence box for concept i (graph order) in pixels (x0, y0, x1, y1), also
    when the concept is absent (so 'occlude the evidence region' is defined for every image).
    """
    g = self.graph()
    a, d, nuis, rng = self.sample_labels(seed, split, index, agreement)
    arr, boxes = self.render(a, g.nuisance_values[nuis], rng)
    return {
      "image": png_bytes(arr) if encode_png else arr,
      "question": g.question,
      "chain": g.chain_text(a),
      "answer": g.answer_text(d),
      "decision": g.decision_id(d),
      "concepts": np.asarray(g.value_ids(a), np.int32),
      "nuisance": nuis,
      "boxes": boxes,
      "index": index,
    }

  def counterfactual(
    self,
    seed: int,
    split: str,
    index: int,
    assignment: dict[str, str],
    *,
    encode_png: bool = True,
    agreement: float | None = None,
  ) -> dict[str, Any]:
    """Example `index` re-rendered with `assignment` instead of its own concepts.

    Same nuisance and the same rng state as make_example, so whatever the renderer draws
    independently of a concept's value (background, other objects, their jitter) comes out
    pixel-identical: with one concept changed this is a minimal pair (METHOD.md section 4).
    Both renderers draw the same randomness whatever the concept values (tested pixel-exact
    for synth_drive); in synth_cxr the lungs' shape (hyperinflation, volume loss) moves the
    effusion and pneumothorax drawn inside them.
    Returns image, decision, concepts, boxes (no texts: the pair keeps the chosen text).
    """
    g = self.graph()
    _, _, nuis, rng = self.sample_labels(seed, split, index, agreement)
    if not g.is_valid(assignment):
      raise ValueError(f"invalid {self.graph_name} assignment {assignment}")
    arr, boxes = self.render(assignment, g.nuisance_values[nuis], rng)
    return {
      "image": png_bytes(arr) if encode_png else arr,
      "decision": g.decision_id(g.decide(assignment)),
      "concepts": np.asarray(g.value_ids(assignment), np.int32),
      "boxes": boxes,
    }


class SynthSource:
  """Random-access source rendering a domain's records on the fly (same records as the TFDS builder).

  Implements grain's RandomAccessDataSource protocol (__len__, __getitem__), so the pipeline
  can run without preparing TFDS files (tests, quick runs). Subclasses set `synth` and `domain`.
  """

  synth: Synth
  domain: str  # concept graph name, read by the pipeline

  def __init__(
    self,
    split: str,
    num_examples: int,
    seed: int = 0,
    encode_png: bool = True,
    agreement: float | None = None,
    first_index: int = 0,
  ):
    self.split, self.num_examples, self.seed, self.encode_png = (
      split,
      num_examples,
      seed,
      encode_png,
    )
    self.agreement = agreement
    # Record i is the split's scene first_index + i: another range of the same split gives
    # scenes from the same distribution that a source over [0, first_index) never shows.
    if first_index < 0:
      raise ValueError(f"first_index={first_index}; expected >= 0")
    self.first_index = int(first_index)

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> dict[str, Any]:
    if not 0 <= index < self.num_examples:
      raise IndexError(index)
    return self.synth.make_example(
      self.seed,
      self.split,
      self.first_index + int(index),
      encode_png=self.encode_png,
      agreement=self.agreement,
    )

  def counterfactual(self, index: int, assignment: dict[str, str]) -> dict[str, Any]:
    """Record `index` re-rendered with another concept assignment (Synth.counterfactual)."""
    return self.synth.counterfactual(
      self.seed,
      self.split,
      self.first_index + int(index),
      assignment,
      encode_png=self.encode_png,
      agreement=self.agreement,
    )

  def labels(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(decision [N], concepts [N,C], nuisance [N]) without rendering (for the pair index)."""
    g = self.synth.graph()
    d, c, n = [], [], []
    for i in range(self.first_index, self.first_index + self.num_examples):
      a, dec, nuis, _ = self.synth.sample_labels(self.seed, self.split, i, self.agreement)
      d.append(g.decision_id(dec))
      c.append(g.value_ids(a))
      n.append(nuis)
    return np.asarray(d, np.int32), np.asarray(c, np.int32), np.asarray(n, np.int32)

  def __repr__(self):
    first = f", first_index={self.first_index}" if self.first_index else ""
    return (
      f"{type(self).__name__}(split={self.split!r}, n={self.num_examples}, seed={self.seed}{first})"
    )
