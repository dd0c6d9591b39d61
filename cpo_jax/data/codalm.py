"""`codalm`: CODA-LM (driving corner cases, Li et al. 2024) as a TFDS builder (ArrayRecord).

Layout, as published in the README of github.com/DLUT-LYZ/CODA-LM ("Data Preparation" and
"Data Format"; checked against its convert2vqa.py), under the user's `data.manual_dir`:
  val/images/*.jpg            CODA2022 val images (CODA-LM Train uses them)
  test/images/*.jpg           CODA2022 test images (CODA-LM Val, Test, Mini)
  CODA-LM/{Train,Val,Test,Mini}/<img_dir>_<name>.json    one annotation file per image, e.g.
      CODA-LM/Train/val_0001.json -> val/images/0001.jpg (convert2vqa.py: img_dir = the file
      name before the first '_', image = the rest + '.jpg'), holding
    {"general_perception": {"vehicles": [{"description", "explanation"}], "vulnerable_road_users":
        [...], "traffic signs", "traffic lights", "traffic cones", "barriers", "other objects",
        "description and explanation": str},
     "region_perception": {"1": {"description and explanation": str, "box": [x, y, w, h],
        "category_name": str}, ...},
     "driving_suggestion": str}
The three tasks become examples exactly as the repo's convert2vqa.py makes its VQA files
(CODA-LM/<Split>/vqa_anno/*.json, a derived format we do not need to read): its questions verbatim;
general perception answers 'description and explanation', driving suggestion answers
'driving_suggestion', and each region is one example on the image with its box drawn as a red
rectangle (width 2, as convert2vqa.py; its saved images_w_boxes/<name>_object_<k>.jpg is used when
present) on the published image, which is then resized to the run's square like any other
(prepared_images.py; the `box` field stays in the published image's pixels, `source_size`). Not confirmed: the 'description and explanation' summary of general_perception is absent
from the README's first version; the Test split's answers were released later (convert2vqa.py writes
no answers for Test), so a record without its answer is a bad record (missing_field).

No counterfactuals ship with CODA-LM. A record becomes a thinking pair only when its answer parses
with the driving concept graph (cpo_jax/knowledge/driving.json: free-text terms, decision aliases
and negation cues): it names exactly one decision ('the ego car should slow down'; 'no need to stop'
names none), the negation-aware concept matcher (knowledge/free_text.py) finds at least one concept
in it, the graph's rule agrees with the named decision, and the rewriter emits a valid
counterfactual. Then chosen = '<think> ANSWER </think> The decision is D.' and rejected = the
rewritten report for another decision. Every other record is SFT/eval only: rejected == chosen,
cpo_source 'other', cpo_sample_weight 0 (inert in the CPO++ loss). An answer that lists many objects
and several possible actions (most general-perception answers) names no single decision: such
records stay SFT/eval only.

`make_source` gives a pair-level source (kind 'pairs', the swift_jsonl record format) with
`domain = 'driving'`: one row per example, then one perception row per thinking-pair example (same
chosen text; rejected image = its `hard` negative, pairs.PairIndex: among the parsed examples with
another decision and from another image, the nearest by thumbnail, an example with a red box
preferring one with a box; SFT on this source sees such an example twice). Bad records (missing or
undecodable image, missing field, empty answer, wrong types) follow data.on_bad_record when the
files are prepared ('skip' counts them by reason: `source.skipped`; 'raise' names the file and the
field). `data.manual_dir` may be a gs:// path.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from cpo_jax import paths
from cpo_jax.data.bad_records import BadRecordError
from cpo_jax.data.manual_tfds import ManualBuilder
from cpo_jax.data.manual_tfds import as_str as _s
from cpo_jax.data.manual_tfds import load_thumbnails
from cpo_jax.data.manual_tfds import missing_split_error
from cpo_jax.data.manual_tfds import prepare_manual
from cpo_jax.data.manual_tfds import source_size_feature
from cpo_jax.data.manual_tfds import text as _text
from cpo_jax.data.manual_tfds import thumbnail_feature
from cpo_jax.data.pairs import SOURCE_IDS
from cpo_jax.data.pairs import PairIndex
from cpo_jax.data.prepared_images import ImageJob
from cpo_jax.data.prepared_images import ImageResult
from cpo_jax.data.swift_jsonl import NO_PREFERENCE
from cpo_jax.knowledge import free_text
from cpo_jax.knowledge.graph import THINK_CLOSE
from cpo_jax.knowledge.graph import THINK_OPEN
from cpo_jax.knowledge.graph import load_graph

SPLITS = {
  "train": "Train",
  "val": "Val",
  "validation": "Val",
  "validate": "Val",
  "test": "Test",
  "mini": "Mini",
}
TASKS = ("general_perception", "region_perception", "driving_suggestion")
# convert2vqa.py's questions, verbatim
QUESTIONS = {
  "general_perception": "There is an image of traffic captured from the perspective of the ego car. Please focus "
  "on objects that have a great influence on ego car driving behavior in the scene, describe "
  "these objects and the reasons why they influence ego car driving.",
  "driving_suggestion": "There is an image of traffic captured from the perspective of the ego car. Please provide "
  "driving suggestions for the ego car based on the current scene.",
  "region_perception": "Please describe the object inside the red rectangle in the image and explain why it affect "
  "ego car driving.",
}


def _answer(x, field, rid) -> str:
  if x is None:
    raise BadRecordError("missing_field", rid, f"missing field {field!r}")
  if not isinstance(x, str):
    raise BadRecordError("bad_type", rid, f"field {field!r} must be a string")
  if not x.strip():
    raise BadRecordError("empty_chain", rid, f"field {field!r} is empty")
  return x.strip()


def thinking_pair(answer: str, graph) -> tuple[str, str] | None:
  """(chosen, rejected) when the answer parses with the graph (module doc), else None."""
  d = free_text.answer_decision(graph, answer)
  a, sents = free_text.parse_report(graph, answer)
  if d is None or not any(m for _, m in sents) or graph.decide(a) != d:
    return None
  chosen = f"{THINK_OPEN} {answer} {THINK_CLOSE} {graph.answer_text(d)}"
  try:
    cf = free_text.rewrite_report(graph, chosen, k=1, seed=0)[0]
  except Exception:  # GraphError: no valid counterfactual for this answer
    return None
  return chosen, cf.completion


def _annotation_files(manual_dir: str, split_dir: str) -> list:
  root = paths.path(manual_dir) / "CODA-LM" / split_dir
  files = sorted(root.glob("*_*.json"), key=os.fspath)
  if not files:
    raise FileNotFoundError(
      f"codalm: no CODA-LM/{split_dir}/<img_dir>_<name>.json annotation files in {manual_dir}"
    )
  return files


@dataclasses.dataclass
class _Scene:
  """One annotation file (one scene image) on its way to examples, kept in the preparing
  process while its images are prepared: the error that makes the whole file bad, or its
  items in file order, each a BadRecordError (raised or counted in that order once the image
  is known good) or (task, answer, meta, box k or None for the scene image, record id)."""

  split: str
  fname: str
  error: BadRecordError | None = None
  items: list = dataclasses.field(default_factory=list)


def _scenes(manual_dir: str, split: str, files, side: int):
  """(scene, image job) per annotation file, in file order (lazy; text only)."""

  @functools.lru_cache(maxsize=None)
  def published_boxes(img_dir: str) -> frozenset:  # <img_dir>/images_w_boxes, listed once
    d = paths.path(manual_dir) / img_dir / "images_w_boxes"
    return frozenset(p.name for p in d.iterdir()) if d.is_dir() else frozenset()

  for path in files:
    fname = path.name
    img_dir, name = fname[: -len(".json")].split("_", 1)
    try:
      ann = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      yield _Scene(split, fname, BadRecordError("bad_json", fname, f"not valid JSON: {e}")), None
      continue
    if not isinstance(ann, dict):
      error = BadRecordError("bad_type", fname, "an annotation file must hold a JSON object")
      yield _Scene(split, fname, error), None
      continue
    img_path = os.path.join(manual_dir, img_dir, "images", f"{name}.jpg")
    scene, boxes, published = _Scene(split, fname), [], []
    base = {
      "image_id": f"{img_dir}/{name}",
      "region": -1,
      "box": np.zeros(4, np.float32),
      "category": "",
    }
    gp = ann.get("general_perception")
    for task, value, field in (
      (
        "general_perception",
        gp.get("description and explanation") if isinstance(gp, dict) else gp,
        "general_perception.description and explanation",
      ),
      ("driving_suggestion", ann.get("driving_suggestion"), "driving_suggestion"),
    ):
      try:
        scene.items.append((task, _answer(value, field, fname), base, None, fname))
      except BadRecordError as e:
        scene.items.append(e)
    regions = ann.get("region_perception", {})
    if not isinstance(regions, dict):
      scene.items.append(
        BadRecordError(
          "bad_type", fname, "field 'region_perception' must be an object {index: region}"
        )
      )
      regions = {}
    for k, reg in sorted(regions.items(), key=lambda kv: (len(kv[0]), kv[0])):
      rid = f"{fname} region_perception[{k!r}]"
      try:
        if (
          not isinstance(reg, dict)
          or not isinstance(reg.get("box"), list)
          or len(reg["box"]) != 4
          or not all(isinstance(v, (int, float)) for v in reg["box"])
        ):
          raise BadRecordError("bad_type", rid, "a region needs 'box': [x, y, w, h] numbers")
        text = _answer(reg.get("description and explanation"), "description and explanation", rid)
      except BadRecordError as e:
        scene.items.append(e)
        continue
      meta = {
        "image_id": f"{img_dir}/{name}",
        "region": int(k) if str(k).isdigit() else -1,
        "box": np.asarray(reg["box"], np.float32),
        "category": str(reg.get("category_name", "")),
      }
      drawn = f"{name}_object_{k}.jpg"  # convert2vqa.py's own boxed image, used when present
      published.append(
        os.path.join(manual_dir, img_dir, "images_w_boxes", drawn)
        if drawn in published_boxes(img_dir)
        else ""
      )
      boxes.append(tuple(float(v) for v in reg["box"]))
      scene.items.append(("region_perception", text, meta, len(boxes) - 1, rid))
    yield scene, ImageJob(img_path, side, tuple(boxes), tuple(published))


def _scene_examples(scene: _Scene, image: ImageResult | None, bad, graph) -> list:
  """(split, example) of one annotation file once its images are prepared; bad items are
  raised or counted by `bad`, in file order (a file whose image is bad: that alone)."""
  if scene.error is not None:
    bad(scene.error)
    return []
  if image.error:
    bad(BadRecordError("bad_image", scene.fname, image.error))
    return []
  out = []
  for item in scene.items:
    if isinstance(item, BadRecordError):
      bad(item)
      continue
    task, answer, meta, k, rid = item
    data = image.image if k is None else image.boxed[k]
    if isinstance(data, str):  # the box could not be drawn
      bad(BadRecordError("bad_image", rid, data))
      continue
    pair = thinking_pair(answer, graph)
    example = {
      "image": data,
      # Of the scene: its regions' thin red boxes barely touch an 8x8 thumbnail.
      "thumbnail": image.thumbnail,
      "source_size": np.asarray(image.size, np.int32),
      "question": QUESTIONS[task],
      "answer": answer,
      "task": task,
      "chosen": pair[0] if pair else answer,
      "rejected": pair[1] if pair else "",
      "decision": np.int32(graph.decision_id(graph.parse_decision(pair[0])) if pair else -1),
      **meta,
    }
    out.append((scene.split, example))
  return out


with tfds.core.registered.skip_registration():

  class Codalm(ManualBuilder):
    """CODA-LM (see module doc); one example per (image, task[, region])."""

    MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__

    def _info(self) -> tfds.core.DatasetInfo:
      return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict(
          {
            # PNG at the config's side (prepared_images.py; regions: the red box drawn on the
            # published image before resizing), or the JPEG as published
            "image": _text(),
            "thumbnail": thumbnail_feature(),  # pairs.thumbnail of the scene image (without the box)
            "source_size": source_size_feature(),  # of the published scene image
            "question": _text(),
            "answer": _text(),
            "task": _text(),
            "image_id": _text(),
            "category": _text(),
            "chosen": _text(),
            "rejected": _text(),  # rejected '' = no counterfactual (SFT/eval only)
            "region": tfds.features.Scalar(dtype=np.int32),
            # The driving decision id of a thinking pair, else -1.
            "decision": tfds.features.Scalar(dtype=np.int32),
            # xywh in the published image's pixels (source_size); 0 = none
            "box": tfds.features.Tensor(shape=(4,), dtype=np.float32),
            "index": tfds.features.Scalar(dtype=np.int64),
          }
        ),
        supervised_keys=None,
        disable_shuffling=True,
        homepage="https://github.com/DLUT-LYZ/CODA-LM",
      )

    def _passes(self, manual_dir):
      root = paths.path(manual_dir) / "CODA-LM"
      present = sorted({v for v in SPLITS.values() if (root / v).is_dir()})
      if not present:
        raise FileNotFoundError(f"codalm: no CODA-LM/{{Train,Val,Test,Mini}} in {manual_dir}")
      files = {s: _annotation_files(manual_dir, s) for s in present}  # all listed first
      side = self.builder_config.image_side
      self._graph = load_graph("driving")  # once: parsing it is not free
      return [
        (s.lower(), len(fs), _scenes(manual_dir, s.lower(), fs, side)) for s, fs in files.items()
      ]

    def _examples(self, context, result):
      return _scene_examples(context, result, self.policy, self._graph)

    def _facts(self, example):
      """Decision, scene id and whether the image has a box (the perception index)."""
      return {
        "decisions": int(example["decision"]),
        "image_ids": example["image_id"],
        "boxed": int(example["region"] >= 0),
      }


def data_source(
  manual_dir: str,
  split: str,
  *,
  on_bad_record: str = "raise",
  prepared_dir: str | None = None,
  image_size: int | None = None,
  prepare_workers: int = 0,
) -> "CodalmSource":
  """The split's pair-level source; the files are prepared first if needed, with the images at
  the run's side (`image_size`, data.image_size; None keeps them as published) by
  `prepare_workers` processes (data.prepare_workers)."""
  if split not in SPLITS:
    raise ValueError(f"codalm has no split {split!r} (names: {sorted(SPLITS)})")
  builder, report = prepare_manual(
    Codalm, manual_dir, prepared_dir, on_bad_record, image_size, prepare_workers
  )
  s = SPLITS[split].lower()
  if s not in builder.info.splits:
    raise missing_split_error(f"codalm (CODA-LM/{SPLITS[split]})", split, builder, report)
  return CodalmSource(builder.as_data_source(split=s), s, report, load_thumbnails(builder, s))


def hard_negatives(decisions, image_ids, boxed, thumbnails, seed: int = 0) -> np.ndarray:
  """[N] each thinking-pair example's perception negative, -1 if none or not a pair: the nearest
  by thumbnail among the pair examples with another decision and another image, same `boxed` first
  (pairs.PairIndex; the box is the one known nuisance)."""
  dec = np.asarray(decisions, np.int64)
  out = np.full(len(dec), -1, np.int64)
  ok = np.flatnonzero(dec >= 0)
  if len(np.unique(dec[ok])) < 2:
    return out
  scene = np.unique(np.asarray(image_ids), return_inverse=True)[1].reshape(-1)
  idx = PairIndex(
    dec[ok],
    dec[ok, None],
    np.asarray(boxed)[ok],
    thumbnails=np.asarray(thumbnails)[ok],
    group=scene[ok],
    seed=seed,
  )
  neg = idx.hard_negatives()
  out[ok] = np.where(neg >= 0, ok[neg], -1)
  return out


class CodalmSource:
  """Pair records in the swift_jsonl format (+ task, answer): one row per example, then the
  perception rows (module doc)."""

  kind = "pairs"
  domain = "driving"

  def __init__(self, src, split: str, report: dict, thumbnails: np.ndarray):
    self._src, self.split, self.skipped = src, split, report["skipped"]
    self._decisions = report["decisions"][split]
    neg = hard_negatives(
      self._decisions, report["image_ids"][split], report["boxed"][split], thumbnails
    )
    self._rows = [(i, -1) for i in range(len(src))] + [
      (i, int(j)) for i, j in enumerate(neg) if j >= 0
    ]

  def __len__(self) -> int:
    return len(self._rows)

  def __repr__(self):
    return f"codalm({self.split})"

  def pair_sources(self) -> np.ndarray:
    """[N] int8: each row's cpo_source id (an example without a thinking pair, decision -1:
    NO_PREFERENCE), from the prepared files' report, without reading a record."""
    return np.array(
      [
        SOURCE_IDS["perception"]
        if j >= 0
        else (SOURCE_IDS["thinking"] if self._decisions[i] >= 0 else NO_PREFERENCE)
        for i, j in self._rows
      ],
      np.int8,
    )

  def __getitem__(self, i: int) -> dict[str, Any]:
    if not 0 <= i < len(self):
      raise IndexError(i)
    k, j = self._rows[i]
    ex = self._src[k]
    user = [{"role": "user", "content": "<image>" + _s(ex["question"])}]
    chosen, rejected = _s(ex["chosen"]), _s(ex["rejected"])
    rid = f"codalm/{self.split}[{k}] ({_s(ex['image_id'])} {_s(ex['task'])})"
    row = {
      "prompt_messages": user,
      "chosen": chosen,
      "rejected_prompt_messages": user,
      "rejected": rejected or chosen,
      "image": ex["image"],
      "rejected_image": ex["image"],
      "source": SOURCE_IDS["thinking" if rejected else "other"],
      "sample_weight": 1.0 if rejected else 0.0,
      "index": i,
      "record_id": rid,
      "task": _s(ex["task"]),
      "answer": _s(ex["answer"]),
      "region": int(ex["region"]),
      "box": np.asarray(ex["box"], np.float32),
      "decision": int(ex["decision"]),
    }
    if j >= 0:  # perception: same text, the hard negative's image
      neg = self._src[j]
      row.update(
        rejected=chosen,
        rejected_image=neg["image"],
        source=SOURCE_IDS["perception"],
        record_id=f"{rid} vs [{j}] ({_s(neg['image_id'])} {_s(neg['task'])})",
      )
    return row
