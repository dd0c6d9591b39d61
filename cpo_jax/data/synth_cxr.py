"""synth_cxr: procedural chest-X-ray-like 112x112 images with a side-marker shortcut.

The medical twin of synth_drive (same record format, same pipeline): a body silhouette with
two lung fields and a heart. The evidence is local and faint, 30-45 grey levels off the lung
around it (film grain +-6, vascular markings +25): a thin pleural line with darker, unmarked
air beyond it, a shallow fluid layer at the right costophrenic angle, a few small
consolidation patches, a heart a few pixels wider than normal, lungs a few pixels longer
with flattened bases (hyperinflation), a slightly shrunken left lung (volume loss).
The nuisance is a radiopaque side marker (none/left/right/both: image sides), drawn as a
full-height bright band: the brightest, largest thing in the image, seen at a glance (as a
hospital's or scanner's signature is on real films). Its value is `decision id mod 4`, so in
train/test it narrows the finding to two of the seven (one for cardiomegaly) 90% of the time,
and in ood it is uniform: a model that leans on it loses there.
Every example is a pure function of (seed, split, index). The renderer draws the same random
numbers whatever the concept values, so a counterfactual re-render (Synth.counterfactual)
keeps the scene; flipping hyperinflation or volume loss reshapes the lungs, which moves the
effusion and pneumothorax drawn inside them. Medical concept graph: a sketch.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from PIL import ImageDraw

from cpo_jax.data import synthetic

IMAGE_SIZE = 112
_BODY, _LUNG, _HEART, _MARKER = 150, 60, 200, 245
_MARKINGS = _LUNG + 25  # vascular markings: the distractor the faint evidence must beat
_CONSOL, _FLUID, _LINE, _AIR = _LUNG + 45, _LUNG + 45, _LUNG + 45, _LUNG - 30
MARKER_WIDTH = 10  # px: the side band, clear of the lung fields (x 16-96)

# Nominal evidence regions (x0, y0, x1, y1), graph concept order.
REGIONS = {
  "pneumothorax_line": (80, 20, 94, 72),
  "effusion": (18, 74, 52, 90),
  "consolidation": (24, 38, 42, 56),
  "heart_size": (38, 60, 74, 88),
  "hyperinflation": (18, 84, 94, 96),
  "volume_loss": (60, 18, 94, 88),
}


def _j(rng, j=2):
  return int(rng.integers(-j, j + 1))


def render(
  a: dict[str, str], nuisance: str, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
  """Draw the film; returns (uint8 image [112,112,3], boxes int32 [6,4] in concept order).

  Every random number is drawn, in the same order, whatever `a` says (see module doc).
  """
  S = IMAGE_SIZE
  # The scene's randomness, drawn up front.
  body = (6 + _j(rng), 4, 106 + _j(rng), 122)
  body_shade = _BODY + _j(rng, 8)
  right = [18 + _j(rng), 18 + _j(rng), 52 + _j(rng), 86 + _j(rng, 1)]  # patient's right: image left
  left = [60 + _j(rng), 18 + _j(rng), 94 + _j(rng), 86 + _j(rng, 1)]
  markings = [
    (int(rng.integers(4, 31)), int(rng.integers(6, 63)), _j(rng, 5)) for _ in range(2 * 8)
  ]  # (dx, dy, slant) within a lung
  line_dx = _j(rng)
  fluid_dy = _j(rng, 1)
  consol_dx, consol_dy = _j(rng, 3), _j(rng, 3)
  blobs = [(int(rng.integers(5, 14)), int(rng.integers(5, 14))) for _ in range(3)]
  heart_c = (56 + _j(rng), 76 + _j(rng))
  heart_jitter = (_j(rng, 1), _j(rng, 1))
  grain = rng.integers(-6, 7, (S, S))

  im = Image.new("L", (S, S), 0)
  dr = ImageDraw.Draw(im)
  dr.ellipse(body, fill=body_shade)
  hyper = a["hyperinflation"] == "present"
  if hyper:  # longer lungs
    right[3] += 6
    left[3] += 6
  if a["volume_loss"] == "present":  # a smaller left lung
    left = [left[0] + 2, left[1] + 6, left[2] - 2, left[3] - 5]
  for box in (right, left):
    if hyper:  # flattened diaphragm: square-ish bases
      dr.rounded_rectangle(box, radius=12, fill=_LUNG)
    else:
      dr.ellipse(box, fill=_LUNG)
  for k, (dx, dy, slant) in enumerate(markings):
    box = right if k < 8 else left
    x = min(box[0] + dx, box[2] - 4)
    y = min(box[1] + dy, box[3] - 8)
    dr.line((x, y, x + slant, y + 6), fill=_MARKINGS)
  boxes = np.zeros((6, 4), np.int32)
  # Pneumothorax: unmarked air lateral to a thin pleural line (left lung, image right).
  x0, y0, x1, y1 = REGIONS["pneumothorax_line"]
  if a["pneumothorax_line"] == "present":
    lx = 86 + line_dx
    if lx + 1 <= left[2]:  # a volume-loss lung can end left of the line: no air to draw.
      dr.rectangle((lx + 1, y0 + 2, left[2], y1), fill=_AIR)
    dr.line((lx, y0 + 2, lx, y1), fill=_LINE, width=1)
  boxes[0] = (x0 + line_dx, y0, x1 + line_dx, y1)
  # Effusion: a shallow fluid layer in the right costophrenic angle, meniscus on top.
  x0, y0, x1, y1 = REGIONS["effusion"]
  if a["effusion"] == "present":
    top = right[3] - 9 + fluid_dy
    dr.rectangle((right[0] + 2, top + 3, right[2] - 2, right[3]), fill=_FLUID)
    dr.ellipse((right[0] + 2, top, right[2] - 2, top + 6), fill=_FLUID)
  boxes[1] = (x0, y0 + fluid_dy, x1, y1 + fluid_dy)
  # Consolidation: small patches in the right mid zone.
  x0, y0, x1, y1 = REGIONS["consolidation"]
  if a["consolidation"] == "present":
    for bx, by in blobs:
      cx, cy = x0 + bx + consol_dx, y0 + by + consol_dy
      dr.ellipse((cx - 4, cy - 4, cx + 4, cy + 4), fill=_CONSOL)
  boxes[2] = (x0 + consol_dx, y0 + consol_dy, x1 + consol_dx, y1 + consol_dy)
  # Heart: its width is the evidence (cardiothoracic ratio), a few pixels.
  cx, cy = heart_c
  hw, hh = (18, 14) if a["heart_size"] == "enlarged" else (14, 12)
  hw, hh = hw + heart_jitter[0], hh + heart_jitter[1]
  dr.ellipse((cx - hw, cy - hh, cx + hw, cy + hh), fill=_HEART)
  boxes[3] = (cx - 19, cy - 15, cx + 19, cy + 15)
  boxes[4] = REGIONS["hyperinflation"]
  boxes[5] = left
  # Nuisance: full-height bright band(s) at the image side(s).
  if nuisance in ("left", "both"):
    dr.rectangle((0, 0, MARKER_WIDTH - 1, S - 1), fill=_MARKER)
  if nuisance in ("right", "both"):
    dr.rectangle((S - MARKER_WIDTH, 0, S - 1, S - 1), fill=_MARKER)
  arr = np.asarray(im, np.uint8)
  arr = np.clip(arr.astype(np.int16) + grain, 0, 255).astype(np.uint8)  # film grain
  return np.repeat(arr[..., None], 3, -1), boxes


# Stream 100: the random streams stay apart from synth_drive's (stream 0).
CXR = synthetic.Synth("medical", stream=100, render=render)
graph, sample_labels, make_example = CXR.graph, CXR.sample_labels, CXR.make_example


class SynthCxrSource(synthetic.SynthSource):
  """Random-access source of synth_cxr records (same record format as synth_drive)."""

  synth = CXR
  domain = CXR.graph_name
