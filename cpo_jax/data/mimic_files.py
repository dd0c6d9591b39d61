"""The published MIMIC-CXR-JPG, CheXpert and CXR-CounterFact files -> one example per CCF record.

What `mimic_ccf`'s builder writes (see its module doc for the layout of `data.manual_dir`):
the split from the split CSV, the labels from the CheXpert CSV by study, the chosen completion
from the report and diagnose, one rejected thinking completion per counterfact disease. A
record that cannot become an example raises `BadRecordError` naming it and the field, which the
builder's bad-record policy raises or counts.
"""

from __future__ import annotations

import collections
import csv
import glob
import gzip
import json
import math
import os
from typing import Any

import numpy as np

from cpo_jax.data.bad_records import BadRecordError
from cpo_jax.data.pairs import thumbnail
from cpo_jax.knowledge.graph import THINK_CLOSE
from cpo_jax.knowledge.graph import THINK_OPEN
from cpo_jax.knowledge.graph import load_graph

FINDINGS = (
  "Atelectasis",
  "Cardiomegaly",
  "Consolidation",
  "Edema",
  "Enlarged Cardiomediastinum",
  "Fracture",
  "Lung Lesion",
  "Lung Opacity",
  "No Finding",
  "Pleural Effusion",
  "Pleural Other",
  "Pneumonia",
  "Pneumothorax",
  "Support Devices",
)  # CheXpert's 14, in the CSV's column order
SPLITS = ("train", "validate", "test")
SPLIT_ALIASES = {
  "train": "train",
  "validate": "validate",
  "validation": "validate",
  "val": "validate",
  "test": "test",
}
QUESTION = "What is the disease of this patient?"
ANSWER = "The disease of this patient is {}."
CHEXPERT_CSV, SPLIT_CSV = "mimic-cxr-2.0.0-chexpert.csv", "mimic-cxr-2.0.0-split.csv"


def _open_csv(manual_dir: str, name: str):
  for p in (os.path.join(manual_dir, name), os.path.join(manual_dir, name + ".gz")):
    if os.path.exists(p):
      raw = gzip.open(p, "rt", newline="") if p.endswith(".gz") else open(p, newline="")
      return p, raw
  raise FileNotFoundError(f"mimic_ccf: {name}[.gz] not found in manual_dir {manual_dir}")


def _id(x, prefix: str) -> int:
  """'p10000032' / '10000032' / 10000032 -> 10000032 (CCF writes pid/sid with or without the letter)."""
  s = str(x).strip()
  return int(s[1:] if s[:1].lower() == prefix else s)


def read_chexpert(manual_dir: str) -> dict[tuple[int, int], np.ndarray]:
  """(subject_id, study_id) -> [14] float32 (NaN = blank)."""
  path, f = _open_csv(manual_dir, CHEXPERT_CSV)
  with f:
    rows = csv.DictReader(f)
    missing = [c for c in ("subject_id", "study_id") + FINDINGS if c not in (rows.fieldnames or ())]
    if missing:
      raise ValueError(f"{path}: missing columns {missing}")
    return {
      (int(r["subject_id"]), int(r["study_id"])): np.array(
        [float(r[c]) if r[c].strip() else math.nan for c in FINDINGS], np.float32
      )
      for r in rows
    }


def read_split(manual_dir: str) -> dict[str, tuple[int, int, str]]:
  """dicom_id -> (subject_id, study_id, split)."""
  path, f = _open_csv(manual_dir, SPLIT_CSV)
  with f:
    rows = csv.DictReader(f)
    if not {"dicom_id", "study_id", "subject_id", "split"} <= set(rows.fieldnames or ()):
      raise ValueError(f"{path}: needs columns dicom_id, study_id, subject_id, split")
    return {
      r["dicom_id"]: (int(r["subject_id"]), int(r["study_id"]), r["split"].strip()) for r in rows
    }


def find_ccf_json(manual_dir: str) -> str:
  found = sorted(glob.glob(os.path.join(manual_dir, "*.json")))
  if len(found) != 1:
    raise FileNotFoundError(
      f"mimic_ccf: expected exactly one CXR-CounterFact .json in {manual_dir}, found {found}"
    )
  return found[0]


def image_path(manual_dir: str, subject_id: int, study_id: int, dicom_id: str) -> str:
  s = str(subject_id)
  return os.path.join(manual_dir, "files", f"p{s[:2]}", f"p{s}", f"s{study_id}", f"{dicom_id}.jpg")


def _diseases(diagnose, rid) -> list[str]:
  if isinstance(diagnose, str):
    out = [d.strip() for d in diagnose.split(",")]
  elif isinstance(diagnose, list) and all(isinstance(d, str) for d in diagnose):
    out = [d.strip() for d in diagnose]
  else:
    raise BadRecordError(
      "bad_type", rid, f"field 'diagnose' must be a string or a list of strings, got {diagnose!r}"
    )
  out = [d for d in out if d]
  if not out:
    raise BadRecordError("missing_field", rid, "field 'diagnose' is empty")
  return out


def completion(findings: str, diseases: list[str]) -> str:
  """METHOD.md's target format; text that already carries the think tags is kept."""
  if THINK_OPEN in findings:
    return findings.strip()
  return f"{THINK_OPEN} {findings.strip()} {THINK_CLOSE} {ANSWER.format(', '.join(diseases))}"


def decision_id(diseases: list[str], g) -> int:
  """The medical graph's decision id when the diagnosis is exactly one of its decisions, else -1."""
  if len(diseases) != 1:
    return -1
  d = diseases[0].lower().replace("_", " ")
  for name in g.decisions:
    if d in (name.replace("_", " "), g.decision_texts[name].lower()):
      return g.decision_id(name)
  return -1


def examples(manual_dir: str, bad) -> dict[str, list[dict[str, Any]]]:
  """split -> example dicts (image bytes read). `bad(err)` raises or counts a BadRecordError."""
  chex, splits, path = read_chexpert(manual_dir), read_split(manual_dir), find_ccf_json(manual_dir)
  with open(path, encoding="utf-8") as f:
    recs = json.load(f)
  if not isinstance(recs, list):
    raise ValueError(f"{path}: CXR-CounterFact must be a JSON list of records")
  out, graph = collections.defaultdict(list), load_graph("medical")
  for k, r in enumerate(recs):
    try:
      ex = _example(manual_dir, r, f"{os.path.basename(path)}[{k}]", chex, splits, bad, graph)
    except BadRecordError as e:
      bad(e)
      continue
    out[ex.pop("split")].append(ex)
  return out


def _example(manual_dir, r, rid, chex, splits, bad, graph) -> dict[str, Any]:
  if not isinstance(r, dict):
    raise BadRecordError("bad_type", rid, f"a record must be a JSON object, got {type(r).__name__}")
  for field in ("dicom_id", "report", "diagnose", "counterfact"):
    if field not in r:
      raise BadRecordError("missing_field", rid, f"missing field {field!r}")
  dicom = r["dicom_id"]
  if not isinstance(dicom, str) or not isinstance(r["report"], str):
    raise BadRecordError("bad_type", rid, "fields 'dicom_id' and 'report' must be strings")
  rid = f"{rid} (dicom_id={dicom})"
  if not r["report"].strip():
    raise BadRecordError("empty_chain", rid, "field 'report' is empty")
  diseases = _diseases(r["diagnose"], rid)
  cfs = r["counterfact"]
  if not isinstance(cfs, dict) or not all(
    isinstance(k, str) and isinstance(v, str) for k, v in cfs.items()
  ):
    raise BadRecordError("bad_type", rid, "field 'counterfact' must be an object {disease: text}")
  if dicom not in splits:
    raise BadRecordError("missing_split", rid, f"dicom_id not in {SPLIT_CSV}")
  subject, study, split = splits[dicom]
  try:  # CCF's own pid/sid must agree with the split CSV when given
    if ("pid" in r and _id(r["pid"], "p") != subject) or (
      "sid" in r and _id(r["sid"], "s") != study
    ):
      raise BadRecordError(
        "bad_type",
        rid,
        f"fields 'pid'/'sid' ({r.get('pid')}/{r.get('sid')}) disagree with "
        f"{SPLIT_CSV} (p{subject}/s{study})",
      )
  except ValueError as e:
    raise BadRecordError("bad_type", rid, f"fields 'pid'/'sid' are not ids: {e}") from e
  if (subject, study) not in chex:
    raise BadRecordError(
      "missing_label", rid, f"study s{study} of p{subject} not in {CHEXPERT_CSV}"
    )
  img = image_path(manual_dir, subject, study, dicom)
  try:
    with open(img, "rb") as f:
      image = f.read()
  except OSError as e:
    raise BadRecordError(
      "bad_image", rid, f"field 'dicom_id': cannot read image {img}: {e.strerror}"
    ) from e
  try:
    thumb = thumbnail(image)
  except Exception as e:  # PIL raises several types for a truncated or foreign file
    raise BadRecordError(
      "bad_image", rid, f"field 'dicom_id': cannot decode image {img}: {e!r}"
    ) from e
  rejected = []
  for disease, text in cfs.items():
    if not text.strip() or not disease.strip():
      bad(BadRecordError("empty_chain", f"{rid} counterfact[{disease!r}]", "empty counterfactual"))
      continue
    rejected.append([disease, completion(text, [disease.strip()])])
  raw = chex[(subject, study)]
  return {
    "image": image,
    "thumbnail": thumb,
    "question": QUESTION,
    "chosen": completion(r["report"], diseases),
    "counterfactuals": json.dumps(rejected),
    "diagnose": ", ".join(diseases),
    "labels": (raw == 1.0).astype(np.int32),
    "chexpert": raw,
    "decision": np.int32(decision_id(diseases, graph)),
    "dicom_id": dicom,
    "subject_id": subject,
    "study_id": study,
    "split": SPLIT_ALIASES.get(split, split),
  }
