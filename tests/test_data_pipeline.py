"""Tokenizer, pair making and the Grain batches: formats, validity, determinism, resume."""

import numpy as np
from PIL import Image
import pytest

from cpo_jax.data import bad_records
from cpo_jax.data import datasets
from cpo_jax.data import eval_batches
from cpo_jax.data import packing
from cpo_jax.data import pairs as pairs_lib
from cpo_jax.data import processors
from cpo_jax.data import sources
from cpo_jax.data import synth_drive
from cpo_jax.data import tokenizer as tok_lib
from cpo_jax.knowledge import load_graph
from cpo_jax.knowledge import validate_counterfactual

L = 96


@pytest.fixture(scope="module")
def proc(tmp_path_factory):
  return processors.make_processors(str(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def train():
  return sources.make_source("synth_drive", "train", num_examples=512, seed=0)


def test_tokenizer_round_trip_and_save_load(proc, tmp_path):
  tok = proc.tokenizer
  texts = [
    load_graph(d).completion_text(a)
    for d in ("driving", "medical")
    for a in load_graph(d).all_assignments()[:10]
  ]
  texts += load_graph("driving").all_sentences() + load_graph("medical").all_sentences()
  for t in texts:
    ids = tok(t, add_special_tokens=False)["input_ids"]
    assert tok.unk_token_id not in ids, t
    assert tok.decode(ids) == t
  for s in tok_lib.SPECIAL_TOKENS:
    assert len(tok(s, add_special_tokens=False)["input_ids"]) == 1
  tok_lib.save_tokenizer(tok, str(tmp_path))
  tok2 = tok_lib.load_tokenizer(str(tmp_path))
  assert tok2(texts[0])["input_ids"] == tok(texts[0])["input_ids"]
  assert tok_lib.special_ids(tok2) == tok_lib.special_ids(tok)
  msgs = [
    {
      "role": "user",
      "content": [{"type": "image"}, {"type": "text", "text": "What should the car do?"}],
    }
  ]
  assert tok2.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    "<|vision_start|><|image_pad|><|vision_end|>What should the car do?<|im_end|>\n<|im_start|>assistant\n"
  )


def test_sft_batch_format(proc, train):
  b = next(datasets.make_sft_iterator(train, proc, batch_size=4, max_len=L, seed=0))
  assert b["input_ids"].shape == b["attention_mask"].shape == b["loss_mask"].shape == (4, L)
  assert b["input_ids"].dtype == np.int32 and b["loss_mask"].dtype == np.int32
  assert b["pixel_values"].shape == (4 * 64, 1176) and b["pixel_values"].dtype == np.float32
  np.testing.assert_array_equal(b["image_grid_thw"], np.tile([1, 8, 8], (4, 1)))
  ids = proc.ids
  for r in range(4):
    row, lm, am = b["input_ids"][r], b["loss_mask"][r], b["attention_mask"][r]
    assert (row == ids["image_token_id"]).sum() == 16
    n = am.sum()
    assert (
      am[:n].all() and not am[n:].any() and (row[n:] == ids["pad_token_id"]).all()
    )  # right padded
    assert lm[b["prompt_length"][r] : n].all() and lm.sum() == n - b["prompt_length"][r]
    assert row[n - 1] == ids["eos_token_id"] and lm[n - 1] == 1
    rec = train[int(b["index"][r])]
    assert proc.tokenizer.decode(row[lm == 1]) == pairs_lib.completion_of(rec) + "<|im_end|>"
    assert proc.tokenizer.decode(row[: b["prompt_length"][r]]).endswith("<|im_start|>assistant\n")


def _cpo(proc, src, **kw):
  kw = dict(dict(batch_size=8, max_len=L, seed=0), **kw)
  return datasets.make_cpo_iterator(src, proc, **kw)


def test_cpo_pairs_are_valid_counterfactuals(proc, train):
  g = load_graph("driving")
  it = _cpo(proc, train, thinking_fraction=0.5)
  tok = proc.tokenizer
  n_src = np.zeros(2, int)
  for _ in range(4):
    b = next(it)
    assert b["chosen_pixel_values"].shape == b["rejected_pixel_values"].shape == (8 * 64, 1176)
    for k in (
      "chosen_input_ids",
      "rejected_input_ids",
      "chosen_loss_mask",
      "rejected_attention_mask",
    ):
      assert b[k].shape == (8, L) and b[k].dtype == np.int32
    assert b["source"].dtype == np.int32 and b["sample_weight"].dtype == np.float32
    assert b["boxes"].shape == (8, 4, 4)
    for r in range(8):
      P_ = slice(r * 64, (r + 1) * 64)
      ch = tok.decode(b["chosen_input_ids"][r][b["chosen_loss_mask"][r] == 1]).removesuffix(
        "<|im_end|>"
      )
      rj = tok.decode(b["rejected_input_ids"][r][b["rejected_loss_mask"][r] == 1]).removesuffix(
        "<|im_end|>"
      )
      pl = b["prompt_length"][r]
      np.testing.assert_array_equal(b["chosen_input_ids"][r][:pl], b["rejected_input_ids"][r][:pl])
      for side, text in (("chosen_", ch), ("rejected_", rj)):  # where each side's answer starts
        start, end = b[side + "answer_start"][r], b[side + "attention_mask"][r].sum()
        answer = tok.decode(b[side + "input_ids"][r][start:end]).removesuffix("<|im_end|>")
        assert text.endswith("</think>" + answer) and answer.startswith(" The decision is")
      assert b["chosen_decision"][r] != b["rejected_decision"][r]
      assert g.decision_id(g.parse_decision(ch)) == b["chosen_decision"][r]
      if b["source"][r] == 0:  # thinking: same image, counterfactual text
        np.testing.assert_array_equal(b["chosen_pixel_values"][P_], b["rejected_pixel_values"][P_])
        target = g.parse_decision(rj)
        assert validate_counterfactual(
          g, rj, original_decision=g.parse_decision(ch), target=target
        )[0]
        assert g.decision_id(target) == b["rejected_decision"][r]
      else:  # perception: same text, an image with another decision
        assert b["source"][r] == 1 and ch == rj
        assert not np.array_equal(b["chosen_pixel_values"][P_], b["rejected_pixel_values"][P_])
        assert train[int(b["index"][r])]["decision"] == b["chosen_decision"][r]
      n_src[b["source"][r]] += 1
  assert n_src.min() >= 6  # both sources present at 50% mixing


def test_chain_length_reads_token_offsets_with_a_byte_level_bpe(proc):
  """The chain/answer split holds for a byte-level BPE (Qwen's kind), whose merges differ
  from the word-level test tokenizer's; no '</think>': the whole completion is chain."""
  import dataclasses

  import tokenizers
  from transformers import PreTrainedTokenizerFast

  bpe = tokenizers.ByteLevelBPETokenizer()
  bpe.train_from_iterator(tok_lib.domain_corpus(), vocab_size=400, min_frequency=1)
  fast = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer)
  bpe_proc = dataclasses.replace(proc, tokenizer=fast)
  text = load_graph("driving").completion_text(load_graph("driving").all_assignments()[3])
  ids = bpe_proc.completion_ids(text)
  n = bpe_proc.chain_length(text)
  assert fast.decode(ids[:n]).endswith("</think>")
  assert text.endswith("</think>" + fast.decode(ids[n:-1]))
  assert bpe_proc.chain_length("no chain here") == len(bpe_proc.completion_ids("no chain here"))


@pytest.mark.parametrize("frac,src", [(1.0, 0), (0.0, 1)])
def test_mixing_ratio_extremes(proc, train, frac, src):
  b = next(_cpo(proc, train, thinking_fraction=frac))
  assert (b["source"] == src).all()


def test_hard_negatives_share_nuisance_far_more_than_random(train):
  idx = pairs_lib.PairIndex.from_source(train)
  rng = np.random.default_rng(0)
  share = {}
  for mode in pairs_lib.INDEX_MODES:
    hits = []
    for i in range(300):
      j = idx.pick(i, mode, rng)
      assert j != i and idx.decision[j] != idx.decision[i]
      hits.append(idx.nuisance[j] == idx.nuisance[i])
    share[mode] = float(np.mean(hits))
  assert share["hard"] > 0.95, share
  assert share["random"] < 0.3 and share["hard"] > share["random"] + 0.6, share


def test_same_seed_same_batches_other_seed_differs(proc, train):
  a, b, c = (_cpo(proc, train, seed=s) for s in (3, 3, 4))
  for _ in range(2):
    x, y, z = next(a), next(b), next(c)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  assert not np.array_equal(x["index"], z["index"])


@pytest.mark.parametrize(
  "host,buckets,layout", [(None, (), None), (1, (), None), (None, (75, 76), None), (1, (), (1, 2))]
)  # host 1 of 2 simulated
def test_iterator_state_resume(proc, train, host, buckets, layout):
  shard = {} if host is None else dict(shard_index=host, shard_count=2)
  kw = dict(batch_size=4, length_buckets=buckets, pair_layout=layout, **shard)
  it = _cpo(proc, train, **kw)
  for _ in range(3):
    next(it)
  state = it.get_state()
  expect = [next(it) for _ in range(2)]
  it2 = _cpo(proc, train, **kw)
  assert not np.array_equal(next(it2)["index"], expect[0]["index"])  # the state is what matters
  it2.set_state(state)
  for e in expect:
    got = next(it2)
    for k in e:
      np.testing.assert_array_equal(e[k], got[k])


def test_parse_length_buckets():
  assert packing.parse_length_buckets("", 96) == packing.parse_length_buckets((), 96) == (96,)
  assert (
    packing.parse_length_buckets("64, 80", 96)
    == packing.parse_length_buckets((64, 80), 96)
    == (64, 80, 96)
  )
  assert packing.parse_length_buckets("64,96", 96) == (64, 96)
  for bad in ("80,64", "64,64", "0,64", "64,x", "2.5", "128"):
    with pytest.raises(ValueError, match=r"data.length_buckets="):
      packing.parse_length_buckets(bad, 96)


@pytest.mark.parametrize("kind", ["sft", "cpo"])
def test_length_buckets_cut_only_trailing_padding(proc, kind):
  """Same rows in the same order as without buckets; each batch is cut to the smallest bucket
  that holds its longest row (both sides of a pair alike), and only pad columns are cut."""
  train = sources.make_source(
    "synth_cxr", "train", num_examples=128, seed=0
  )  # rows of 89-95 tokens
  make = datasets.make_sft_iterator if kind == "sft" else datasets.make_cpo_iterator
  sides = ("",) if kind == "sft" else ("chosen_", "rejected_")
  seq_keys = {p + k for p in sides for k in ("input_ids", "attention_mask", "loss_mask")}
  full, cut = (
    make(train, proc, batch_size=4, max_len=L, seed=0, length_buckets=b) for b in ("", "91,93")
  )
  widths = set()
  for _ in range(6):
    a, b = next(full), next(cut)
    assert a.keys() == b.keys()
    width = b[sides[0] + "input_ids"].shape[1]
    longest = max(a[p + "attention_mask"].sum(1).max() for p in sides)
    assert width == min(w for w in (91, 93, L) if w >= longest)
    for k in a:
      if k in seq_keys:
        assert b[k].shape == (4, width) and b[k].flags.c_contiguous
        np.testing.assert_array_equal(a[k][:, :width], b[k])
        pad = proc.ids["pad_token_id"] if k.endswith("input_ids") else 0
        assert (a[k][:, width:] == pad).all()
      else:
        np.testing.assert_array_equal(a[k], b[k])
    widths.add(width)
  assert len(widths) >= 2, widths  # the test exercises the choice
  assert full.get_state() == cut.get_state()  # trimming keeps the iterator state as it was


def test_host_shards_are_disjoint(proc, train):
  seen = []
  for h in range(2):
    it = datasets.make_sft_iterator(
      train, proc, batch_size=8, max_len=L, seed=0, shard_index=h, shard_count=2, num_epochs=1
    )
    seen.append({int(i) for _ in range(4) for i in next(it)["index"]})
  assert len(seen[0]) == len(seen[1]) == 32 and not seen[0] & seen[1]


def test_overlong_raise_names_record_or_skip_counts(proc, train):
  with pytest.raises(bad_records.OverlongError, match=r"record .*\[\d+\].*max_len 60"):
    next(datasets.make_sft_iterator(train, proc, batch_size=4, max_len=60, seed=0))
  # 75 tokens fit the short chains (74-75) but not the longest (76): some skipped, none cut.
  skips = bad_records.SkipCounter()
  small = sources.make_source("synth_drive", "train", num_examples=128, seed=0)
  it = datasets.make_sft_iterator(
    small, proc, batch_size=8, max_len=75, seed=0, on_bad_record="skip", skips=skips, num_epochs=1
  )
  n_rows = sum(b["input_ids"].shape[0] for b in it)
  assert skips.counts["overlong"] > 0
  assert n_rows + skips.total() >= len(small) - 7  # every record either batched or counted
  with pytest.raises(bad_records.OverlongError):
    next(_cpo(proc, train, max_len=60))


@pytest.mark.parametrize("maker", ["sft", "cpo"])
def test_a_stream_that_skips_every_record_stops_with_the_counts(proc, maker):
  small = sources.make_source("synth_drive", "train", num_examples=16, seed=0)
  make = datasets.make_sft_iterator if maker == "sft" else datasets.make_cpo_iterator
  # Every record is longer than 40 tokens; the stream repeats forever, so without the guard
  # it would look for a first batch forever.
  it = make(small, proc, batch_size=4, max_len=40, seed=0, on_bad_record="skip")
  with pytest.raises(
    bad_records.TooManySkipsError, match=r"16 of the first 16 records .*'overlong': 16"
  ):
    next(it)


def test_a_stream_over_its_skip_share_stops(proc):
  small = sources.make_source("synth_drive", "train", num_examples=128, seed=0)
  # 75 tokens: some records (76 tokens) are skipped, far fewer than all of them.
  kw = dict(batch_size=8, max_len=75, seed=0, on_bad_record="skip")
  assert next(datasets.make_sft_iterator(small, proc, **kw))["input_ids"].shape[0] == 8
  it = datasets.make_sft_iterator(small, proc, max_skipped_share=0.01, **kw)
  with pytest.raises(bad_records.TooManySkipsError, match=r"of the first \d+ records.*=0.01"):
    for _ in range(32):  # the share is judged after a pass over the 128 records
      next(it)


def test_eval_batches_left_padded_with_labels(proc):
  src = sources.make_source("synth_drive", "ood", num_examples=10, seed=0)
  batches = list(eval_batches.make_eval_batches(src, proc, batch_size=4, max_prompt_len=48))
  assert len(batches) == 3
  assert batches[-1]["valid"].tolist() == [True, True, False, False]
  b = batches[0]
  assert b["input_ids"].shape == (4, 48) and b["pixel_values"].shape == (4 * 64, 1176)
  nl = proc.tokenizer.convert_tokens_to_ids("\n")
  assert (b["input_ids"][:, -1] == nl).all() and b["attention_mask"][:, -1].all()
  n = b["attention_mask"].sum(1)
  for r in range(4):
    assert not b["attention_mask"][r, : 48 - n[r]].any()
    rec = src[int(b["index"][r])]
    assert b["decision"][r] == rec["decision"] and b["nuisance"][r] == rec["nuisance"]
    np.testing.assert_array_equal(b["concepts"][r], rec["concepts"])


def test_medical_pairs_use_the_medical_graph(proc):
  g = load_graph("medical")
  src = sources.make_source("synth_cxr", "train", num_examples=128, seed=0)
  b = next(
    datasets.make_cpo_iterator(src, proc, batch_size=8, max_len=112, seed=0, thinking_fraction=1.0)
  )
  tok = proc.tokenizer
  for r in range(8):
    ch = tok.decode(b["chosen_input_ids"][r][b["chosen_loss_mask"][r] == 1]).removesuffix(
      "<|im_end|>"
    )
    rj = tok.decode(b["rejected_input_ids"][r][b["rejected_loss_mask"][r] == 1]).removesuffix(
      "<|im_end|>"
    )
    assert validate_counterfactual(
      g, rj, original_decision=g.parse_decision(ch), target=g.parse_decision(rj)
    )[0]


def test_fast_image_path_equals_transformers_processor(proc, train):
  for i in range(3):
    img = train[i]["image"]
    pv, grid = proc.image_inputs(img)
    ref_pv, ref_grid = proc.image_inputs_reference(img)
    np.testing.assert_array_equal(pv, ref_pv)
    np.testing.assert_array_equal(grid, ref_grid)
  assert pv.shape == (64, 1176) and grid.tolist() == [1, 8, 8]


def test_images_of_any_size_and_aspect_reach_the_static_grid_at_512(tmp_path, caplog):
  # The paper's 512 px is not a multiple of 28: it becomes 504 (Qwen's smart_resize rounding),
  # with a note, and every image, whatever its size, aspect or mode, gets the same grid.
  with caplog.at_level("WARNING"):
    proc512 = processors.make_processors(str(tmp_path / "tok"), image_size=512)
  assert proc512.image_size == 504 and "resized to 504 x 504" in caplog.text
  rng = np.random.default_rng(0)
  shapes = [(600, 480, 3), (300, 900, 3), (504, 504, 3), (1024, 1024), (64, 96, 4)]
  for shape in shapes:
    arr = rng.integers(0, 256, shape, dtype=np.uint8)
    img = Image.fromarray(arr)
    pv, grid = proc512.image_inputs(img)
    assert grid.tolist() == [1, 36, 36] and pv.shape == (36 * 36, 1176), shape
    square = img.convert("RGB").resize((504, 504), Image.BICUBIC)
    ref_pv, ref_grid = proc512.image_inputs_reference(square)
    np.testing.assert_allclose(pv, ref_pv, atol=1e-5)
    np.testing.assert_array_equal(grid, ref_grid)
  # Evidence boxes follow the resize; a whole-image box stays the whole square.
  wide = Image.fromarray(rng.integers(0, 256, (300, 900, 3), dtype=np.uint8))
  boxes = proc512.boxes_for([[0, 0, 900, 300], [450, 150, 900, 300]], wide)
  assert boxes.tolist() == [[0, 0, 504, 504], [252, 252, 504, 504]]


@pytest.mark.parametrize("kind", ["none", "synonym", "contradict"])
def test_probe_batches(proc, kind):
  g = load_graph("driving")
  src = sources.make_source("synth_drive", "test", num_examples=6, seed=0)
  dec_ids = eval_batches.decision_token_ids(proc, g)
  assert len(set(dec_ids.tolist())) == 4
  (b,) = list(eval_batches.make_probe_batches(src, proc, kind=kind, batch_size=6, max_len=80))
  tok = proc.tokenizer
  n_changed = 0
  for r in range(6):
    text = tok.decode(b["input_ids"][r][b["attention_mask"][r] == 1])
    assert text.endswith("</think> The decision is") and b["attention_mask"][r, -1]
    chain = text.split("<|im_start|>assistant\n")[1]
    gold = src[r]["chain"]
    assert (chain.split(" The decision is")[0] == gold) == (kind == "none")
    parsed, _ = g.parse_chain(chain)
    assert g.decision_id(g.decide(parsed)) == b["expected_decision"][r]
    if kind == "synonym":
      assert b["expected_decision"][r] == b["decision"][r]
    n_changed += int(b["expected_decision"][r] != b["decision"][r])
  if kind != "contradict":
    assert n_changed == 0


class _Corrupted:
  """Wraps a source; every 4th record is broken in one of four ways."""

  kinds = ("bad_image", "missing_field", "empty_chain", "overlong")

  def __init__(self, src):
    self.src, self.domain = src, "driving"

  def __len__(self):
    return len(self.src)

  def __getitem__(self, i):
    r = dict(self.src[i])
    if i % 4 == 0:
      kind = self.kinds[(i // 4) % 4]
      if kind == "bad_image":
        r["image"] = r["image"][:40]  # truncated PNG
      elif kind == "missing_field":
        del r["answer"]
      elif kind == "empty_chain":
        r["chain"] = " "
      else:
        r["chain"] = r["chain"].replace(
          "</think>", "The lane is clear of cones. " * 20 + "</think>"
        )
    return r

  def labels(self):
    return self.src.labels()

  def __repr__(self):
    return "Corrupted"


def test_bad_records_skip_counts_by_reason_or_raise_names_record(proc):
  src = _Corrupted(sources.make_source("synth_drive", "train", num_examples=64, seed=0))
  skips = bad_records.SkipCounter()
  it = datasets.make_sft_iterator(
    src, proc, batch_size=8, max_len=L, seed=0, num_epochs=1, on_bad_record="skip", skips=skips
  )
  rows = sum(len(b["index"]) for b in it)
  assert dict(skips.counts) == {k: 4 for k in _Corrupted.kinds}
  assert rows == 48
  with pytest.raises(bad_records.BadRecordError, match=r"record Corrupted\[\d+\]: .*reason="):
    for _ in datasets.make_sft_iterator(src, proc, batch_size=8, max_len=L, seed=0, num_epochs=1):
      pass
  skips = bad_records.SkipCounter()
  it = datasets.make_cpo_iterator(
    src,
    proc,
    batch_size=8,
    max_len=L,
    seed=0,
    num_epochs=1,
    on_bad_record="skip",
    skips=skips,
    thinking_fraction=1.0,
  )
  assert sum(len(b["index"]) for b in it) == 48 and skips.total() == 16


def test_tfds_files_give_the_same_batches_as_rendering(proc, tmp_path):
  files = sources.make_source(
    "synth_drive", "train", num_examples=64, seed=0, data_dir=str(tmp_path)
  )
  mem = sources.make_source("synth_drive", "train", num_examples=64, seed=0)
  for mode in (
    "hard",
    "counterfactual",
  ):  # counterfactual: the files' source re-renders the same scenes
    a = next(
      datasets.make_cpo_iterator(files, proc, batch_size=8, max_len=L, seed=0, perception_mode=mode)
    )
    b = next(
      datasets.make_cpo_iterator(mem, proc, batch_size=8, max_len=L, seed=0, perception_mode=mode)
    )
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


def test_counterfactual_image_is_the_same_scene_with_one_concept_changed():
  """Minimal pairs: pixels differ only where the flipped concept is painted (in either render),
  one concept differs, and the decision changes whenever a single change can change it."""
  g = load_graph("driving")
  src = synth_drive.SynthDriveSource("ood", 400, seed=5, encode_png=False)
  flipped, n_diff = np.zeros(len(g.concepts), int), []
  for i in range(len(src)):
    rec = src[i]
    a = g.assignment_from_ids(rec["concepts"])
    np.testing.assert_array_equal(
      src.counterfactual(i, a)["image"], rec["image"]
    )  # same scene re-rendered
    ci, v = pairs_lib.counterfactual_flip(g, a, np.random.default_rng([1, i]))
    assert (ci, v) == pairs_lib.counterfactual_flip(g, a, np.random.default_rng([1, i]))  # seeded
    b = {**a, g.concepts[ci].name: v}
    assert sum(a[k] != b[k] for k in a) == 1 and g.is_valid(b)
    cf = src.counterfactual(i, b)
    assert (cf["concepts"] != rec["concepts"]).sum() == 1 and cf["concepts"][ci] != rec["concepts"][
      ci
    ]
    single_flips = [{**a, c.name: w} for c in g.concepts for w in c.values if w != a[c.name]]
    if any(g.decide(x) != g.decide(a) for x in single_flips):
      assert cf["decision"] != rec["decision"]
    else:  # red light + pedestrian: stop whatever one concept says
      assert cf["decision"] == rec["decision"] == g.decision_id("stop")
    diff = (cf["image"] != rec["image"]).any(-1)
    allowed = np.zeros_like(diff)
    for box in (rec["boxes"][ci], cf["boxes"][ci]):
      x0, y0, x1, y1 = synth_drive.painted_region(g.concepts[ci].name, box)
      allowed[y0 : y1 + 1, x0 : x1 + 1] = True
    assert diff.any() and not (diff & ~allowed).any(), (i, g.concepts[ci].name)
    np.testing.assert_array_equal(np.delete(cf["boxes"], ci, 0), np.delete(rec["boxes"], ci, 0))
    flipped[ci] += 1
    n_diff.append(diff.sum())
  assert flipped.min() > 40, flipped  # every concept gets flipped
  assert np.median(n_diff) < 0.05 * diff.size  # small, local evidence


def test_counterfactual_cpo_batches(proc, train):
  g = load_graph("driving")
  kw = dict(thinking_fraction=0.25, perception_mode="counterfactual")
  it = _cpo(proc, train, **kw)
  tok = proc.tokenizer
  n_perc = 0
  for _ in range(2):
    b = next(it)
    assert b["flipped_concept"].dtype == np.int32
    for r in range(8):
      if b["source"][r] == 0:
        assert b["flipped_concept"][r] == -1
        continue
      n_perc += 1
      ci, i = int(b["flipped_concept"][r]), int(b["index"][r])
      ch = tok.decode(b["chosen_input_ids"][r][b["chosen_loss_mask"][r] == 1])
      assert ch == tok.decode(b["rejected_input_ids"][r][b["rejected_loss_mask"][r] == 1])
      rec = train[i]
      a = g.assignment_from_ids(rec["concepts"])
      c = g.concepts[ci]
      # the rejected pixels are the scene re-rendered with concept ci set to one of its other values
      renders = [train.counterfactual(i, {**a, c.name: v}) for v in c.values if v != a[c.name]]
      got = b["rejected_pixel_values"][r * 64 : (r + 1) * 64]
      match = [x for x in renders if np.array_equal(proc.image_inputs(x["image"])[0], got)]
      assert len(match) == 1 and match[0]["decision"] == b["rejected_decision"][r]
      np.testing.assert_array_equal(
        proc.image_inputs(rec["image"])[0], b["chosen_pixel_values"][r * 64 : (r + 1) * 64]
      )
  assert n_perc >= 8
  x, y, z = (
    next(_cpo(proc, train, seed=7, **kw)),
    next(_cpo(proc, train, seed=7, **kw)),
    next(_cpo(proc, train, seed=8, **kw)),
  )
  for k in x:
    np.testing.assert_array_equal(x[k], y[k])
  assert not np.array_equal(x["index"], z["index"])
  for mode in pairs_lib.INDEX_MODES:  # other modes carry no flipped concept
    assert (next(_cpo(proc, train, perception_mode=mode))["flipped_concept"] == -1).all()


def test_counterfactual_needs_a_source_that_can_render(proc, train):
  src = _Corrupted(train)
  with pytest.raises(ValueError, match=r"counterfactual.*dataset Corrupted cannot re-render"):
    _cpo(proc, src, perception_mode="counterfactual")


def test_grouped_pair_layout_holds_the_share_exactly_and_is_what_the_step_checks(proc, train):
  from cpo_jax.train import pair_images

  assert datasets.pair_layout_for(0.5, 8) == (1, 2) and datasets.pair_layout_for(0.25, 8) == (1, 4)
  assert datasets.pair_layout_for(1.0, 8) == (1, 1) and datasets.pair_layout_for(0.75, 8) == (3, 4)
  for bad in (0.3, 0.125):  # 3/10 and 1/8 do not fit a batch of 4
    with pytest.raises(ValueError, match=f"thinking_fraction={bad}"):
      datasets.pair_layout_for(bad, 4)
  it = _cpo(proc, train, thinking_fraction=0.25, pair_layout=(1, 4))
  seen = set()
  for _ in range(4):
    b = next(it)
    assert b["source"].tolist() == [0, 1, 1, 1] * 2  # exactly 1 in 4, first of each group
    pair_images.check_pair_layout(b, (1, 4))  # thinking rows repeat their chosen image
    seen.update(b["index"][b["source"] == 0].tolist())
  assert len(seen) == 8  # the thinking stream walks the shuffled split: no repeats here
  with pytest.raises(ValueError, match="does not match thinking_fraction"):
    _cpo(proc, train, thinking_fraction=0.5, pair_layout=(1, 4))


def test_boxes_follow_the_image_when_the_processor_resizes_it(proc, train, tmp_path):
  """Rendered at 112 px, processed at 224: boxes double, in CPO and eval batches alike."""
  big = processors.make_processors(str(tmp_path / "tok"), image_size=224)
  small_b, big_b = (next(_cpo(p, train, batch_size=4, max_len=160)) for p in (proc, big))
  assert big_b["chosen_pixel_values"].shape[0] == 4 * small_b["chosen_pixel_values"].shape[0]
  np.testing.assert_array_equal(big_b["boxes"], 2 * small_b["boxes"])
  ev_small, ev_big = (
    next(eval_batches.make_eval_batches(train, p, batch_size=2, max_prompt_len=120))
    for p in (proc, big)
  )
  np.testing.assert_array_equal(ev_big["boxes"], 2 * ev_small["boxes"])
  assert (
    ev_small["boxes"][..., 2] > ev_small["boxes"][..., 0]
  ).any()  # real boxes, not padding only
  image = Image.new("RGB", (300, 150))
  np.testing.assert_array_equal(big.boxes_for([[30, 15, 60, 75]], image), [[22, 22, 45, 112]])


def test_left_out_records_are_counted_apart_and_a_stream_of_only_those_stops():
  def fn(i):
    if i % 2:
      raise bad_records.LeftOut("no_preference", f"r{i}")
    return i

  skips = bad_records.SkipCounter()
  guard = bad_records.Guard(fn, "raise", skips, window=4)  # left out even under 'raise'
  assert [guard(i) for i in range(4)] == [0, None, 2, None]
  assert skips.counts == {"no_preference": 2}
  only = bad_records.Guard(lambda i: fn(2 * i + 1), "skip", bad_records.SkipCounter(), window=3)
  with pytest.raises(bad_records.TooManySkipsError, match=r"none of the first 3.*no_preference"):
    for i in range(3):
      only(i)


@pytest.mark.parametrize('num_epochs', [None, 3])
def test_every_epoch_visits_each_record_of_the_shard_once_in_a_new_order(num_epochs):
  ds = datasets._indices(10, seed=3, shard_index=1, shard_count=2, num_epochs=num_epochs)
  epochs = [[int(ds[e * 5 + i]) for i in range(5)] for e in range(3)]
  assert all(sorted(e) == [1, 3, 5, 7, 9] for e in epochs), epochs
  assert len({tuple(e) for e in epochs}) > 1, epochs  # reshuffled, not one order repeated


def test_a_new_tokenizer_directory_shows_its_tokenizer_json_last(tmp_path, monkeypatch):
  """Every host makes its processors from the shared directory, and one that finds
  tokenizer.json loads it: that file lands after the others (a two-process gs:// run once
  read the directory half-written, its pad token missing)."""
  landed = []
  gpath = type(processors.paths.epath.Path(tmp_path))  # the class local paths copy with
  original = gpath.copy

  def recording(self, dst, **kw):
    landed.append(processors.paths.epath.Path(dst).name)
    return original(self, dst, **kw)

  monkeypatch.setattr(gpath, "copy", recording)
  built = processors.make_processors(str(tmp_path / "tok"))
  assert landed[-1] == processors.TOKENIZER_FILE and len(landed) > 1, landed
  loaded = processors.make_processors(str(tmp_path / "tok"))
  assert loaded.ids == built.ids and loaded.ids["pad_token_id"] is not None
