"""Scenes past a synthetic split's records: data.cpo_scenes='fresh' makes the CPO++ pairs (and
the compute-matched control's rows) on train scenes the SFT stage never sees, and
sft.early_stop validates on held-out train scenes apart from both."""

import hashlib

import numpy as np
import pytest

from cpo_jax import config_defaults
from cpo_jax.data import sources
from cpo_jax.data import streams
from cpo_jax.data import synth_cxr


def test_a_source_from_index_n_holds_the_splits_scenes_from_n(tmp_path):
  whole = synth_cxr.SynthCxrSource("train", 12, seed=1)
  tail = synth_cxr.SynthCxrSource("train", 4, seed=1, first_index=8)
  files = sources.make_source(
    "synth_cxr", "train", num_examples=4, seed=1, data_dir=str(tmp_path), first_index=8
  )
  assert len(tail) == len(files) == 4 and "first_index=8" in repr(tail)
  for i in range(4):
    assert tail[i]["index"] == files[i]["index"] == 8 + i
    assert tail[i]["image"] == files[i]["image"] == whole[8 + i]["image"]
  for got, want in zip(tail.labels(), whole.labels()):
    np.testing.assert_array_equal(got, want[8:])
  g = synth_cxr.graph()
  flipped = dict(g.assignment_from_ids(whole[9]["concepts"]), heart_size="enlarged")
  assert (
    tail.counterfactual(1, flipped)["image"]
    == files.counterfactual(1, flipped)["image"]
    == whole.counterfactual(9, flipped)["image"]
  )
  with pytest.raises(ValueError, match="only the synthetic datasets"):
    sources.make_source("swift_jsonl", "train", data_dir=str(tmp_path), first_index=8)


def _config(cpo_scenes, early_stop=""):
  cfg = config_defaults.base_config("", domain="medical", data="synth_cxr")
  cfg.data.num_examples = dict(train=16, test=8, ood=8)
  cfg.data.spurious_correlation = 0.9
  cfg.sft.batch_size = cfg.cpo.batch_size = 8
  cfg.cpo.num_steps = 3
  cfg.data.cpo_scenes = cpo_scenes
  cfg.sft.early_stop, cfg.sft.val_examples = early_stop, 8
  return cfg


def _digest(pixels):
  return hashlib.sha1(np.asarray(pixels, np.float32).tobytes()).hexdigest()


def _images(batches, key, n_batches=2):
  """Digests of the images (each example's pixel rows) of the first n batches."""
  out = []
  for _ in range(n_batches):
    b = next(batches)
    out += [_digest(r) for r in np.asarray(b[key]).reshape(len(b["index"]), -1)]
  return out


def _source_images(data, source):
  return {_digest(data.processors.image_inputs(source[i]["image"])[0]) for i in range(len(source))}


def test_fresh_cpo_pairs_share_no_scene_with_sft(tmp_path):
  same = streams.RunData(_config("sft"), str(tmp_path))
  sft_images = _source_images(same, same.sources["train"])  # every image SFT trains on
  assert len(sft_images) == 16 and set(_images(same.sft_batches(), "pixel_values")) <= sft_images
  # Default: the pairs are made on the SFT records (the check below can fail).
  assert set(_images(same.cpo_batches(), "chosen_pixel_values")) <= sft_images

  data = streams.RunData(_config("fresh", early_stop="val_loss"), str(tmp_path))
  assert _images(data.sft_batches(), "pixel_values") == _images(same.sft_batches(), "pixel_values")
  # Scenes 16-23 validate SFT, 24-47 are the CPO++ stage's (3 steps x 8 pairs, one each).
  assert [data.sft_val_source[i]["index"] for i in range(8)] == list(range(16, 24))
  assert len(data.cpo_source) == 24 and data.cpo_source[0]["index"] == 24
  cpo_images = set(_images(data.cpo_batches(), "chosen_pixel_values", 3))
  more_images = set(_images(data.sft_more_batches(), "pixel_values", 3))
  val_images = _images(data.sft_val_batches(), "pixel_values", 1)
  assert val_images == _images(data.sft_val_batches(), "pixel_values", 1)  # the same every time
  assert len(cpo_images) > 8 and len(more_images) > 8
  assert not cpo_images & sft_images and not more_images & sft_images
  assert not set(val_images) & (sft_images | cpo_images | more_images)
  # Rejected images of perception pairs come from the fresh scenes too.
  rejected = set(_images(data.cpo_batches(), "rejected_pixel_values", 3))
  assert not rejected & sft_images

  cfg = _config("fresh")
  cfg.data.cpo_examples = 5
  assert len(streams.RunData(cfg, str(tmp_path)).cpo_source) == 5


def test_bad_scene_settings_are_clear_errors(tmp_path):
  cfg = _config("fresh")
  cfg.data.cpo_scenes = "new"
  with pytest.raises(ValueError, match="data.cpo_scenes='new'"):
    streams.RunData(cfg, str(tmp_path))
  cfg = _config("sft", early_stop="val_loss")
  cfg.sft.val_examples = 4
  with pytest.raises(ValueError, match="sft.val_examples=4 holds no whole validation batch"):
    streams.RunData(cfg, str(tmp_path))


def test_the_chosen_side_control_trains_on_exactly_the_preferred_rows(tmp_path):
  """data.sft_more_rows='chosen': the control's rows are the CPO++ stream's chosen sides, row
  for row, re-rendered scenes included (their images are in no record of the split)."""
  cfg = _config("fresh")
  cfg.data.thinking_target = "shortcut_rerender"
  cfg.data.sft_more_rows = "chosen"
  data = streams.RunData(cfg, str(tmp_path))
  pairs, control = data.cpo_batches(), data.sft_more_batches()
  for _ in range(2):
    p, c = next(pairs), next(control)
    for k in ("input_ids", "attention_mask", "loss_mask", "pixel_values"):
      np.testing.assert_array_equal(c[k], p[f"chosen_{k}"])
    np.testing.assert_array_equal(c["decision"], p["chosen_decision"])
  records = _source_images(data, data.cpo_source)
  chosen = set(_images(data.sft_more_batches(), "pixel_values", 3))
  assert chosen - records  # re-rendered scenes: the default 'records' control never sees them
  cfg.data.sft_more_rows = "records"
  assert (
    set(_images(streams.RunData(cfg, str(tmp_path)).sft_more_batches(), "pixel_values", 3))
    <= records
  )
  cfg.data.sft_more_rows = "pairs"
  with pytest.raises(ValueError, match="data.sft_more_rows='pairs'"):
    streams.RunData(cfg, str(tmp_path)).sft_more_batches()
