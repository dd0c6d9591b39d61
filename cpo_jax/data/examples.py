"""Per-example transforms: one record -> one SFT row or one CPO++ pair row (numpy).

Records are read and checked here (missing field, empty chain, unreadable image, another patch
grid); a problem raises `BadRecordError` naming the record, which the dataset's bad-record
policy turns into an error or a counted skip. Pair-level sources (swift_jsonl, mimic_ccf,
codalm) give their pairs; the synthetic sources' pairs are made by `pairs.make_pair`.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np

from cpo_jax.data import pairs as pairs_lib
from cpo_jax.data.bad_records import BadRecordError
from cpo_jax.data.bad_records import LeftOut
from cpo_jax.data.bad_records import OverlongError
from cpo_jax.data.packing import pack_right
from cpo_jax.data.processors import Processors
from cpo_jax.knowledge.graph import ConceptGraph


def read_record(source, i: int) -> dict[str, Any]:
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


def checked_image(proc: Processors, image, rid: str, want_grid=None):
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


def sft_example(i: int, *, source, proc: Processors, max_len: int):
  rec = read_record(source, i)
  rid = f"{source!r}[{i}]"
  pv, grid = checked_image(proc, rec["image"], rid)
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


def cpo_example(
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
  thinking_negative: str = "counterfactual",
  thinking=None,
):
  rec = read_record(source, i)
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
    thinking_negative=thinking_negative,
    thinking=thinking,
  )
  c_pv, grid = checked_image(proc, pair["chosen_image"], rid)
  if pair["source"] == pairs_lib.SOURCE_IDS["thinking"]:
    r_pv = c_pv
  else:
    r_pv = checked_image(
      proc,
      pair["rejected_image"],
      f"{source!r}[{pair['rejected_index']}] (rejected image for {i})",
      want_grid=grid,
    )[0]
  prompt = proc.prompt_ids(pair["question"], proc.num_image_tokens(grid))
  answer_start = lambda side: np.int32(len(prompt) + proc.chain_length(pair[side]))
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
    "chosen_answer_start": answer_start("chosen_completion"),
    "rejected_answer_start": answer_start("rejected_completion"),
    "boxes": proc.boxes_for(pair["boxes"], pair["chosen_image"]),
    "chosen_decision": np.int32(pair["chosen_decision"]),
    "rejected_decision": np.int32(pair["rejected_decision"]),
    "index": np.int32(i),
    "flipped_concept": np.int32(pair["flipped_concept"]),
    "image_digest": image_digest(pair["chosen_image"], pair["rejected_image"]),
  }


def _swift_side(proc: Processors, rec, prefix: str, max_len: int, want_grid=None):
  pv, grid = checked_image(proc, rec[f"{prefix}image"], rec["record_id"], want_grid)
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
  return packed, pv, grid, len(prompt), np.int32(len(prompt) + proc.chain_length(text))


def swift_cpo_example(
  i: int, *, source, proc: Processors, max_len: int, max_prompt_len: int | None = None
):
  """A given pair's row. `max_prompt_len` (the grouped stream's thinking pairs; 0 = no bound):
  the record must be a thinking pair whose sides share the image and the prompt, of at most
  that many tokens, so the step can run its prompt once (train/shared_prefix.py)."""
  rec = source[i]  # raises BadRecordError itself
  if rec["sample_weight"] == 0:
    # Nothing to prefer (rejected == chosen, codalm's 'other' rows): costs two forwards and
    # would inflate the other rows' batch-normalised weights. Still an SFT / eval example.
    raise LeftOut("no_preference", rec["record_id"])
  (c, c_pv, grid, c_len, c_answer) = _swift_side(proc, rec, "", max_len)
  (r, r_pv, _, r_len, r_answer) = _swift_side(proc, rec, "rejected_", max_len, want_grid=grid)
  if max_prompt_len is not None:
    _check_shared_prefix(rec, c[0][:c_len], r[0][:r_len], c_pv, r_pv, max_prompt_len)
  S = proc.image_size
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
    "chosen_answer_start": c_answer,
    "rejected_answer_start": r_answer,
    "boxes": np.array([[0, 0, S, S]], np.int32),  # no evidence boxes known: the whole image
    "chosen_decision": np.int32(-1),
    "rejected_decision": np.int32(-1),
    "index": np.int32(i),
    "flipped_concept": np.int32(-1),
    "image_digest": image_digest(rec["image"], rec["rejected_image"]),
  }


def _check_shared_prefix(rec, chosen_prompt, rejected_prompt, chosen_pv, rejected_pv, bound):
  rid, fix = rec["record_id"], "fix the record, or set data.pair_layout='mixed'"
  if rec["source"] != pairs_lib.SOURCE_IDS["thinking"]:
    raise BadRecordError("bad_type", rid, "in the thinking pairs' stream but not a thinking pair")
  if not np.array_equal(chosen_pv, rejected_pv):
    raise BadRecordError(
      "unshared_thinking",
      rid,
      f"cpo_source 'thinking' but the rejected image differs from the chosen one (a thinking "
      f"pair shares its image and prompt; only the completion is counterfactual); {fix}",
    )
  if not np.array_equal(chosen_prompt, rejected_prompt):
    raise BadRecordError(
      "unshared_thinking",
      rid,
      f"cpo_source 'thinking' but the prompt turns of 'rejected_messages' differ from those of "
      f"'messages' (a thinking pair shares its image and prompt); {fix}",
    )
  if bound and len(chosen_prompt) > bound:
    raise OverlongError(
      rid,
      f"prompt of {len(chosen_prompt)} tokens (image tokens included) > data.max_prompt_len "
      f"{bound}, the thinking pairs' shared prefix; raise it (0 = the row length), never cut",
    )


def swift_sft_example(i: int, *, source, proc: Processors, max_len: int):
  rec = source[i]
  (c, pv, grid, c_len, _) = _swift_side(proc, rec, "", max_len)
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


def image_digest(*images) -> np.uint64:
  """64-bit digest of a pair's source images (encoded bytes, or the array): computed once per
  row in the pipeline, so the precomputed reference's batch fingerprint need not hash pixels
  on the training loop's path."""
  h = hashlib.blake2b(digest_size=8)
  for image in images:
    if isinstance(image, (bytes, np.bytes_)):
      h.update(image)
    else:
      arr = np.ascontiguousarray(image)
      h.update(str(arr.shape).encode())
      h.update(arr.tobytes())
  return np.uint64(int.from_bytes(h.digest(), "little"))


def gives_pairs(source) -> bool:
  """True when the records are pairs already (swift_jsonl, mimic_ccf, codalm): no pair making."""
  return getattr(source, "kind", None) == "pairs"
