"""`swift_jsonl`: preference records in the CPO authors' ms-swift format (METHOD.md section 4).

One JSON object per line:
  messages: [{role, content}], the last one the chosen assistant turn; '<image>' in a user
    turn marks where the image goes (prepended when there is no tag),
  images: [path | {"path": p} | {"bytes": ...}] (paths relative to the jsonl's directory),
  rejected_messages (or ms-swift's rejected_response: str), rejected_images (default: images),
  cpo_source: thinking | perception | other (aliases reasoning/text, vision/visual/image;
    inferred from what differs when absent), cpo_sample_weight (default 1.0).
Random access by line through a byte-offset index, so Grain can shuffle and shard it.
Problems raise BadRecordError naming the file, the line and the field. `pair_sources()` lists
every record's cpo_source without reading images (the grouped CPO++ stream splits by it).
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from cpo_jax.data.bad_records import BadRecordError
from cpo_jax.data.pairs import SOURCE_IDS

SOURCE_ALIASES = {
  "thinking": "thinking",
  "reasoning": "thinking",
  "text": "thinking",
  "perception": "perception",
  "vision": "perception",
  "visual": "perception",
  "image": "perception",
  "other": "other",
}
IMAGE_TAG = "<image>"
# `pair_sources()` codes beside the SOURCE_IDS (shared by every pair-level source).
NO_PREFERENCE = -1  # cpo_sample_weight 0: an SFT / eval example, not a CPO++ pair
UNREADABLE = -2  # a record that raises BadRecordError when read (the bad-record policy's)


class SwiftJsonlSource:
  """Random-access source of normalised pair records from one .jsonl file."""

  kind = (
    "pairs"  # pair-level records: the pipeline takes pairs as given (no rewriter, no label index)
  )
  domain = None

  def __init__(self, path: str, root: str | None = None):
    if not os.path.exists(path):
      raise FileNotFoundError(
        f"swift_jsonl: {path} does not exist (expected <manual_dir>/<split>.jsonl)"
      )
    self.path, self.root = path, root or os.path.dirname(os.path.abspath(path))
    self._offsets, self._sources = [], None
    with open(path, "rb") as f:
      pos = 0
      for line in f:
        if line.strip():
          self._offsets.append(pos)
        pos += len(line)

  def __len__(self) -> int:
    return len(self._offsets)

  def __repr__(self):
    return f"swift_jsonl({os.path.basename(self.path)})"

  def _raw(self, i: int) -> bytes:
    with open(self.path, "rb") as f:
      f.seek(self._offsets[i])
      return f.readline()

  def __getitem__(self, i: int) -> dict[str, Any]:
    if not 0 <= i < len(self):
      raise IndexError(i)
    rid = f"{self.path}:{i + 1}"  # 1-based line among non-empty lines
    rec = _pair_of(_parse(self._raw(i), rid), rid)
    images = rec.pop("image_refs")
    rec.update(
      image=self._load(images[0], rid),
      rejected_image=self._load(images[1], rid),
      index=i,
      record_id=rid,
    )
    return rec

  def pair_sources(self):
    """[N] int8: each record's SOURCE_IDS value, NO_PREFERENCE (weight 0) or UNREADABLE, from
    its JSON alone (one pass over the file, kept)."""
    if self._sources is None:
      out = np.empty(len(self), np.int8)
      with open(self.path, "rb") as f:
        lines = (line for line in f if line.strip())
        for i, line in enumerate(lines):
          try:
            rec = _pair_of(_parse(line, i), i)
          except BadRecordError:
            out[i] = UNREADABLE
            continue
          out[i] = rec["source"] if rec["sample_weight"] > 0 else NO_PREFERENCE
      self._sources = out
    return self._sources

  def _load(self, ref, rid) -> bytes:
    if isinstance(ref, bytes):
      return ref
    path = ref if os.path.isabs(ref) else os.path.join(self.root, ref)
    try:
      with open(path, "rb") as f:
        return f.read()
    except OSError as e:
      raise BadRecordError("bad_image", rid, f"cannot read image {path}: {e.strerror}") from e


def _parse(line: bytes, rid) -> dict:
  try:
    raw = json.loads(line)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise BadRecordError("bad_json", rid, f"not valid JSON: {e}") from e
  if not isinstance(raw, dict):
    raise BadRecordError(
      "bad_type", rid, f"a record must be a JSON object, got {type(raw).__name__}"
    )
  return raw


def _pair_of(raw: dict, rid) -> dict[str, Any]:
  """The normalised record without its images (`image_refs`: chosen and rejected reference)."""
  msgs = _messages(raw, "messages", rid)
  if "rejected_messages" in raw:
    rmsgs = _messages(raw, "rejected_messages", rid)
  elif "rejected_response" in raw:
    if not isinstance(raw["rejected_response"], str):
      raise BadRecordError("bad_type", rid, "field 'rejected_response' must be a string")
    rmsgs = msgs[:-1] + [{"role": "assistant", "content": raw["rejected_response"]}]
  else:
    raise BadRecordError("missing_field", rid, "needs 'rejected_messages' or 'rejected_response'")
  images = _images(raw.get("images", []), "images", rid)
  rimages = (
    _images(raw["rejected_images"], "rejected_images", rid) if "rejected_images" in raw else images
  )
  if len(images) != 1 or len(rimages) != 1:
    raise BadRecordError(
      "bad_images",
      rid,
      f"exactly one image per side is supported, got {len(images)}/{len(rimages)}",
    )
  src = raw.get("cpo_source")
  if src is None:
    src = "perception" if rimages != images else ("thinking" if rmsgs != msgs else "other")
  if not isinstance(src, str) or src.lower() not in SOURCE_ALIASES:
    raise BadRecordError("bad_type", rid, f"cpo_source {src!r} not one of {sorted(SOURCE_ALIASES)}")
  w = raw.get("cpo_sample_weight", 1.0)
  if isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0:
    raise BadRecordError("bad_type", rid, f"cpo_sample_weight {w!r} must be a number >= 0")
  return {
    "prompt_messages": msgs[:-1],
    "chosen": msgs[-1]["content"],
    "rejected_prompt_messages": rmsgs[:-1],
    "rejected": rmsgs[-1]["content"],
    "image_refs": (images[0], rimages[0]),
    "source": SOURCE_IDS[SOURCE_ALIASES[src.lower()]],
    "sample_weight": float(w),
  }


def _messages(raw, field, rid) -> list[dict[str, str]]:
  msgs = raw.get(field)
  if msgs is None:
    raise BadRecordError("missing_field", rid, f"missing field {field!r}")
  if (
    not isinstance(msgs, list)
    or not msgs
    or not all(
      isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
      for m in msgs
    )
  ):
    raise BadRecordError(
      "bad_type", rid, f"field {field!r} must be a non-empty list of {{role: str, content: str}}"
    )
  if msgs[-1]["role"] != "assistant":
    raise BadRecordError("bad_type", rid, f"the last of {field!r} must be the assistant turn")
  if not msgs[-1]["content"].strip():
    raise BadRecordError("empty_chain", rid, f"empty assistant turn in {field!r}")
  return [{"role": m["role"], "content": m["content"]} for m in msgs]


def _images(refs, field, rid) -> list:
  if isinstance(refs, (str, dict)):
    refs = [refs]
  if not isinstance(refs, list):
    raise BadRecordError("bad_type", rid, f"field {field!r} must be a list of paths")
  out = []
  for r in refs:
    if isinstance(r, dict):
      r = r.get("path", r.get("bytes"))
    if not isinstance(r, (str, bytes)):
      raise BadRecordError("bad_type", rid, f"field {field!r}: image reference {r!r} is not a path")
    out.append(r)
  return out


def to_chat(messages: list[dict[str, str]]) -> list[dict[str, Any]]:
  """ms-swift string content with '<image>' tags -> chat-template content lists (one image)."""
  out, placed = [], False
  for m in messages:
    if m["role"] == "user" and not placed:
      parts = m["content"].split(IMAGE_TAG)
      content = []
      if len(parts) == 1:  # no tag: the image goes first
        parts = ["", parts[0]]
      for k, p in enumerate(parts):
        if k > 0 and not placed:
          content.append({"type": "image"})
          placed = True
        if p:
          content.append({"type": "text", "text": p})
      out.append({"role": m["role"], "content": content})
    else:
      out.append({"role": m["role"], "content": m["content"].replace(IMAGE_TAG, "")})
  return out
