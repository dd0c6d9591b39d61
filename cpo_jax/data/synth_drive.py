"""synth_drive: procedural 112x112 road scenes with a built-in shortcut (DESIGN.md, embedded default).

Evidence is small and local, at roughly fixed places (a few px of jitter) so a tiny ViT with
14 px patches can find it: traffic-light housing top right (lit lamp 9 px), pedestrian on the
crosswalk bottom left (~9x26 px), lead vehicle in the ego lane (near = big box low in the
image, far = small box at the horizon), orange cone in the lane bottom right (~14x18 px).
The nuisance (time of day / weather) recolours the whole sky, road and grass: global and the
easiest thing to see. In `train`/`test` nuisance value i co-occurs with decision i 90% of the
time; in `ood` it is uniform, so a model that leans on the sky drops toward chance there.
Every example is a pure function of (seed, split, index).
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from PIL import ImageDraw

from cpo_jax.data import synthetic

IMAGE_SIZE = 112
HORIZON = 40

# Scene colours per nuisance value (graph order: night, fog, day, dusk): sky, road, grass, overlay.
_PALETTES = {
  "night": dict(sky=(14, 18, 52), road=(48, 48, 58), grass=(18, 40, 26), haze=None),
  "fog": dict(
    sky=(196, 198, 200), road=(150, 150, 152), grass=(138, 156, 140), haze=(205, 205, 205)
  ),
  "day": dict(sky=(110, 175, 250), road=(105, 105, 108), grass=(70, 160, 64), haze=None),
  "dusk": dict(sky=(246, 132, 74), road=(96, 84, 88), grass=(92, 104, 54), haze=None),
}
# Evidence colours are the same under every nuisance: only the evidence carries the decision.
_LAMP_RED, _LAMP_GREEN, _LAMP_OFF = (255, 30, 30), (40, 235, 70), (75, 75, 75)
_PED_SHIRT, _PED_SKIN, _PED_LEGS = (235, 40, 205), (240, 200, 160), (30, 30, 90)
_CAR, _CAR_WINDOW, _WHEEL = (40, 95, 235), (20, 25, 40), (10, 10, 10)
_CONE, _CONE_BAND = (255, 135, 0), (250, 250, 250)

# Nominal evidence regions (x0, y0, x1, y1) before jitter; also the box reported when absent.
REGIONS = {
  "traffic_light": (90, 4, 101, 31),
  "pedestrian": (19, 70, 28, 96),
  "lead_vehicle_near": (38, 56, 74, 80),
  "lead_vehicle_far": (50, 42, 62, 51),
  "cone": (68, 84, 82, 102),
}


def painted_region(concept: str, box) -> tuple[int, int, int, int]:
  """Inclusive (x0, y0, x1, y1) the renderer may paint for `concept` drawn at `box` (its
  reported box): the box itself, plus the traffic light's pole below it (to HORIZON + 8)."""
  x0, y0, x1, y1 = (int(v) for v in box)
  return (x0, y0, x1, max(y1, HORIZON + 8)) if concept == "traffic_light" else (x0, y0, x1, y1)


def _jit(rng, box, j=2):
  dx, dy = (int(v) for v in rng.integers(-j, j + 1, size=2))
  x0, y0, x1, y1 = box
  return (x0 + dx, y0 + dy, x1 + dx, y1 + dy)


def _shade(rng, colour, amount=10):
  return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in colour)


def render(
  a: dict[str, str], nuisance: str, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
  """Draw the scene; returns (uint8 image [112,112,3], boxes int32 [4,4] in concept order).

  boxes: the drawn object's box (traffic_light, pedestrian, lead_vehicle, cone), or the
  nominal region where it would be when absent.
  """
  S = IMAGE_SIZE
  pal = _PALETTES[nuisance]
  im = Image.new("RGB", (S, S), _shade(rng, pal["sky"]))
  dr = ImageDraw.Draw(im)
  dr.rectangle((0, HORIZON, S, S), fill=_shade(rng, pal["grass"]))
  road = _shade(rng, pal["road"])
  dr.polygon([(8, S), (104, S), (62, HORIZON), (50, HORIZON)], fill=road)
  for y in range(46, S, 12):  # centre dashes
    dr.rectangle((55, y, 57, y + 5), fill=(220, 220, 200))
  for x in range(16, 100, 8):  # crosswalk stripes (always there: not evidence by itself)
    dr.rectangle((x, 90, x + 4, 96), fill=(225, 225, 225))
  if pal["haze"] is not None:  # fog washes out the background only
    im = Image.blend(im, Image.new("RGB", (S, S), pal["haze"]), 0.35)
    dr = ImageDraw.Draw(im)

  boxes = np.zeros((4, 4), np.int32)
  # Traffic light: housing + pole, one lit lamp.
  b = _jit(rng, REGIONS["traffic_light"])
  if a["traffic_light"] != "none":
    x0, y0, x1, y1 = b
    cx = (x0 + x1) // 2
    dr.rectangle((cx - 1, y1, cx + 1, HORIZON + 8), fill=(90, 90, 90))
    dr.rectangle(b, fill=(28, 28, 28))
    red_on = a["traffic_light"] == "red"
    dr.ellipse((cx - 4, y0 + 3, cx + 4, y0 + 11), fill=_LAMP_RED if red_on else _LAMP_OFF)
    dr.ellipse((cx - 4, y1 - 11, cx + 4, y1 - 3), fill=_LAMP_OFF if red_on else _LAMP_GREEN)
  boxes[0] = b
  # Pedestrian on the crosswalk.
  b = _jit(rng, REGIONS["pedestrian"])
  if a["pedestrian"] == "crossing":
    x0, y0, x1, y1 = b
    dr.ellipse((x0 + 1, y0, x1 - 1, y0 + 7), fill=_PED_SKIN)
    dr.rectangle((x0, y0 + 8, x1, y0 + 18), fill=_PED_SHIRT)
    dr.rectangle((x0 + 1, y0 + 19, x0 + 3, y1), fill=_PED_LEGS)
    dr.rectangle((x1 - 3, y0 + 19, x1 - 1, y1), fill=_PED_LEGS)
  boxes[1] = b
  # Lead vehicle: size and height in the image encode the distance.
  lv = a["lead_vehicle"]
  b = _jit(
    rng,
    REGIONS["lead_vehicle_far" if lv == "far" else "lead_vehicle_near"],
    j=2 if lv == "near" else 1,
  )
  if lv != "none":
    x0, y0, x1, y1 = b
    h = y1 - y0
    dr.rectangle((x0, y0, x1, y1 - max(2, h // 6)), fill=_CAR)
    dr.rectangle(
      (x0 + 2 + (x1 - x0) // 8, y0 + 2, x1 - 2 - (x1 - x0) // 8, y0 + h // 3), fill=_CAR_WINDOW
    )
    w = max(2, (x1 - x0) // 6)
    dr.rectangle((x0 + 1, y1 - max(2, h // 6), x0 + w, y1), fill=_WHEEL)
    dr.rectangle((x1 - w, y1 - max(2, h // 6), x1 - 1, y1), fill=_WHEEL)
  boxes[2] = b
  # Cone in the ego lane.
  b = _jit(rng, REGIONS["cone"])
  if a["cone"] == "in_lane":
    x0, y0, x1, y1 = b
    cx = (x0 + x1) // 2
    dr.polygon([(x0, y1), (x1, y1), (cx, y0)], fill=_CONE)
    dr.rectangle((x0 + 4, y0 + 9, x1 - 4, y0 + 11), fill=_CONE_BAND)
  boxes[3] = b
  arr = np.asarray(im, dtype=np.uint8).copy()
  return arr, boxes


DRIVE = synthetic.Synth("driving", stream=0, render=render)
graph, sample_labels, make_example = DRIVE.graph, DRIVE.sample_labels, DRIVE.make_example


class SynthDriveSource(synthetic.SynthSource):
  """Random-access source of synth_drive records (grain's RandomAccessDataSource protocol)."""

  synth = DRIVE
  domain = DRIVE.graph_name
