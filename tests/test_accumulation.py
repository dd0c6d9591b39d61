"""Gradient accumulation on a sharded mesh gives the whole batch's update on one device."""

from flax import nnx
import jax
import numpy as np
import optax
import pytest

from cpo_jax import config_defaults
from cpo_jax import models
from cpo_jax import sharding
from cpo_jax.data import datasets
from cpo_jax.data import processors
from cpo_jax.data import sources
from cpo_jax.models import lora
from cpo_jax.train import accumulation
from cpo_jax.train import optimizer
from cpo_jax.train import stages
from cpo_jax.train import steps

pytestmark = pytest.mark.skipif(
  jax.device_count() < 8, reason='needs XLA_FLAGS=--xla_force_host_platform_device_count=8'
)


@pytest.fixture(scope='module')
def setup():
  proc = processors.make_processors(None)
  source = sources.make_source('synth_drive', 'train', num_examples=32)
  model_config = models.get_config_for_tokens('tiny', proc.ids)
  cfg = config_defaults.base_config('', domain='driving', data='synth_drive')
  sft_raw = next(datasets.make_sft_iterator(source, proc, batch_size=8, max_len=128, seed=0))
  layout = datasets.pair_layout_for(0.5, 8)
  cpo_raw = next(
    datasets.make_cpo_iterator(source, proc, batch_size=8, max_len=128, seed=1, pair_layout=layout)
  )
  return model_config, cfg, sft_raw, cpo_raw, layout


def _placed_step(stage, prepare, raw, mesh):
  """The stage's jitted step and its inputs (trainable, frozen, optimizer state, batch) placed
  on `mesh`."""
  tr_sh = sharding.state_shardings(stage.trainable, mesh)
  fr_sh = sharding.state_shardings(stage.frozen, mesh)
  opt_sh = optimizer.opt_state_shardings(stage.tx, stage.trainable, tr_sh, mesh)
  trainable = jax.device_put(stage.trainable, tr_sh)
  frozen = jax.device_put(stage.frozen, fr_sh)
  opt_state = jax.jit(stage.tx.init, out_shardings=opt_sh)(trainable)
  batch = prepare(raw)
  acc = stage.accumulation
  if acc is not None:
    batch = accumulation.split_micro(batch, acc.steps, acc.group)
  batch = sharding.global_batch(batch, mesh, micro=acc is not None)
  step = steps.make_train_step(stage, mesh, (tr_sh, fr_sh, opt_sh))
  return step, (trainable, frozen, opt_state, batch)


def _one_step(stage, prepare, raw, mesh):
  """One jitted step; returns (first moments = 0.1 * clipped gradients, metrics)."""
  step, args = _placed_step(stage, prepare, raw, mesh)
  out = step(*args)
  mu = optax.tree_utils.tree_get(out.opt_state, 'mu')
  flat = {'/'.join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(mu)}
  return flat, jax.device_get(out.metrics)


def _assert_same(a, b):
  (mu_a, m_a), (mu_b, m_b) = a, b
  assert set(m_a) == set(m_b)
  for key in m_a:
    np.testing.assert_allclose(m_a[key], m_b[key], rtol=1e-5, atol=1e-5, err_msg=key)
  assert mu_a.keys() == mu_b.keys()
  for key in mu_a:
    np.testing.assert_allclose(mu_a[key], mu_b[key], rtol=1e-4, atol=1e-7, err_msg=key)


ONE_DEVICE = {'data': 1, 'fsdp': 1, 'tensor': 1}
SHARDED = {'data': 2, 'fsdp': 2, 'tensor': 2}


def _mesh(shape):
  devices = jax.devices()[: int(np.prod(list(shape.values())))]
  return sharding.make_mesh(shape, devices=devices)


@pytest.mark.alone  # an 8-device step with many collectives (tests/conftest.py)
@pytest.mark.parametrize('remat', ['none', 'full'])
def test_sft_accumulated_on_a_mesh_equals_the_whole_batch(setup, remat):
  model_config, cfg, raw, _, _ = setup
  grid = np.asarray(raw['image_grid_thw'][0])
  runs = []
  for shape, accum in ((ONE_DEVICE, 1), (SHARDED, 2)):
    c = cfg.copy_and_resolve_references()
    c.sft.grad_accum_steps = accum
    model = models.Qwen2_5_VL(model_config, rngs=nnx.Rngs(0), remat=remat if accum > 1 else 'none')
    stage, prepare = stages.sft_stage(stages.sft_model(model, c), c, grid)
    runs.append(_one_step(stage, prepare, raw, _mesh(shape)))
  _assert_same(*runs)
  assert runs[0][1]['grad_norm'] > 0


def _random_adapters(model, seed=2):
  adapters = nnx.state(model, lora.LoRAParam)
  keys = iter(jax.random.split(jax.random.key(seed), len(jax.tree.leaves(adapters))))
  nnx.update(model, jax.tree.map(lambda x: 0.05 * jax.random.normal(next(keys), x.shape), adapters))


@pytest.mark.alone  # an 8-device step with many collectives (tests/conftest.py)
@pytest.mark.parametrize('perturbations', ['', 'occlude:1.0'])
def test_cpo_accumulated_on_a_mesh_equals_the_whole_batch(setup, perturbations):
  model_config, cfg, _, raw, layout = setup
  grid = np.asarray(raw['image_grid_thw'][0])
  runs = []
  for shape, accum in ((ONE_DEVICE, 1), (SHARDED, 2)):
    c = cfg.copy_and_resolve_references()
    c.cpo.grad_accum_steps = accum
    c.cpo.device_perturbations = perturbations  # occlusion draws nothing at random
    c.cpo.source_weights = (2.0, 0.5, 1.0)  # the normalised weights must span micro-batches
    model = models.Qwen2_5_VL(model_config, rngs=nnx.Rngs(0))
    adapted = stages.attach_adapters(model, c)
    _random_adapters(adapted)  # policy != reference
    stage, prepare = stages.cpo_stage(adapted, c, grid, pair_layout=layout)
    runs.append(_one_step(stage, prepare, raw, _mesh(shape)))
  _assert_same(*runs)
  metrics = runs[0][1]
  assert abs(float(metrics['rewards/margins'])) > 1e-4
  assert int(metrics['thinking/count']) == int(metrics['perception/count']) - (
    8 if perturbations else 0
  )


def test_micro_batches_keep_whole_pair_groups():
  batch = {'chosen_input_ids': np.zeros((6, 4)), 'chosen_pixel_values': np.zeros((6 * 3, 5))}
  micro = accumulation.split_micro(batch, 3)
  assert micro['chosen_input_ids'].shape == (3, 2, 4)
  assert micro['chosen_pixel_values'].shape == (3, 6, 5)
  with pytest.raises(ValueError, match='6 rows per process does not split into 3 micro-batches'):
    accumulation.split_micro(batch, 3, group=4)


def _compiled_temp_bytes(stage, prepare, raw, mesh):
  step, args = _placed_step(stage, prepare, raw, mesh)
  return step.lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_activations_stay_split_by_rows_on_an_fsdp_mesh(setup, monkeypatch):
  # With the weights split over fsdp, XLA may gather a layer's activations instead and every
  # device computes all rows: the step constrains them to rows over (data, fsdp).
  model_config, cfg, raw, _, _ = setup
  grid = np.asarray(raw['image_grid_thw'][0])
  mesh = _mesh({'data': 1, 'fsdp': 8, 'tensor': 1})
  model = models.Qwen2_5_VL(model_config, rngs=nnx.Rngs(0))
  stage, prepare = stages.sft_stage(stages.sft_model(model, cfg), cfg, grid)
  split = _compiled_temp_bytes(stage, prepare, raw, mesh)
  monkeypatch.setattr(sharding, 'rows_over_data', lambda x: x)
  free = _compiled_temp_bytes(stage, prepare, raw, mesh)
  assert split < 0.75 * free, (split, free)
