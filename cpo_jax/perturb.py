"""Perturbation masks for counterfactual pairs and interference curves (METHOD.md section 4).

Perception masks act directly on Qwen2.5-VL's model input, i.e. on what transformers'
`Qwen2VLImageProcessor(Pil)` returns, so they run on device inside the jitted step with no host round trip:

* `pixel_values` [N * t*h*w, C * temporal_patch * patch * patch]: for each image, rows are patches in
  merge-window order (t, h/m, w/m, m, m) and each row is (C, temporal_patch, patch, patch); a still image is
  repeated over the temporal_patch frames.
* `image_grid_thw` [N, 3]: (t, h, w) in patches. Here `grid` is ONE (t, h, w) Python tuple shared by all N
  images of the batch (the data pipeline gives every image the same size); it is static under jit, so each
  function compiles once per (grid, layout, N) and severity / rng / boxes are traced.
* The processor normalises pixels: v = (x/255 - mean_c) / std_c. Everything that writes a colour (occlusion,
  masking) writes the NORMALISED value of the fill colour (`PatchLayout.normalized_fill`), computed in float32
  the way the processor computes it, so occluding in patch space equals occluding pixels before processing.
  `fill=None` writes 0.0 = the processor's mean colour.

Boxes are (x0, y0, x1, y1) in pixels of the PROCESSED image (width = w*patch, height = h*patch), half-open:
pixel (x, y) is covered iff x0 <= x + 0.5 < x1 and y0 <= y + 0.5 < y1 (for integer boxes: x0 <= x < x1).
A box with x1 <= x0 or y1 <= y0 is padding and covers nothing. Shapes: [N, K, 4] (or [K, 4] for all images).
Boxes are in pixels of the processed image (the pipeline rescales resized images' boxes). Severity is a scalar or [N], in [0, 1].

Every perception mask has the signature (rng, patches, grid, boxes, severity, *, layout, ...) -> patches.
Thinking masks: `concept_span_mask(s)` mark the token spans of concept mentions inside a chain.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class PatchLayout:
  """The processor settings that define the patch layout (hashable: a static jit argument)."""

  patch_size: int = 14
  temporal_patch_size: int = 2
  merge_size: int = 2
  channels: int = 3
  image_mean: tuple = OPENAI_CLIP_MEAN
  image_std: tuple = OPENAI_CLIP_STD
  rescale_factor: float = 1 / 255

  @classmethod
  def from_processor(cls, proc) -> "PatchLayout":
    """From a transformers Qwen2VLImageProcessor(Pil) (or a processor holding one as .image_processor)."""
    proc = getattr(proc, "image_processor", proc)
    mean, std = proc.image_mean, proc.image_std
    return cls(
      patch_size=int(proc.patch_size),
      temporal_patch_size=int(proc.temporal_patch_size),
      merge_size=int(proc.merge_size),
      channels=len(mean),
      image_mean=tuple(float(v) for v in mean),
      image_std=tuple(float(v) for v in std),
      rescale_factor=float(proc.rescale_factor),
    )

  @property
  def patch_dim(self) -> int:
    return self.channels * self.temporal_patch_size * self.patch_size**2

  def normalize(self, rgb) -> np.ndarray:
    """Pixel values 0..255 [..., C] -> normalised float32, the processor's arithmetic (rescale in f64, cast,
    then (v - mean) / std in float32)."""
    v = (np.asarray(rgb, np.float64) * self.rescale_factor).astype(np.float32)
    return (
      (v - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std, np.float32)
    ).astype(np.float32)

  def normalized_fill(self, fill) -> np.ndarray:
    """[C] float32 normalised value of a fill colour (0..255 per channel); None -> zeros (the mean colour)."""
    if fill is None:
      return np.zeros(self.channels, np.float32)
    return self.normalize(np.broadcast_to(np.asarray(fill, np.float64), (self.channels,)))


DEFAULT_LAYOUT = PatchLayout()


# --------------------------------------------------------------------------- layout helpers (static, numpy)


def grid_of(image_grid_thw) -> tuple:
  """The single (t, h, w) of a batch's image_grid_thw [N, 3]; raises if images differ in size."""
  g = np.asarray(image_grid_thw).reshape(-1, 3)
  if not (g == g[0]).all():
    raise ValueError(
      f"perturb needs one grid per batch (static shapes); got {np.unique(g, axis=0).tolist()}"
    )
  return tuple(int(v) for v in g[0])


def _check(patches, grid, layout):
  t, h, w = grid
  m = layout.merge_size
  if h % m or w % m:
    raise ValueError(f"grid {grid} not divisible by merge_size {m}")
  rows = t * h * w
  if patches.ndim != 2 or patches.shape[1] != layout.patch_dim or patches.shape[0] % rows:
    raise ValueError(
      f"patches {patches.shape} do not hold whole images of grid {grid} "
      f"(rows a multiple of {rows}, {layout.patch_dim} features)"
    )
  return patches.shape[0] // rows, rows


@functools.lru_cache(maxsize=64)
def _coords(grid, layout):
  """Pixel origin (y, x) of each row's patch [P] and in-patch offset / channel of each feature [D] (numpy)."""
  t, h, w = grid
  m, p, tp = layout.merge_size, layout.patch_size, layout.temporal_patch_size
  _, bh, bw, mh, mw = np.meshgrid(
    np.arange(t), np.arange(h // m), np.arange(w // m), np.arange(m), np.arange(m), indexing="ij"
  )
  row_y = ((bh * m + mh) * p).reshape(-1)
  row_x = ((bw * m + mw) * p).reshape(-1)
  c, _, py, px = np.meshgrid(
    np.arange(layout.channels), np.arange(tp), np.arange(p), np.arange(p), indexing="ij"
  )
  return row_y, row_x, py.reshape(-1), px.reshape(-1), c.reshape(-1)


def _per_image(x, n):
  """Scalar or [N] -> [N, 1, 1] float32, to broadcast over an image's [P, D]."""
  return jnp.broadcast_to(jnp.asarray(x, jnp.float32), (n,))[:, None, None]


def _box_mask(boxes, grid, layout, n):
  """[N, P, D] bool: which entries of the patches lie inside any box (pixel-centre rule)."""
  row_y, row_x, py, px, _ = _coords(grid, layout)
  y = jnp.asarray(row_y[:, None] + py[None, :], jnp.float32) + 0.5
  x = jnp.asarray(row_x[:, None] + px[None, :], jnp.float32) + 0.5
  boxes = jnp.asarray(boxes, jnp.float32)
  if boxes.ndim == 2:
    boxes = jnp.broadcast_to(boxes, (n,) + boxes.shape)
  inside = jnp.zeros((n,) + y.shape, bool)
  # K is small and static; a loop keeps memory at one [N, P, D] mask.
  for k in range(boxes.shape[1]):
    b = boxes[:, k, :, None, None]
    inside |= (x >= b[:, 0]) & (x < b[:, 2]) & (y >= b[:, 1]) & (y < b[:, 3])
  return inside


def _fill_row(fill, layout):
  """[D] normalised fill value for each feature column (its channel's value)."""
  *_, chan = _coords((1, layout.merge_size, layout.merge_size), layout)
  return jnp.asarray(layout.normalized_fill(fill)[chan])


# --------------------------------------------------------------------------- patchify / unpatchify


@functools.partial(jax.jit, static_argnames=("grid", "layout"))
def unpatchify(patches, grid, layout: PatchLayout = DEFAULT_LAYOUT):
  """[N*t*h*w, D] -> frames [N, t*temporal_patch, C, h*patch, w*patch] (normalised values)."""
  n, _ = _check(patches, grid, layout)
  t, h, w = grid
  m, p, tp, c = layout.merge_size, layout.patch_size, layout.temporal_patch_size, layout.channels
  x = patches.reshape(n, t, h // m, w // m, m, m, c, tp, p, p)
  # -> (n, t, tp, c, h/m, m, p, w/m, m, p)
  x = x.transpose(0, 1, 7, 6, 2, 4, 8, 3, 5, 9)
  return x.reshape(n, t * tp, c, h * p, w * p)


@functools.partial(jax.jit, static_argnames=("layout",))
def patchify(frames, layout: PatchLayout = DEFAULT_LAYOUT):
  """Inverse of `unpatchify`: frames [N, t*temporal_patch, C, H, W] -> ([N*t*h*w, D], grid)."""
  n, ttp, c, hh, ww = frames.shape
  m, p, tp = layout.merge_size, layout.patch_size, layout.temporal_patch_size
  t, h, w = ttp // tp, hh // p, ww // p
  x = frames.reshape(n, t, tp, c, h // m, m, p, w // m, m, p)
  x = x.transpose(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)  # (n, t, h/m, w/m, m, m, c, tp, p, p)
  return x.reshape(n * t * h * w, c * tp * p * p)


# --------------------------------------------------------------------------- perception masks


@functools.partial(jax.jit, static_argnames=("grid", "layout", "fill"))
def occlude_boxes(
  rng, patches, grid, boxes, severity=1.0, *, layout: PatchLayout = DEFAULT_LAYOUT, fill=None
):
  """Occlude the evidence boxes: blend them toward the fill colour by `severity` (1 = fully painted over).

  `rng` is unused (deterministic), kept for the common signature. `fill`: RGB 0..255 tuple or None (mean).
  """
  del rng
  n, rows = _check(patches, grid, layout)
  x = patches.reshape(n, rows, -1)
  inside = _box_mask(boxes, grid, layout, n)
  a = _per_image(severity, n).astype(x.dtype)
  fill_row = _fill_row(fill, layout).astype(x.dtype)
  # where, not a blend everywhere: at severity 1 the result is exactly the fill value (bit-equal to pixels).
  out = jnp.where(inside, jnp.where(a >= 1, fill_row, x + a * (fill_row - x)), x)
  return out.reshape(patches.shape)


@functools.partial(jax.jit, static_argnames=("grid", "layout", "unit", "fill"))
def mask_random_patches(
  rng,
  patches,
  grid,
  boxes=None,
  severity=0.5,
  *,
  layout: PatchLayout = DEFAULT_LAYOUT,
  unit="token",
  fill=None,
):
  """Paint a random `severity` fraction of units with the fill colour (exactly round(severity * units)).

  unit: "token" = one merge window (merge_size**2 consecutive rows = one LLM image token) or "patch" = one row.
  With boxes, the chosen units are painted only inside the boxes.
  """
  n, rows = _check(patches, grid, layout)
  group = layout.merge_size**2 if unit == "token" else 1
  if unit not in ("token", "patch"):
    raise ValueError(f"unit={unit!r}; expected 'token' or 'patch'")
  n_units = rows // group
  k = jnp.round(jnp.clip(_per_image(severity, n)[:, 0, 0], 0.0, 1.0) * n_units)  # [N]
  u = jax.random.uniform(rng, (n, n_units))
  ranks = jnp.argsort(jnp.argsort(u, axis=1), axis=1)  # a uniformly random permutation per image
  chosen = jnp.repeat(ranks < k[:, None], group, axis=1)[:, :, None]  # [N, rows, 1]
  if boxes is not None:
    chosen = chosen & _box_mask(boxes, grid, layout, n)
  x = patches.reshape(n, rows, -1)
  return jnp.where(chosen, _fill_row(fill, layout).astype(x.dtype), x).reshape(patches.shape)


@functools.partial(jax.jit, static_argnames=("grid", "layout"))
def gaussian_noise(
  rng, patches, grid, boxes=None, severity=0.1, *, layout: PatchLayout = DEFAULT_LAYOUT
):
  """Add N(0, severity^2) noise in [0, 1] intensity units, clipped to the valid pixel range.

  Done in normalised space: noise / std_c, clip to [(0 - mean_c)/std_c, (1 - mean_c)/std_c]; the same noise on
  every temporal copy of a pixel, as if the still image had been noised before processing. With boxes: only
  inside them.
  """
  n, rows = _check(patches, grid, layout)
  tp, p, c = layout.temporal_patch_size, layout.patch_size, layout.channels
  x = patches.reshape(n, rows, c, tp, p * p)
  z = jax.random.normal(rng, (n, rows, c, 1, p * p), jnp.float32)  # shared over the temporal copies
  mean = jnp.asarray(layout.image_mean, jnp.float32)[:, None, None]
  std = jnp.asarray(layout.image_std, jnp.float32)[:, None, None]
  sev = jnp.broadcast_to(jnp.asarray(severity, jnp.float32), (n,))[:, None, None, None, None]
  noisy = jnp.clip(x + sev * z / std, (0.0 - mean) / std, (1.0 - mean) / std).astype(x.dtype)
  noisy = noisy.reshape(n, rows, -1)
  x = x.reshape(n, rows, -1)
  if boxes is not None:
    noisy = jnp.where(_box_mask(boxes, grid, layout, n), noisy, x)
  return noisy.reshape(patches.shape)


@functools.partial(jax.jit, static_argnames=("grid", "layout", "max_sigma"))
def gaussian_blur(
  rng,
  patches,
  grid,
  boxes=None,
  severity=0.5,
  *,
  layout: PatchLayout = DEFAULT_LAYOUT,
  max_sigma=4.0,
):
  """Gaussian blur with sigma = severity * max_sigma pixels (separable, edge padding, radius ceil(3*max_sigma)).

  Blur is linear with weights summing to 1 and normalisation is per-channel affine, so blurring normalised
  values equals blurring pixels then normalising (up to the processor's uint8 rounding). `rng` unused. With
  boxes: the blurred image replaces the original only inside them.
  """
  del rng
  n, rows = _check(patches, grid, layout)
  frames = unpatchify(patches, grid, layout).astype(jnp.float32)  # [N, T, C, H, W]
  r = int(math.ceil(3 * max_sigma))
  sigma = jnp.maximum(
    jnp.broadcast_to(jnp.asarray(severity, jnp.float32), (n,)) * max_sigma, 1e-3
  )  # [N]
  offs = jnp.arange(-r, r + 1, dtype=jnp.float32)
  kern = jnp.exp(-0.5 * (offs[None, :] / sigma[:, None]) ** 2)
  kern = kern / kern.sum(axis=1, keepdims=True)  # [N, 2r+1]

  def blur_axis(f, axis):
    length = f.shape[axis]
    pad = [(0, 0)] * f.ndim
    pad[axis] = (r, r)
    fp = jnp.pad(f, pad, mode="edge")
    out = jnp.zeros_like(f)
    for i in range(2 * r + 1):  # static taps; XLA fuses them into one pass
      out = out + kern[:, i, None, None, None, None] * jax.lax.slice_in_dim(
        fp, i, i + length, axis=axis
      )
    return out

  blurred = blur_axis(blur_axis(frames, 3), 4)
  out = patchify(blurred, layout).astype(patches.dtype).reshape(n, rows, -1)
  if boxes is not None:
    out = jnp.where(_box_mask(boxes, grid, layout, n), out, patches.reshape(n, rows, -1))
  return out.reshape(patches.shape)


PERCEPTION_MASKS = {
  "occlude": occlude_boxes,
  "mask_patches": mask_random_patches,
  "noise": gaussian_noise,
  "blur": gaussian_blur,
}


# --------------------------------------------------------------------------- thinking masks


def pad_mentions(mentions: Sequence[Sequence[int]], pad_id: int = -1) -> np.ndarray:
  """Token-id sequences of concept mentions -> [M, K] int32 padded with pad_id (K = longest mention)."""
  k = max((len(m) for m in mentions), default=1)
  out = np.full((max(len(mentions), 1), max(k, 1)), pad_id, np.int32)
  for i, m in enumerate(mentions):
    out[i, : len(m)] = m
  return out


def concept_span_masks(token_ids, mentions, pad_id: int = -1):
  """Per-mention span masks: [..., L] ids, [M, K] padded mentions -> [..., M, L] bool.

  Token t is set for mention i when t lies inside an occurrence of mention i's full id sequence.
  Empty mentions match nothing. Pure jnp (jit-able; K and M static from the shapes).
  """
  ids = jnp.asarray(token_ids)
  ments = jnp.asarray(mentions)
  length, k = ids.shape[-1], ments.shape[-1]
  lens = (ments != pad_id).sum(-1)  # [M]
  # start[..., i, s]: mention i starts at s
  start = jnp.broadcast_to((lens > 0)[:, None], ids.shape[:-1] + (ments.shape[0], length))
  for j in range(k):
    shifted = jnp.pad(ids[..., j:], [(0, 0)] * (ids.ndim - 1) + [(0, j)], constant_values=pad_id)
    tok = ments[:, j][:, None]  # [M, 1]
    ok = (tok == pad_id) | ((shifted[..., None, :] == tok) & (jnp.arange(length) + j < length))
    start = start & ok
  covered = jnp.zeros_like(start)
  for j in range(k):  # spread each start over its mention's length
    moved = jnp.pad(start[..., : length - j], [(0, 0)] * (start.ndim - 1) + [(j, 0)])
    covered = covered | (moved & (j < lens)[:, None])
  return covered


def concept_span_mask(token_ids, mentions, pad_id: int = -1):
  """[..., L] bool: tokens inside any concept mention (see `concept_span_masks`)."""
  return concept_span_masks(token_ids, mentions, pad_id).any(axis=-2)
