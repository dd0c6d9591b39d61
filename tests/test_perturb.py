"""cpo_jax.perturb on the real Qwen2.5-VL input layout (transformers' PIL-backend image processor)."""

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from PIL import ImageDraw
import pytest
from transformers import Qwen2VLImageProcessorPil

from cpo_jax import perturb as T

H, W = 112, 168  # non-square so a swapped h/w in the layout cannot pass; both divisible by 28
PROC = Qwen2VLImageProcessorPil(min_pixels=H * W, max_pixels=H * W)  # min == max: no resize
LAYOUT = T.PatchLayout.from_processor(PROC)
FILL = (128, 64, 200)


def _scene(seed, box, colour=(255, 0, 0)):
  """A noisy background with a small filled rectangle (the 'evidence'), as uint8 HxWx3."""
  rng = np.random.default_rng(seed)
  img = Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8))
  ImageDraw.Draw(img).rectangle(
    [box[0], box[1], box[2] - 1, box[3] - 1], fill=colour
  )  # PIL: inclusive corners
  return np.asarray(img)


def _process(arrays):
  out = PROC(images=[Image.fromarray(a) for a in arrays], return_tensors="np")
  return jnp.asarray(out["pixel_values"]), T.grid_of(out["image_grid_thw"])


def test_layout_roundtrip_matches_processor():
  img = _scene(0, (30, 20, 60, 50))
  patches, grid = _process([img, img[::-1]])
  assert grid == (1, H // 14, W // 14) and patches.shape == (2 * 8 * 12, 1176)
  frames = T.unpatchify(patches, grid, LAYOUT)
  assert frames.shape == (2, 2, 3, H, W)
  ref = LAYOUT.normalize(img).transpose(2, 0, 1)
  np.testing.assert_array_equal(frames[0, 0], ref)  # bit-exact: same arithmetic as the processor
  np.testing.assert_array_equal(frames[0, 1], ref)  # still image: both temporal copies
  np.testing.assert_array_equal(frames[1, 0], LAYOUT.normalize(img[::-1]).transpose(2, 0, 1))
  np.testing.assert_array_equal(T.patchify(frames, LAYOUT), patches)


def test_occlusion_in_patch_space_equals_occluding_pixels():
  # boxes not aligned to patches (14 px) or merge windows (28 px); the second image has a padding box
  boxes = np.array(
    [[[17, 9, 45, 40], [100, 70, 131, 101]], [[3, 50, 90, 61], [0, 0, 0, 0]]], np.float32
  )
  imgs = [_scene(1, (20, 12, 40, 35)), _scene(2, (10, 52, 80, 60), (0, 255, 0))]
  patches, grid = _process(imgs)
  occluded = T.occlude_boxes(
    jax.random.PRNGKey(0), patches, grid, jnp.asarray(boxes), 1.0, layout=LAYOUT, fill=FILL
  )
  painted = []
  for img, bx in zip(imgs, boxes):
    img = img.copy()
    for x0, y0, x1, y1 in bx.astype(int):
      img[y0:y1, x0:x1] = FILL
    painted.append(img)
  expected, _ = _process(painted)
  np.testing.assert_array_equal(occluded, expected)
  assert not np.array_equal(occluded, patches)
  # fill=None writes the processor's mean colour = 0.0 in normalised space
  grey = T.occlude_boxes(None, patches, grid, jnp.asarray(boxes), 1.0, layout=LAYOUT)
  frames = T.unpatchify(grey, grid, LAYOUT)
  assert float(jnp.abs(frames[0, :, :, 9:40, 17:45]).max()) == 0.0
  # severity blends: 0 = unchanged, 0.5 = half way
  np.testing.assert_array_equal(
    T.occlude_boxes(None, patches, grid, jnp.asarray(boxes), 0.0, layout=LAYOUT, fill=FILL), patches
  )
  half = T.occlude_boxes(
    None, patches, grid, jnp.asarray(boxes), jnp.array([0.5, 0.5]), layout=LAYOUT, fill=FILL
  )
  np.testing.assert_allclose(half, (np.asarray(patches) + np.asarray(expected)) / 2, atol=1e-6)


def test_random_patch_mask_fraction_units_and_single_compile():
  img = _scene(3, (30, 20, 60, 50))
  patches, grid = _process([img, img])
  n_tokens = 8 * 12 // 4
  before = T.mask_random_patches._cache_size()
  outs = []
  for i, sev in enumerate([0.25, 0.5, 0.0]):
    out = T.mask_random_patches(
      jax.random.PRNGKey(i), patches, grid, None, sev, layout=LAYOUT, fill=FILL
    )
    rows_changed = np.any(np.asarray(out) != np.asarray(patches), axis=1).reshape(2, n_tokens, 4)
    assert (
      rows_changed.all(-1) == rows_changed.any(-1)
    ).all()  # whole merge windows (= LLM tokens)
    assert rows_changed.all(-1).sum(1).tolist() == [round(sev * n_tokens)] * 2
    outs.append(out)
  assert not np.array_equal(outs[0][:96], outs[0][96:])  # each image draws its own permutation
  assert T.mask_random_patches._cache_size() - before == 1  # severity and rng are traced
  fill_row = LAYOUT.normalized_fill(FILL)[np.repeat(np.arange(3), 2 * 14 * 14)]
  changed = np.any(np.asarray(outs[1]) != np.asarray(patches), axis=1)
  np.testing.assert_array_equal(
    np.asarray(outs[1])[changed], np.broadcast_to(fill_row, (changed.sum(), 1176))
  )
  per_patch = T.mask_random_patches(
    jax.random.PRNGKey(0), patches, grid, None, 0.5, layout=LAYOUT, unit="patch"
  )
  assert np.any(np.asarray(per_patch) != np.asarray(patches), axis=1).reshape(2, -1).sum(
    1
  ).tolist() == [48, 48]


def test_gaussian_noise():
  grey = np.full((H, W, 3), 120, np.uint8)  # mid-grey: no clipping, so the noise std is measurable
  patches, grid = _process([grey, grey])
  key = jax.random.PRNGKey(0)
  np.testing.assert_allclose(
    T.gaussian_noise(key, patches, grid, None, 0.0, layout=LAYOUT), patches, atol=1e-6
  )
  noisy = T.gaussian_noise(key, patches, grid, None, 0.1, layout=LAYOUT)
  frames, clean = T.unpatchify(noisy, grid, LAYOUT), T.unpatchify(patches, grid, LAYOUT)
  np.testing.assert_array_equal(
    frames[:, 0], frames[:, 1]
  )  # the same noise on both temporal copies
  std = np.asarray(T.OPENAI_CLIP_STD)[None, :, None, None]
  measured = float(((np.asarray(frames[:, 0]) - np.asarray(clean[:, 0])) * std).std())
  assert abs(measured - 0.1) < 0.005, measured
  big = T.unpatchify(T.gaussian_noise(key, patches, grid, None, 5.0, layout=LAYOUT), grid, LAYOUT)
  pix = np.asarray(big[:, 0]) * std + np.asarray(T.OPENAI_CLIP_MEAN)[None, :, None, None]
  assert pix.min() >= -1e-6 and pix.max() <= 1 + 1e-6  # clipped to valid intensities
  boxed = T.unpatchify(
    T.gaussian_noise(key, patches, grid, jnp.array([[10, 20, 40, 30]]), 0.1, layout=LAYOUT),
    grid,
    LAYOUT,
  )
  diff = np.any(np.asarray(boxed) != np.asarray(clean), axis=(1, 2))
  assert diff[:, 20:30, 10:40].all() and diff.sum() == 2 * 10 * 30  # exactly the box


def _np_blur(frames, sigma, r):
  k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
  k /= k.sum()
  for axis in (3, 4):
    pad = [(0, 0)] * 5
    pad[axis] = (r, r)
    fp = np.pad(frames, pad, mode="edge")
    n = frames.shape[axis]
    frames = sum(k[i] * np.take(fp, np.arange(i, i + n), axis=axis) for i in range(2 * r + 1))
  return frames


def test_gaussian_blur():
  img = _scene(4, (30, 20, 60, 50))
  patches, grid = _process([img])
  key = jax.random.PRNGKey(0)
  np.testing.assert_allclose(
    T.gaussian_blur(key, patches, grid, None, 0.0, layout=LAYOUT), patches, atol=1e-6
  )
  out = T.gaussian_blur(key, patches, grid, None, 0.5, layout=LAYOUT, max_sigma=2.0)
  ref = _np_blur(np.asarray(T.unpatchify(patches, grid, LAYOUT), np.float64), 1.0, 6)
  np.testing.assert_allclose(T.unpatchify(out, grid, LAYOUT), ref, atol=1e-5)
  assert float(jnp.std(out)) < float(
    jnp.std(patches)
  )  # smoothing lowers the variance of a noisy image


def test_thinking_concept_spans():
  ids = np.array([[5, 7, 8, 9, 7, 8, 3, 7], [9, 9, 1, 7, 2, 0, 0, 0]])
  mentions = T.pad_mentions([[7, 8], [9], [4, 4], []])
  assert mentions.shape == (4, 2)
  per = np.asarray(jax.jit(T.concept_span_masks)(ids, mentions))
  assert per.shape == (2, 4, 8)
  assert per[0, 0].astype(int).tolist() == [
    0,
    1,
    1,
    0,
    1,
    1,
    0,
    0,
  ]  # trailing lone 7 is not a mention
  assert per[0, 1].astype(int).tolist() == [0, 0, 0, 1, 0, 0, 0, 0]
  assert not per[:, 2:].any()  # absent and empty mentions match nothing
  assert np.asarray(T.concept_span_mask(ids, mentions)).astype(int).tolist() == [
    [0, 1, 1, 1, 1, 1, 0, 0],
    [1, 1, 0, 0, 0, 0, 0, 0],
  ]


def test_errors_are_explicit():
  with pytest.raises(ValueError, match="one grid per batch"):
    T.grid_of(np.array([[1, 8, 8], [1, 8, 12]]))
  with pytest.raises(ValueError, match="whole images"):
    T.occlude_boxes(None, jnp.zeros((10, 1176)), (1, 8, 8), jnp.zeros((1, 4)), 1.0)
