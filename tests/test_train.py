"""Training: steps lower their loss, the reference is the adapters-off model, and a resumed
stage ends exactly where an uninterrupted one does (params, optimizer and data order)."""

import functools
import json

from flax import nnx
import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpo_jax import config_defaults
from cpo_jax import models
from cpo_jax import sharding
from cpo_jax.data import datasets
from cpo_jax.data import processors
from cpo_jax.data import sources
from cpo_jax.models import lora
from cpo_jax.train import reference_table
from cpo_jax.train import stages
from cpo_jax.train import writers


@pytest.fixture(scope='module')
def setup():
  proc = processors.make_processors(None)
  source = sources.make_source('synth_drive', 'train', num_examples=64)
  ids = proc.ids
  model_config = models.get_config_for_tokens('tiny', ids)
  cfg = config_defaults.base_config('', domain='driving', data='synth_drive')
  cfg.sft.optimizer.lr = 3e-3
  cfg.cpo.optimizer.lr = 3e-3
  cfg.sft.optimizer.warmup_frac = cfg.cpo.optimizer.warmup_frac = 0.0
  mesh = sharding.make_mesh({'data': -1, 'fsdp': 1, 'tensor': 1})  # 8 simulated devices.
  return proc, source, model_config, cfg, mesh


def _model(model_config, seed=0):
  return models.Qwen2_5_VL(model_config, rngs=nnx.Rngs(seed))


def _sft_iter(proc, source, batch_size=8):
  return datasets.make_sft_iterator(source, proc, batch_size=batch_size, max_len=128, seed=0)


def _cpo_iter(proc, source, batch_size=8):
  return datasets.make_cpo_iterator(source, proc, batch_size=batch_size, max_len=128, seed=1)


def _run(stage_fn, model, cfg, mesh, grid, make_batches, workdir):
  return stage_fn(
    model,
    cfg,
    mesh=mesh,
    grid=grid,
    make_batches=make_batches,
    workdir=str(workdir),
    writer=writers.MetricsWriter(str(workdir)),
  )


def _rows(workdir):
  return [json.loads(line) for line in open(workdir / 'metrics.jsonl')]


def test_sft_lowers_the_loss_on_the_mesh(setup, tmp_path):
  proc, source, model_config, cfg, mesh = setup
  cfg = cfg.copy_and_resolve_references()
  cfg.sft.num_steps, cfg.log_every_steps, cfg.checkpoint.every_steps = 12, 1, 100
  grid = np.asarray(next(_sft_iter(proc, source))['image_grid_thw'][0])
  # Always the same batch: the loss on it must fall.
  fixed = next(_sft_iter(proc, source))
  _run(stages.train_sft, _model(model_config), cfg, mesh, grid, lambda: _Repeat(fixed), tmp_path)
  losses = [r['loss'] for r in _rows(tmp_path)]
  assert len(losses) == 12 and all(r['stage'] == 'sft' for r in _rows(tmp_path))
  assert losses[-1] < 0.8 * losses[0], losses
  assert [r['perf/step_recompiles'] for r in _rows(tmp_path)] == [0] * 12


def test_a_step_that_compiles_again_is_counted_and_logged(setup, tmp_path, caplog):
  proc, source, model_config, cfg, mesh = setup
  cfg = cfg.copy_and_resolve_references()
  cfg.sft.num_steps, cfg.log_every_steps, cfg.checkpoint.every_steps = 3, 1, 100
  grid = np.asarray(next(_sft_iter(proc, source))['image_grid_thw'][0])
  short = next(datasets.make_sft_iterator(source, proc, batch_size=8, max_len=128, seed=0))
  long = next(datasets.make_sft_iterator(source, proc, batch_size=8, max_len=160, seed=0))
  batches = lambda: _Repeat(short, then=long, after=2)  # step 3 has longer rows
  with caplog.at_level('WARNING'):
    _run(stages.train_sft, _model(model_config), cfg, mesh, grid, batches, tmp_path)
  assert [r['perf/step_recompiles'] for r in _rows(tmp_path)] == [0, 0, 1]
  assert 'compiled again at step 3' in caplog.text


def test_cpo_starts_at_the_reference_and_learns_the_preference(setup, tmp_path):
  proc, source, model_config, cfg, mesh = setup
  cfg = cfg.copy_and_resolve_references()
  cfg.cpo.num_steps, cfg.log_every_steps, cfg.checkpoint.every_steps = 10, 1, 100
  fixed = next(_cpo_iter(proc, source))
  assert set(np.unique(fixed['source'])) == {0, 1}  # both pair sources in the batch.
  grid = np.asarray(fixed['image_grid_thw'][0])
  model = _run(
    stages.train_cpo, _model(model_config), cfg, mesh, grid, lambda: _Repeat(fixed), tmp_path
  )
  rows = _rows(tmp_path)
  first, last = rows[0], rows[-1]
  # Step 1 is computed before any update: policy == reference (LoRA B = 0), every reward is
  # 0 up to rounding (the two passes are compiled apart), and the sigmoid loss is log 2
  # (+ rpo_alpha * NLL).
  for key in ('rewards/chosen', 'rewards/rejected', 'rewards/margins'):
    assert abs(first[key]) < 1e-6, (key, first[key])
  np.testing.assert_allclose(first['preference_loss'], np.log(2), rtol=1e-5)
  np.testing.assert_allclose(first['loss'], np.log(2) + 0.1 * first['nll'], rtol=1e-5)
  assert last['rewards/margins'] > 0 and last['preference_loss'] < first['preference_loss']
  for src in ('thinking', 'perception'):
    assert f'{src}/rewards/accuracies' in last and last[f'{src}/count'] > 0
  # Only the adapters trained: switching them off gives back the base (reference) model.
  base = _model(model_config)
  batch = stages.step_inputs(fixed, grid, model_config, ('chosen_',), extra=())
  args = dict(
    attention_mask=batch['chosen_attention_mask'],
    pixel_values=fixed['chosen_pixel_values'],
    image_grid_thw=np.tile(grid, (8, 1)),
    position_ids=batch['chosen_position_ids'].transpose(1, 0, 2),
  )
  with lora.adapters_disabled(model):
    off = model(fixed['chosen_input_ids'], **args)
  np.testing.assert_allclose(off, base(fixed['chosen_input_ids'], **args), atol=1e-5)
  assert np.abs(model(fixed['chosen_input_ids'], **args) - off).max() > 1e-4


def test_resume_matches_an_uninterrupted_run(setup, tmp_path):
  proc, source, model_config, cfg, mesh = setup
  cfg = cfg.copy_and_resolve_references()
  cfg.sft.num_steps, cfg.log_every_steps, cfg.checkpoint.every_steps = 4, 1, 2
  grid = np.asarray(next(_sft_iter(proc, source))['image_grid_thw'][0])
  make = functools.partial(_sft_iter, proc, source)

  straight = _run(stages.train_sft, _model(model_config), cfg, mesh, grid, make, tmp_path / 'a')
  # Preempted after step 2 (checkpointed there), then the same command again, with a
  # differently initialised model: params, optimizer and data order come from the checkpoint.
  with pytest.raises(_Preemption):
    _run(
      stages.train_sft,
      _model(model_config),
      cfg,
      mesh,
      grid,
      lambda: _Preempted(make(), after=3),
      tmp_path / 'b',
    )
  resumed = _run(
    stages.train_sft, _model(model_config, seed=1), cfg, mesh, grid, make, tmp_path / 'b'
  )
  for a, b in zip(jax.tree.leaves(nnx.state(straight)), jax.tree.leaves(nnx.state(resumed))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  losses = lambda d: {r['step']: r['loss'] for r in _rows(d)}
  assert losses(tmp_path / 'a') == losses(tmp_path / 'b')
  # A finished stage is not trained again.
  n_rows = len(_rows(tmp_path / 'b'))
  _run(stages.train_sft, _model(model_config), cfg, mesh, grid, make, tmp_path / 'b')
  assert len(_rows(tmp_path / 'b')) == n_rows


def test_non_finite_metrics_stop_the_run():
  with pytest.raises(FloatingPointError, match='sft step 3: metric loss is nan'):
    writers.metrics_row('sft', 3, {'loss': np.float32('nan')}, 0.1)


class _Preemption(Exception):
  pass


class _Preempted(grain.DatasetIterator):
  """A Grain iterator that dies on its `after`-th batch, as a preempted host would."""

  def __init__(self, inner, after):
    super().__init__()
    self._inner, self._left = inner, after

  def __next__(self):
    self._left -= 1
    if self._left <= 0:
      raise _Preemption()
    return next(self._inner)

  def get_state(self):
    return self._inner.get_state()

  def set_state(self, state):
    self._inner.set_state(state)


class _Repeat(grain.DatasetIterator):
  """One batch forever, or `then` from the `after`-th on (no state to checkpoint)."""

  def __init__(self, batch, then=None, after=None):
    super().__init__()
    self.batch, self._then, self._left = batch, then, after

  def __next__(self):
    if self._then is not None:
      self._left -= 1
      if self._left < 0:
        return self._then
    return self.batch

  def get_state(self):
    return {}

  def set_state(self, state):
    del state


def test_precomputed_reference_trains_like_adapters_off_and_guards_its_rows(setup, tmp_path):
  proc, source, model_config, cfg, mesh = setup
  cfg = cfg.copy_and_resolve_references()
  cfg.cpo.num_steps, cfg.log_every_steps, cfg.checkpoint.every_steps = 3, 1, 100
  make = functools.partial(_cpo_iter, proc, source)
  grid = np.asarray(next(make())['image_grid_thw'][0])
  sft_model = _model(model_config)
  runs = {}
  for mode in ('adapters_off', 'precomputed'):
    cfg.cpo.reference = mode
    runs[mode] = _run(
      stages.train_cpo, nnx.clone(sft_model), cfg, mesh, grid, make, tmp_path / mode
    )
  off, pre = (_rows(tmp_path / m) for m in ('adapters_off', 'precomputed'))
  assert [r['step'] for r in pre] == [1, 2, 3]
  for a, b in zip(off, pre):
    for key in ('loss', 'rewards/margins', 'rewards/chosen', 'logps/rejected'):
      np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-6, err_msg=key)
  assert abs(pre[-1]['rewards/margins']) > 1e-5  # the reference mattered after step 1
  for a, b in zip(
    jax.tree.leaves(nnx.state(runs['adapters_off'], lora.LoRAParam)),
    jax.tree.leaves(nnx.state(runs['precomputed'], lora.LoRAParam)),
  ):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
  # The table on disk: one row of [pairs, 2] (chosen, rejected) per step, plain arrays.
  path = tmp_path / 'precomputed' / 'reference' / 'cpo_plus.process0.npz'
  with np.load(path, allow_pickle=False) as f:
    assert f['rows'].shape == (3, 8, 2) and f['fingerprints'].shape == (3,)
  table = reference_table.ReferenceTable(
    np.zeros((3, 8, 2), np.float32), np.zeros(3, np.uint64), str(path)
  )
  with pytest.raises(ValueError, match='step 1: the batch is not the one'):
    table.attach({'source': np.zeros(8, np.int32)}, 1, np.uint64(7))


def test_a_reference_pass_cut_short_resumes_from_its_stored_rows(setup, tmp_path, caplog):
  proc, source, model_config, cfg, mesh = setup
  cfg = cfg.copy_and_resolve_references()
  cfg.cpo.reference, cfg.cpo.num_steps, cfg.checkpoint.every_steps = 'precomputed', 4, 2
  make = functools.partial(_cpo_iter, proc, source)
  grid = np.asarray(next(make())['image_grid_thw'][0])
  sft_model = _model(model_config)

  def crashing():  # the pass dies at its fourth batch, after the rows of two were stored
    it = make()
    for _ in range(3):
      yield next(it)
    raise RuntimeError('host lost')

  with pytest.raises(RuntimeError, match='host lost'):
    _run(stages.train_cpo, nnx.clone(sft_model), cfg, mesh, grid, crashing, tmp_path / 'cut')
  table = tmp_path / 'cut' / 'reference' / 'cpo_plus.process0.npz'
  with np.load(table) as f:
    assert f['rows'].shape[0] == 2
  # Log-probs of another preference (here the answers weighed apart) are never reused.
  other = cfg.copy_and_resolve_references()
  other.cpo.answer_weight = 0.5
  with pytest.raises(ValueError, match='computed with .*"answer_weight": 1.0.*delete the file'):
    _run(stages.train_cpo, nnx.clone(sft_model), other, mesh, grid, make, tmp_path / 'cut')
  with caplog.at_level('INFO'):
    _run(stages.train_cpo, nnx.clone(sft_model), cfg, mesh, grid, make, tmp_path / 'cut')
  assert 'has 2 of 4 steps; computing the rest' in caplog.text
  _run(stages.train_cpo, nnx.clone(sft_model), cfg, mesh, grid, make, tmp_path / 'whole')
  whole = tmp_path / 'whole' / 'reference' / 'cpo_plus.process0.npz'
  with np.load(table) as cut, np.load(whole) as ref:
    np.testing.assert_array_equal(cut['rows'], ref['rows'])
    np.testing.assert_array_equal(cut['fingerprints'], ref['fingerprints'])


def test_the_fingerprint_reads_image_digests_instead_of_pixels(setup):
  proc, source, *_ = setup
  batch = next(_cpo_iter(proc, source))
  assert batch['image_digest'].dtype == np.uint64 and len(set(batch['image_digest'])) > 1
  fp = reference_table.batch_fingerprint(batch)
  # Pixels are not hashed on the loop's path: the pipeline's digest stands for them...
  same = dict(batch, chosen_pixel_values=np.zeros_like(batch['chosen_pixel_values']))
  assert reference_table.batch_fingerprint(same) == fp
  # ... and a row whose images differ has another digest, so another fingerprint.
  digest = batch['image_digest'].copy()
  digest[0] ^= np.uint64(1)
  assert reference_table.batch_fingerprint(dict(batch, image_digest=digest)) != fp
  # Without digests (another pipeline) the pixels are hashed.
  bare = {k: v for k, v in batch.items() if k != 'image_digest'}
  bare_zeros = dict(bare, chosen_pixel_values=np.zeros_like(batch['chosen_pixel_values']))
  assert reference_table.batch_fingerprint(bare) != reference_table.batch_fingerprint(bare_zeros)


def test_lora_sft_trains_adapters_and_merges_them(setup, tmp_path):
  """sft.trainable='lora' (the paper's SFT): adapters are attached, trained, then merged."""
  proc, source, model_config, cfg, mesh = setup
  cfg = cfg.copy_and_resolve_references()
  cfg.sft.trainable = 'lora'
  cfg.sft.num_steps, cfg.log_every_steps, cfg.checkpoint.every_steps = 12, 1, 100
  cfg.sft.optimizer.lr = 1e-2
  grid = np.asarray(next(_sft_iter(proc, source))['image_grid_thw'][0])
  fixed = next(_sft_iter(proc, source))
  model = _model(model_config)
  # A host copy: the merge after SFT updates the base kernels in place (their buffers donated).
  before = jax.tree.map(np.array, nnx.state(model, nnx.Param))
  merged = _run(stages.train_sft, model, cfg, mesh, grid, lambda: _Repeat(fixed), tmp_path)
  losses = [r['loss'] for r in _rows(tmp_path)]
  assert losses[-1] < 0.9 * losses[0], losses
  assert not jax.tree.leaves(nnx.state(merged, lora.LoRAParam))  # merged into the weights
  q = lambda m: np.asarray(m.layers.q_proj.kernel[...])
  norm = lambda m: np.asarray(m.layers.input_layernorm.weight[...])
  assert np.abs(q(merged) - np.asarray(before['layers']['q_proj']['kernel'][...])).max() > 0
  # Only the adapter targets changed: norms and the embedding are the initial ones.
  np.testing.assert_array_equal(norm(merged), before['layers']['input_layernorm']['weight'][...])
  np.testing.assert_array_equal(merged.embed_tokens[...], before['embed_tokens'][...])


def test_unknown_sft_trainable_is_a_clear_error(setup):
  _, _, model_config, cfg, _ = setup
  cfg = cfg.copy_and_resolve_references()
  cfg.sft.trainable = 'adapters'
  with pytest.raises(ValueError, match="sft.trainable='adapters'"):
    stages.sft_stage(_model(model_config), cfg, np.array([1, 8, 8]))


def test_adapters_and_their_moments_stay_float32_on_a_bfloat16_model(setup):
  _, _, model_config, cfg, _ = setup
  model = models.Qwen2_5_VL(
    model_config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0)
  )
  stage, _ = stages.cpo_stage(stages.attach_adapters(model, cfg), cfg, np.array([1, 8, 8]))
  assert model.layers.q_proj.kernel[...].dtype == jnp.bfloat16
  adapters = jax.tree.leaves(stage.trainable)
  assert adapters and all(a.dtype == jnp.float32 for a in adapters)
  moments = jax.tree.leaves(stage.tx.init(stage.trainable))
  assert all(m.dtype in (jnp.float32, jnp.int32) for m in moments)
  merged = lora.merge_lora(model)
  assert merged.layers.q_proj.kernel[...].dtype == jnp.bfloat16  # merged back in bf16


def test_accumulated_sft_trains_through_the_loop(setup, tmp_path):
  proc, source, model_config, cfg, mesh = setup
  cfg = cfg.copy_and_resolve_references()
  cfg.sft.grad_accum_steps = 2  # 16 rows: 2 micro-batches of 8, one per device each
  cfg.sft.num_steps, cfg.log_every_steps, cfg.checkpoint.every_steps = 10, 1, 5
  fixed = next(_sft_iter(proc, source, batch_size=16))
  grid = np.asarray(fixed['image_grid_thw'][0])
  _run(stages.train_sft, _model(model_config), cfg, mesh, grid, lambda: _Repeat(fixed), tmp_path)
  losses = [r['loss'] for r in _rows(tmp_path)]
  assert len(losses) == 10 and losses[-1] < 0.8 * losses[0], losses
