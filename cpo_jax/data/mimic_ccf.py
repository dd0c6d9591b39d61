"""`mimic_ccf`: MIMIC-CXR-JPG + CheXpert labels + CXR-CounterFact, as a TFDS builder (ArrayRecord).

The user's `data.manual_dir` holds the files as published (`.csv` or `.csv.gz`):
  files/pXX/pSUBJECT/sSTUDY/DICOM_ID.jpg    MIMIC-CXR-JPG images (XX = first 2 digits of SUBJECT)
  mimic-cxr-2.0.0-chexpert.csv[.gz]         subject_id, study_id, then the 14 CheXpert columns
                                            (1.0 positive, 0.0 negative, -1.0 uncertain, blank)
  mimic-cxr-2.0.0-split.csv[.gz]            dicom_id, study_id, subject_id, split (train/validate/test)
  one CXR-CounterFact *.json                a list of {dicom_id, sid, pid, report, diagnose,
                                            counterfact: {disease: text}} (METHOD.md section 4),
                                            read one record at a time (ijson)
One example per CCF record (split from the split CSV, labels from the CheXpert CSV by study):
  chosen = '<think> REPORT </think> The disease of this patient is A, B.' (report + diagnose),
  counterfactuals = one rejected thinking completion per counterfact disease, the precomputed
    text in the same format (kept as is when it already has '<think>').
Labels: `labels` is the 14-finding multi-hot (1 only for 1.0: uncertain and blank count as
negative, the 'U-zeros' convention) and `chexpert` the raw values (NaN = blank). The medical concept
graph is a single-label sketch, so `decision` is its decision id only when the diagnose names exactly
one of its decisions, else -1; the 14-finding multi-hot is the label of record.

`make_source` gives a pair-level source (kind 'pairs', the swift_jsonl record format), so the
pipeline's SFT (chosen side), CPO (the given pairs) and eval streams take it unchanged:
  view 'pairs' (default for train): one row per (record, counterfactual), cpo_source 'thinking';
    a record without counterfactuals is one row with rejected == chosen and cpo_sample_weight 0
    (inert in the CPO++ loss, still an SFT / eval example); then one perception row per record
    (same text, rejected image = its `hard` negative: among the records of the split with another
    14-finding label set and another study, the nearest by thumbnail: pairs.PairIndex; MIMIC has no
    nuisance labels). SFT on this view sees a record once per row (about 3 times with CCF's 2
    counterfactuals);
  view 'records' (default for the other splits): one row per record (the first counterfactual as
    the rejected side).
Bad records are found when the files are prepared: data.on_bad_record 'raise' names the CCF record
and the field; 'skip' drops it and counts it by reason (saved next to the prepared files:
`source.skipped`). Reasons: bad_type, missing_field, empty_chain (empty report or counterfactual
text: a record with an empty counterfactual keeps its other ones), missing_split (dicom not in the
split CSV), missing_label (study not in the CheXpert CSV), bad_image (image file missing or not an
image).
Prepared files go to `prepared_dir` (default <manual_dir>/_tfds), one config per (policy, image
side): the images are stored resized to the run's square as PNG (manual_tfds.py); delete them to
re-prepare. `data.manual_dir` may be a gs:// path.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from cpo_jax.data import mimic_files
from cpo_jax.data.manual_tfds import ManualBuilder
from cpo_jax.data.manual_tfds import as_str as _s
from cpo_jax.data.manual_tfds import load_thumbnails
from cpo_jax.data.manual_tfds import missing_split_error
from cpo_jax.data.manual_tfds import prepare_manual
from cpo_jax.data.manual_tfds import source_size_feature
from cpo_jax.data.manual_tfds import text as _text
from cpo_jax.data.manual_tfds import thumbnail_feature
from cpo_jax.data.mimic_files import FINDINGS
from cpo_jax.data.mimic_files import SPLIT_ALIASES
from cpo_jax.data.pairs import SOURCE_IDS
from cpo_jax.data.pairs import PairIndex
from cpo_jax.data.swift_jsonl import NO_PREFERENCE

# ---- TFDS builder -----------------------------------------------------------------------

with tfds.core.registered.skip_registration():

  class MimicCcf(ManualBuilder):
    """MIMIC-CXR-JPG + CheXpert labels + CXR-CounterFact (see module doc)."""

    MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__

    def _info(self) -> tfds.core.DatasetInfo:
      return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict(
          {
            # PNG at the config's side (prepared_images.py), or the JPEG as published
            "image": _text(),
            "thumbnail": thumbnail_feature(),  # pairs.thumbnail(the published image)
            "source_size": source_size_feature(),
            "question": _text(),
            "chosen": _text(),
            "counterfactuals": _text(),  # JSON [[disease, completion]]
            "diagnose": _text(),
            "dicom_id": _text(),
            "labels": tfds.features.Tensor(shape=(len(FINDINGS),), dtype=np.int32),
            "chexpert": tfds.features.Tensor(shape=(len(FINDINGS),), dtype=np.float32),
            "decision": tfds.features.Scalar(dtype=np.int32),
            "subject_id": tfds.features.Scalar(dtype=np.int64),
            "study_id": tfds.features.Scalar(dtype=np.int64),
            "index": tfds.features.Scalar(dtype=np.int64),
          }
        ),
        supervised_keys=None,
        disable_shuffling=True,  # record i = the split's i-th CCF record
        homepage="https://physionet.org/content/mimic-cxr-jpg/2.0.0/",
        metadata=tfds.core.MetadataDict(findings=list(FINDINGS)),
      )

    def _passes(self, manual_dir):
      # One pass over the CXR-CounterFact records: each goes to its split's files.
      total, items = mimic_files.records(manual_dir, self.builder_config.image_side)
      self._label_sets = {}  # label set -> the one tuple every record with it shares
      return [("CXR-CounterFact records", total, items)]

    def _examples(self, context, result):
      return mimic_files.examples_of(context, result, self.policy)

    def _facts(self, example):
      """Counterfactuals per record, the label multi-hot and the study id (the report keeps
      them per split: the row index and the perception negatives without reading every record
      back). Records share a few label sets: each is held once (a tuple, written as a list)."""
      labels = tuple(np.asarray(example["labels"]).tolist())
      return {
        "num_counterfactuals": len(json.loads(example["counterfactuals"])),
        "labels": self._label_sets.setdefault(labels, labels),
        "study_ids": int(example["study_id"]),
      }


def hard_negatives(
  labels: np.ndarray, thumbnails: np.ndarray, study_ids: np.ndarray, seed: int = 0
) -> np.ndarray:
  """[N] index of each record's perception negative, -1 if none (METHOD.md section 4 'hard'): among
  the records whose 14-finding label set differs and whose study differs, the nearest by thumbnail
  (pairs.PairIndex.hard_negatives: bounded candidate pools, no N x N matrix)."""
  labels = np.asarray(labels, np.int64).reshape(len(labels), -1)
  # The label set as one int: the decisive label.
  codes = (labels << np.arange(labels.shape[1])).sum(-1)
  if len(np.unique(codes)) < 2:  # one label set in the split: no perception pair possible
    return np.full(len(labels), -1, np.int64)
  return PairIndex(
    codes, labels, thumbnails=thumbnails, group=np.asarray(study_ids), seed=seed
  ).hard_negatives()


def data_source(
  manual_dir: str,
  split: str,
  *,
  view: str | None = None,
  on_bad_record: str = "raise",
  prepared_dir: str | None = None,
  image_size: int | None = None,
  prepare_workers: int = 0,
) -> "MimicCcfSource":
  """The split's pair-level source; the files are prepared first if needed, with the images at
  the run's side (`image_size`, data.image_size; None keeps them as published) by
  `prepare_workers` processes (data.prepare_workers)."""
  split = SPLIT_ALIASES.get(split, split)
  builder, report = prepare_manual(
    MimicCcf, manual_dir, prepared_dir, on_bad_record, image_size, prepare_workers
  )
  if split not in builder.info.splits:
    raise missing_split_error("mimic_ccf", split, builder, report)
  view = view or ("pairs" if split == "train" else "records")
  return MimicCcfSource(
    builder.as_data_source(split=split),
    split,
    report,
    view,
    load_thumbnails(builder, split) if view == "pairs" else None,
  )


# ---- the pair-level source the pipeline reads --------------------------------------------


class MimicCcfSource:
  """Pair records in the swift_jsonl format (+ labels, decision, dicom_id); see the module doc."""

  kind = "pairs"
  domain = "medical"

  def __init__(
    self, src, split: str, report: dict, view: str, thumbnails: np.ndarray | None = None
  ):
    if view not in ("pairs", "records"):
      raise ValueError(f"view {view!r}; expected 'pairs' or 'records'")
    self._src, self.split, self.view = src, split, view
    self.skipped = report["skipped"]  # reason -> count, from preparing the files
    n_cf = report["num_counterfactuals"][split]
    if view == "pairs":  # (record, counterfactual j or -1 - negative record for a perception row)
      neg = (
        hard_negatives(report["labels"][split], thumbnails, report["study_ids"][split])
        if n_cf
        else []
      )
      self._rows = [(i, j) for i, n in enumerate(n_cf) for j in range(max(n, 1))]
      self._rows += [(i, -1 - int(v)) for i, v in enumerate(neg) if v >= 0]
    else:
      self._rows = [(i, 0) for i in range(len(n_cf))]
    self._num_counterfactuals = n_cf

  def __len__(self) -> int:
    return len(self._rows)

  def __repr__(self):
    return f"mimic_ccf({self.split}, {self.view})"

  def pair_sources(self) -> np.ndarray:
    """[N] int8: each row's cpo_source id (a record without counterfactuals: NO_PREFERENCE),
    from the prepared files' report, without reading a record."""
    n_cf = self._num_counterfactuals
    return np.array(
      [
        SOURCE_IDS["perception"]
        if j < 0
        else (SOURCE_IDS["thinking"] if j < n_cf[i] else NO_PREFERENCE)
        for i, j in self._rows
      ],
      np.int8,
    )

  def __getitem__(self, i: int) -> dict[str, Any]:
    if not 0 <= i < len(self):
      raise IndexError(i)
    k, j = self._rows[i]
    ex = self._src[k]
    cfs = json.loads(_s(ex["counterfactuals"]))
    chosen = _s(ex["chosen"])
    user = [{"role": "user", "content": "<image>" + _s(ex["question"])}]
    rid = f"mimic_ccf/{self.split}[{k}] (dicom_id={_s(ex['dicom_id'])})"
    if j < 0:  # perception: same text, the hard negative's image
      neg = self._src[-1 - j]
      return {
        "prompt_messages": user,
        "chosen": chosen,
        "rejected_prompt_messages": user,
        "rejected": chosen,
        "image": ex["image"],
        "rejected_image": neg["image"],
        "source": SOURCE_IDS["perception"],
        "sample_weight": 1.0,
        "index": i,
        "labels": np.asarray(ex["labels"], np.int32),
        "record_id": f"{rid} vs [{-1 - j}] (dicom_id={_s(neg['dicom_id'])})",
        "decision": int(ex["decision"]),
        "dicom_id": _s(ex["dicom_id"]),
      }
    has_cf = j < len(cfs)
    return {
      "prompt_messages": user,
      "chosen": chosen,
      "rejected_prompt_messages": user,
      "rejected": cfs[j][1] if has_cf else chosen,
      "image": ex["image"],
      "rejected_image": ex["image"],
      "source": SOURCE_IDS["thinking" if has_cf else "other"],
      "sample_weight": 1.0 if has_cf else 0.0,
      "index": i,
      "record_id": rid,
      "labels": np.asarray(ex["labels"], np.int32),
      "decision": int(ex["decision"]),
      "dicom_id": _s(ex["dicom_id"]),
    }
