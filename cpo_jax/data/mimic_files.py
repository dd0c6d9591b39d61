"""The published MIMIC-CXR-JPG, CheXpert and CXR-CounterFact files -> one example per CCF record.

What `mimic_ccf`'s builder writes (see its module doc for the layout of `data.manual_dir`):
the split from the split CSV, the labels from the CheXpert CSV by study, the chosen completion
from the report and diagnose, one rejected thinking completion per counterfact disease. A
record that cannot become an example raises `BadRecordError` naming it and the field, which the
builder's bad-record policy raises or counts. The files may be local or on gs:// (etils.epath);
the records are read here, their images in the preparation's workers (prepared_images.py).
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import io
import json
import math
import os
from typing import Any
from typing import Iterator

import numpy as np

from cpo_jax import paths
from cpo_jax.data.bad_records import BadRecordError
from cpo_jax.data.prepared_images import ImageJob
from cpo_jax.data.prepared_images import ImageResult
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


def _open_csv(manual_dir: str, name: str) -> tuple[str, io.StringIO]:
  """(path, text) of `name` or `name.gz` (local or gs://; the CSVs are tens of MB)."""
  for p in (paths.path(manual_dir) / name, paths.path(manual_dir) / (name + ".gz")):
    if p.exists():
      data = p.read_bytes()
      if p.name.endswith(".gz"):
        data = gzip.decompress(data)
      return os.fspath(p), io.StringIO(data.decode("utf-8"), newline="")
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
  found = sorted(os.fspath(p) for p in paths.path(manual_dir).glob("*.json"))
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


@dataclasses.dataclass
class Record:
  """One CXR-CounterFact record on its way to an example (kept in the preparing process while
  its image is prepared): its example without the image, or the error that makes it bad."""

  rid: str
  split: str = ""
  fields: dict[str, Any] | None = None
  error: BadRecordError | None = None
  # Empty counterfactuals: reported once the image is known good (a record with a bad image
  # is reported for that alone, as the checks ran before preparation streamed).
  late_errors: list[BadRecordError] = dataclasses.field(default_factory=list)


def records(manual_dir: str, side: int) -> tuple[int, Iterator[tuple[Record, ImageJob | None]]]:
  """(number of CCF records, their (Record, image job) pairs in file order; lazy). Only text
  is read here: the images are read by the image jobs (prepared_images.prepare_image)."""
  chex, splits, path = read_chexpert(manual_dir), read_split(manual_dir), find_ccf_json(manual_dir)
  recs = json.loads(paths.path(path).read_text(encoding="utf-8"))
  if not isinstance(recs, list):
    raise ValueError(f"{path}: CXR-CounterFact must be a JSON list of records")
  graph = load_graph("medical")

  def items():
    for k in range(len(recs)):
      r, recs[k] = recs[k], None  # let each record go once read: only the lookups stay
      rid = f"{os.path.basename(path)}[{k}]"
      try:
        rec, image_file = _record(manual_dir, r, rid, chex, splits, graph)
      except BadRecordError as e:
        yield Record(rid, error=e), None
        continue
      yield rec, ImageJob(image_file, side)

  return len(recs), items()


def examples_of(rec: Record, image: ImageResult | None, bad) -> list[tuple[str, dict[str, Any]]]:
  """The record's (split, example) once its image is prepared ([] for a bad record: `bad(err)`
  raises or counts it, in record order)."""
  if rec.error is not None:
    bad(rec.error)
    return []
  if image.error:
    bad(BadRecordError("bad_image", rec.rid, f"field 'dicom_id': {image.error}"))
    return []
  for e in rec.late_errors:
    bad(e)
  example = dict(
    rec.fields,
    image=image.image,
    thumbnail=image.thumbnail,
    source_size=np.asarray(image.size, np.int32),
  )
  return [(rec.split, example)]


def _record(manual_dir, r, rid, chex, splits, graph) -> tuple[Record, str]:
  """(the record without its image, the image's path); raises BadRecordError."""
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
  except BadRecordError:
    raise
  except ValueError as e:
    raise BadRecordError("bad_type", rid, f"fields 'pid'/'sid' are not ids: {e}") from e
  if (subject, study) not in chex:
    raise BadRecordError(
      "missing_label", rid, f"study s{study} of p{subject} not in {CHEXPERT_CSV}"
    )
  rejected, late = [], []
  for disease, text in cfs.items():
    if not text.strip() or not disease.strip():
      late.append(
        BadRecordError("empty_chain", f"{rid} counterfact[{disease!r}]", "empty counterfactual")
      )
      continue
    rejected.append([disease, completion(text, [disease.strip()])])
  raw = chex[(subject, study)]
  fields = {
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
  }
  split = SPLIT_ALIASES.get(split, split)
  return Record(rid, split, fields, late_errors=late), image_path(manual_dir, subject, study, dicom)
