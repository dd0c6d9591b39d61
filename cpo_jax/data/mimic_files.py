"""The published MIMIC-CXR-JPG, CheXpert and CXR-CounterFact files -> one example per CCF record.

What `mimic_ccf`'s builder writes (see its module doc for the layout of `data.manual_dir`):
the split from the split CSV, the labels from the CheXpert CSV by study, the chosen completion
from the report and diagnose, one rejected thinking completion per counterfact disease. A
record that cannot become an example raises `BadRecordError` naming it and the field, which the
builder's bad-record policy raises or counts. The files may be local or on gs:// (etils.epath);
the records are read here, their images in the preparation's workers (prepared_images.py).
"""

from __future__ import annotations

import array
import contextlib
import csv
import dataclasses
import gzip
import io
import json
import math
import os
from typing import Any
from typing import Iterator

import ijson
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


@contextlib.contextmanager
def _open_csv(manual_dir: str, name: str) -> Iterator[tuple[str, io.TextIOBase]]:
  """(path, text stream) of `name` or `name.gz` (local or gs://), read as it is parsed: the
  published CSVs are tens of MB, and a whole copy of one (bytes, text) would set the peak."""
  for p in (paths.path(manual_dir) / name, paths.path(manual_dir) / (name + ".gz")):
    if p.exists():
      with p.open("rb") as raw:
        stream = gzip.GzipFile(fileobj=raw) if p.name.endswith(".gz") else raw
        with io.TextIOWrapper(stream, encoding="utf-8", newline="") as f:
          yield os.fspath(p), f
      return
  raise FileNotFoundError(f"mimic_ccf: {name}[.gz] not found in manual_dir {manual_dir}")


def _id(x, prefix: str) -> int:
  """'p10000032' / '10000032' / 10000032 -> 10000032 (CCF writes pid/sid with or without the letter)."""
  s = str(x).strip()
  return int(s[1:] if s[:1].lower() == prefix else s)


def _unique_sorted(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(sorted unique keys, the row of each): the last row of a repeated key wins, as in a dict."""
  order = np.argsort(keys, kind="stable")
  keys = keys[order]
  last = np.append(keys[1:] != keys[:-1], True)
  return keys[last], order[last]


def _find(sorted_keys: np.ndarray, key) -> int:
  """The row of `key` in `sorted_keys`, or -1 (compared whole: numpy would cut a longer key to
  the array's width)."""
  i = int(np.searchsorted(sorted_keys, key))
  return i if i < len(sorted_keys) and sorted_keys[i] == key else -1


class StudyLabels:
  """(subject_id, study_id) -> [14] float32 CheXpert row (NaN = blank), as sorted arrays: about
  64 bytes a study where a dict of arrays took about 310 (the CSV has every MIMIC-CXR study)."""

  def __init__(self, path: str, keys: np.ndarray, values: np.ndarray):
    if len(keys) and (keys.min() < 0 or keys.max() >= 1 << 32):
      raise ValueError(f"{path}: subject_id and study_id must be ids in [0, 2**32)")
    self._keys, rows = _unique_sorted(keys[:, 0] << 32 | keys[:, 1])
    self._values = values[rows]

  def _row(self, key: tuple[int, int]) -> int:
    subject, study = key
    if not (0 <= subject < 1 << 32 and 0 <= study < 1 << 32):
      return -1
    return _find(self._keys, np.int64(subject << 32 | study))

  def __contains__(self, key: tuple[int, int]) -> bool:
    return self._row(key) >= 0

  def __getitem__(self, key: tuple[int, int]) -> np.ndarray:
    row = self._row(key)
    if row < 0:
      raise KeyError(key)
    return self._values[row].copy()

  def __len__(self) -> int:
    return len(self._keys)


def read_chexpert(manual_dir: str) -> StudyLabels:
  """(subject_id, study_id) -> [14] float32 (NaN = blank)."""
  keys, values = array.array("q"), array.array("f")  # float32, as np.float32 rounds
  with _open_csv(manual_dir, CHEXPERT_CSV) as (path, f):
    rows = csv.DictReader(f)
    missing = [c for c in ("subject_id", "study_id") + FINDINGS if c not in (rows.fieldnames or ())]
    if missing:
      raise ValueError(f"{path}: missing columns {missing}")
    for r in rows:
      keys.extend((int(r["subject_id"]), int(r["study_id"])))
      values.extend(float(r[c]) if r[c].strip() else math.nan for c in FINDINGS)
  return StudyLabels(
    path,
    np.frombuffer(keys, np.int64).reshape(-1, 2),
    np.frombuffer(values, np.float32).reshape(-1, len(FINDINGS)),
  )


class DicomSplits:
  """dicom_id -> (subject_id, study_id, split), as sorted arrays: about 64 bytes an image where
  a dict took about 250 (the CSV has every MIMIC-CXR image)."""

  def __init__(self, dicoms: np.ndarray, ids: np.ndarray, splits: np.ndarray, names: list[str]):
    self._dicoms, rows = _unique_sorted(dicoms)
    self._ids, self._splits, self._names = ids[rows], splits[rows], names

  def _row(self, dicom: str) -> int:
    return _find(self._dicoms, dicom.encode("utf-8"))

  def __contains__(self, dicom: str) -> bool:
    return self._row(dicom) >= 0

  def __getitem__(self, dicom: str) -> tuple[int, int, str]:
    row = self._row(dicom)
    if row < 0:
      raise KeyError(dicom)
    subject, study = self._ids[row].tolist()
    return subject, study, self._names[self._splits[row]]

  def __len__(self) -> int:
    return len(self._dicoms)


def read_split(manual_dir: str) -> DicomSplits:
  """dicom_id -> (subject_id, study_id, split)."""
  chunks, dicoms, ids, splits, names = [], [], array.array("q"), array.array("i"), {}
  with _open_csv(manual_dir, SPLIT_CSV) as (path, f):
    rows = csv.DictReader(f)
    if not {"dicom_id", "study_id", "subject_id", "split"} <= set(rows.fieldnames or ()):
      raise ValueError(f"{path}: needs columns dicom_id, study_id, subject_id, split")
    for r in rows:
      dicoms.append(r["dicom_id"].encode("utf-8"))
      ids.extend((int(r["subject_id"]), int(r["study_id"])))
      splits.append(names.setdefault(r["split"].strip(), len(names)))
      if len(dicoms) == 1 << 16:  # fixed-width bytes in chunks: no list of every id
        chunks.append(np.array(dicoms, np.bytes_))
        dicoms = []
  chunks.append(np.array(dicoms, np.bytes_))
  return DicomSplits(
    np.concatenate(chunks),
    np.frombuffer(ids, np.int64).reshape(-1, 2),
    np.frombuffer(splits, np.int32),
    list(names),
  )


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


def ccf_records(path: str) -> tuple[int, Iterator[Any]]:
  """(number of records, the records one at a time) of a CXR-CounterFact JSON list. The file is
  parsed twice, incrementally (ijson): once now to count and check it (a broken file stops
  before any image is prepared), then as the records are taken, so only one is in memory.
  The values are json.loads' (floats as float), except that an integer past 64 bits is an
  error (yajl's)."""
  file = paths.path(path)
  try:
    with file.open("rb") as f:
      first = next(ijson.parse(f), None)
      if first is None or first[:2] != ("", "start_array"):
        raise ValueError(f"{path}: CXR-CounterFact must be a JSON list of records")
      f.seek(0)
      total = sum(1 for _ in ijson.items(f, "item", use_float=True))
  except ijson.JSONError as e:
    raise ValueError(f"{path}: not valid JSON: {e}") from e

  def each():
    with file.open("rb") as f:
      yield from ijson.items(f, "item", use_float=True)

  return total, each()


def records(manual_dir: str, side: int) -> tuple[int, Iterator[tuple[Record, ImageJob | None]]]:
  """(number of CCF records, their (Record, image job) pairs in file order; lazy). Only text
  is read here, one record at a time: the images are read by the image jobs
  (prepared_images.prepare_image)."""
  chex, splits, path = read_chexpert(manual_dir), read_split(manual_dir), find_ccf_json(manual_dir)
  total, recs = ccf_records(path)
  graph = load_graph("medical")

  def items():
    for k, r in enumerate(recs):
      rid = f"{os.path.basename(path)}[{k}]"
      try:
        rec, image_file = _record(manual_dir, r, rid, chex, splits, graph)
      except BadRecordError as e:
        yield Record(rid, error=e), None
        continue
      yield rec, ImageJob(image_file, side)

  return total, items()


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
