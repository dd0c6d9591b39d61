"""The run's tokenizer and image processor: images -> patches, texts -> chat-templated ids.

min_pixels == max_pixels keeps every image at one patch grid, so batches have static shapes;
images of any size and aspect ratio are resized to that square first (and their evidence boxes
with them), as the paper's runs resized to 512 x 512. The square's side is a multiple of 28
(14 px patches merged 2 x 2), rounded like Qwen2.5-VL's own `smart_resize`: 512 -> 504.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import tempfile
from typing import Any

from absl import logging
import numpy as np
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from cpo_jax import paths
from cpo_jax.data import tokenizer as tok_lib
from cpo_jax.knowledge.graph import THINK_CLOSE

TOKENIZER_FILE = "tokenizer.json"  # written last: a directory holding it is complete
PATCH_MULTIPLE = 28  # patch 14 x merge 2: the grid is whole merge windows.


def static_image_side(image_size: int) -> int:
  """The square side a configured `data.image_size` becomes: the nearest multiple of 28 (the
  rounding of Qwen2.5-VL's smart_resize), at least 28."""
  return max(PATCH_MULTIPLE, round(int(image_size) / PATCH_MULTIPLE) * PATCH_MULTIPLE)


@dataclasses.dataclass
class Processors:
  tokenizer: Any
  image_processor: Any
  ids: dict[str, int]

  image_size: int  # square side every image is resized to (min_pixels == max_pixels)

  def image_inputs(self, image) -> tuple[np.ndarray, np.ndarray]:
    """PNG/JPEG bytes / PIL / uint8 array -> (pixel_values [P,1176] float32, grid_thw [3] int32)."""
    if isinstance(image, (bytes, np.bytes_)):
      image = Image.open(io.BytesIO(image))
    pil = image if isinstance(image, Image.Image) else None
    arr = np.asarray(image)
    if arr.shape != (self.image_size, self.image_size, 3) or arr.dtype != np.uint8:
      # Other sizes/aspects (and grey or RGBA images) become the RGB square first: one patch
      # grid for every batch (static shapes). A native aspect ratio would need grid buckets.
      pil = (pil or Image.fromarray(arr)).convert("RGB")
      arr = np.asarray(pil.resize((self.image_size, self.image_size), Image.BICUBIC))
    # At the target size the processor's resize is the identity, so only rescale + normalize +
    # HF's own patchify remain (~10x faster than calling it; equal to it, tested).
    ip = self.image_processor
    x = arr.transpose(2, 0, 1).astype(np.float64) * ip.rescale_factor
    x = (x.astype(np.float32) - np.asarray(ip.image_mean, np.float32)[:, None, None]) / np.asarray(
      ip.image_std, np.float32
    )[:, None, None]
    pv, gh, gw = ip.patchify(
      x,
      patch_size=ip.patch_size,
      merge_size=ip.merge_size,
      temporal_patch_size=ip.temporal_patch_size,
    )
    return np.ascontiguousarray(pv, np.float32), np.array([1, gh, gw], np.int32)

  def boxes_for(self, boxes, image) -> np.ndarray:
    """Evidence boxes [C, 4] (x0, y0, x1, y1) given in the source image's pixels -> pixels of
    the processed image (`image_inputs` resizes other sizes to image_size x image_size)."""
    boxes = np.asarray(boxes, np.int32)
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

  @property
  def static_grid(self) -> np.ndarray:
    """[3] (t, h, w) patches of every processed image."""
    side = self.image_size // self.image_processor.patch_size
    return np.array([1, side, side], np.int32)

  def num_image_tokens(self, grid_thw) -> int:
    m = self.image_processor.merge_size
    return int(np.prod(grid_thw)) // (m * m)

  @functools.lru_cache(maxsize=64)  # noqa: B019 (one Processors per run)
  def prompt_ids(self, question: str, num_image_tokens: int) -> tuple[int, ...]:
    """Chat-templated user turn with one image (pad token expanded) + assistant header."""
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    text = text.replace(tok_lib.IMAGE_PAD, tok_lib.IMAGE_PAD * num_image_tokens)
    return tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"])

  @functools.lru_cache(maxsize=1024)  # noqa: B019 (one Processors per run)
  def prompt_ids_from_json(self, messages_json: str, num_image_tokens: int) -> tuple[int, ...]:
    """Prompt for ms-swift style messages (JSON string: hashable for the cache), all turns
    but the last assistant one, + the assistant header."""
    from cpo_jax.data.swift_jsonl import to_chat

    msgs = to_chat(json.loads(messages_json))
    text = self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    text = text.replace(tok_lib.IMAGE_PAD, tok_lib.IMAGE_PAD * num_image_tokens)
    return tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"])

  @functools.lru_cache(maxsize=4096)  # noqa: B019 (one Processors per run)
  def completion_ids(self, completion: str) -> tuple[int, ...]:
    """Completion tokens + the closing <|im_end|> (the model must learn to stop)."""
    ids = self.tokenizer(completion, add_special_tokens=False)["input_ids"]
    return tuple(ids) + (self.ids["eos_token_id"],)

  @functools.lru_cache(maxsize=4096)  # noqa: B019 (one Processors per run)
  def chain_length(self, completion: str) -> int:
    """Tokens of `completion_ids(completion)` through its first '</think>' (all of them when
    it has none): the chain, apart from the answer for cpo.answer_weight, read from the token
    offsets, so it holds for any tokenizer's merges."""
    end = completion.find(THINK_CLOSE)
    if end < 0:
      return len(self.completion_ids(completion))
    end += len(THINK_CLOSE)
    offsets = self.tokenizer(completion, add_special_tokens=False, return_offsets_mapping=True)
    return sum(1 for start, _ in offsets["offset_mapping"] if start < end)

  def __hash__(self):  # for lru_cache on methods: one Processors per run
    return id(self)


def make_processors(
  tokenizer_dir: str | None = None, image_size: int = 112, extra_texts=None
) -> Processors:
  """(tokenizer, image processor) bundle. Builds + saves the synthetic tokenizer when
  `tokenizer_dir` is None or has no tokenizer yet; loads it (or a HF Qwen2.5-VL dir) otherwise.
  min_pixels = max_pixels = side**2 keeps every image at the same patch grid, side =
  `static_image_side(image_size)` (a note is logged when that differs from image_size).
  `extra_texts`: a callable giving more texts whose words a newly built tokenizer covers."""
  if tokenizer_dir and (paths.path(tokenizer_dir) / TOKENIZER_FILE).exists():
    with paths.local_directory(tokenizer_dir, read=paths.small_files) as local:
      tok = tok_lib.load_tokenizer(local)
  else:
    tok = tok_lib.build_tokenizer(extra_texts() if extra_texts else ())
    if tokenizer_dir:
      # tokenizer.json last: another process (every host makes its processors) that finds it
      # in the check above finds the rest too; seen: a host read the directory half-written,
      # without its pad token, on a two-process gs:// run.
      with tempfile.TemporaryDirectory(prefix="cpo_jax_tokenizer_") as local:
        tok_lib.save_tokenizer(tok, local)
        paths.upload_tree(local, tokenizer_dir, last=(TOKENIZER_FILE,))
  side = static_image_side(image_size)
  if side != image_size:
    logging.warning(
      'data.image_size=%d is not a multiple of %d (14 px patches merged 2 x 2): images are '
      'resized to %d x %d, as Qwen2.5-VL itself would.',
      image_size,
      PATCH_MULTIPLE,
      side,
      side,
    )
  ip = Qwen2VLImageProcessorPil(min_pixels=side * side, max_pixels=side * side)
  return Processors(tok, ip, tok_lib.special_ids(tok), side)
