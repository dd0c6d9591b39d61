"""synth_cxr's shortcut is tempting and its evidence decides (issue 12, the medical default).

The side marker's value predicts the finding in train/test and not in ood. A simple pixel model
(logistic regression on 14x14 box-averaged pixels) trained on the train split leans on it and
loses clearly on ood; the same model trained on train scenes whose marker is uninformative
reads the evidence and holds up on ood. So a model that reads the nuisance is punished, and
one that reads the evidence is not.
"""

import functools

import numpy as np
from PIL import Image
from sklearn.linear_model import LogisticRegression

from cpo_jax.data import synth_cxr

SIDE = 14  # 8x8-pixel cells: the marker band fills a column, the evidence a cell or less


@functools.cache
def _pixels(split, n, agreement=None):
  src = synth_cxr.SynthCxrSource(split, n, seed=0, encode_png=False, agreement=agreement)
  x, d = [], []
  for i in range(n):
    rec = src[i]
    small = Image.fromarray(rec["image"][..., 0]).resize((SIDE, SIDE), Image.BOX)
    x.append(np.asarray(small, np.float32).ravel() / 255)
    d.append(rec["decision"])
  return np.stack(x), np.asarray(d)


def _pixel_model_accuracy(train, splits):
  x, d = train
  mean, std = x.mean(0), x.std(0) + 1e-3
  # Strong L2: like a model early in training, it takes the cheapest features that fit.
  model = LogisticRegression(C=0.003, max_iter=1000).fit((x - mean) / std, d)
  return {k: float((model.predict((x - mean) / std) == d).mean()) for k, (x, d) in splits.items()}


def test_the_marker_predicts_the_finding_in_train_and_test_but_not_in_ood():
  g = synth_cxr.graph()
  labels = {
    s: synth_cxr.SynthCxrSource(s, n, seed=0).labels()
    for s, n in (("train", 4000), ("test", 2000), ("ood", 2000))
  }
  d, _, nuis = labels["train"]
  # The finding most often seen with each marker value in train: the nuisance-only guess.
  guess = np.array(
    [np.bincount(d[nuis == v], minlength=len(g.decisions)).argmax() for v in range(4)]
  )
  acc = {s: float((guess[n] == d).mean()) for s, (d, _, n) in labels.items()}
  # 4 marker values for 7 findings: it narrows the finding to 2 (1 for cardiomegaly), so the
  # guess is right about half the time in train/test, and at chance (1/7) in ood.
  assert 0.45 <= acc["train"] <= 0.6 and 0.45 <= acc["test"] <= 0.6, acc
  assert acc["ood"] <= 0.2, acc


def test_the_marker_is_seen_at_a_glance():
  """The band fills a 14x14 image's edge column: two thresholds read the marker exactly."""
  x, _ = _pixels("ood", 400)
  _, _, nuis = synth_cxr.SynthCxrSource("ood", 400, seed=0).labels()
  grid = x.reshape(-1, SIDE, SIDE)
  left, right = grid[:, :, 0].mean(1) > 0.7, grid[:, :, -1].mean(1) > 0.7
  read = np.select([left & right, left, right], [3, 1, 2], 0)  # none, left, right, both
  names = synth_cxr.graph().nuisance_values
  assert tuple(names) == ("none", "left", "right", "both")
  np.testing.assert_array_equal(read, nuis)


def test_a_pixel_model_leans_on_the_marker_and_loses_on_ood_while_the_evidence_decides():
  # Measured (seed 0): trained on train, test 0.89 / ood 0.33; trained with an uninformative
  # marker, ood 0.77. The renderer before the side band (a 12 px corner square, bold evidence)
  # fails it: test 0.93 / ood 0.84, and 0.94 on ood without the shortcut.
  splits = {"test": _pixels("test", 400), "ood": _pixels("ood", 400)}
  shortcut = _pixel_model_accuracy(_pixels("train", 600), splits)
  # Train scenes of the same renderer whose marker is uninformative (agreement 1/4: uniform).
  evidence = _pixel_model_accuracy(_pixels("train", 600, agreement=0.25), splits)
  assert shortcut["test"] >= 0.8, shortcut  # the evidence is readable ...
  assert shortcut["ood"] <= shortcut["test"] - 0.3, shortcut  # ... but the marker is cheaper
  assert evidence["ood"] >= 0.7 and evidence["ood"] >= shortcut["ood"] + 0.25, (evidence, shortcut)
