"""synth_cxr: procedural chest-X-ray-like 112x112 images with a hospital-marker shortcut.

The medical twin of synth_drive (same record format, same pipeline): a body silhouette with
two lung fields and a heart; evidence is local (a thin bright pleural line with no lung
markings beyond it, fluid at the right costophrenic angle, a consolidation blob, an enlarged
heart, long flattened lungs for hyperinflation, a shrunken left lung for volume loss). The
nuisance is a bright corner marker (none/left/right/both), correlated 90% with the primary
finding in train/test (value = decision id mod 4) and uniform in ood.
Every example is a pure function of (seed, split, index). Medical concept graph: a sketch.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from PIL import ImageDraw

from cpo_jax.data import synthetic

IMAGE_SIZE = 112
_BODY, _LUNG, _HEART, _CONSOL, _FLUID, _LINE, _AIR, _MARKER = 150, 55, 205, 185, 180, 235, 12, 250

# Nominal evidence regions (x0, y0, x1, y1), graph concept order.
REGIONS = {
  "pneumothorax_line": (80, 20, 94, 72),
  "effusion": (18, 72, 52, 88),
  "consolidation": (24, 38, 42, 56),
  "heart_size": (36, 56, 80, 90),
  "hyperinflation": (18, 84, 94, 100),
  "volume_loss": (60, 18, 94, 88),
}


def _j(rng, j=2):
  return int(rng.integers(-j, j + 1))


def render(
  a: dict[str, str], nuisance: str, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
  S = IMAGE_SIZE
  im = Image.new("L", (S, S), 0)
  dr = ImageDraw.Draw(im)
  dr.ellipse((6 + _j(rng), 4, 106 + _j(rng), 122), fill=_BODY + _j(rng, 8))
  hyper = a["hyperinflation"] == "present"
  lung_bottom = 98 if hyper else 86
  right = (18 + _j(rng), 18 + _j(rng), 52 + _j(rng), lung_bottom)  # patient's right = image left
  left = (60 + _j(rng), 18 + _j(rng), 94 + _j(rng), lung_bottom)
  if a["volume_loss"] == "present":
    left = (left[0] + 4, left[1] + 12, left[2] - 4, left[3] - 10)
  for box in (right, left):
    if hyper:  # flattened diaphragm: square-bottomed lungs
      dr.rounded_rectangle(box, radius=10, fill=_LUNG)
    else:
      dr.ellipse(box, fill=_LUNG)
  for box in (right, left):  # faint vascular markings
    for _ in range(6):
      x = int(rng.integers(box[0] + 4, box[2] - 4))
      y = int(rng.integers(box[1] + 6, box[3] - 6))
      dr.line((x, y, x + _j(rng, 5), y + 6), fill=_LUNG + 25)
  boxes = np.zeros((6, 4), np.int32)
  # Pneumothorax: air without markings lateral to a thin bright pleural line (left lung, image right).
  x0, y0, x1, y1 = REGIONS["pneumothorax_line"]
  dx = _j(rng)
  if a["pneumothorax_line"] == "present":
    lx = 86 + dx
    if lx + 1 <= left[2]:  # a volume-loss lung can end left of the line: no air to draw.
      dr.rectangle((lx + 1, y0 + 2, left[2], y1), fill=_AIR)
    dr.line((lx, y0 + 2, lx, y1), fill=_LINE, width=2)
  boxes[0] = (x0 + dx, y0, x1 + dx, y1)
  # Effusion: fluid filling the right costophrenic angle, meniscus on top.
  x0, y0, x1, y1 = REGIONS["effusion"]
  dy = _j(rng)
  if a["effusion"] == "present":
    top = right[3] - 16 + dy
    dr.rectangle((right[0], top + 4, right[2], right[3] + 2), fill=_FLUID)
    dr.ellipse((right[0], top, right[2], top + 10), fill=_FLUID)
  boxes[1] = (x0, y0 + dy, x1, y1 + dy)
  # Consolidation: a patchy bright blob in the right mid zone.
  x0, y0, x1, y1 = REGIONS["consolidation"]
  dx, dy = _j(rng, 3), _j(rng, 3)
  if a["consolidation"] == "present":
    for _ in range(4):
      cx = int(rng.integers(x0 + 5, x1 - 5)) + dx
      cy = int(rng.integers(y0 + 5, y1 - 5)) + dy
      dr.ellipse((cx - 5, cy - 5, cx + 5, cy + 5), fill=_CONSOL)
  boxes[2] = (x0 + dx, y0 + dy, x1 + dx, y1 + dy)
  # Heart: size is the evidence (cardiothoracic ratio).
  cx, cy = 56 + _j(rng), 74 + _j(rng)
  hw, hh = (22, 16) if a["heart_size"] == "enlarged" else (13, 12)
  dr.ellipse((cx - hw, cy - hh, cx + hw, cy + hh), fill=_HEART)
  boxes[3] = (cx - 22, cy - 16, cx + 22, cy + 16)
  boxes[4] = REGIONS["hyperinflation"]
  boxes[5] = left
  # Nuisance: bright marker square(s) in the top corner(s).
  if nuisance in ("left", "both"):
    dr.rectangle((2, 2, 13, 13), fill=_MARKER)
  if nuisance in ("right", "both"):
    dr.rectangle((S - 14, 2, S - 3, 13), fill=_MARKER)
  arr = np.asarray(im, np.uint8)
  grain = rng.integers(-6, 7, arr.shape)  # film grain
  arr = np.clip(arr.astype(np.int16) + grain, 0, 255).astype(np.uint8)
  return np.repeat(arr[..., None], 3, -1), boxes


# Stream 100: the random streams stay apart from synth_drive's (stream 0).
CXR = synthetic.Synth("medical", stream=100, render=render)
graph, sample_labels, make_example = CXR.graph, CXR.sample_labels, CXR.make_example


class SynthCxrSource(synthetic.SynthSource):
  """Random-access source of synth_cxr records (same record format as synth_drive)."""

  synth = CXR
  domain = CXR.graph_name
