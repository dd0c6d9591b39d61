"""cpo.device_perturbations: extra perception pairs made on device inside the jitted CPO++ loss
(chosen image + chain vs the same chain over the chosen image perturbed in its evidence boxes)."""

import functools

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpo_jax import config_defaults
from cpo_jax import models
from cpo_jax import perturb
from cpo_jax import sharding
from cpo_jax.data import datasets
from cpo_jax.data import processors
from cpo_jax.data import sources
from cpo_jax.models import lora
from cpo_jax.train import device_pairs
from cpo_jax.train import objectives
from cpo_jax.train import optimizer
from cpo_jax.train import stages
from cpo_jax.train import steps

KEYS = ('source', 'sample_weight', 'boxes')


@pytest.fixture(scope='module')
def setup():
  proc = processors.make_processors(None)
  source = sources.make_source('synth_drive', 'train', num_examples=32)
  raw = next(datasets.make_cpo_iterator(source, proc, batch_size=4, max_len=128, seed=1))
  assert set(np.unique(raw['source'])) == {0, 1}
  grid = np.asarray(raw['image_grid_thw'][0])
  ids = proc.ids
  model_config = models.get_config_for_tokens('tiny', ids)
  batch = stages.step_inputs(raw, grid, model_config, ('chosen_', 'rejected_'), extra=KEYS)
  cfg = config_defaults.base_config('', domain='driving', data='synth_drive')
  layout = perturb.PatchLayout.from_processor(proc.image_processor)
  return proc, raw, batch, grid, model_config, cfg, layout


@pytest.fixture(scope='module')
def policy(setup):
  """Adapters with random B on a base model, so policy != reference."""
  model = models.Qwen2_5_VL(setup[4], rngs=nnx.Rngs(0))
  lora.apply_lora(model, rank=4, alpha=8.0, rngs=nnx.Rngs(1))
  adapters = nnx.state(model, lora.LoRAParam)
  keys = iter(jax.random.split(jax.random.key(2), len(jax.tree.leaves(adapters))))
  nnx.update(model, jax.tree.map(lambda x: 0.05 * jax.random.normal(next(keys), x.shape), adapters))
  return model


def _metrics(model, batch, grid, cfg, **kw):
  graphdef, state = nnx.split(model)
  f = lambda st, b: objectives.cpo_loss_fn(nnx.merge(graphdef, st, copy=True), b, grid, cfg, **kw)[
    1
  ]
  return jax.device_get(jax.jit(f)(state, batch))


def test_parse_and_layout(setup):
  *_, model_config, _, layout = setup
  assert device_pairs.parse_device_perturbations('') == ()
  assert device_pairs.parse_device_perturbations('occlude:1.0, noise:0.3') == (
    ('occlude', 1.0),
    ('noise', 0.3),
  )
  for bad in ('occlude', 'smear:0.5', 'noise:1.5'):
    with pytest.raises(ValueError):
      device_pairs.parse_device_perturbations(bad)
  # The default layout (no processor given) is the one the pipeline's processor defines.
  assert device_pairs.layout_for(model_config) == layout


def test_perturbed_pixels_are_the_masks_applied_by_hand_and_follow_the_step(setup):
  _, raw, batch, grid, _, _, layout = setup
  g = tuple(int(v) for v in grid)
  pixels, boxes = batch['chosen_pixel_values'], batch['boxes'].astype(np.float32)
  out = np.asarray(
    device_pairs.perturbed_pixels(batch, grid, (('occlude', 1.0), ('noise', 0.3)), layout, seed=7)
  )
  n_rows = pixels.shape[0]
  by_hand = perturb.occlude_boxes(None, pixels, g, boxes, 1.0, layout=layout)
  np.testing.assert_array_equal(out[:n_rows], np.asarray(by_hand))
  assert not np.array_equal(out[:n_rows], pixels)  # the evidence boxes really were painted.
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(7), 0), 1)
  noise = perturb.gaussian_noise(key, pixels, g, boxes, 0.3, layout=layout)
  np.testing.assert_array_equal(out[n_rows:], np.asarray(noise))
  # rng: a function of (seed, step): the same step perturbs the same, the next one differs.
  kinds = (('occlude', 1.0), ('noise', 0.3))
  again = device_pairs.perturbed_pixels(dict(batch, step=0), grid, kinds, layout, seed=7)
  np.testing.assert_array_equal(np.asarray(again), out)
  later = np.asarray(
    device_pairs.perturbed_pixels(dict(batch, step=1), grid, kinds, layout, seed=7)
  )
  np.testing.assert_array_equal(later[:n_rows], out[:n_rows])  # occlusion draws nothing.
  assert not np.array_equal(later[n_rows:], out[n_rows:])


def test_extra_pairs_equal_the_same_pairs_built_by_hand(setup, policy):
  # Policy != reference: the extra rows enter the loss exactly as hand-made perception pairs
  # (chosen chain on the chosen image vs the same chain on the occluded image) would.
  _, raw, batch, grid, model_config, cfg, layout = setup
  model = policy
  n = batch['chosen_input_ids'].shape[0]
  on = _metrics(model, batch, grid, cfg.cpo, perturbations=(('occlude', 1.0),), layout=layout)
  assert int(on['perturbed/count']) == n
  assert int(on['perception/count']) == int((raw['source'] == 1).sum()) + n
  assert int(on['thinking/count']) == int((raw['source'] == 0).sum())

  occluded = perturb.occlude_boxes(
    None,
    batch['chosen_pixel_values'],
    tuple(int(v) for v in grid),
    batch['boxes'].astype(np.float32),
    1.0,
    layout=layout,
  )
  hand = {}
  for key in ('input_ids', 'attention_mask', 'loss_mask', 'position_ids', 'pixel_values'):
    c, r = batch['chosen_' + key], batch['rejected_' + key]
    hand['chosen_' + key] = np.concatenate([c, c])
    hand['rejected_' + key] = np.concatenate([r, occluded if key == 'pixel_values' else c])
  hand['source'] = np.concatenate([batch['source'], np.ones(n, np.int32)])
  hand['sample_weight'] = np.concatenate([batch['sample_weight'], np.ones(n, np.float32)])
  off = _metrics(model, hand, grid, cfg.cpo)
  assert abs(float(off['rewards/margins'])) > 1e-4
  for key in (
    'preference_loss',
    'rewards/margins',
    'rewards/accuracies',
    'logps/rejected',
    'perception/rewards/margins',
    'thinking/rewards/margins',
    'perception/count',
  ):
    np.testing.assert_allclose(on[key], off[key], rtol=1e-5, atol=1e-6, err_msg=key)
  # rpo's NLL stays over the batch's own chosen rows (the extra chosen sides are copies).
  np.testing.assert_allclose(on['nll'], off['nll'], rtol=1e-6)


def test_off_by_default_is_the_plain_loss_bit_for_bit(setup, policy):
  _, raw, batch, grid, model_config, cfg, _ = setup
  assert cfg.cpo.device_perturbations == ''
  stage, prepare = stages.cpo_stage(policy, cfg, grid)
  assert 'boxes' not in prepare(raw)  # nothing extra travels to the device.
  plain = {k: v for k, v in batch.items() if k != 'boxes'}
  plain_fn = functools.partial(
    objectives.cpo_loss_fn, grid=grid, cfg=cfg.cpo, max_completion_len=cfg.data.max_completion_len
  )

  def run(loss_fn, b):  # the same split and jit for both: the same program, the same bits.
    f = lambda tr: loss_fn(nnx.merge(stage.graphdef, tr, stage.frozen, copy=True), b)[1]
    return jax.device_get(jax.jit(f)(stage.trainable))

  got = run(stage.loss_fn, dict(batch, step=jnp.int32(3)))
  want = run(plain_fn, plain)
  assert set(got) == set(want) and not any(k.startswith('perturbed/') for k in got)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_train_step_with_the_knob_compiles_once_and_starts_at_log2(setup):
  _, raw, _, grid, model_config, cfg, _ = setup
  cfg = cfg.copy_and_resolve_references()
  cfg.cpo.device_perturbations = 'occlude:1.0,noise:0.3'
  cfg.cpo.num_steps = 3
  model = stages.attach_adapters(models.Qwen2_5_VL(model_config, rngs=nnx.Rngs(0)), cfg)
  stage, prepare = stages.cpo_stage(model, cfg, grid)
  mesh = sharding.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1}, devices=jax.devices()[:1])
  tr_sh = sharding.state_shardings(stage.trainable, mesh)
  fr_sh = sharding.state_shardings(stage.frozen, mesh)
  opt_sh = optimizer.opt_state_shardings(stage.tx, stage.trainable, tr_sh, mesh)
  step_fn = steps.make_train_step(stage, mesh, (tr_sh, fr_sh, opt_sh))
  trainable, frozen = jax.device_put(stage.trainable, tr_sh), jax.device_put(stage.frozen, fr_sh)
  opt_state = jax.jit(stage.tx.init, out_shardings=opt_sh)(trainable)
  batch = prepare(raw)
  n = raw['chosen_input_ids'].shape[0]
  rows = []
  for _ in range(3):
    trainable, opt_state, metrics = step_fn(trainable, frozen, opt_state, batch)
    rows.append(jax.device_get(metrics))
  assert step_fn._cache_size() == 1  # the step count is traced: one compilation.
  first = rows[0]
  assert int(first['perturbed/count']) == 2 * n
  # Step 1 (LoRA B = 0): policy == reference, every pair's loss is log 2, extra ones included,
  # although their rejected side saw other pixels than their chosen side.
  np.testing.assert_allclose(first['perturbed/loss'], np.log(2), rtol=1e-6)
  # Zero up to float32 rounding: XLA compiles the adapters-on and adapters-off forwards apart
  # (seen: 3.8e-7 with jax 0.10.2 on CPU); the same bound as test_train's first CPO++ step.
  assert abs(float(first['perturbed/rewards/margins'])) < 1e-6
  np.testing.assert_allclose(first['preference_loss'], np.log(2), rtol=1e-6)
  assert float(first['perturbed/logps/rejected']) != float(first['perturbed/logps/chosen'])
  assert float(rows[-1]['perturbed/rewards/margins']) != 0.0  # the adapters learned from them.
