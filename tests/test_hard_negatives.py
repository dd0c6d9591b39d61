"""`hard` perception negatives without nuisance labels: the nearest image by thumbnail."""

import io

import numpy as np
from PIL import Image
import pytest

from cpo_jax.data import pairs


def _visual_groups(n_groups=40, per_group=6, seed=0):
  """JPEGs in visually similar groups (a shared smooth background) whose members all have other
  label sets (3 findings; the evidence is a small local square), plus for members 0 and 4 of a
  group a second record of the SAME scene with another label set (a region of the same image:
  identical pixels). 320 records."""
  rng = np.random.default_rng(seed)
  images, codes, vis, scene = [], [], [], []
  for g in range(n_groups):
    base = np.kron(rng.integers(0, 256, (4, 4, 3)), np.ones((16, 16, 1)))  # 64x64 smooth layout
    for k, code in enumerate(rng.permutation(8)[:per_group]):
      img = np.clip(base + rng.normal(0, 8, base.shape), 0, 255)
      for f in range(3):  # the decisive evidence: small and local
        if code >> f & 1:
          img[6 + 18 * f : 12 + 18 * f, 50:56] = 255
      buf = io.BytesIO()
      Image.fromarray(img.astype(np.uint8)).save(buf, format="JPEG")
      for dup in range(2 if k % 4 == 0 else 1):
        images.append(buf.getvalue())
        codes.append(code if dup == 0 else (code + 1) % 8)
        vis.append(g)
        scene.append(g * per_group + k)
  return images, np.array(codes), np.array(vis), np.array(scene)


def test_hard_picks_the_visually_similar_image_far_more_often_than_random():
  images, codes, vis, scene = _visual_groups()
  thumbs = np.stack([pairs.thumbnail(b) for b in images])
  labels = (codes[:, None] >> np.arange(3)) & 1
  idx = pairs.PairIndex(codes, labels, thumbnails=thumbs, group=scene)
  rng = np.random.default_rng(0)
  share = {}
  for mode in ("hard", "random", "far"):
    picks = np.array([idx.pick(i, mode, rng) for i in range(len(codes))])
    assert (codes[picks] != codes).all() and (scene[picks] != scene).all()  # never the same scene
    share[mode] = float((vis[picks] == vis).mean())
  # ~6 of the ~310 candidates are in the same visual group: random finds one ~2% of the time
  assert share["hard"] > 0.95 and share["random"] < 0.1 and share["far"] < 0.2, share
  np.testing.assert_array_equal(
    idx.hard_negatives(),
    pairs.PairIndex(codes, labels, thumbnails=thumbs, group=scene).hard_negatives(),
  )  # deterministic
  # without scene ids, the same-scene twin (identical pixels) is what `hard` would take
  twins = pairs.PairIndex(codes, labels, thumbnails=thumbs).hard_negatives()
  assert (scene[twins] == scene).mean() > 0.4


@pytest.mark.parametrize("name", ["synth_drive", "synth_cxr"])
def test_nearest_thumbnail_recovers_the_hidden_nuisance(name):
  """On the synthetic sets the nuisance is known: hidden from the index, the thumbnail still finds it."""
  from cpo_jax.data.sources import make_source

  src = make_source(name, "ood", num_examples=300)  # ood: nuisance independent of the decision
  d, c, n = src.labels()
  thumbs = np.stack([pairs.thumbnail(src[i]["image"]) for i in range(len(src))])
  hard = pairs.PairIndex(d, c, thumbnails=thumbs).hard_negatives()
  rng = np.random.default_rng(0)
  rand = np.array([pairs.PairIndex(d, c).pick(i, "random", rng) for i in range(len(d))])
  assert (d[hard] != d).all()
  assert (n[hard] == n).mean() > 0.95 and (
    n[rand] == n
  ).mean() < 0.35  # 4 nuisance values: ~25% by chance


def test_bounded_pool_at_scale():
  """100k records: every record gets a valid negative from a pool of 256 (no N x N matrix), and
  the known nuisance restricts the pool to its block."""
  rng = np.random.default_rng(0)
  n = 100_000
  dec, nuis = rng.integers(0, 50, n), rng.integers(0, 3, n)
  thumbs = rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
  idx = pairs.PairIndex(
    dec, dec[:, None], nuis, thumbnails=thumbs, group=np.arange(n) // 2, pool_size=256
  )
  neg = idx.hard_negatives()
  assert (neg >= 0).all() and (dec[neg] != dec).all() and (nuis[neg] == nuis).all()
  assert (neg // 2 != np.arange(n) // 2).all()
  # a nuisance value with a single decision falls back to any other decision
  nuis[dec == 7] = 9
  neg = pairs.PairIndex(dec, dec[:, None], nuis, thumbnails=thumbs, pool_size=256).hard_negatives()
  assert (dec[neg] != dec).all() and (nuis[neg[dec == 7]] != 9).all()
