"""swift_jsonl ingestion: the authors' ms-swift preference records -> CPO batches."""

import json
import shutil

from cli_configs import SMALL_RUN
from cli_configs import cli_config
import numpy as np
from PIL import Image
import pytest

from cpo_jax import config_defaults
from cpo_jax.data import bad_records
from cpo_jax.data import datasets
from cpo_jax.data import eval_batches
from cpo_jax.data import processors
from cpo_jax.data import sources
from cpo_jax.data import streams
from cpo_jax.data import synth_cxr
from cpo_jax.knowledge import load_graph

Q = "<image>What is the disease of this patient?"


@pytest.fixture(scope="module")
def proc():
  return processors.make_processors(None)


def _write(tmp_path, extra_lines=()):
  g = load_graph("medical")
  (tmp_path / "imgs").mkdir()
  for i in range(3):
    (tmp_path / "imgs" / f"{i}.png").write_bytes(synth_cxr.make_example(0, "train", i)["image"])
  a = g.all_assignments()
  chosen = g.completion_text(a[0])
  other = g.completion_text(a[-1])
  user = {"role": "user", "content": Q}
  recs = [
    {
      "messages": [user, {"role": "assistant", "content": chosen}],
      "images": ["imgs/0.png"],
      "rejected_messages": [user, {"role": "assistant", "content": other}],
      "rejected_images": ["imgs/0.png"],
      "cpo_source": "reasoning",
    },
    {
      "messages": [user, {"role": "assistant", "content": chosen}],
      "images": ["imgs/0.png"],
      "rejected_messages": [user, {"role": "assistant", "content": chosen}],
      "rejected_images": ["imgs/1.png"],
      "cpo_source": "vision",
      "cpo_sample_weight": 0.5,
    },
    {
      "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        user,
        {"role": "assistant", "content": chosen},
      ],
      "images": [str(tmp_path / "imgs" / "2.png")],
      "rejected_response": other,
    },  # source inferred: thinking
    {
      "messages": [
        {"role": "user", "content": "What is the disease of this patient?"},
        {"role": "assistant", "content": chosen},
      ],
      "images": [{"path": "imgs/1.png"}],
      "rejected_messages": [user, {"role": "assistant", "content": chosen}],
      "rejected_images": ["imgs/2.png"],
    },  # no <image> tag; source inferred: perception
  ]
  lines = [json.dumps(r) for r in recs] + list(extra_lines)
  (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
  return chosen, other


def test_swift_records_become_cpo_batches(proc, tmp_path):
  chosen, other = _write(tmp_path)
  src = sources.make_source("swift_jsonl", "train", data_dir=str(tmp_path))
  assert len(src) == 4
  it = datasets.make_cpo_iterator(src, proc, batch_size=4, max_len=112, seed=0, num_epochs=1)
  b = next(it)
  order = b["index"].tolist()
  assert sorted(order) == [0, 1, 2, 3]
  by = {i: r for r, i in enumerate(order)}
  assert [int(b["source"][by[i]]) for i in range(4)] == [0, 1, 0, 1]
  assert [float(b["sample_weight"][by[i]]) for i in range(4)] == [1.0, 0.5, 1.0, 1.0]
  tok = proc.tokenizer
  img = proc.ids["image_token_id"]
  for i in range(4):
    r = by[i]
    ch = tok.decode(b["chosen_input_ids"][r][b["chosen_loss_mask"][r] == 1])
    rj = tok.decode(b["rejected_input_ids"][r][b["rejected_loss_mask"][r] == 1])
    assert ch == chosen + "<|im_end|>"
    assert rj == (other if i in (0, 2) else chosen) + "<|im_end|>"
    assert (
      (b["chosen_input_ids"][r] == img).sum() == 16 == (b["rejected_input_ids"][r] == img).sum()
    )
    same_img = np.array_equal(
      b["chosen_pixel_values"][r * 64 : (r + 1) * 64],
      b["rejected_pixel_values"][r * 64 : (r + 1) * 64],
    )
    assert same_img == (i in (0, 2))
  prompt = tok.decode(b["chosen_input_ids"][by[3]][: b["prompt_length"][by[3]]])
  assert prompt.startswith(
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>"
  )
  assert prompt.endswith(
    "<|vision_end|>What is the disease of this patient?<|im_end|>\n<|im_start|>assistant\n"
  )
  sft = next(datasets.make_sft_iterator(src, proc, batch_size=2, max_len=112, seed=0))
  assert sft["input_ids"].shape == (2, 112)


def test_swift_bad_lines_skip_by_reason_or_raise_with_line(proc, tmp_path):
  _write(
    tmp_path,
    extra_lines=[
      '{"messages": [{"role": "user", "content": "x"}',  # truncated JSON
      json.dumps(
        {"messages": "hello", "images": ["imgs/0.png"], "rejected_response": "x"}
      ),  # wrong type
      json.dumps(
        {
          "messages": [
            {"role": "user", "content": Q},
            {"role": "assistant", "content": "The heart is enlarged."},
          ],
          "images": ["imgs/missing.png"],
          "rejected_response": "The lungs are clear.",
        }
      ),  # missing image
      json.dumps(
        {
          "messages": [
            {"role": "user", "content": Q},
            {"role": "assistant", "content": "zebra unicorn"},
          ],
          "images": ["imgs/0.png"],
          "rejected_response": "The lungs are clear.",
        }
      ),  # out of vocabulary
    ],
  )
  src = sources.make_source("swift_jsonl", "train", data_dir=str(tmp_path))
  skips = bad_records.SkipCounter()
  it = datasets.make_cpo_iterator(
    src, proc, batch_size=2, max_len=112, seed=0, num_epochs=1, on_bad_record="skip", skips=skips
  )
  assert sum(len(b["index"]) for b in it) == 4
  assert dict(skips.counts) == {"bad_json": 1, "bad_type": 1, "bad_image": 1, "unknown_token": 1}
  with pytest.raises(bad_records.BadRecordError, match=r"train.jsonl:\d+: "):
    for _ in datasets.make_cpo_iterator(src, proc, batch_size=2, max_len=112, seed=0, num_epochs=1):
      pass


def test_fuzz_1000_corrupted_records_are_counted_never_crash(proc, tmp_path):
  _write(tmp_path)
  (tmp_path / "imgs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
  good = json.loads((tmp_path / "train.jsonl").read_text().splitlines()[0])
  rng = np.random.default_rng(0)
  kinds = [
    "truncated",
    "wrong_type",
    "broken_image",
    "huge_text",
    "not_object",
    "bad_source",
    "bad_weight",
    "no_rejected",
  ]
  expect = {
    "truncated": "bad_json",
    "wrong_type": "bad_type",
    "broken_image": "bad_image",
    "huge_text": "overlong",
    "not_object": "bad_type",
    "bad_source": "bad_type",
    "bad_weight": "bad_type",
    "no_rejected": "missing_field",
  }
  lines, want = [], {}
  for n in range(1000):
    kind = kinds[n % len(kinds)]
    r = json.loads(json.dumps(good))
    if kind == "truncated":
      s = json.dumps(r)
      line = s[: int(rng.integers(1, len(s) - 1))]
    else:
      if kind == "wrong_type":
        field = ["messages", "images", "rejected_messages"][n % 3]
        r[field] = [5, [1, 2], {"a": 1}][int(rng.integers(3))]
      elif kind == "broken_image":
        r["images"] = ["imgs/broken.png"]
      elif kind == "huge_text":
        r["messages"][-1]["content"] = "The heart is enlarged. " * 400
      elif kind == "not_object":
        r = [r]
      elif kind == "bad_source":
        r["cpo_source"] = ["bogus", 3, None][n % 3] or "bogus"
      elif kind == "bad_weight":
        r["cpo_sample_weight"] = ["abc", -1, True][n % 3]
      elif kind == "no_rejected":
        del r["rejected_messages"]
      line = json.dumps(r)
    lines.append(line)
    want[expect[kind]] = want.get(expect[kind], 0) + 1
  (tmp_path / "fuzz.jsonl").write_text("\n".join(lines) + "\n")
  from cpo_jax.data.swift_jsonl import SwiftJsonlSource

  src = SwiftJsonlSource(str(tmp_path / "fuzz.jsonl"), root=str(tmp_path))
  assert len(src) == 1000
  skips = bad_records.SkipCounter()
  rows = sum(
    len(b["index"])
    for b in datasets.make_cpo_iterator(
      src, proc, batch_size=1, max_len=112, seed=0, num_epochs=1, on_bad_record="skip", skips=skips
    )
  )
  assert rows == 0 and dict(skips.counts) == want
  with pytest.raises(bad_records.BadRecordError, match=r"fuzz.jsonl:\d+: .*reason="):
    next(datasets.make_cpo_iterator(src, proc, batch_size=1, max_len=112, seed=0, num_epochs=1))


def test_swift_eval_batches_read_gold_labels_from_the_chosen_text(proc, tmp_path):
  chosen, _ = _write(tmp_path)
  g = load_graph("medical")
  src = sources.make_source("swift_jsonl", "train", data_dir=str(tmp_path))
  (b,) = list(eval_batches.make_eval_batches(src, proc, batch_size=4, max_prompt_len=64))
  gold = g.decision_id(g.parse_decision(chosen))
  assert b["decision"].tolist() == [gold] * 4 and b["valid"].all()
  assert b["input_ids"].shape == (4, 64) and b["attention_mask"][:, -1].all()
  np.testing.assert_array_equal(b["concepts"][0], g.value_ids(g.all_assignments()[0]))


def test_swift_counterfactual_mode_raises_naming_the_dataset(proc, tmp_path):
  _write(tmp_path)
  src = sources.make_source("swift_jsonl", "train", data_dir=str(tmp_path))
  with pytest.raises(ValueError, match=r"counterfactual.*swift_jsonl.*cannot re-render"):
    datasets.make_cpo_iterator(
      src, proc, batch_size=2, max_len=160, perception_mode="counterfactual"
    )
  b = next(datasets.make_cpo_iterator(src, proc, batch_size=2, max_len=160))
  assert (b["flipped_concept"] == -1).all()


def test_a_run_takes_the_datasets_eval_splits_and_skips_a_missing_one(tmp_path, caplog):
  _write(tmp_path)
  cfg = config_defaults.base_config('data=swift_jsonl', domain='medical', data='synth_cxr')
  cfg.data.manual_dir = str(tmp_path)
  with caplog.at_level('WARNING'):
    data = streams.RunData(cfg, str(tmp_path / 'work'))  # no test.jsonl: skipped, said so
  assert data.eval_splits == [] and "eval split 'test' skipped" in caplog.text
  shutil.copy(tmp_path / 'train.jsonl', tmp_path / 'test.jsonl')
  assert streams.RunData(cfg, str(tmp_path / 'work')).eval_splits == ['test']  # not 'test,ood'
  cfg.eval.splits = 'test,ood'  # asked for by name: a missing one is an error
  with pytest.raises(FileNotFoundError, match='ood.jsonl'):
    streams.RunData(cfg, str(tmp_path / 'work'))


def _free_text_set(root, n=6, *, bad=False):
  """An ms-swift set (jsonl text; images written under root) the way a user's own data is:
  report-style words the concept graph has never seen, images of assorted sizes by relative
  path (`bad`: paths that do not exist)."""
  (root / "imgs").mkdir(exist_ok=True)
  rng = np.random.default_rng(0)
  lines = []
  for i in range(n):
    shape = (40 + 8 * i, 64, 3)
    img = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))
    img.save(root / "imgs" / f"{i}.jpg")
    finding = ["Cardiomegaly", "Pneumothorax", "Lung Lesion"][i % 3]  # the last: no graph decision
    report = f"Mild enlargement of the cardiac silhouette; study {i} shows no acute osseous change."
    lines.append(
      {
        "messages": [
          {"role": "user", "content": "<image>Describe the radiograph, then diagnose."},
          {"role": "assistant", "content": f"<think> {report} </think> The answer is {finding}."},
        ],
        "images": [f"imgs/{i}.jpg" if not bad else f"missing/{i}.jpg"],
        "rejected_response": f"<think> {report} Bilateral effusions. </think> The answer is Edema.",
      }
    )
  return "\n".join(json.dumps(r) for r in lines) + "\n"


def _byod_config(manual_dir, *overrides):
  return cli_config(
    "configs/medical.py:data=swift_jsonl",
    *SMALL_RUN,
    f"--config.data.manual_dir={manual_dir}",
    "--config.data.on_bad_record=skip",
    *overrides,
  )


@pytest.mark.parametrize("with_test_split", [False, True])
def test_own_data_runs_first_time_with_a_random_init_preset(tmp_path, with_test_split):
  # The new user: the README command on an ms-swift set, nothing else set. Before,
  # every record was an `unknown_token` skip and the run hung.
  from cpo_jax import main

  text = _free_text_set(tmp_path)
  (tmp_path / "train.jsonl").write_text(text)
  if with_test_split:
    (tmp_path / "test.jsonl").write_text(text)
  cfg = _byod_config(tmp_path)
  report = main.run(cfg, str(tmp_path / "work"))
  tok = processors.make_processors(str(tmp_path / "work" / "data" / "tokenizer")).tokenizer
  for line in text.splitlines():  # the user's words are in the vocabulary
    rec = json.loads(line)
    for words in [m["content"] for m in rec["messages"]] + [rec["rejected_response"]]:
      assert tok.unk_token_id not in tok(words.replace("<image>", ""))["input_ids"], words
  if not with_test_split:
    assert report["splits"] == {}
    return
  split = report["splits"]["test"]
  assert split["skipped"] == {} and (split["n"], split["unlabelled"]) == (4, 2)


@pytest.mark.parametrize("stream", ["train", "eval"])
def test_a_set_whose_records_are_all_bad_stops_at_once_with_the_counts(tmp_path, stream):
  from cpo_jax import main

  good, bad = _free_text_set(tmp_path), _free_text_set(tmp_path, bad=True)
  (tmp_path / "train.jsonl").write_text(good if stream == "eval" else bad)
  (tmp_path / "test.jsonl").write_text(bad if stream == "eval" else good)
  cfg = _byod_config(tmp_path)
  with pytest.raises(bad_records.TooManySkipsError, match=r"6 of the first 6 .*'bad_image': 6"):
    main.run(cfg, str(tmp_path / "work"))


def test_inspect_reads_the_data_without_training(tmp_path):
  from cpo_jax import inspect_data

  text = _free_text_set(tmp_path)
  bad = json.loads(_free_text_set(tmp_path, bad=True).splitlines()[0])
  long = json.loads(text.splitlines()[1])
  long["messages"][-1]["content"] = "<think> " + "word " * 200 + "</think> The answer is Edema."
  (tmp_path / "train.jsonl").write_text(text + json.dumps(bad) + "\n" + json.dumps(long) + "\n")
  (tmp_path / "test.jsonl").write_text(text)
  cfg = _byod_config(tmp_path)
  report = inspect_data.inspect(cfg, str(tmp_path / "work"))
  train, test = report["splits"]["train"], report["splits"]["test"]
  assert (train["records"], train["skipped"], train["over_max_len"]) == (8, {"bad_image": 1}, 1)
  assert train["usable"] == 6 and train["pairs_by_source"] == {"thinking": 7}
  assert train["skipped_examples"]["bad_image"] == [f"{tmp_path}/train.jsonl:7"]
  assert test["image_sizes"] == {f"64x{40 + 8 * i}": 1 for i in range(6)}
  assert sum(test["total_tokens"]["counts"]) == 6 and report["eval_splits"] == ["test"]
  for name in ("inspect.json", "lengths.png", "examples.png"):
    assert (tmp_path / "work" / "inspect" / name).stat().st_size > 0
  assert "train: 8 records, 6 usable" in inspect_data.summary_lines(report)[0]


def test_own_data_runs_from_an_init_from_checkpoint(tmp_path):
  # The same command with a Hugging Face directory (weights + its own tokenizer) instead of a
  # random-init preset: the run takes the checkpoint's tokenizer and weights.
  from flax import nnx

  from cpo_jax import main
  from cpo_jax import models
  from cpo_jax.data import tokenizer as tok_lib

  text = _free_text_set(tmp_path)
  (tmp_path / "train.jsonl").write_text(text)
  (tmp_path / "test.jsonl").write_text(text)
  words = [m["content"] for line in text.splitlines() for m in json.loads(line)["messages"]]
  tok = tok_lib.build_tokenizer(extra_texts=words)
  checkpoint = tmp_path / "hf"
  config = models.get_config_for_tokens("tiny", tok_lib.special_ids(tok))
  models.save_hf(models.Qwen2_5_VL(config, rngs=nnx.Rngs(3)), str(checkpoint))
  tok.save_pretrained(str(checkpoint))
  cfg = _byod_config(
    tmp_path,
    f"--config.model.init_from={checkpoint}",
    "--config.stages=sft,eval",
    "--config.eval.robustness=False",
  )
  report = main.run(cfg, str(tmp_path / "work"))
  assert not (tmp_path / "work" / "data" / "tokenizer").exists()  # the checkpoint's is used
  split = report["splits"]["test"]
  assert split["skipped"] == {} and (split["n"], split["unlabelled"]) == (4, 2)


def test_a_512_px_stream_over_mixed_aspect_images_skips_nothing(tmp_path):
  # The paper's 512 px over images of assorted sizes and aspects (the fixture's are 64 px wide,
  # 40-80 px high): every record becomes a row on the one static grid (504 px, 324 tokens).
  text = _free_text_set(tmp_path)
  (tmp_path / "train.jsonl").write_text(text)
  src = sources.make_source("swift_jsonl", "train", data_dir=str(tmp_path))
  words = [m["content"] for line in text.splitlines() for m in json.loads(line)["messages"]]
  from cpo_jax.data import tokenizer as tok_lib

  tok_dir = tmp_path / "tok"
  tok_lib.save_tokenizer(tok_lib.build_tokenizer(extra_texts=words), str(tok_dir))
  proc512 = processors.make_processors(str(tok_dir), image_size=512)
  skips = bad_records.SkipCounter()
  rows = list(
    datasets.make_sft_iterator(
      src, proc512, batch_size=2, max_len=400, num_epochs=1, on_bad_record="skip", skips=skips
    )
  )
  assert skips.total() == 0 and sum(len(b["input_ids"]) for b in rows) == 6
  assert all(b["image_grid_thw"].tolist() == [[1, 36, 36]] * 2 for b in rows)
