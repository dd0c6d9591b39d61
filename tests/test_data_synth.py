"""synth_drive: determinism, the built-in shortcut, evidence visibility, the TFDS round trip."""

import collections
import subprocess
import sys
import time

import numpy as np
import pytest

from cpo_jax.data import synth_drive as sd


def test_same_seed_same_bytes_other_seed_differs():
  a = [sd.make_example(0, "train", i) for i in range(8)]
  b = [sd.make_example(0, "train", i) for i in range(8)]
  c = [sd.make_example(1, "train", i) for i in range(8)]
  for x, y in zip(a, b):
    assert x["image"] == y["image"] and x["chain"] == y["chain"]
    np.testing.assert_array_equal(x["boxes"], y["boxes"])
  assert sum(x["image"] != z["image"] for x, z in zip(a, c)) >= 6
  assert sd.make_example(0, "test", 3)["image"] != sd.make_example(0, "train", 3)["image"]


def _labels(split, n=2000):
  src = sd.SynthDriveSource(split, n, seed=0)
  return src.labels()


@pytest.mark.parametrize(
  "split,lo,hi", [("train", 0.87, 0.93), ("test", 0.87, 0.93), ("ood", 0.21, 0.29)]
)
def test_shortcut_agreement_per_split(split, lo, hi):
  d, _, n = _labels(split)
  agree = float((d == n).mean())  # nuisance value i is the shortcut for decision i
  assert lo <= agree <= hi, agree
  frac = np.bincount(d, minlength=4) / len(d)
  assert frac.min() > 0.2 and frac.max() < 0.3, frac  # decisions roughly balanced


def test_chain_and_decision_follow_the_graph():
  g = sd.graph()
  for i in range(50):
    ex = sd.make_example(0, "ood", i)
    a = g.assignment_from_ids(ex["concepts"])
    parsed, _ = g.parse_chain(ex["chain"])
    assert parsed == a
    assert g.decisions[ex["decision"]] == g.decide(a)
    assert g.parse_decision(ex["answer"]) == g.decide(a)
    assert ex["chain"].startswith("<think>") and ex["chain"].endswith("</think>")


def _has_colour(img, box, colour, tol=30):
  x0, y0, x1, y1 = (int(v) for v in box)
  patch = img[max(y0, 0) : y1 + 1, max(x0, 0) : x1 + 1].astype(int)
  return bool((np.abs(patch - np.array(colour)).max(-1) < tol).any())


def test_evidence_is_drawn_in_its_box_and_large_enough():
  g = sd.graph()
  seen = collections.Counter()
  for i in range(80):
    ex = sd.make_example(0, "ood", i, encode_png=False)
    img, a, boxes = ex["image"], g.assignment_from_ids(ex["concepts"]), ex["boxes"]
    assert img.shape == (112, 112, 3) and img.dtype == np.uint8
    assert _has_colour(img, boxes[0], sd._LAMP_RED) == (a["traffic_light"] == "red")
    assert _has_colour(img, boxes[0], sd._LAMP_GREEN) == (a["traffic_light"] == "green")
    assert _has_colour(img, boxes[1], sd._PED_SHIRT) == (a["pedestrian"] == "crossing")
    assert _has_colour(img, boxes[2], sd._CAR) == (a["lead_vehicle"] != "none")
    assert _has_colour(img, boxes[3], sd._CONE) == (a["cone"] == "in_lane")
    seen.update(f"{k}={v}" for k, v in a.items())
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (np.minimum(w, h) >= 8).all()  # >= ~8 px: visible to 14 px patches
  assert len(seen) == 10  # every concept value occurs


def test_nuisance_is_global_background():
  # The sky row far from any evidence differs across nuisance values: the easy feature.
  skies = collections.defaultdict(list)
  for i in range(60):
    ex = sd.make_example(0, "ood", i, encode_png=False)
    skies[ex["nuisance"]].append(ex["image"][2, 10].astype(int))
  means = {k: np.mean(v, 0) for k, v in skies.items()}
  assert len(means) == 4
  ks = sorted(means)
  assert min(np.abs(means[a] - means[b]).sum() for a in ks for b in ks if a < b) > 60


def test_tfds_array_record_round_trip(tmp_path):
  from cpo_jax.data import tfds_synth

  cfg = tfds_synth.SynthConfig(name="t", seed=3, num_train=6, num_test=4, num_ood=4)
  src = tfds_synth.data_source("synth_drive", str(tmp_path), "ood", cfg)
  assert len(src) == 4
  for i in range(4):
    r, ex = src[i], sd.make_example(3, "ood", i)
    assert r["image"] == ex["image"]
    assert r["chain"].decode() == ex["chain"] and r["answer"].decode() == ex["answer"]
    assert r["decision"] == ex["decision"] and r["nuisance"] == ex["nuisance"] and r["index"] == i
    np.testing.assert_array_equal(r["boxes"], ex["boxes"])
    np.testing.assert_array_equal(r["concepts"], ex["concepts"])
  assert list((tmp_path / "synth_drive" / "t" / "1.0.0").glob("*.array_record*"))
  cx = tfds_synth.data_source("synth_cxr", str(tmp_path), "train", cfg)
  from cpo_jax.data import synth_cxr

  assert cx.domain == "medical" and cx[5]["image"] == synth_cxr.make_example(3, "train", 5)["image"]


def test_shortcut_strength_is_a_knob_and_tfds_source_matches(tmp_path):
  d, _, n = sd.SynthDriveSource("train", 2000, seed=0, agreement=0.5).labels()
  assert 0.46 <= float((d == n).mean()) <= 0.54
  from cpo_jax.data.sources import make_source

  files = make_source(
    "synth_drive",
    "test",
    num_examples=5,
    seed=2,
    data_dir=str(tmp_path),
    shortcut_agreement=0.7,
    split_sizes={"train": 3, "ood": 3},
  )
  mem = make_source("synth_drive", "test", num_examples=5, seed=2, shortcut_agreement=0.7)
  assert len(files) == len(mem) == 5
  assert [files[i]["image"] for i in range(5)] == [mem[i]["image"] for i in range(5)]


def test_synth_cxr_deterministic_consistent_and_shortcut():
  from cpo_jax.data import synth_cxr as cx

  g = cx.graph()
  assert cx.make_example(0, "train", 5)["image"] == cx.make_example(0, "train", 5)["image"]
  for i in range(30):
    ex = cx.make_example(0, "ood", i)
    a = g.assignment_from_ids(ex["concepts"])
    assert g.parse_chain(ex["chain"])[0] == a and g.decisions[ex["decision"]] == g.decide(a)
  for split, lo, hi in (("train", 0.86, 0.94), ("ood", 0.19, 0.31)):
    d, _, n = cx.SynthCxrSource(split, 1500, seed=0).labels()
    assert lo <= float((d % 4 == n).mean()) <= hi
  assert len(set(d.tolist())) == len(g.decisions)


def test_synth_cxr_renders_pneumothorax_beside_volume_loss():
  # These records pair a pneumothorax line with a shrunken lung that ends left of it; they
  # used to crash the renderer (an air rectangle of negative width).
  from cpo_jax.data import synth_cxr

  for split, n, i in (("train", 4096, 566), ("test", 512, 219), ("ood", 512, 285)):
    record = synth_cxr.SynthCxrSource(split, n, 0)[i]
    assert record["image"][:8] == b"\x89PNG\r\n\x1a\n"


_PREPARE_AT = """
import sys, time
from cpo_jax.data import tfds_synth
data_dir, start = sys.argv[1], float(sys.argv[2])
time.sleep(max(0.0, start - time.time()))  # both processes start writing together
config = tfds_synth.SynthConfig(name="race", num_train=64, num_test=0, num_ood=0)
source = tfds_synth.data_source("synth_drive", data_dir, "train", config)
print(sum(len(source[i]["image"]) for i in range(len(source))))
"""


def test_two_processes_preparing_one_data_dir_at_once_both_read_it(tmp_path):
  """Runs sharing a data dir (ablation arms started together) prepare the same version at
  once; the one that finishes second reads the first one's files instead of failing on
  tfds's rename."""
  start = str(time.time() + 8)  # after both interpreters have imported tfds
  procs = [
    subprocess.Popen(
      [sys.executable, "-c", _PREPARE_AT, str(tmp_path), start],
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for _ in range(2)
  ]
  results = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, results):
    assert p.returncode == 0, err[-2000:]
  image_bytes = [int(out.split()[-1]) for out, _ in results]  # the last line: tfds logs first
  assert image_bytes[0] == image_bytes[1] > 0
  assert [d.name for d in (tmp_path / "synth_drive" / "race").iterdir()] == ["1.0.0"]
