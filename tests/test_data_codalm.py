"""codalm: CODA-LM's published layout (per-image JSON + CODA2022 images) -> TFDS -> batches."""

import collections
import io
import json

import numpy as np
from PIL import Image
import pytest

from cpo_jax.data import bad_records
from cpo_jax.data import codalm
from cpo_jax.data import datasets
from cpo_jax.data import eval_batches
from cpo_jax.data import pairs as pairs_lib
from cpo_jax.data import prepared_images
from cpo_jax.data import processors
from cpo_jax.data import sources
from cpo_jax.data import tokenizer as tok_lib
from cpo_jax.knowledge import free_text
from cpo_jax.knowledge import load_graph

GP = "A white truck ahead in the same lane occupies the road, so the ego car must keep a safe distance."
DS = "Slow down and keep a safe distance from the truck ahead, and watch the cones on the right."
DS2 = "The traffic light at the intersection is red, so the ego car should come to a stop at the stop line."
REG = "This is a traffic cone on the right side of the lane, the ego car should avoid it."


def _jpeg(seed, size=(64, 48)):
  arr = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, format="JPEG")
  return buf.getvalue()


def _ann(regions=1, ds=DS):
  return {
    "general_perception": {
      "vehicles": [{"description": "a white truck", "explanation": "it is ahead"}],
      "vulnerable_road_users": [],
      "traffic signs": [],
      "traffic lights": [],
      "traffic cones": [],
      "barriers": [],
      "other objects": [],
      "description and explanation": GP,
    },
    "region_perception": {
      str(k + 1): {
        "description and explanation": REG,
        "box": [10.0, 8.0, 20.0, 16.0],
        "category_name": "traffic_cone",
      }
      for k in range(regions)
    },
    "driving_suggestion": ds,
  }


def _write(root, bad=False):
  for d, names in (("val", ["0001", "0002"]), ("test", ["0003"])):
    (root / d / "images").mkdir(parents=True)
    for n in names:
      (root / d / "images" / f"{n}.jpg").write_bytes(_jpeg(int(n)))
  (root / "CODA-LM" / "Train").mkdir(parents=True)
  (root / "CODA-LM" / "Val").mkdir(parents=True)
  (root / "CODA-LM" / "Train" / "val_0001.json").write_text(json.dumps(_ann(regions=2)))
  (root / "CODA-LM" / "Train" / "val_0002.json").write_text(json.dumps(_ann(regions=0, ds=DS2)))
  (root / "CODA-LM" / "Val" / "test_0003.json").write_text(json.dumps(_ann(regions=1)))
  if bad:
    t = root / "CODA-LM" / "Train"
    (t / "val_0009.json").write_text(json.dumps(_ann()))  # no image val/images/0009.jpg
    a = _ann(regions=2)
    del a["driving_suggestion"]  # missing field
    a["general_perception"]["description and explanation"] = "  "  # empty answer
    a["region_perception"]["2"]["box"] = "oops"  # wrong type
    (t / "val_0002.json").write_text(json.dumps(a))
    (t / "val_0001.json").write_text(json.dumps(_ann(regions=2))[:50])  # truncated JSON


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("tok")
  pairs = [p for t in (DS, DS2) for p in codalm.thinking_pair(t, load_graph("driving"))]
  tok_lib.save_tokenizer(
    tok_lib.build_tokenizer(extra_texts=[GP, DS, DS2, REG, *pairs, *codalm.QUESTIONS.values()]),
    str(d),
  )
  return str(d)


@pytest.fixture(scope="module")
def proc(tok_dir):
  return processors.make_processors(tok_dir)


def test_codalm_prepares_and_feeds_sft_cpo_eval(proc, tmp_path):
  _write(tmp_path)
  src = sources.make_source("codalm", "train", data_dir=str(tmp_path))
  assert src.kind == "pairs" and src.domain == "driving" and src.skipped == {}
  rows = [src[i] for i in range(len(src))]
  # val_0001: general + suggestion + 2 regions; val_0002: general + suggestion; then one perception
  # row per thinking pair (the two suggestions: slow down vs stop, each the other's negative)
  assert [(r["task"], r["region"], r["source"]) for r in rows] == [
    ("general_perception", -1, 2),
    ("driving_suggestion", -1, 0),
    ("region_perception", 1, 2),
    ("region_perception", 2, 2),
    ("general_perception", -1, 2),
    ("driving_suggestion", -1, 0),
    ("driving_suggestion", -1, 1),
    ("driving_suggestion", -1, 1),
  ]
  g = load_graph("driving")
  assert (
    rows[0]["chosen"] == GP and rows[2]["chosen"] == REG
  )  # no single decision named: SFT/eval only
  assert all(
    rows[i]["sample_weight"] == 0.0 and rows[i]["rejected"] == rows[i]["chosen"]
    for i in (0, 2, 3, 4)
  )
  # the suggestions parse with the driving graph: thinking pairs whose rejected side the validator accepts
  assert rows[1]["chosen"] == f"<think> {DS} </think> The decision is slow down."
  assert rows[5]["chosen"] == f"<think> {DS2} </think> The decision is stop."
  for r, d in ((rows[1], "slow_down"), (rows[5], "stop")):
    target = g.parse_decision(r["rejected"])
    assert target not in (None, d) and r["sample_weight"] == 1.0
    assert free_text.validate_report(g, r["rejected"], original_decision=d, target=target)[0]
  assert [r["decision"] for r in rows[:6]] == [
    -1,
    g.decision_id("slow_down"),
    -1,
    -1,
    -1,
    g.decision_id("stop"),
  ]
  raw1, raw2 = (
    (tmp_path / "val/images/0001.jpg").read_bytes(),
    (tmp_path / "val/images/0002.jpg").read_bytes(),
  )
  assert rows[0]["image"] == raw1 and rows[2]["image"] != raw1  # the region image has the box drawn
  assert (rows[6]["chosen"], rows[6]["rejected"], rows[6]["image"], rows[6]["rejected_image"]) == (
    rows[1]["chosen"],
    rows[1]["chosen"],
    raw1,
    raw2,
  )
  assert (rows[7]["image"], rows[7]["rejected_image"]) == (raw2, raw1)
  boxed = np.asarray(Image.open(io.BytesIO(rows[2]["image"])).convert("RGB")).astype(int)
  assert (
    boxed[8, 20, 0] > 180 and boxed[8, 20, 1] < 90
  )  # red top edge of the xywh box (10, 8, 20, 16)
  np.testing.assert_array_equal(rows[2]["box"], [10, 8, 20, 16])
  np.testing.assert_array_equal(
    src._src[4]["thumbnail"], pairs_lib.thumbnail(raw2)
  )  # stored at prepare time

  sft = next(datasets.make_sft_iterator(src, proc, batch_size=2, max_len=160, seed=0))
  assert sft["input_ids"].shape == (2, 160) and sft["pixel_values"].shape == (128, 1176)
  tok = proc.tokenizer
  assert tok.decode(sft["input_ids"][0][sft["loss_mask"][0] == 1]) in {
    r["chosen"] + "<|im_end|>" for r in rows
  }
  skips = bad_records.SkipCounter()
  batches = list(  # one whole pass: the skip counts are final only at its end
    datasets.make_cpo_iterator(
      src, proc, batch_size=4, max_len=160, seed=0, num_epochs=1, skips=skips
    )
  )
  cpo = batches[0]
  assert len(batches) == 1 and cpo["chosen_input_ids"].shape == (4, 160)
  # the 'other' rows (weight 0: nothing to prefer) leave the CPO stream, counted
  assert sorted(cpo["source"].tolist()) == [0, 0, 1, 1]
  assert cpo["sample_weight"].tolist() == [1.0] * 4 and skips.counts == {"no_preference": 4}

  val = sources.make_source("codalm", "val", data_dir=str(tmp_path))
  assert len(val) == 3  # one suggestion parses, but no other decision to pair its image with
  (b,) = list(eval_batches.make_eval_batches(val, proc, batch_size=4, max_prompt_len=96, graph=g))
  assert b["input_ids"].shape == (4, 96) and b["valid"].tolist() == [True, True, True, False]
  with pytest.raises(ValueError, match="CODA-LM/Test"):
    sources.make_source("codalm", "test", data_dir=str(tmp_path))


def test_codalm_thinking_pair_only_where_the_answer_parses_with_the_graph():
  g = load_graph("driving")
  assert (
    codalm.thinking_pair(GP, g) is None and codalm.thinking_pair(REG, g) is None
  )  # no decision named
  assert (
    codalm.thinking_pair("There is a red light ahead, so the ego car should slow down.", g) is None
  )  # rule: stop
  assert codalm.thinking_pair("Slow down or stop for the truck ahead.", g) is None  # two decisions
  assert (
    codalm.thinking_pair("There is no need to stop; slow down for the truck ahead.", g) is not None
  )
  g = load_graph("medical")  # the same mechanism on the medical graph
  chosen, rejected = codalm.thinking_pair(
    "There is a small pleural effusion. The disease of this patient is pleural effusion.", g
  )
  assert chosen.startswith("<think> There is a small pleural effusion.") and chosen.endswith(
    "</think> The disease of this patient is pleural effusion."
  )
  assert g.parse_decision(rejected) not in (None, "pleural_effusion")


# ---- CODA-LM-style free text ---------------------------------------------------------------
# Carrier sentences in the style of CODA-LM's answers (GPT-4V-written descriptions of the objects
# that influence the ego car, and a suggestion); {t} is a term of the graph's value.
EVIDENCE = {
  ("traffic_light", "red"): [
    "In the traffic image, there is a {t} at the intersection ahead, which regulates "
    "the flow of traffic.",
    "The {t} above the crossing is clearly visible.",
  ],
  ("traffic_light", "green"): [
    "There is a {t} at the junction ahead, which allows traffic to move.",
    "A {t} is visible above the road ahead.",
  ],
  ("traffic_light", "none"): [
    "There are no traffic lights at this location.",
    "No traffic signals are visible.",
  ],
  ("pedestrian", "crossing"): [
    "A {t} from the left, which poses a direct risk to the ego car.",
    "In front of the ego car, a {t}, and they have the right of way.",
  ],
  ("pedestrian", "none"): [
    "There are no pedestrians on the road.",
    "Some pedestrians on the sidewalk are walking along the street.",
  ],
  ("lead_vehicle", "near"): [
    "A white {t} occupies the road, so the ego car must keep a safe distance.",
    "There is a black {t}, which limits the space of the ego car.",
  ],
  ("lead_vehicle", "far"): [
    "A silver {t} is moving in the same direction as the ego car.",
    "There is a {t}, which does not affect the ego car for now.",
  ],
  ("lead_vehicle", "none"): [
    "The road ahead is clear of other traffic.",
    "There are parked cars along the right side of the road, which do not block it.",
  ],
  ("cone", "in_lane"): [
    "Several orange {t}, indicating a construction zone.",
    "A {t}, which forces the ego car to leave its lane.",
  ],
  ("cone", "none"): [
    "There are no cones on the road.",
    "Traffic cones on the right side of the road mark a work zone.",
  ],
}
# terms per value that read as a noun phrase + predicate inside the carriers above
TERMS = {
  ("traffic_light", "red"): ["red traffic light", "red light", "red signal"],
  ("traffic_light", "green"): ["green traffic light", "green light", "green signal"],
  ("pedestrian", "crossing"): [
    "pedestrian is crossing the road",
    "cyclist is crossing the street",
    "woman crossing the road",
    "child is walking across",
  ],
  ("lead_vehicle", "near"): [
    "truck ahead in the same lane",
    "sedan directly in front of the ego car",
    "bus close ahead",
    "van in the ego lane",
  ],
  ("lead_vehicle", "far"): ["car far ahead", "truck in the distance", "suv far away"],
  ("cone", "in_lane"): [
    "traffic cones are placed in the ego lane",
    "traffic cone is blocking the lane",
    "cones in the middle of the road ahead",
  ],
}
FILLERS = [
  "The weather is cloudy and the road surface is dry.",
  "A white barrier stands on the left side of the road.",
  "There is a speed limit sign on the right side of the road.",
  "A stop sign is mounted on a pole at the corner.",  # 'stop' here names no decision
  "Buildings and trees line both sides of the street.",
  "A bus stop is located on the sidewalk.",
]
SUGGEST = {
  "stop": ["stop", "come to a complete stop", "halt"],
  "slow_down": ["slow down", "reduce its speed", "proceed with caution"],
  "proceed": ["proceed", "continue driving", "maintain its speed"],
  "change_lane": [
    "change lanes",
    "move to the adjacent lane",
    "steer around the obstacle and change lane",
  ],
}
CONCLUDE = [
  "Therefore, the ego car should {d}.",
  "The ego car needs to {d} in this situation.",
  "It is advisable for the ego car to {d}.",
]


def codalm_description(g, a, rng) -> str:
  """A CODA-LM-style answer stating assignment `a` and concluding its decision."""
  out = []
  for c in g.concepts:
    v = a[c.name]
    if v != c.neutral or rng.random() < 0.5:
      out.append(
        str(rng.choice(EVIDENCE[c.name, v])).format(t=rng.choice(TERMS.get((c.name, v), [""])))
      )
  out += list(rng.choice(FILLERS, size=int(rng.integers(0, 3)), replace=False))
  out = [str(x) for x in rng.permutation(out)]
  d = g.decide(a)
  if d != "stop" and rng.random() < 0.3:
    out.append("There is no need to stop.")  # a negated decision names none
  conclusion = str(rng.choice(CONCLUDE)).format(d=rng.choice(SUGGEST[d]))
  return " ".join([conclusion] + out if rng.random() < 0.3 else out + [conclusion])


def test_codalm_style_descriptions_parse_and_rewrite_into_validated_counterfactuals():
  g = load_graph("driving")
  rng = np.random.default_rng(0)
  assigns = g.all_assignments()
  n_cf, seen = 0, set()
  for i in range(120):
    a = assigns[i % len(assigns)]
    text = codalm_description(g, a, rng)
    parsed, _ = free_text.parse_report(g, text)
    assert parsed == a, text
    assert free_text.answer_decision(g, text) == g.decide(a), text
    chosen, rejected = codalm.thinking_pair(text, g)
    assert chosen == f"<think> {text} </think> {g.answer_text(g.decide(a))}"
    for cf in free_text.rewrite_report(g, chosen, k=len(g.decisions) - 1, seed=i):
      ok, why = free_text.validate_report(
        g, cf.completion, original_decision=g.decide(a), target=cf.decision
      )
      assert ok, (why, cf.completion)
      n_cf += 1
    seen.add(g.decide(a))
  assert n_cf == 120 * 3 and seen == set(g.decisions)


def test_rewrite_makes_kept_conclusions_name_the_target():
  g = load_graph("driving")
  chosen = f"<think> {DS} </think> The decision is slow down."
  (cf,) = free_text.rewrite_report(g, chosen, k=1, seed=0)
  body = cf.completion.split("</think>")[0]
  assert cf.decision in ("stop", "change_lane", "proceed")
  assert (
    "Slow down" not in body
    and free_text.validate_report(
      g, cf.completion, original_decision="slow_down", target=cf.decision
    )[0]
  )
  # a kept sentence that still concludes the original decision fails validation
  bad = "<think> The traffic light is red. Slow down for the truck ahead. </think> The decision is stop."
  ok, why = free_text.validate_report(g, bad, original_decision="slow_down", target="stop")
  assert not ok and "concludes ['slow_down']" in why


def test_codalm_stream_of_generated_descriptions_yields_thinking_and_perception_pairs(tmp_path):
  """12 images with CODA-LM-style suggestions: every one becomes a thinking pair and a perception pair."""
  g = load_graph("driving")
  rng = np.random.default_rng(1)
  assigns = g.all_assignments()
  (tmp_path / "val" / "images").mkdir(parents=True)
  (tmp_path / "CODA-LM" / "Train").mkdir(parents=True)
  texts = []
  for k in range(12):
    texts.append(codalm_description(g, assigns[int(rng.integers(len(assigns)))], rng))
    (tmp_path / "val" / "images" / f"{k:04d}.jpg").write_bytes(_jpeg(k))
    ann = _ann(regions=0, ds=texts[-1])
    (tmp_path / "CODA-LM" / "Train" / f"val_{k:04d}.json").write_text(json.dumps(ann))
  src = sources.make_source("codalm", "train", data_dir=str(tmp_path))
  rows = [src[i] for i in range(len(src))]
  kinds = collections.Counter(r["source"] for r in rows)
  assert kinds == {2: 12, 0: 12, 1: 12}, (
    kinds
  )  # general perception: SFT only; suggestions: both pair kinds
  for r in rows:
    if r["source"] == 1:
      assert r["rejected_image"] != r["image"] and r["rejected"] == r["chosen"]
    if r["source"] == 0:
      assert free_text.validate_report(
        g,
        r["rejected"],
        original_decision=g.decisions[r["decision"]],
        target=g.parse_decision(r["rejected"]),
      )[0]
  d = tmp_path / "tok"
  tok_lib.save_tokenizer(
    tok_lib.build_tokenizer(
      extra_texts=[t for r in rows for t in (r["chosen"], r["rejected"])]
      + list(codalm.QUESTIONS.values())
    ),
    str(d),
  )
  cpo = next(
    datasets.make_cpo_iterator(
      src, processors.make_processors(str(d)), batch_size=24, max_len=512, seed=0, num_epochs=1
    )
  )
  # general perception (weight 0) stays out of the CPO stream
  assert sorted(collections.Counter(cpo["source"].tolist()).items()) == [(0, 12), (1, 12)]


def test_codalm_bad_records_skip_by_reason_or_raise_naming_file_and_field(tmp_path):
  _write(tmp_path, bad=True)
  src = sources.make_source("codalm", "train", data_dir=str(tmp_path), on_bad_record="skip")
  assert src.skipped == {
    "bad_image": 1,
    "missing_field": 1,
    "empty_chain": 1,
    "bad_type": 1,
    "bad_json": 1,
  }
  assert [(r["task"], r["region"]) for r in (src[i] for i in range(len(src)))] == [
    ("region_perception", 1)
  ]
  with pytest.raises(
    bad_records.BadRecordError, match=r"record val_0001.json: not valid JSON.*reason=bad_json"
  ):
    sources.make_source(
      "codalm", "train", data_dir=str(tmp_path), prepared_dir=str(tmp_path / "prep")
    )
  (tmp_path / "CODA-LM" / "Train" / "val_0001.json").unlink()
  with pytest.raises(
    bad_records.BadRecordError,
    match=r"record val_0002.json: field 'general_perception.description and "
    r"explanation' is empty",
  ):
    sources.make_source(
      "codalm", "train", data_dir=str(tmp_path), prepared_dir=str(tmp_path / "prep2")
    )


def test_a_codalm_set_whose_records_are_all_bad_stops_at_once_with_the_counts(tmp_path):
  _write(tmp_path)
  for jpg in tmp_path.glob("*/images/*.jpg"):
    jpg.unlink()
  with pytest.raises(bad_records.TooManySkipsError, match=r"split 'train'.*'bad_image': 3"):
    sources.make_source("codalm", "train", data_dir=str(tmp_path), on_bad_record="skip")


def test_codalm_boxes_are_drawn_on_the_published_image_then_resized_to_the_run(tok_dir, tmp_path):
  _write(tmp_path)
  blue = np.zeros((48, 64, 3), np.uint8)
  blue[..., 2] = 255
  (tmp_path / "val" / "images_w_boxes").mkdir()
  Image.fromarray(blue).save(tmp_path / "val" / "images_w_boxes" / "0001_object_2.jpg")
  src = sources.make_source("codalm", "train", data_dir=str(tmp_path), image_size=56)
  rows = [src[i] for i in range(4)]  # val_0001: general, suggestion, region 1, region 2
  side = 56
  scene, region = (
    np.asarray(Image.open(io.BytesIO(rows[k]["image"])).convert("RGB")).astype(int) for k in (0, 2)
  )
  assert scene.shape == region.shape == (side, side, 3)
  # The box (x, y, w, h) = (10, 8, 20, 16) on the 64 x 48 image lands on the square scaled:
  # only its outline differs from the prepared scene, and it is red.
  changed = np.argwhere(np.abs(region - scene).sum(-1) > 90)
  sx, sy = side / 64, side / 48
  (y0, x0), (y1, x1) = changed.min(0), changed.max(0)
  np.testing.assert_allclose([x0, y0, x1, y1], [10 * sx, 8 * sy, 30 * sx, 24 * sy], atol=2)
  inner = np.abs(region - scene)[round(12 * sy) : round(20 * sy), round(14 * sx) : round(26 * sx)]
  assert inner.max() < 40  # inside the outline: the scene itself
  edge = region[changed[:, 0], changed[:, 1]]
  assert (edge[:, 0] - edge[:, 1]).mean() > 60  # red
  np.testing.assert_array_equal(rows[2]["box"], [10, 8, 20, 16])  # still the published pixels
  assert src._src[2]["source_size"].tolist() == [64, 48]
  # Through the run's processor the stored image gives the pixels of the boxed published one.
  proc = processors.make_processors(tok_dir, image_size=side)
  raw = (tmp_path / "val/images/0001.jpg").read_bytes()
  drawn = prepared_images.draw_box(Image.open(io.BytesIO(raw)).convert("RGB"), [10, 8, 20, 16])
  np.testing.assert_array_equal(proc.image_inputs(rows[2]["image"])[0], proc.image_inputs(drawn)[0])
  # CODA-LM's own boxed image is used where present (resized the same way)
  published = (tmp_path / "val/images_w_boxes/0001_object_2.jpg").read_bytes()
  np.testing.assert_array_equal(
    proc.image_inputs(rows[3]["image"])[0], proc.image_inputs(published)[0]
  )
