"""Grain pipelines: records -> (pairs) -> processor + tokenizer -> static-shape numpy batches.

Batch formats (INTERFACES.md). P = patches per image (64 for 112x112), L = max_len, or with
`length_buckets` the smallest bucket that holds every row of the batch (for a CPO batch: both
sides, which share L; see `parse_length_buckets`).
SFT batch:
  input_ids [B,L] int32 (right padded with pad id), attention_mask [B,L] int32,
  loss_mask [B,L] int32: 1 where input_ids[b,t] is a completion token (the chain, the answer
    and the final <|im_end|>); the logit that predicts it sits at t-1, so a caller does
    logits[:, :-1] vs input_ids[:, 1:] with loss_mask[:, 1:],
  pixel_values [B*P,1176] float32, image_grid_thw [B,3] int32 (identical rows),
  prompt_length [B] int32 (first completion position), decision [B] int32, index [B] int32.
CPO batch (one row = one preference pair):
  chosen_{input_ids,attention_mask,loss_mask} [B,L], chosen_pixel_values [B*P,1176],
  rejected_{input_ids,attention_mask,loss_mask} [B,L], rejected_pixel_values [B*P,1176],
  image_grid_thw [B,3], source [B] int32 (0 thinking, 1 perception, 2 other),
  sample_weight [B] float32 (the record's cpo_sample_weight, 1.0 for synthetic data; per-source
    weights are the loss's source_weights),
  prompt_length [B] int32 (first completion position; for synthetic pairs the prompt ids are
    identical on both sides), rejected_prompt_length [B] int32 (differs only for ingested pairs
    whose rejected prompt text differs),
  boxes [B,C,4] int32 (evidence boxes of the chosen image in pixels, for on-device perception
    masks; [B,1,4] = whole image for ingested pairs),
  chosen_decision / rejected_decision / index [B] int32 (diagnostics, -1 when unknown),
  flipped_concept [B] int32 (perception_mode 'counterfactual': the concept index, graph order,
    changed in the rejected image; -1 on other rows and modes).
  What the CPO++ loss needs from a batch: per side the sequence log-prob = sum over
  loss_mask[:, 1:] of log p(input_ids[:, 1:] | logits[:, :-1]), for the policy and the
  reference (adapters off); `source` to weight/normalise per pair and for per-source metrics;
  `sample_weight`; the chosen side's loss_mask again for the rpo_alpha NLL. Savings it allows:
  thinking rows (source == 0) have rejected_pixel_values == chosen_pixel_values and the same
  prompt, so image + prompt (first prompt_length tokens) can be encoded once for both sides;
  perception rows share only the text before <|vision_start|>.
Eval batch: input_ids [B,Lp] LEFT padded prompts ending with '<|im_start|>assistant\\n',
  attention_mask [B,Lp], pixel_values, image_grid_thw, decision [B] (gold), concepts [B,C],
  nuisance [B], boxes [B,C,4], index [B], valid [B] bool (False on rows that only fill the
  last batch to the static size).
Bad records (over-long sequence, unreadable record or image, missing field, empty chain, an
image whose patch grid differs): `on_bad_record='raise'` (default) raises BadRecordError
(OverlongError for length) naming the record and the problem; 'skip' drops the record and
counts it by reason in `skips` (a SkipCounter; counts are per process). Never truncated.
"""

from __future__ import annotations

import dataclasses
import fractions
import functools
import io
import json
import os
from typing import Any
from typing import Iterator

import grain
import numpy as np
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from cpo_jax.data import pairs as pairs_lib
from cpo_jax.data import tokenizer as tok_lib
from cpo_jax.data.bad_records import BadRecordError  # noqa: F401 (re-exported)
from cpo_jax.data.bad_records import OverlongError  # noqa: F401 (re-exported)
from cpo_jax.data.bad_records import SkipCounter  # noqa: F401 (re-exported)
from cpo_jax.data.sources import make_source  # noqa: F401  (re-exported: P.make_source)
from cpo_jax.knowledge.graph import ConceptGraph
from cpo_jax.knowledge.graph import load_graph

# ---- processors -----------------------------------------------------------------


@dataclasses.dataclass
class Processors:
  tokenizer: Any
  image_processor: Any
  ids: dict[str, int]

  image_size: int | None = None  # square size the processor keeps (min_pixels == max_pixels)

  def image_inputs(self, image) -> tuple[np.ndarray, np.ndarray]:
    """PNG bytes / PIL / uint8 array -> (pixel_values [P,1176] float32, grid_thw [3] int32)."""
    if isinstance(image, (bytes, np.bytes_)):
      image = Image.open(io.BytesIO(image)).convert("RGB")
    arr = np.asarray(image)
    ip = self.image_processor
    if self.image_size is not None and arr.shape[:2] != (self.image_size, self.image_size):
      # Other sizes/aspects are resized to the square first: one patch grid for every batch
      # (static shapes). Real data with a native aspect needs buckets (issue 5), not this.
      pil = image if isinstance(image, Image.Image) else Image.fromarray(arr)
      arr = np.asarray(pil.convert("RGB").resize((self.image_size, self.image_size), Image.BICUBIC))
    if (
      self.image_size is not None
      and arr.shape == (self.image_size, self.image_size, 3)
      and arr.dtype == np.uint8
    ):
      # Fast path (~10x): at the target size the processor's resize is the identity, so only
      # rescale + normalize + HF's own patchify remain. Equal to the processor (tested).
      x = arr.transpose(2, 0, 1).astype(np.float64) * ip.rescale_factor
      x = (
        x.astype(np.float32) - np.asarray(ip.image_mean, np.float32)[:, None, None]
      ) / np.asarray(ip.image_std, np.float32)[:, None, None]
      pv, gh, gw = ip.patchify(
        x,
        patch_size=ip.patch_size,
        merge_size=ip.merge_size,
        temporal_patch_size=ip.temporal_patch_size,
      )
      return np.ascontiguousarray(pv, np.float32), np.array([1, gh, gw], np.int32)
    out = ip(images=image, return_tensors="np")
    return out["pixel_values"].astype(np.float32), out["image_grid_thw"][0].astype(np.int32)

  def boxes_for(self, boxes, image) -> np.ndarray:
    """Evidence boxes [C, 4] (x0, y0, x1, y1) given in the source image's pixels -> pixels of
    the processed image (`image_inputs` resizes other sizes to image_size x image_size)."""
    boxes = np.asarray(boxes, np.int32)
    if self.image_size is None:
      return boxes
    if isinstance(image, (bytes, np.bytes_)):
      with Image.open(io.BytesIO(image)) as im:  # reads the header only
        width, height = im.size
    elif isinstance(image, Image.Image):
      width, height = image.size
    else:
      height, width = np.asarray(image).shape[:2]
    if (width, height) == (self.image_size, self.image_size):
      return boxes
    scale = np.array([self.image_size / width, self.image_size / height] * 2)
    return np.rint(boxes * scale).astype(np.int32)

  def image_inputs_reference(self, image) -> tuple[np.ndarray, np.ndarray]:
    """Always the transformers processor (for checking the fast path)."""
    if isinstance(image, (bytes, np.bytes_)):
      image = Image.open(io.BytesIO(image)).convert("RGB")
    out = self.image_processor(images=image, return_tensors="np")
    return out["pixel_values"].astype(np.float32), out["image_grid_thw"][0].astype(np.int32)

  def num_image_tokens(self, grid_thw) -> int:
    m = self.image_processor.merge_size
    return int(np.prod(grid_thw)) // (m * m)

  @functools.lru_cache(maxsize=64)
  def prompt_ids(self, question: str, num_image_tokens: int) -> tuple[int, ...]:
    """Chat-templated user turn with one image (pad token expanded) + assistant header."""
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    text = text.replace(tok_lib.IMAGE_PAD, tok_lib.IMAGE_PAD * num_image_tokens)
    return tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"])

  @functools.lru_cache(maxsize=1024)
  def prompt_ids_from_json(self, messages_json: str, num_image_tokens: int) -> tuple[int, ...]:
    """Prompt for ms-swift style messages (JSON string: hashable for the cache), all turns
    but the last assistant one, + the assistant header."""
    from cpo_jax.data.swift_jsonl import to_chat

    msgs = to_chat(json.loads(messages_json))
    text = self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    text = text.replace(tok_lib.IMAGE_PAD, tok_lib.IMAGE_PAD * num_image_tokens)
    return tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"])

  @functools.lru_cache(maxsize=4096)
  def completion_ids(self, completion: str) -> tuple[int, ...]:
    """Completion tokens + the closing <|im_end|> (the model must learn to stop)."""
    ids = self.tokenizer(completion, add_special_tokens=False)["input_ids"]
    return tuple(ids) + (self.ids["eos_token_id"],)

  def __hash__(self):  # for lru_cache on methods: one Processors per pipeline
    return id(self)


def make_processors(tokenizer_dir: str | None = None, image_size: int = 112) -> Processors:
  """(tokenizer, image processor) bundle. Builds + saves the synthetic tokenizer when
  `tokenizer_dir` is None or has no tokenizer yet; loads it (or a HF Qwen2.5-VL dir) otherwise.
  min_pixels = max_pixels = image_size**2 keeps every image at the same patch grid."""
  if tokenizer_dir and os.path.exists(os.path.join(tokenizer_dir, "tokenizer.json")):
    tok = tok_lib.load_tokenizer(tokenizer_dir)
  else:
    tok = tok_lib.build_tokenizer()
    if tokenizer_dir:
      tok_lib.save_tokenizer(tok, tokenizer_dir)
  ip = Qwen2VLImageProcessorPil(
    min_pixels=image_size * image_size, max_pixels=image_size * image_size
  )
  return Processors(tok, ip, tok_lib.special_ids(tok), image_size if image_size % 28 == 0 else None)


# ---- packing ------------------------------------------------------------------------


def pack_right(
  prompt: tuple[int, ...],
  completion: tuple[int, ...],
  max_len: int,
  pad_id: int,
  record_id,
  unk_id: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  if unk_id is not None and (unk_id in completion or unk_id in prompt):
    # the small word-level tokenizer maps unseen words to <unk>: that text is not learnable
    raise BadRecordError(
      "unknown_token",
      record_id,
      "text has words outside the tokenizer vocabulary "
      "(build_tokenizer(extra_texts=...) or use the model's own tokenizer)",
    )
  n = len(prompt) + len(completion)
  if n > max_len:
    raise OverlongError(
      record_id,
      f"{n} tokens ({len(prompt)} prompt + {len(completion)} completion) "
      f"> max_len {max_len}; raise max_len (never truncated)",
    )
  ids = np.full(max_len, pad_id, np.int32)
  ids[:n] = prompt + completion
  attn = np.zeros(max_len, np.int32)
  attn[:n] = 1
  loss = np.zeros(max_len, np.int32)
  loss[len(prompt) : n] = 1
  return ids, attn, loss


def pack_left(
  prompt: tuple[int, ...], max_len: int, pad_id: int, record_id
) -> tuple[np.ndarray, np.ndarray]:
  n = len(prompt)
  if n > max_len:
    raise OverlongError(record_id, f"prompt of {n} tokens > max_prompt_len {max_len}")
  ids = np.full(max_len, pad_id, np.int32)
  ids[max_len - n :] = prompt
  attn = np.zeros(max_len, np.int32)
  attn[max_len - n :] = 1
  return ids, attn


def parse_length_buckets(spec, max_len: int) -> tuple[int, ...]:
  """Config data.length_buckets ('64,80', or a sequence of ints) -> the static lengths a
  training batch may have, increasing and ending with max_len. '' / () = (max_len,): off."""
  items = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s) for s in spec]
  items = [s for s in items if s]
  try:
    out = [int(s) for s in items]
  except ValueError:
    raise ValueError(
      f"data.length_buckets={spec!r}: expected comma-separated ints such as '64,80'"
    ) from None
  if (
    any(b <= 0 for b in out)
    or any(a >= b for a, b in zip(out, out[1:]))
    or (out and out[-1] > max_len)
  ):
    raise ValueError(
      f"data.length_buckets={spec!r}: expected strictly increasing positive lengths, each <= "
      f"data.max_len ({max_len}); max_len is always the last bucket"
    )
  return tuple(out) if out and out[-1] == max_len else tuple(out) + (max_len,)


class _TrimToBucket:
  """Cuts a right-padded training batch down to the smallest bucket that holds all its rows.

  Only all-pad trailing columns go, so it is exact: under causal attention a later (pad)
  position never changes an earlier one. Both sides of a pair share one length (the step
  concatenates them). Stateless: the iterator state is the same with or without it."""

  def __init__(self, buckets: tuple[int, ...], prefixes: tuple[str, ...]):
    self.buckets, self.prefixes = buckets, prefixes

  def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    n = max(int(batch[p + "attention_mask"].sum(1).max()) for p in self.prefixes)
    length = next(b for b in self.buckets if b >= n)  # pack_right kept every row <= max_len
    for p in self.prefixes:
      for k in ("input_ids", "attention_mask", "loss_mask"):
        batch[p + k] = np.ascontiguousarray(batch[p + k][:, :length])
    return batch


_PAIR_SIDES = ("chosen_", "rejected_")
_PERCEPTION_STREAM = 1000  # seed offset of a grouped stream's perception pairs


def _stack(rows: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """Stack per-example arrays; pixel_values are concatenated to [B*P, D] (HF layout)."""
  out = {}
  for k in rows[0]:
    v = np.stack([r[k] for r in rows])
    out[k] = v.reshape(-1, v.shape[-1]) if k.endswith("pixel_values") else v
  return out


# ---- per-example transforms -----------------------------------------------------------


class _Guard:
  """Applies the bad-record policy around a per-example transform (picklable for workers)."""

  def __init__(self, fn, policy: str, skips: SkipCounter):
    self.fn, self.policy, self.skips = fn, policy, skips

  def __call__(self, i, *args):
    try:
      return self.fn(i, *args)
    except BadRecordError as e:
      if self.policy == "raise":
        raise
      self.skips.add(e.reason, int(i))
      return None


def _read(source, i: int) -> dict[str, Any]:
  """source[i] with the fields every transform needs checked (missing field, empty chain)."""
  rid = f"{source!r}[{i}]"
  try:
    rec = source[i]
  except Exception as e:  # unreadable/corrupt record in the file
    raise BadRecordError("unreadable_record", rid, f"cannot read: {e!r}") from e
  for f in _REQUIRED:
    if f not in rec:
      raise BadRecordError("missing_field", rid, f"missing field {f!r}")
  if not pairs_lib.as_text(rec["chain"]).strip() or not pairs_lib.as_text(rec["answer"]).strip():
    raise BadRecordError("empty_chain", rid, "empty chain or answer")
  return rec


_REQUIRED = ("image", "question", "chain", "answer", "decision", "concepts", "index")


def _image(proc: Processors, image, rid: str, want_grid=None):
  try:
    pv, grid = proc.image_inputs(image)
  except Exception as e:
    raise BadRecordError("bad_image", rid, f"image cannot be decoded/processed: {e!r}") from e
  if want_grid is not None and not np.array_equal(grid, want_grid):
    raise BadRecordError(
      "bad_image",
      rid,
      f"image grid {grid.tolist()} != {np.asarray(want_grid).tolist()}; "
      "set min_pixels == max_pixels so batches have one shape",
    )
  return pv, grid


def _sft_example(i: int, *, source, proc: Processors, max_len: int):
  rec = _read(source, i)
  rid = f"{source!r}[{i}]"
  pv, grid = _image(proc, rec["image"], rid)
  prompt = proc.prompt_ids(pairs_lib.as_text(rec["question"]), proc.num_image_tokens(grid))
  ids, attn, loss = pack_right(
    prompt,
    proc.completion_ids(pairs_lib.completion_of(rec)),
    max_len,
    proc.ids["pad_token_id"],
    rid,
    proc.tokenizer.unk_token_id,
  )
  return {
    "input_ids": ids,
    "attention_mask": attn,
    "loss_mask": loss,
    "pixel_values": pv,
    "image_grid_thw": grid,
    "prompt_length": np.int32(len(prompt)),
    "decision": np.int32(rec["decision"]),
    "index": np.int32(i),
  }


def _cpo_example(
  i: int,
  rng: np.random.Generator,
  *,
  source,
  proc: Processors,
  graph: ConceptGraph,
  index: pairs_lib.PairIndex,
  max_len: int,
  thinking_fraction: float,
  perception_mode: str,
):
  rec = _read(source, i)
  rid = f"{source!r}[{i}]"
  pair = pairs_lib.make_pair(
    rec,
    i,
    rng,
    graph=graph,
    source=source,
    index=index,
    thinking_fraction=thinking_fraction,
    perception_mode=perception_mode,
  )
  c_pv, grid = _image(proc, pair["chosen_image"], rid)
  if pair["source"] == pairs_lib.SOURCE_IDS["thinking"]:
    r_pv = c_pv
  else:
    r_pv = _image(
      proc,
      pair["rejected_image"],
      f"{source!r}[{pair['rejected_index']}] (rejected image for {i})",
      want_grid=grid,
    )[0]
  prompt = proc.prompt_ids(pair["question"], proc.num_image_tokens(grid))
  pad = proc.ids["pad_token_id"]
  unk = proc.tokenizer.unk_token_id
  c = pack_right(
    prompt, proc.completion_ids(pair["chosen_completion"]), max_len, pad, f"{rid} chosen", unk
  )
  r = pack_right(
    prompt,
    proc.completion_ids(pair["rejected_completion"]),
    max_len,
    pad,
    f"{rid} rejected ({'thinking' if pair['source'] == 0 else 'perception'})",
    unk,
  )
  return {
    "chosen_input_ids": c[0],
    "chosen_attention_mask": c[1],
    "chosen_loss_mask": c[2],
    "chosen_pixel_values": c_pv,
    "rejected_input_ids": r[0],
    "rejected_attention_mask": r[1],
    "rejected_loss_mask": r[2],
    "rejected_pixel_values": r_pv,
    "image_grid_thw": grid,
    "source": np.int32(pair["source"]),
    "sample_weight": np.float32(pair["sample_weight"]),
    "prompt_length": np.int32(len(prompt)),
    "rejected_prompt_length": np.int32(len(prompt)),
    "boxes": proc.boxes_for(pair["boxes"], pair["chosen_image"]),
    "chosen_decision": np.int32(pair["chosen_decision"]),
    "rejected_decision": np.int32(pair["rejected_decision"]),
    "index": np.int32(i),
    "flipped_concept": np.int32(pair["flipped_concept"]),
  }


def _swift_side(proc: Processors, rec, prefix: str, max_len: int, want_grid=None):
  pv, grid = _image(proc, rec[f"{prefix}image"], rec["record_id"], want_grid)
  msgs = rec[f"{prefix}prompt_messages"]
  prompt = proc.prompt_ids_from_json(json.dumps(msgs), proc.num_image_tokens(grid))
  text = rec["chosen"] if prefix == "" else rec["rejected"]
  packed = pack_right(
    prompt,
    proc.completion_ids(text),
    max_len,
    proc.ids["pad_token_id"],
    f"{rec['record_id']} {'chosen' if prefix == '' else 'rejected'}",
    proc.tokenizer.unk_token_id,
  )
  return packed, pv, grid, len(prompt)


def _swift_cpo_example(i: int, *, source, proc: Processors, max_len: int):
  rec = source[i]  # raises BadRecordError itself
  (c, c_pv, grid, c_len) = _swift_side(proc, rec, "", max_len)
  (r, r_pv, _, r_len) = _swift_side(proc, rec, "rejected_", max_len, want_grid=grid)
  S = proc.image_size or 0
  return {
    "chosen_input_ids": c[0],
    "chosen_attention_mask": c[1],
    "chosen_loss_mask": c[2],
    "chosen_pixel_values": c_pv,
    "rejected_input_ids": r[0],
    "rejected_attention_mask": r[1],
    "rejected_loss_mask": r[2],
    "rejected_pixel_values": r_pv,
    "image_grid_thw": grid,
    "source": np.int32(rec["source"]),
    "sample_weight": np.float32(rec["sample_weight"]),
    "prompt_length": np.int32(c_len),
    "rejected_prompt_length": np.int32(r_len),
    "boxes": np.array([[0, 0, S, S]], np.int32),  # no evidence boxes known: the whole image
    "chosen_decision": np.int32(-1),
    "rejected_decision": np.int32(-1),
    "index": np.int32(i),
    "flipped_concept": np.int32(-1),
  }


def _swift_sft_example(i: int, *, source, proc: Processors, max_len: int):
  rec = source[i]
  (c, pv, grid, c_len) = _swift_side(proc, rec, "", max_len)
  return {
    "input_ids": c[0],
    "attention_mask": c[1],
    "loss_mask": c[2],
    "pixel_values": pv,
    "image_grid_thw": grid,
    "prompt_length": np.int32(c_len),
    "decision": np.int32(-1),
    "index": np.int32(i),
  }


def gives_pairs(source) -> bool:
  """True when the records are pairs already (swift_jsonl, mimic_ccf, codalm): no pair making."""
  return getattr(source, "kind", None) == "pairs"


# ---- datasets ------------------------------------------------------------------------


def _indices(
  n: int, *, seed: int, shard_index: int, shard_count: int, num_epochs: int | None, shuffle: bool
):
  """Per-host slice of the positions, then (seeded, per-epoch) shuffle and repeat."""
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index {shard_index} not in [0, {shard_count})")
  ds = grain.MapDataset.range(n)[shard_index::shard_count]
  ds = ds.repeat(num_epochs)
  return ds.shuffle(seed=seed) if shuffle else ds


def _batched(ds: grain.MapDataset, batch_size: int, read_threads: int = 1) -> grain.IterDataset:
  # Few read threads: the map work is Python (GIL-bound); grain's default 16 threads made it
  # ~2.5x slower on 2 cores. Scale out with worker_count (processes) instead.
  opts = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=4 * batch_size)
  it = ds.to_iter_dataset(opts)  # drops the None of skipped records
  return it.batch(batch_size, drop_remainder=True, batch_fn=_stack)


def _finish(
  it: grain.IterDataset, worker_count: int, buckets: tuple[int, ...], prefixes: tuple[str, ...]
) -> grain.IterDataset:
  if len(buckets) > 1:
    # Per batch: the rows and their order stay those of the unbucketed stream. Grouping rows
    # of similar length across batches would cut more padding where lengths spread widely,
    # but would make batches length- (so source- and label-) homogeneous, while CPO++
    # normalises its weights per batch.
    it = it.map(_TrimToBucket(buckets, prefixes))
  if worker_count > 0:
    from absl import (
      flags,  # grain's worker processes read absl flags; outside absl.app they are unparsed
    )

    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return it


def _policy(on_bad_record: str | None, on_overlong: str | None) -> str:
  policy = on_bad_record or on_overlong or "raise"  # on_overlong: older name, same meaning
  if policy not in ("raise", "skip"):
    raise ValueError(f"on_bad_record={policy!r}; expected 'raise' or 'skip'")
  return policy


def pair_layout_for(thinking_fraction: float, batch_size: int) -> tuple[int, int]:
  """(t, g) of a grouped CPO stream: rows come in groups of g pairs whose first t are thinking
  pairs and the rest perception pairs, so the train step knows statically which rejected
  images repeat their chosen image (it encodes them once). g is the smallest group with
  t / g == thinking_fraction and must divide the (per-host) batch."""
  fraction = fractions.Fraction(thinking_fraction).limit_denominator(batch_size)
  if float(fraction) != float(thinking_fraction) or batch_size % fraction.denominator:
    raise ValueError(
      f"data.thinking_fraction={thinking_fraction} is not t / g with g dividing the batch size "
      f"{batch_size}; choose one that is (0.5, 0.25, ...) or set data.pair_layout='mixed'"
    )
  return fraction.numerator, fraction.denominator


class _InterleaveGroups:
  """(thinking batch, perception batch) -> one batch whose rows follow the (t, g) layout."""

  def __init__(self, t: int, g: int):
    self.t, self.g = t, g

  def __call__(self, parts):
    thinking, perception = parts
    groups = thinking["source"].shape[0] // self.t
    out = {}
    for k, a in thinking.items():
      b = perception[k]
      rows_a = (
        a.reshape(groups, self.t, -1, a.shape[-1])
        if k.endswith("pixel_values")
        else a.reshape(groups, self.t, *a.shape[1:])
      )
      rows_b = b.reshape(groups, self.g - self.t, *rows_a.shape[2:])
      rows = np.concatenate([rows_a, rows_b], axis=1)
      out[k] = (
        rows.reshape(-1, a.shape[-1])
        if k.endswith("pixel_values")
        else rows.reshape(-1, *a.shape[1:])
      )
    return out


def make_sft_dataset(
  source,
  proc: Processors,
  *,
  batch_size: int,
  max_len: int,
  seed: int = 0,
  shard_index: int = 0,
  shard_count: int = 1,
  num_epochs: int | None = None,
  on_bad_record: str | None = None,
  on_overlong: str | None = None,
  skips: SkipCounter | None = None,
  worker_count: int = 0,
  length_buckets=(),
) -> grain.IterDataset:
  """SFT batches (see module doc). num_epochs=None repeats forever. `length_buckets` (see
  `parse_length_buckets`): each batch is cut to the smallest bucket that holds its rows."""
  policy = _policy(on_bad_record, on_overlong)
  buckets = parse_length_buckets(length_buckets, max_len)
  skips = SkipCounter() if skips is None else skips
  ds = _indices(
    len(source),
    seed=seed,
    shard_index=shard_index,
    shard_count=shard_count,
    num_epochs=num_epochs,
    shuffle=True,
  )
  fn = (
    _swift_sft_example if gives_pairs(source) else _sft_example
  )  # pair records: SFT on the chosen side
  ds = ds.map(
    _Guard(functools.partial(fn, source=source, proc=proc, max_len=max_len), policy, skips)
  )
  return _finish(_batched(ds, batch_size), worker_count, buckets, ("",))


def make_cpo_dataset(
  source,
  proc: Processors,
  *,
  batch_size: int,
  max_len: int,
  seed: int = 0,
  thinking_fraction: float = 0.5,
  perception_mode: str = "hard",
  graph: ConceptGraph | None = None,
  pair_index: pairs_lib.PairIndex | None = None,
  shard_index: int = 0,
  shard_count: int = 1,
  num_epochs: int | None = None,
  on_bad_record: str | None = None,
  on_overlong: str | None = None,
  skips: SkipCounter | None = None,
  worker_count: int = 0,
  length_buckets=(),
  pair_layout: tuple[int, int] | None = None,
) -> grain.IterDataset:
  """CPO++ pair batches (see module doc). Each pair is thinking with prob thinking_fraction
  (seeded per position), else perception with `perception_mode` in hard | far | random |
  counterfactual (the last re-renders the chosen scene: synthetic sources only). With
  `pair_layout` (t, g) (`pair_layout_for`) every batch holds exactly that share, in groups.
  `length_buckets` as in `make_sft_dataset`, over both sides of the pairs."""
  policy = _policy(on_bad_record, on_overlong)
  buckets = parse_length_buckets(length_buckets, max_len)
  if not 0.0 <= thinking_fraction <= 1.0:
    raise ValueError(f"thinking_fraction {thinking_fraction} not in [0, 1]")
  if perception_mode not in pairs_lib.PERCEPTION_MODES:
    raise ValueError(
      f"perception_mode {perception_mode!r}; expected one of {pairs_lib.PERCEPTION_MODES}"
    )
  skips = SkipCounter() if skips is None else skips
  if perception_mode == "counterfactual" and not hasattr(source, "counterfactual"):
    raise ValueError(
      f"perception_mode='counterfactual' re-renders the chosen scene with one concept changed; "
      f"dataset {source!r} cannot re-render its images (only synth_drive and synth_cxr can); "
      f"use perception_mode in {pairs_lib.INDEX_MODES}"
    )
  if gives_pairs(source):  # pairs given by the records (swift_jsonl): no rewriter, no image index
    ds = _indices(
      len(source),
      seed=seed,
      shard_index=shard_index,
      shard_count=shard_count,
      num_epochs=num_epochs,
      shuffle=True,
    )
    ds = ds.map(
      _Guard(
        functools.partial(_swift_cpo_example, source=source, proc=proc, max_len=max_len),
        policy,
        skips,
      )
    )
    return _finish(_batched(ds, batch_size), worker_count, buckets, _PAIR_SIDES)
  graph = graph or load_graph(getattr(source, "domain", "driving"))
  if perception_mode != "counterfactual":  # counterfactual negatives need no index over the split
    pair_index = pair_index or pairs_lib.PairIndex.from_source(source)

  def pairs(fraction, stream):
    ds = _indices(
      len(source),
      seed=seed + stream,
      shard_index=shard_index,
      shard_count=shard_count,
      num_epochs=num_epochs,
      shuffle=True,
    )
    return ds.random_map(
      _Guard(
        functools.partial(
          _cpo_example,
          source=source,
          proc=proc,
          graph=graph,
          index=pair_index,
          max_len=max_len,
          thinking_fraction=fraction,
          perception_mode=perception_mode,
        ),
        policy,
        skips,
      ),
      seed=seed + 1 + stream,
    )

  if pair_layout is not None and tuple(pair_layout) != pair_layout_for(
    thinking_fraction, batch_size
  ):
    raise ValueError(
      f"pair_layout {pair_layout} does not match thinking_fraction {thinking_fraction} and "
      f"batch size {batch_size}; expected {pair_layout_for(thinking_fraction, batch_size)}"
    )
  t, g = pair_layout or (0, 1)
  if t in (0, g):  # mixed, or one kind only: nothing to interleave
    return _finish(
      _batched(pairs(thinking_fraction, 0), batch_size), worker_count, buckets, _PAIR_SIDES
    )
  # Two streams, each over the whole (shuffled) split: thinking pairs and perception pairs,
  # batched by their share of the batch and interleaved group by group.
  groups = batch_size // g
  zipped = grain.experimental.ZipIterDataset(
    parents=[
      _batched(pairs(1.0, 0), groups * t),
      _batched(pairs(0.0, _PERCEPTION_STREAM), groups * (g - t)),
    ]
  )
  return _finish(zipped.map(_InterleaveGroups(t, g)), worker_count, buckets, _PAIR_SIDES)


def make_sft_iterator(source, proc: Processors, **kw) -> grain.DatasetIterator:
  """Iterator over SFT batches; `.get_state()` / `.set_state()` for checkpoint + resume."""
  return iter(make_sft_dataset(source, proc, **kw))


def make_cpo_iterator(source, proc: Processors, **kw) -> grain.DatasetIterator:
  """Iterator over CPO batches; `.get_state()` / `.set_state()` for checkpoint + resume."""
  return iter(make_cpo_dataset(source, proc, **kw))


def _eval_row_from_pair(rec, proc: Processors, graph: ConceptGraph, max_prompt_len: int):
  """Ingested pairs evaluate on the chosen side: the gold decision is the record's own where it
  carries one (mimic_ccf's labels, codalm's parsed suggestion), else read from the chosen text
  with the graph (swift_jsonl); -1 where there is none. Concepts are read from the text."""
  from cpo_jax.knowledge import free_text

  pv, grid = proc.image_inputs(rec["image"])
  prompt = proc.prompt_ids_from_json(
    json.dumps(rec["prompt_messages"]), proc.num_image_tokens(grid)
  )
  ids, attn = pack_left(prompt, max_prompt_len, proc.ids["pad_token_id"], rec["record_id"])
  if "decision" in rec:
    decision = int(rec["decision"])
  else:
    d = graph.parse_decision(rec["chosen"])
    decision = -1 if d is None else graph.decision_id(d)
  a, _ = free_text.parse_report(graph, rec["chosen"])
  S = proc.image_size or 0
  return {
    "input_ids": ids,
    "attention_mask": attn,
    "pixel_values": pv,
    "image_grid_thw": grid,
    "decision": np.int32(decision),
    "concepts": np.asarray(graph.value_ids(a), np.int32),
    "nuisance": np.int32(-1),
    "boxes": np.array([[0, 0, S, S]], np.int32),
  }


def make_eval_batches(
  source,
  proc: Processors,
  *,
  batch_size: int,
  max_prompt_len: int,
  max_examples: int | None = None,
  shard_index: int = 0,
  shard_count: int = 1,
  graph: ConceptGraph | None = None,
) -> Iterator[dict[str, np.ndarray]]:
  """Left-padded prompts in source order (+ gold labels); the last batch is filled to the
  static size by repeating its first row with valid=False. `graph` (default: the source's
  domain, medical for ingested pairs) is only used to read labels from ingested pairs."""
  if gives_pairs(source):
    graph = graph or load_graph("medical")
  n = len(source) if max_examples is None else min(max_examples, len(source))
  positions = list(range(n))[shard_index::shard_count]
  pad = proc.ids["pad_token_id"]
  for s in range(0, len(positions), batch_size):
    chunk = positions[s : s + batch_size]
    rows = []
    for i in chunk:
      rec = source[i]
      if gives_pairs(source):
        rows.append(
          dict(
            _eval_row_from_pair(rec, proc, graph, max_prompt_len),
            index=np.int32(i),
            valid=np.bool_(True),
          )
        )
        continue
      pv, grid = proc.image_inputs(rec["image"])
      prompt = proc.prompt_ids(pairs_lib.as_text(rec["question"]), proc.num_image_tokens(grid))
      ids, attn = pack_left(prompt, max_prompt_len, pad, f"{source!r}[{i}]")
      rows.append(
        {
          "input_ids": ids,
          "attention_mask": attn,
          "pixel_values": pv,
          "image_grid_thw": grid,
          "decision": np.int32(rec["decision"]),
          "concepts": np.asarray(rec["concepts"], np.int32),
          "nuisance": np.int32(rec["nuisance"]),
          "boxes": proc.boxes_for(rec["boxes"], rec["image"]),
          "index": np.int32(i),
          "valid": np.bool_(True),
        }
      )
    while len(rows) < batch_size:
      rows.append(dict(rows[0], valid=np.bool_(False)))
    yield _stack(rows)


# ---- drift probe ---------------------------------------------------------------------


def decision_token_ids(proc: Processors, graph: ConceptGraph) -> np.ndarray:
  """[num_decisions] id of each decision's first answer token (' stop', ' slow', ...), in
  graph.decisions order: the next-token distribution over these after the answer prefix is the
  outcome distribution (for AUC and the drift probe)."""
  ids = [
    proc.tokenizer(" " + graph.decision_texts[d], add_special_tokens=False)["input_ids"][0]
    for d in graph.decisions
  ]
  if len(set(ids)) != len(ids):
    raise ValueError(f"decisions share a first token: {dict(zip(graph.decisions, ids))}")
  return np.asarray(ids, np.int32)


def make_probe_batches(
  source,
  proc: Processors,
  *,
  kind: str,
  batch_size: int,
  max_len: int,
  max_examples: int | None = None,
  seed: int = 0,
  graph: ConceptGraph | None = None,
) -> Iterator[dict[str, np.ndarray]]:
  """Teacher-forced drift-probe inputs: prompt + chain (kind 'none' = the gold chain,
  'synonym' / 'contradict' = one concept sentence edited, see knowledge/drift.py) + the answer
  prefix, LEFT padded to max_len, so logits[:, -1] over decision_token_ids is the outcome
  distribution. Same example order for every kind (pair them by row).
  Keys: input_ids, attention_mask [B,max_len], pixel_values, image_grid_thw, decision (gold),
  expected_decision (the rule's decision for the edited chain), index, valid."""
  from cpo_jax.knowledge import drift

  graph = graph or load_graph(getattr(source, "domain", "driving"))
  prefix = drift.answer_prefix(graph)
  n = len(source) if max_examples is None else min(max_examples, len(source))
  pad = proc.ids["pad_token_id"]
  for s in range(0, n, batch_size):
    rows = []
    for i in range(s, min(n, s + batch_size)):
      rec = source[i]
      a = graph.assignment_from_ids(rec["concepts"])
      if kind == "none":
        chain, expected = pairs_lib.as_text(rec["chain"]), graph.decisions[int(rec["decision"])]
      else:
        e = drift.edit_chain(graph, a, kind, np.random.default_rng([seed, i]))
        chain, expected = e.chain, e.expected_decision
      pv, grid = proc.image_inputs(rec["image"])
      prompt = proc.prompt_ids(pairs_lib.as_text(rec["question"]), proc.num_image_tokens(grid))
      body = tuple(proc.tokenizer(f"{chain} {prefix}", add_special_tokens=False)["input_ids"])
      ids, attn = pack_left(prompt + body, max_len, pad, f"{source!r}[{i}] ({kind} probe)")
      rows.append(
        {
          "input_ids": ids,
          "attention_mask": attn,
          "pixel_values": pv,
          "image_grid_thw": grid,
          "decision": np.int32(rec["decision"]),
          "expected_decision": np.int32(graph.decision_id(expected)),
          "index": np.int32(i),
          "valid": np.bool_(True),
        }
      )
    while len(rows) < batch_size:
      rows.append(dict(rows[0], valid=np.bool_(False)))
    yield _stack(rows)
