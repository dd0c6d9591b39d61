"""mimic_ccf: MIMIC-CXR-JPG layout + CheXpert/split CSVs + CXR-CounterFact JSON -> TFDS -> batches."""

import csv
import gzip
import io
import itertools
import json
import shutil
import tracemalloc

from cli_configs import SMALL_RUN
from cli_configs import cli_config
from conftest import bucket_files
from etils import epath
import numpy as np
from PIL import Image
import pytest

from cpo_jax import config_defaults
from cpo_jax.data import bad_records
from cpo_jax.data import datasets
from cpo_jax.data import eval_batches
from cpo_jax.data import mimic_ccf
from cpo_jax.data import mimic_files
from cpo_jax.data import pairs as pairs_lib
from cpo_jax.data import processors
from cpo_jax.data import sources
from cpo_jax.data import streams
from cpo_jax.data import tokenizer as tok_lib
from cpo_jax.data import worker_pool
from cpo_jax.knowledge import load_graph

HEADER = ["subject_id", "study_id", *mimic_files.FINDINGS]
REPORTS = [
  "The heart size is normal. There is a small left pleural effusion.",
  "The lungs are clear. The heart is enlarged.",
  "There is a focal consolidation in the right lower lobe.",
  "No pleural effusion or pneumothorax is seen.",
]
CF = {
  "Pneumothorax": "A pleural line is visible at the apex.",
  "Cardiomegaly": "The heart is enlarged.",
}


def _jpeg(seed):
  arr = np.random.default_rng(seed).integers(0, 255, (40, 32, 3), dtype=np.uint8)
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, format="JPEG")
  return buf.getvalue()


def _write(root, extra=(), drop_image=None):
  """4 good studies (subject 1000000k, study 5000000k): 2 train, 1 validate, 1 test."""
  split_of = ["train", "train", "validate", "test"]
  chex_rows, split_rows, recs = [], [], []
  for k in range(4):
    subj, study, dicom = 10000000 + k, 50000000 + k, f"d{k:02d}-abc"
    d = root / "files" / f"p{str(subj)[:2]}" / f"p{subj}" / f"s{study}"
    d.mkdir(parents=True)
    if dicom != drop_image:
      (d / f"{dicom}.jpg").write_bytes(_jpeg(k))
    vals = [""] * 14
    vals[mimic_files.FINDINGS.index("Pleural Effusion")] = "1.0" if k == 0 else "0.0"
    vals[mimic_files.FINDINGS.index("Cardiomegaly")] = "-1.0" if k == 1 else ""
    chex_rows.append([subj, study, *vals])
    split_rows.append([dicom, study, subj, split_of[k]])
    recs.append(
      {
        "dicom_id": dicom,
        "sid": f"s{study}",
        "pid": f"p{subj}",
        "report": REPORTS[k],
        "diagnose": ["Pleural Effusion", "Cardiomegaly", "Pneumonia", "No Finding"][k],
        "counterfact": CF if k != 1 else {},
      }
    )
  buf = io.StringIO()
  csv.writer(buf).writerows([HEADER, *chex_rows])
  with gzip.open(root / "mimic-cxr-2.0.0-chexpert.csv.gz", "wt") as f:  # published gzipped
    f.write(buf.getvalue())
  with open(root / "mimic-cxr-2.0.0-split.csv", "w", newline="") as f:
    csv.writer(f).writerows([["dicom_id", "study_id", "subject_id", "split"], *split_rows])
  (root / "cxr_counterfact.json").write_text(json.dumps(recs + list(extra)))
  return recs


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("tok")
  words = (
    REPORTS
    + list(CF.values())
    + [
      mimic_files.ANSWER.format(x)
      for x in ("Pleural Effusion, Cardiomegaly, Pneumonia, No Finding, Pneumothorax",)
    ]
  )
  tok_lib.save_tokenizer(tok_lib.build_tokenizer(extra_texts=words), str(d))
  return str(d)


@pytest.fixture(scope="module")
def proc(tok_dir):
  return processors.make_processors(tok_dir)


def test_mimic_prepares_and_feeds_sft_cpo_eval(proc, tmp_path):
  _write(tmp_path)
  src = sources.make_source("mimic_ccf", "train", data_dir=str(tmp_path))
  assert src.kind == "pairs" and src.skipped == {}
  # train: record 0 has 2 counterfactuals (2 thinking rows), record 1 none (1 inert row), then one
  # perception row each (their label sets differ: each is the other's hard negative)
  assert len(src) == 5
  rows = [src[i] for i in range(5)]
  assert rows[0]["chosen"] == (
    f"<think> {REPORTS[0]} </think> The disease of this patient is Pleural Effusion."
  )
  assert [r["rejected"] for r in rows[:2]] == [
    f"<think> {CF['Pneumothorax']} </think> The disease of this patient is Pneumothorax.",
    f"<think> {CF['Cardiomegaly']} </think> The disease of this patient is Cardiomegaly.",
  ]
  assert [r["source"] for r in rows] == [0, 0, 2, 1, 1]
  assert [r["sample_weight"] for r in rows] == [1.0, 1.0, 0.0, 1.0, 1.0]
  assert rows[2]["rejected"] == rows[2]["chosen"] and rows[3]["rejected"] == rows[3]["chosen"]
  img0 = (tmp_path / "files/p10/p10000000/s50000000/d00-abc.jpg").read_bytes()
  img1 = (tmp_path / "files/p10/p10000001/s50000001/d01-abc.jpg").read_bytes()
  assert rows[0]["image"] == img0 == rows[0]["rejected_image"]
  assert [(r["image"], r["rejected_image"]) for r in rows[3:]] == [(img0, img1), (img1, img0)]
  eff, card = (
    mimic_files.FINDINGS.index("Pleural Effusion"),
    mimic_files.FINDINGS.index("Cardiomegaly"),
  )
  assert rows[0]["labels"].tolist() == [int(i == eff) for i in range(14)]
  assert rows[2]["labels"].sum() == 0  # uncertain (-1.0) and blank are negative (U-zeros)
  g = load_graph("medical")
  # the diagnosis names one decision of the medical graph: its id (a multi-label diagnosis gives -1)
  assert rows[0]["decision"] == g.decision_id("pleural_effusion")
  assert rows[2]["decision"] == g.decision_id("cardiomegaly")
  assert (
    mimic_files.decision_id(["Pleural Effusion", "Cardiomegaly"], g)
    == -1
    == mimic_files.decision_id(["Edema"], g)
  )
  # the TFDS files read back directly, raw CheXpert values kept (NaN = blank), the thumbnail stored
  raw = src._src[1]
  np.testing.assert_array_equal(raw["thumbnail"], pairs_lib.thumbnail(img1))
  assert (
    raw["chexpert"][card] == -1.0
    and np.isnan(raw["chexpert"][0])
    and int(raw["study_id"]) == 50000001
  )

  skips = bad_records.SkipCounter()
  batches = list(  # one whole pass: the skip counts are final only at its end
    datasets.make_cpo_iterator(
      src, proc, batch_size=4, max_len=128, seed=0, num_epochs=1, skips=skips
    )
  )
  assert len(batches) == 1
  cpo = batches[0]
  assert cpo["chosen_input_ids"].shape == (4, 128) == cpo["rejected_input_ids"].shape
  assert (
    cpo["chosen_pixel_values"].shape == (4 * 64, 1176)
    and cpo["image_grid_thw"].tolist() == [[1, 8, 8]] * 4
  )
  by = {int(i): r for r, i in enumerate(cpo["index"])}
  tok = proc.tokenizer
  r0 = by[0]
  rejected = tok.decode(cpo["rejected_input_ids"][r0][cpo["rejected_loss_mask"][r0] == 1])
  assert rejected == rows[0]["rejected"] + "<|im_end|>"
  # the record without counterfactuals (weight 0) leaves the CPO stream, counted
  assert cpo["sample_weight"].tolist() == [1.0] * 4 and 2 not in by
  assert skips.counts == {"no_preference": 1}
  for i, r in by.items():  # same image on both sides except for the perception rows
    rows_r = slice(r * 64, (r + 1) * 64)
    same = np.array_equal(cpo["chosen_pixel_values"][rows_r], cpo["rejected_pixel_values"][rows_r])
    assert same == (i < 3) and cpo["source"][r] == rows[i]["source"]
  sft = next(datasets.make_sft_iterator(src, proc, batch_size=2, max_len=128, seed=0))
  assert sft["input_ids"].shape == (2, 128) and sft["pixel_values"].shape == (128, 1176)
  assert (sft["input_ids"] == proc.ids["image_token_id"]).sum(1).tolist() == [16, 16]

  test = sources.make_source("mimic_ccf", "test", data_dir=str(tmp_path))
  val = sources.make_source("mimic_ccf", "validation", data_dir=str(tmp_path))
  assert (len(test), len(val), test.view) == (1, 1, "records")
  (b,) = list(eval_batches.make_eval_batches(test, proc, batch_size=2, max_prompt_len=64))
  assert b["input_ids"].shape == (2, 64) and b["valid"].tolist() == [True, False]
  assert b["decision"][0] == g.decision_id("no_finding")
  with pytest.raises(ValueError, match="no usable record in split 'ood'"):
    sources.make_source("mimic_ccf", "ood", data_dir=str(tmp_path))


BAD = [
  (
    {"dicom_id": "d99-none", "report": "x", "diagnose": "Edema", "counterfact": {}},
    "missing_split",
  ),
  ({"dicom_id": "d00-abc", "report": "   ", "diagnose": "Edema", "counterfact": {}}, "empty_chain"),
  ({"dicom_id": "d00-abc", "report": "x", "counterfact": {}}, "missing_field"),
  ({"dicom_id": "d00-abc", "report": "x", "diagnose": 3, "counterfact": {}}, "bad_type"),
  ("not a record", "bad_type"),
]


def test_mimic_bad_records_skip_by_reason_or_raise_naming_record_and_field(tmp_path):
  root = tmp_path / "m"
  root.mkdir()
  recs = _write(root, extra=[b for b, _ in BAD], drop_image="d02-abc")
  # a study without a CheXpert row: drop record 3's label line
  lines = gzip.open(root / "mimic-cxr-2.0.0-chexpert.csv.gz", "rt").read().splitlines()
  with gzip.open(root / "mimic-cxr-2.0.0-chexpert.csv.gz", "wt") as f:
    f.write("\n".join(lines[:-1]) + "\n")
  recs[0]["counterfact"] = dict(
    CF, Edema=""
  )  # one empty counterfactual: the record keeps the others
  data = json.loads((root / "cxr_counterfact.json").read_text())
  data[0] = recs[0]
  (root / "cxr_counterfact.json").write_text(json.dumps(data))
  src = sources.make_source(
    "mimic_ccf",
    "train",
    data_dir=str(root),
    on_bad_record="skip",
    prepared_dir=str(tmp_path / "prep"),
  )
  assert src.skipped == {
    "missing_split": 1,
    "empty_chain": 2,
    "missing_field": 1,
    "bad_type": 2,
    "bad_image": 1,
    "missing_label": 1,
  }
  assert len(src) == 5  # the train records survive
  # validate's only record had no image: the split stops with the counts (not skipped quietly)
  with pytest.raises(bad_records.TooManySkipsError, match="no usable record in split 'validate'"):
    sources.make_source(
      "mimic_ccf",
      "validate",
      data_dir=str(root),
      on_bad_record="skip",
      prepared_dir=str(tmp_path / "prep"),
    )
  with pytest.raises(
    bad_records.BadRecordError,
    match=r"cxr_counterfact.json\[0\] \(dicom_id=d00-abc\) counterfact\['Edema'\]",
  ):
    sources.make_source(
      "mimic_ccf", "train", data_dir=str(root), prepared_dir=str(tmp_path / "prep")
    )
  data[0]["counterfact"] = CF
  (root / "cxr_counterfact.json").write_text(json.dumps(data))
  with pytest.raises(
    bad_records.BadRecordError,
    match=r"cxr_counterfact.json\[2\] \(dicom_id=d02-abc\): field 'dicom_id': "
    r"cannot read image .*d02-abc.jpg.*reason=bad_image",
  ):
    sources.make_source(
      "mimic_ccf", "train", data_dir=str(root), prepared_dir=str(tmp_path / "prep2")
    )


def test_hard_negatives_pick_the_nearest_thumbnail_with_another_label_set_and_study():
  labels = np.array([[1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 0], [1, 1, 1], [0, 1, 0]])
  studies = np.array([1, 6, 2, 3, 4, 6])
  level = np.array([10, 200, 12, 205, 100, 198])  # thumbnails: flat grey levels
  thumbs = np.broadcast_to(level[:, None, None, None], (6, 8, 8, 3)).astype(np.uint8)
  neg = mimic_ccf.hard_negatives(labels, thumbs, studies)
  # nearest grey level among other label sets: 0 -> 2 (12), 4 -> 2 (12 beats 198); records 1 and 5
  # are nearest to each other but share a study, so both take 3 (205)
  assert neg.tolist() == [2, 3, 0, 1, 2, 3]
  assert (studies[neg] != studies).all() and ((labels[neg] != labels).any(1)).all()
  assert mimic_ccf.hard_negatives(np.ones((3, 14)), thumbs[:3], studies[:3]).tolist() == [
    -1,
    -1,
    -1,
  ]
  np.testing.assert_array_equal(
    neg, mimic_ccf.hard_negatives(labels, thumbs, studies)
  )  # deterministic


def test_mimic_undecodable_image_is_a_bad_record(tmp_path):
  _write(tmp_path)
  (tmp_path / "files/p10/p10000001/s50000001/d01-abc.jpg").write_bytes(b"not a jpeg")
  src = sources.make_source("mimic_ccf", "train", data_dir=str(tmp_path), on_bad_record="skip")
  assert (
    src.skipped == {"bad_image": 1} and len(src) == 2
  )  # record 0's two thinking rows, no perception row


def test_a_mimic_set_whose_records_are_all_bad_stops_at_once_with_the_counts(tmp_path):
  root = tmp_path / "m"
  root.mkdir()
  _write(root)
  for jpg in root.glob("files/**/*.jpg"):
    jpg.unlink()
  cfg = config_defaults.base_config("data=mimic_ccf", domain="medical", data="synth_cxr")
  cfg.data.manual_dir, cfg.data.on_bad_record = str(root), "skip"
  with pytest.raises(
    bad_records.TooManySkipsError, match=r"split 'train'.*'bad_image': 4.*first records"
  ):
    streams.RunData(cfg, str(tmp_path / "work"))


def test_a_mimic_run_reports_the_papers_findings_and_text_metrics(tmp_path):
  from cpo_jax import main
  from cpo_jax.evaluate import findings

  root = tmp_path / "m"
  root.mkdir()
  _write(root)
  cfg = cli_config(
    "configs/medical.py:data=mimic_ccf",
    *SMALL_RUN,
    f"--config.data.manual_dir={root}",
    "--config.eval.robustness=False",
    "--config.stages=sft,eval",
  )
  report = main.run(cfg, str(tmp_path / "work"))
  for split in ("validate", "test"):  # one record each, no positive finding
    section = report["splits"][split]
    f, text = section["findings"], section["examples"][0]
    assert f["n"] == 1 and section["n"] + section["unlabelled"] == 1
    assert all(v["support"] == 0 for v in f["per_finding"].values())
    assert f["macro"]["auc_defined"] == 0  # one example: one class per finding
    named = findings.named_findings(text, mimic_files.FINDINGS)
    assert f["micro"]["precision"] == 0.0 and (f["micro"]["f1"] == 0.0 or not named.any())
    assert f["top1_single_finding"] == {"n": 0, "accuracy": None}
    text_scores = section["report_generation"]
    assert text_scores["n"] == 1 and 0.0 <= text_scores["rouge_l"] <= 1.0
  assert (tmp_path / "work" / "eval" / "paper_metrics.png").stat().st_size > 0


# ---- preparation: images at the run's size, streamed, in worker processes ---------------------


def _image(size, mode="RGB", seed=0, quality=75):
  """A noise JPEG (width, height) in `mode`."""
  shape = (size[1], size[0]) + ((3,) if mode == "RGB" else ())
  arr = np.random.default_rng(seed).integers(0, 255, shape, dtype=np.uint8)
  buf = io.BytesIO()
  Image.fromarray(arr, mode).save(buf, format="JPEG", quality=quality)
  return buf.getvalue()


def _write_many(root, n, size=(24, 20), bad=()):
  """n train records (record k: finding k % 14, noise image k); records in `bad` lose their
  image, and with `bad` every fifth has one empty counterfactual (counted, the record kept)."""
  chex, split_rows, recs = [], [], []
  for k in range(n):
    subj, study, dicom = 10000000 + k, 50000000 + k, f"d{k:03d}"
    d = root / "files" / f"p{str(subj)[:2]}" / f"p{subj}" / f"s{study}"
    d.mkdir(parents=True)
    if k not in bad:
      (d / f"{dicom}.jpg").write_bytes(_image(size, seed=k, quality=95))
    vals = [""] * 14
    vals[k % 14] = "1.0"
    chex.append([subj, study, *vals])
    split_rows.append([dicom, study, subj, "train"])
    cf = dict(CF, Edema="") if bad and k % 5 == 0 else CF
    diagnose = mimic_files.FINDINGS[k % 14]
    recs.append(
      {"dicom_id": dicom, "report": REPORTS[k % 4], "diagnose": diagnose, "counterfact": cf}
    )
  with open(root / "mimic-cxr-2.0.0-chexpert.csv", "w", newline="") as f:
    csv.writer(f).writerows([HEADER, *chex])
  with open(root / "mimic-cxr-2.0.0-split.csv", "w", newline="") as f:
    csv.writer(f).writerows([["dicom_id", "study_id", "subject_id", "split"], *split_rows])
  (root / "cxr_counterfact.json").write_text(json.dumps(recs))


def test_prepared_images_give_the_processors_pixels_of_the_published_ones(tok_dir, tmp_path):
  _write(tmp_path)
  published = [
    tmp_path / "files/p10/p10000000/s50000000/d00-abc.jpg",  # RGB 32 x 40
    tmp_path / "files/p10/p10000001/s50000001/d01-abc.jpg",
  ]
  published[1].write_bytes(_image((70, 50), mode="L", seed=7))  # grey, as MIMIC's, wide
  # 50 px is rounded to the 28-px grid as the processor rounds it: 56
  src = sources.make_source("mimic_ccf", "train", data_dir=str(tmp_path), image_size=50)
  proc = processors.make_processors(tok_dir, image_size=50)
  assert proc.image_size == 56
  for k, (row, mode, size) in enumerate(((0, "RGB", (32, 40)), (2, "L", (70, 50)))):
    stored = src[row]["image"]
    with Image.open(io.BytesIO(stored)) as im:
      assert (im.format, im.size, im.mode) == ("PNG", (56, 56), mode)
    raw = published[k].read_bytes()
    for got, want in zip(proc.image_inputs(stored), proc.image_inputs(raw)):
      np.testing.assert_array_equal(got, want)  # bit-identical pixel_values
    record = src._src[k]
    assert record["source_size"].tolist() == list(size)
    np.testing.assert_array_equal(record["thumbnail"], pairs_lib.thumbnail(raw))


def test_a_run_at_another_image_size_never_reads_files_prepared_for_another(tmp_path):
  _write(tmp_path)
  for size in (28, 56):
    src = sources.make_source("mimic_ccf", "train", data_dir=str(tmp_path), image_size=size)
    assert Image.open(io.BytesIO(src[0]["image"])).size == (size, size)
  prepared = tmp_path / "_tfds" / "mimic_ccf"
  assert {p.name for p in prepared.iterdir()} >= {"raise_28px", "raise_56px"}
  shutil.copytree(prepared / "raise_28px", prepared / "raise_84px")  # moved by hand
  with pytest.raises(ValueError, match=r"prepared at side 28 .*not this run's 84; delete"):
    sources.make_source("mimic_ccf", "train", data_dir=str(tmp_path), image_size=84)


def test_two_workers_write_the_same_files_as_one(tmp_path):
  n = 24
  _write_many(tmp_path, n, bad=(3, 17))
  assert worker_pool.resolve_workers(2, n) == 2  # enough records for the pool to start
  dirs = []
  for workers in (0, 2):
    src = sources.make_source(
      "mimic_ccf",
      "train",
      data_dir=str(tmp_path),
      image_size=28,
      on_bad_record="skip",
      prepared_dir=str(tmp_path / f"w{workers}"),
      prepare_workers=workers,
    )
    assert src.skipped == {"bad_image": 2, "empty_chain": 5}  # records 0, 5, 10, 15, 20
    dirs.append(tmp_path / f"w{workers}" / "mimic_ccf" / "skip_28px" / "2.0.0")
  names = sorted(p.name for p in dirs[0].iterdir())
  assert names == sorted(p.name for p in dirs[1].iterdir())
  assert "thumbnails.train.npy" in names and any(".array_record-" in f for f in names)
  for name in names:
    assert (dirs[0] / name).read_bytes() == (dirs[1] / name).read_bytes(), name
  ids = [int(src._src[i]["subject_id"]) - 10000000 for i in range(len(src._src))]
  assert ids == [k for k in range(n) if k not in (3, 17)]  # record order = file order


def test_the_worker_map_keeps_order_and_reads_ahead_a_bounded_number(tmp_path):
  pulled = itertools.count()

  def inputs():
    for k in range(200):
      next(pulled)
      yield k, "x" * k

  with worker_pool.worker_pool(2) as workers:
    out = worker_pool.ordered_map(workers, len, inputs())
    first = next(out)
    read_ahead = next(pulled)  # inputs taken when the first result came back
    rest = list(out)
  assert [first, *rest] == [(k, k) for k in range(200)]
  assert read_ahead <= 2 * 2 * worker_pool.CHUNK + worker_pool.CHUNK


def test_preparing_holds_a_few_images_at_a_time_not_the_split(tmp_path):
  """Python memory while a split is prepared (tracemalloc: every bytes object and array) stays
  at a few images, where holding the split as a list would hold all 48."""
  _write_many(tmp_path / "warm", 2)
  sources.make_source("mimic_ccf", "train", data_dir=str(tmp_path / "warm"), image_size=140)
  n = 48
  _write_many(tmp_path / "m", n, size=(160, 160))
  tracemalloc.start()
  try:
    src = sources.make_source("mimic_ccf", "train", data_dir=str(tmp_path / "m"), image_size=140)
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  per_image = np.mean([len(src._src[i]["image"]) for i in range(n)])
  assert per_image > 30_000  # noise PNGs: the images dominate what preparation handles
  assert peak < 16 * per_image, (peak, per_image)


def test_mimic_prepares_from_a_gs_manual_dir(gcs_server, tmp_path, monkeypatch):
  _write(tmp_path / "published")
  manual = "gs://bucket/mimic_manual"
  for f in (tmp_path / "published").rglob("*"):
    if f.is_file():
      target = epath.Path(manual) / str(f.relative_to(tmp_path / "published"))
      epath.Path(f).copy(target, overwrite=True)
  monkeypatch.chdir(tmp_path / "cwd" if (tmp_path / "cwd").mkdir() is None else tmp_path)
  src = sources.make_source("mimic_ccf", "train", data_dir=manual, image_size=28)
  assert len(src) == 5 and Image.open(io.BytesIO(src[0]["image"])).size == (28, 28)
  files = bucket_files(manual + "/_tfds/mimic_ccf/raise_28px/2.0.0")
  assert {"cpo_jax_report.json", "dataset_info.json", "thumbnails.train.npy"} <= set(files)
  test = sources.make_source("mimic_ccf", "test", data_dir=manual, image_size=28)
  assert len(test) == 1
  assert list((tmp_path / "cwd").iterdir()) == []  # prepared in a temporary dir, uploaded
