"""codalm: CODA-LM's published layout (per-image JSON + CODA2022 images) -> TFDS -> batches."""
import io
import json

import numpy as np
import pytest
from PIL import Image

from cpo_jax.data import codalm
from cpo_jax.data import pipeline as P
from cpo_jax.data import tokenizer as tok_lib
from cpo_jax.knowledge import load_graph

GP = "A white truck ahead in the same lane occupies the road, so the ego car must keep a safe distance."
DS = "Slow down and keep a safe distance from the truck ahead, and watch the cones on the right."
REG = "This is a traffic cone on the right side of the lane, the ego car should avoid it."


def _jpeg(seed, size=(64, 48)):
  arr = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, format="JPEG")
  return buf.getvalue()


def _ann(regions=1):
  return {"general_perception": {"vehicles": [{"description": "a white truck", "explanation": "it is ahead"}],
                                 "vulnerable_road_users": [], "traffic signs": [], "traffic lights": [],
                                 "traffic cones": [], "barriers": [], "other objects": [],
                                 "description and explanation": GP},
          "region_perception": {str(k + 1): {"description and explanation": REG, "box": [10.0, 8.0, 20.0, 16.0],
                                             "category_name": "traffic_cone"} for k in range(regions)},
          "driving_suggestion": DS}


def _write(root, bad=False):
  for d, names in (("val", ["0001", "0002"]), ("test", ["0003"])):
    (root / d / "images").mkdir(parents=True)
    for n in names:
      (root / d / "images" / f"{n}.jpg").write_bytes(_jpeg(int(n)))
  (root / "CODA-LM" / "Train").mkdir(parents=True)
  (root / "CODA-LM" / "Val").mkdir(parents=True)
  (root / "CODA-LM" / "Train" / "val_0001.json").write_text(json.dumps(_ann(regions=2)))
  (root / "CODA-LM" / "Train" / "val_0002.json").write_text(json.dumps(_ann(regions=0)))
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
def proc(tmp_path_factory):
  d = tmp_path_factory.mktemp("tok")
  tok_lib.save_tokenizer(tok_lib.build_tokenizer(extra_texts=[GP, DS, REG, *codalm.QUESTIONS.values()]), str(d))
  return P.make_processors(str(d))


def test_codalm_prepares_and_feeds_sft_cpo_eval(proc, tmp_path):
  _write(tmp_path)
  src = P.make_source("codalm", "train", data_dir=str(tmp_path))
  assert src.kind == "pairs" and src.domain == "driving" and src.skipped == {}
  rows = [src[i] for i in range(len(src))]
  # val_0001: general + suggestion + 2 regions; val_0002: general + suggestion
  assert [(r["task"], r["region"]) for r in rows] == [
      ("general_perception", -1), ("driving_suggestion", -1), ("region_perception", 1), ("region_perception", 2),
      ("general_perception", -1), ("driving_suggestion", -1)]
  assert rows[0]["chosen"] == GP and rows[1]["chosen"] == DS and rows[2]["chosen"] == REG
  assert rows[0]["prompt_messages"][0]["content"] == "<image>" + codalm.QUESTIONS["general_perception"]
  raw = (tmp_path / "val/images/0001.jpg").read_bytes()
  assert rows[0]["image"] == raw and rows[2]["image"] != raw  # the region image has the box drawn
  boxed = np.asarray(Image.open(io.BytesIO(rows[2]["image"])).convert("RGB")).astype(int)
  assert boxed[8, 20, 0] > 180 and boxed[8, 20, 1] < 90  # red top edge of the xywh box (10, 8, 20, 16)
  np.testing.assert_array_equal(rows[2]["box"], [10, 8, 20, 16])
  # the driving graph (a synth_drive sketch without free-text terms) parses none: SFT/eval only
  assert all(r["source"] == 2 and r["sample_weight"] == 0.0 and r["rejected"] == r["chosen"] for r in rows)

  sft = next(P.make_sft_iterator(src, proc, batch_size=2, max_len=160, seed=0))
  assert sft["input_ids"].shape == (2, 160) and sft["pixel_values"].shape == (128, 1176)
  tok = proc.tokenizer
  assert tok.decode(sft["input_ids"][0][sft["loss_mask"][0] == 1]) in {GP + "<|im_end|>", DS + "<|im_end|>",
                                                                        REG + "<|im_end|>"}
  cpo = next(P.make_cpo_iterator(src, proc, batch_size=2, max_len=160, seed=0))
  assert cpo["chosen_input_ids"].shape == (2, 160) and (cpo["sample_weight"] == 0).all()

  val = P.make_source("codalm", "val", data_dir=str(tmp_path))
  assert len(val) == 3
  (b,) = list(P.make_eval_batches(val, proc, batch_size=4, max_prompt_len=96, graph=load_graph("driving")))
  assert b["input_ids"].shape == (4, 96) and b["valid"].tolist() == [True, True, True, False]
  with pytest.raises(ValueError, match="CODA-LM/Test"):
    P.make_source("codalm", "test", data_dir=str(tmp_path))


def test_codalm_thinking_pair_only_where_the_answer_parses_with_the_graph():
  assert codalm.thinking_pair(DS, load_graph("driving")) is None
  g = load_graph("medical")  # the mechanism, on a graph whose concepts have free-text terms
  chosen, rejected = codalm.thinking_pair("There is a small pleural effusion. The disease of this patient is "
                                          "pleural effusion.", g)
  assert chosen.startswith("<think> There is a small pleural effusion.") and chosen.endswith(
      "</think> The disease of this patient is pleural effusion.")
  assert g.parse_decision(rejected) not in (None, "pleural_effusion")


def test_codalm_bad_records_skip_by_reason_or_raise_naming_file_and_field(tmp_path):
  _write(tmp_path, bad=True)
  src = P.make_source("codalm", "train", data_dir=str(tmp_path), on_bad_record="skip")
  assert src.skipped == {"bad_image": 1, "missing_field": 1, "empty_chain": 1, "bad_type": 1, "bad_json": 1}
  assert [(r["task"], r["region"]) for r in (src[i] for i in range(len(src)))] == [("region_perception", 1)]
  with pytest.raises(P.BadRecordError, match=r"record val_0001.json: not valid JSON.*reason=bad_json"):
    P.make_source("codalm", "train", data_dir=str(tmp_path), prepared_dir=str(tmp_path / "prep"))
  (tmp_path / "CODA-LM" / "Train" / "val_0001.json").unlink()
  with pytest.raises(P.BadRecordError, match=r"record val_0002.json: field 'general_perception.description and "
                                             r"explanation' is empty"):
    P.make_source("codalm", "train", data_dir=str(tmp_path), prepared_dir=str(tmp_path / "prep2"))
