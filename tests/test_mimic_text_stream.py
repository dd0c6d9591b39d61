"""mimic_ccf's text side: the CXR-CounterFact JSON read one record at a time, the CSV lookups
held as arrays (the examples they make: tests/test_data_mimic.py)."""

import csv
import gzip
import json
import math
import tracemalloc

import numpy as np
import pytest

from cpo_jax.data import mimic_files


def _ccf(path, n, report_chars=2000):
  recs = [
    {"dicom_id": f"d{k:04d}", "report": f"{k} " + "x" * report_chars, "counterfact": {}}
    for k in range(n)
  ]
  path.write_text(json.dumps(recs))
  return recs


def test_the_counterfact_json_is_counted_then_read_one_record_at_a_time(tmp_path):
  path = tmp_path / "ccf.json"
  recs = _ccf(path, 500)  # about 1 MB of text
  tracemalloc.start()
  try:
    total, records = mimic_files.ccf_records(str(path))
    ids = []
    for rec in records:
      ids.append(rec["dicom_id"])
      assert rec == recs[len(ids) - 1]
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert total == 500 and ids == [r["dicom_id"] for r in recs]
  # Parsed whole, the records alone would hold over 1 MB.
  assert peak < 300_000, peak


def test_json_values_come_back_as_json_loads_gives_them(tmp_path):
  path = tmp_path / "ccf.json"
  recs = [{"a": 1.5, "b": [1, None, True], "c": "\u00e9\u2603", "d": 2**62, "a2": 1e-7}, "x", 3]
  path.write_text(json.dumps(recs))
  total, records = mimic_files.ccf_records(str(path))
  got = list(records)
  assert total == 3 and got == json.loads(path.read_text())
  assert [type(v) for v in got[0].values()] == [float, list, str, int, float]


@pytest.mark.parametrize(
  "text,error",
  [
    ('{"dicom_id": "d0"}', "CXR-CounterFact must be a JSON list of records"),
    ("", "not valid JSON: parse error: premature EOF"),
    ('[{"dicom_id": "d0"}, {"dicom_id": ', "not valid JSON"),
    ('[{"pid": 100000000000000000000}]', "not valid JSON: parse error: integer overflow"),
  ],
)
def test_a_broken_counterfact_file_stops_before_any_record_is_prepared(tmp_path, text, error):
  path = tmp_path / "ccf.json"
  path.write_text(text)
  with pytest.raises(ValueError, match=rf"ccf\.json: {error}"):
    mimic_files.ccf_records(str(path))  # at the count, before a record is yielded


def test_the_csv_lookups_find_what_a_dict_would(tmp_path):
  header = ["subject_id", "study_id", *mimic_files.FINDINGS]
  chex = [
    [10000001, 50000001, "1.0", "", *["0.0"] * 12],
    [10000002, 50000002, "-1.0", "1.0", *["0.0"] * 12],
    [10000001, 50000001, "0.0", "1.0", *[""] * 12],  # repeated: the last row wins, as in a dict
  ]
  with gzip.open(tmp_path / (mimic_files.CHEXPERT_CSV + ".gz"), "wt", newline="") as f:
    csv.writer(f).writerows([header, *chex])
  split = [
    ["dicom_id", "study_id", "subject_id", "split"],
    ["abc", 50000001, 10000001, "train"],
    ["abd", 50000002, 10000002, " validate "],
    ["ab", 50000002, 10000002, "test"],
  ]
  with open(tmp_path / mimic_files.SPLIT_CSV, "w", newline="") as f:
    csv.writer(f).writerows(split)

  labels = mimic_files.read_chexpert(str(tmp_path))
  assert len(labels) == 2 and (10000001, 50000001) in labels
  first = labels[(10000001, 50000001)]
  assert first.dtype == np.float32 and first[:2].tolist() == [0.0, 1.0] and math.isnan(first[2])
  assert labels[(10000002, 50000002)][:2].tolist() == [-1.0, 1.0]
  for missing in ((10000001, 50000002), (1 << 40, 1), (-1, 0)):
    assert missing not in labels
  with pytest.raises(KeyError):
    labels[(10000002, 50000001)]

  splits = mimic_files.read_split(str(tmp_path))
  assert splits["abd"] == (10000002, 50000002, "validate")
  assert splits["ab"] == (10000002, 50000002, "test") and splits["abc"][2] == "train"
  # Ids are compared whole: neither a longer id with a known prefix nor a prefix matches.
  for missing in ("abcd", "a", "", "abe"):
    assert missing not in splits
  with open(tmp_path / mimic_files.SPLIT_CSV, "w") as f:
    f.write("dicom_id,study_id\nabc,1\n")
  with pytest.raises(ValueError, match=r"split\.csv: needs columns dicom_id, study_id"):
    mimic_files.read_split(str(tmp_path))
