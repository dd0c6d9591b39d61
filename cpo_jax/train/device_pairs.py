"""Perception pairs made on the device (config cpo.device_perturbations, METHOD.md 4 (b)).

For each (kind, severity) every row of the batch gets one extra pair: chosen = the row's
chosen (image, chain), rejected = the same chain with the chosen image perturbed inside the
row's evidence boxes by the jitted masks of `cpo_jax.perturb`.
"""

import jax
import jax.numpy as jnp
import numpy as np

from cpo_jax import perturb

# Their source id is 'perception': they are perception pairs (same text, counterfactual image),
# so cpo.source_weights[1] weighs them with the data's perception pairs and 'other' (2) keeps
# its meaning (ingested pairs of unknown kind). Metrics: the top-level and per-source ones
# count every pair the loss sees (so 'perception/...' includes them); 'perturbed/...' (count,
# rewards, logps, loss) is the device-made pairs alone. Boxes are in pixels of the processed
# image (the pipeline rescales them with the image).
PERTURBED_SOURCE = 1
PERTURBED_PREFIX = 'perturbed'


def parse_device_perturbations(spec):
  """'occlude:1.0,noise:0.3' -> (('occlude', 1.0), ('noise', 0.3)); '' -> () (off)."""
  out = []
  for item in filter(None, (s.strip() for s in (spec or '').split(','))):
    kind, sep, severity = item.partition(':')
    if not sep or kind not in perturb.PERCEPTION_MASKS:
      raise ValueError(
        f'cpo.device_perturbations item {item!r}: expected kind:severity with '
        f'kind in {sorted(perturb.PERCEPTION_MASKS)}.'
      )
    severity = float(severity)
    if not 0.0 <= severity <= 1.0:
      raise ValueError(f'cpo.device_perturbations item {item!r}: severity not in [0, 1].')
    out.append((kind, severity))
  return tuple(out)


def layout_for(model_config, image_processor=None):
  """The PatchLayout of the run's pixel_values: from its image processor when given (mean,
  std, patch sizes), else the Qwen2-VL processor defaults (what `processors.make_processors`
  builds) with the model's patch sizes. Either way it must match the vision tower."""
  vc = model_config.vision_config
  if image_processor is None:
    return perturb.PatchLayout(
      patch_size=vc.patch_size,
      temporal_patch_size=vc.temporal_patch_size,
      merge_size=vc.spatial_merge_size,
    )
  layout = perturb.PatchLayout.from_processor(image_processor)
  want = (vc.patch_size, vc.temporal_patch_size, vc.spatial_merge_size)
  if (layout.patch_size, layout.temporal_patch_size, layout.merge_size) != want:
    raise ValueError(
      f'image processor patch layout {layout} does not match the vision '
      f'tower (patch, temporal_patch, merge) = {want}.'
    )
  return layout


def perturbed_pixels(batch, grid, perturbations, layout, *, seed=0):
  """[K * B * P, D]: the chosen images perturbed by each (kind, severity), in that order.

  Boxes are the batch's evidence boxes, in pixels of the processed image. The rng is a pure
  function of (seed, the batch's 'step', entry index), so a run and its resumption perturb
  identically."""
  grid = tuple(int(v) for v in np.asarray(grid).reshape(3))
  pixels = batch['chosen_pixel_values']
  boxes = jnp.asarray(batch['boxes'], jnp.float32)
  key = jax.random.fold_in(jax.random.key(seed), batch.get('step', 0))
  return jnp.concatenate(
    [
      perturb.PERCEPTION_MASKS[kind](
        jax.random.fold_in(key, i), pixels, grid, boxes, severity, layout=layout
      )
      for i, (kind, severity) in enumerate(perturbations)
    ],
    axis=0,
  )
