"""Given pairs (swift_jsonl here) in the grouped layout: split by cpo_source, shared prefix."""

import json

import numpy as np
import pytest
import test_data_codalm
import test_data_mimic
from test_train_step import _assert_same
from test_train_step import _decoder_tokens
from test_train_step import _loss_and_grads
from test_train_step import _policy

from cpo_jax import config_defaults
from cpo_jax import models
from cpo_jax.data import bad_records
from cpo_jax.data import datasets
from cpo_jax.data import given_pairs
from cpo_jax.data import processors
from cpo_jax.data import sources
from cpo_jax.data import swift_jsonl
from cpo_jax.data import synth_cxr
from cpo_jax.knowledge import load_graph
from cpo_jax.train import pair_images
from cpo_jax.train import stages

Q = "<image>What is the disease of this patient?"
LONG_Q = Q + " The disease of this patient is"  # words the test tokenizer knows
MAX_LEN = 112


@pytest.fixture(scope="module")
def proc():
  return processors.make_processors(None)


def _pair(chosen, rejected, image, *, rejected_image=None, source=None, long=False, **extra):
  prompt = [{"role": "user", "content": LONG_Q if long else Q}]
  rec = {
    "messages": prompt + [{"role": "assistant", "content": chosen}],
    "images": [f"imgs/{image}.png"],
    "rejected_messages": [dict(m) for m in prompt] + [{"role": "assistant", "content": rejected}],
    **extra,
  }
  if rejected_image is not None:
    rec["rejected_images"] = [f"imgs/{rejected_image}.png"]
  if source is not None:
    rec["cpo_source"] = source
  return rec


def _write(root, records):
  (root / "imgs").mkdir(exist_ok=True)
  for i in range(4):
    (root / "imgs" / f"{i}.png").write_bytes(synth_cxr.make_example(0, "train", i)["image"])
  (root / "train.jsonl").write_text("\n".join(map(json.dumps, records)) + "\n")
  return sources.make_source("swift_jsonl", "train", data_dir=str(root))


def _mixed_records():
  """Thinking pairs (tagged, by alias, inferred; two with a longer prompt),
  perception pairs (tagged, inferred), one 'other' pair, one of weight 0, one broken line."""
  texts = [
    load_graph("medical").completion_text(a) for a in load_graph("medical").all_assignments()
  ]
  a, b, c = texts[0], texts[-1], texts[len(texts) // 2]
  return [
    _pair(a, b, 0, source="thinking"),
    _pair(b, c, 1, source="reasoning", long=True),
    _pair(c, a, 2),  # inferred: thinking
    _pair(a, c, 3, source="text", long=True),
    _pair(a, a, 0, rejected_image=1, source="vision", long=True),
    _pair(b, b, 2, rejected_image=3),  # inferred: perception
    _pair(c, c, 1, rejected_image=0, source="perception", cpo_sample_weight=0.5),
    _pair(a, b, 3, source="other"),
    _pair(b, a, 0, source="thinking", cpo_sample_weight=0),  # no preference: in no stream
    {"messages": "not a list"},  # unreadable: read (and skipped or raised) in a stream
  ]


def test_sources_listed_and_batches_in_the_grouped_layout(proc, tmp_path):
  src = _write(tmp_path, _mixed_records())
  kinds = src.pair_sources()
  assert kinds.tolist() == [
    0,
    0,
    0,
    0,
    1,
    1,
    1,
    2,
    swift_jsonl.NO_PREFERENCE,
    swift_jsonl.UNREADABLE,
  ]
  assert [src[i]["source"] for i in range(8)] == kinds[:8].tolist()  # what reading says
  assert given_pairs.layout_for(src, (1, 2)) == (1, 2)
  thinking, rest = given_pairs.stream_positions(src, (1, 2))
  assert thinking.tolist() == [0, 1, 2, 3, 9] and rest.tolist() == [4, 5, 6, 7]  # 9: larger one
  skips = bad_records.SkipCounter()
  kw = dict(
    batch_size=4, max_len=MAX_LEN, seed=3, pair_layout=(1, 2), on_bad_record="skip", skips=skips
  )
  # One pass: each stream goes over the records of its kind.
  batches = list(datasets.make_cpo_iterator(src, proc, num_epochs=1, **kw))
  assert len(batches) == 2
  for b in batches:
    pair_images.check_pair_layout(b, (1, 2))  # the stage's host check: rows 0, 2 thinking
  index = np.concatenate([b["index"] for b in batches]).reshape(-1, 2)
  assert sorted(index[:, 0]) == [0, 1, 2, 3] and sorted(index[:, 1]) == [4, 5, 6, 7]
  assert skips.counts == {"bad_type": 1}  # the broken line, met in the thinking stream
  # Endless, deterministic and resumable: at a saved state a fresh iterator goes on the same.
  it = datasets.make_cpo_iterator(src, proc, **kw)
  first = [next(it) for _ in range(3)]
  state = it.get_state()
  after = [next(it) for _ in range(2)]
  again = datasets.make_cpo_iterator(src, proc, **dict(kw, skips=bad_records.SkipCounter()))
  assert all(np.array_equal(b["index"], next(again)["index"]) for b in first)
  again = datasets.make_cpo_iterator(src, proc, **dict(kw, skips=bad_records.SkipCounter()))
  again.set_state(state)
  for want, got in zip(after, [next(again) for _ in range(2)]):
    pair_images.check_pair_layout(got, (1, 2))
    for key in want:
      np.testing.assert_array_equal(want[key], got[key], err_msg=key)


def test_a_source_with_one_kind_works_and_a_layout_asking_for_a_missing_kind_says_so(
  proc, tmp_path
):
  records = _mixed_records()[:4]  # thinking pairs only
  src = _write(tmp_path, records)
  assert given_pairs.layout_for(src, (1, 2)) == (1, 1)  # every batch thinking (warned)
  b = next(datasets.make_cpo_iterator(src, proc, batch_size=2, max_len=MAX_LEN, pair_layout=(1, 1)))
  pair_images.check_pair_layout(b, (1, 1))
  with pytest.raises(ValueError, match=r"thinking_fraction=0.0 asks for perception or other"):
    given_pairs.layout_for(src, (0, 1))
  with pytest.raises(ValueError, match=r"pair layout \(1, 2\) asks for perception or other"):
    datasets.make_cpo_iterator(src, proc, batch_size=2, max_len=MAX_LEN, pair_layout=(1, 2))
  perception = _write(tmp_path, _mixed_records()[4:7])
  assert given_pairs.layout_for(perception, (1, 2)) == (0, 1)
  with pytest.raises(ValueError, match=r"thinking_fraction=1.0 asks for thinking pairs only"):
    given_pairs.layout_for(perception, (1, 1))
  # A host whose shard of a kind is empty is told so (3 perception pairs over 4 hosts).
  with pytest.raises(ValueError, match=r"shard 3 of 4\) holds none of its 3"):
    datasets.make_cpo_iterator(
      perception,
      proc,
      batch_size=2,
      max_len=MAX_LEN,
      pair_layout=(0, 1),
      shard_index=3,
      shard_count=4,
    )


def test_thinking_pairs_that_cannot_share_a_prefix_are_bad_records_named(proc, tmp_path):
  records = _mixed_records()[:8]
  records[0]["rejected_images"] = ["imgs/3.png"]  # tagged thinking, another image
  records[2]["rejected_messages"][0]["content"] = LONG_Q  # another prompt
  src = _write(tmp_path, records)
  skips = bad_records.SkipCounter()
  kw = dict(batch_size=2, max_len=MAX_LEN, seed=0, pair_layout=(1, 2), num_epochs=1)
  rows = list(datasets.make_cpo_iterator(src, proc, on_bad_record="skip", skips=skips, **kw))
  assert sorted(i for b in rows for i in b["index"][::2].tolist()) == [1, 3]
  assert skips.counts == {"unshared_thinking": 2}
  with pytest.raises(bad_records.BadRecordError, match=r"train.jsonl:[13]: cpo_source 'thinking'"):
    list(datasets.make_cpo_iterator(src, proc, **kw))


def test_max_prompt_len_bounds_a_thinking_pairs_prompt_naming_the_record(proc, tmp_path):
  src = _write(tmp_path, _mixed_records()[:8])
  kw = dict(batch_size=2, max_len=MAX_LEN, seed=0, pair_layout=(1, 2), num_epochs=1)
  rows = list(datasets.make_cpo_iterator(src, proc, **kw))
  prompt = {int(i): int(n) for b in rows for i, n in zip(b["index"], b["prompt_length"])}
  short, long = prompt[0], prompt[1]  # records 1, 3 (and perception pair 4): longer
  assert short == prompt[2] < long == prompt[3] == prompt[4]
  with pytest.raises(
    bad_records.OverlongError,
    match=rf"train.jsonl:[24]: prompt of {long} tokens .*> data.max_prompt_len {long - 1}",
  ):
    list(datasets.make_cpo_iterator(src, proc, max_prompt_len=long - 1, **kw))
  skips = bad_records.SkipCounter()
  rows = datasets.make_cpo_iterator(
    src, proc, max_prompt_len=long - 1, on_bad_record="skip", skips=skips, **kw
  )
  assert sorted(int(i) for b in rows for i in b["index"][::2]) == [0, 2]  # never cut
  assert skips.counts == {"overlong": 2}
  # Perception pairs run as full rows: the bound is not theirs.
  kw.update(pair_layout=(0, 1), batch_size=4)
  rows = list(datasets.make_cpo_iterator(src, proc, max_prompt_len=long - 1, **kw))
  assert sorted(rows[0]["index"].tolist()) == [4, 5, 6, 7]


def test_shared_prefix_step_equals_the_full_row_step_on_given_pairs(proc, tmp_path, monkeypatch):
  src = _write(tmp_path, _mixed_records()[:8])
  raw = next(
    datasets.make_cpo_iterator(src, proc, batch_size=2, max_len=MAX_LEN, seed=1, pair_layout=(1, 2))
  )
  grid = np.asarray(raw["image_grid_thw"][0])
  make_config = lambda **kw: models.get_config_for_tokens("tiny", proc.ids, **kw)
  model, _ = _policy(make_config)
  cfg = config_defaults.base_config("", domain="medical", data="swift_jsonl")
  prompt = int(np.asarray(raw["chosen_loss_mask"]).argmax(1).max())
  cfg.data.max_prompt_len, cfg.data.max_completion_len = prompt, MAX_LEN - prompt
  # The stage's own host checks (layout, prompts fit and match) and its position ids.
  _, prepare = stages.cpo_stage(model, cfg, grid, pair_layout=(1, 2))
  batch = prepare(raw)
  tokens = _decoder_tokens(monkeypatch)
  slab = MAX_LEN - prompt
  kw = dict(pair_layout=(1, 2), max_completion_len=slab)
  shared = _loss_and_grads(model, batch, grid, cfg.cpo, grads=False, max_prompt_len=prompt, **kw)
  shared_tokens, tokens[:] = sum(tokens), []
  full = _loss_and_grads(model, batch, grid, cfg.cpo, grads=False, shared_prefix_step=False, **kw)
  _assert_same(shared, full)
  assert abs(float(shared[0]["rewards/margins"])) > 1e-4
  # Per model (policy and reference): the thinking pair's prompt once, then both completions;
  # the perception pair as two full rows.
  assert shared_tokens == 2 * ((prompt + 2 * slab) + 2 * MAX_LEN)
  assert sum(tokens) == 2 * 2 * 2 * MAX_LEN


@pytest.mark.parametrize("name", ["mimic_ccf", "codalm"])
def test_prepared_sources_list_the_kind_reading_gives(name, tmp_path):
  # Their fixtures as their own tests write them: thinking, weight-0 and perception rows.
  {"mimic_ccf": test_data_mimic, "codalm": test_data_codalm}[name]._write(tmp_path)
  src = sources.make_source(name, "train", data_dir=str(tmp_path), prepare_workers=0)
  rows = [src[i] for i in range(len(src))]
  want = [r["source"] if r["sample_weight"] > 0 else swift_jsonl.NO_PREFERENCE for r in rows]
  assert src.pair_sources().tolist() == want
  assert {0, 1, swift_jsonl.NO_PREFERENCE} <= set(want)
  assert given_pairs.layout_for(src, (1, 2)) == (1, 2)
