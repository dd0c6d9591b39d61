"""Length buckets (config data.length_buckets): a batch cut to a shorter static length gives
the same per-example losses as the same rows padded to max_len, and the train loop takes a
stream whose batches have several lengths (one compile per bucket)."""

import functools
import json

from flax import nnx
import grain
import jax
import numpy as np
import pytest

from cpo_jax import config_defaults
from cpo_jax import models
from cpo_jax import sharding
from cpo_jax.data import datasets
from cpo_jax.data import processors
from cpo_jax.data import sources
from cpo_jax.data import streams
from cpo_jax.train import objectives
from cpo_jax.train import stages
from cpo_jax.train import writers

L = 96


@pytest.fixture(scope='module')
def setup():
  proc = processors.make_processors(None)
  ids = proc.ids
  model_config = models.get_config_for_tokens('tiny', ids)
  cfg = config_defaults.base_config('', domain='driving', data='synth_drive')
  return proc, model_config, cfg


def _model(model_config, seed=0):
  return models.Qwen2_5_VL(model_config, rngs=nnx.Rngs(seed))


def _per_example(loss_fn, model, batch, n):
  """[n] losses of `loss_fn(model, one-row batch)` for each row, one jitted vmap: a batch of
  one row is that example's loss (its token-mean NLL; for a pair, its preference loss +
  rpo_alpha * NLL)."""
  graphdef, state = nnx.split(model)

  def one(state, row):
    # pixel_values of one image are [P, D] (HF layout); every other array gets its batch axis.
    row = {k: v if k.endswith('pixel_values') else v[None] for k, v in row.items()}
    return loss_fn(nnx.merge(graphdef, state, copy=True), row)[0]

  rows = {
    k: v.reshape(n, -1, v.shape[-1]) if k.endswith('pixel_values') else v for k, v in batch.items()
  }
  return jax.jit(jax.vmap(one, in_axes=(None, 0)))(state, rows)


def _drive_batches(make, proc, buckets, **kw):
  source = sources.make_source('synth_drive', 'train', num_examples=64, seed=0)
  return make(source, proc, batch_size=8, max_len=L, seed=0, length_buckets=buckets, **kw)


def test_sft_losses_do_not_depend_on_trailing_padding(setup):
  proc, model_config, _ = setup
  full = next(_drive_batches(datasets.make_sft_iterator, proc, ''))
  cut = next(_drive_batches(datasets.make_sft_iterator, proc, '80'))
  assert full['input_ids'].shape == (8, L) and cut['input_ids'].shape == (8, 80)
  grid = np.asarray(full['image_grid_thw'][0])
  model = _model(model_config)
  loss_fn = functools.partial(objectives.sft_loss_fn, grid=grid)
  a, b = (
    _per_example(loss_fn, model, stages.step_inputs(x, grid, model_config), 8) for x in (full, cut)
  )
  assert np.ptp(np.asarray(a)) > 1e-3  # distinct rows: a row mix-up would show
  np.testing.assert_allclose(a, b, rtol=1e-5)


def test_cpo_losses_do_not_depend_on_trailing_padding(setup):
  proc, model_config, cfg = setup
  kw = dict(thinking_fraction=0.5)
  full = next(_drive_batches(datasets.make_cpo_iterator, proc, '', **kw))
  cut = next(_drive_batches(datasets.make_cpo_iterator, proc, '80', **kw))
  assert cut['chosen_input_ids'].shape == cut['rejected_input_ids'].shape == (8, 80)
  grid = np.asarray(full['image_grid_thw'][0])
  # Policy and reference differ (two initialisations), so the preference loss is not log 2.
  pair = objectives.PolicyAndReference(_model(model_config, 0), _model(model_config, 1))
  loss_fn = functools.partial(objectives.cpo_loss_fn, grid=grid, cfg=cfg.cpo)
  prep = lambda x: stages.step_inputs(
    x, grid, model_config, ('chosen_', 'rejected_'), extra=('source', 'sample_weight')
  )
  a, b = (_per_example(loss_fn, pair, prep(x), 8) for x in (full, cut))
  assert np.ptp(np.asarray(a)) > 1e-3
  np.testing.assert_allclose(a, b, rtol=1e-5)


class _Widths(grain.DatasetIterator):
  """Passes a Grain iterator through, noting each batch's sequence length."""

  def __init__(self, inner, key, seen):
    super().__init__()
    self._inner, self._key, self.seen = inner, key, seen

  def __next__(self):
    batch = next(self._inner)
    self.seen.append(batch[self._key].shape[1])
    return batch

  def get_state(self):
    return self._inner.get_state()

  def set_state(self, state):
    self._inner.set_state(state)


def test_cpo_stage_trains_on_a_stream_of_several_lengths(setup, tmp_path):
  """The step derives every static size from the batch's shape: a bucket is one more compile."""
  proc, model_config, cfg = setup
  cfg = cfg.copy_and_resolve_references()
  cfg.cpo.num_steps, cfg.log_every_steps, cfg.checkpoint.every_steps = 2, 1, 100
  mesh = sharding.make_mesh({'data': -1, 'fsdp': 1, 'tensor': 1})  # 8 simulated devices.
  # synth_cxr rows are 89-95 tokens: with these buckets the first batch (its longest row 95
  # tokens) takes the full length and the second (93) the 94 bucket.
  source = sources.make_source('synth_cxr', 'train', num_examples=64, seed=0)
  make = lambda: datasets.make_cpo_iterator(
    source, proc, batch_size=8, max_len=L, seed=1, length_buckets='92,94'
  )
  grid = np.array([1, 8, 8], np.int32)  # 112x112 images
  widths = []
  stages.train_cpo(
    _model(model_config),
    cfg,
    mesh=mesh,
    grid=grid,
    workdir=str(tmp_path),
    writer=writers.MetricsWriter(str(tmp_path)),
    make_batches=lambda: _Widths(make(), 'chosen_input_ids', widths),
  )
  assert widths == [L, 94]
  rows = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
  assert [(r['stage'], r['step']) for r in rows] == [('cpo_plus', 1), ('cpo_plus', 2)]
  assert all(np.isfinite(r['loss']) and r['completion_tokens_dropped'] == 0 for r in rows)


def test_run_data_passes_the_buckets_and_checks_them(tmp_path, monkeypatch):
  cfg = config_defaults.base_config('', domain='driving', data='synth_drive')
  cfg.data.num_examples = dict(train=32, test=8, ood=8)
  cfg.data.spurious_correlation = 0.9
  cfg.data.length_buckets = '80'
  data = streams.RunData(cfg, str(tmp_path))  # synth_drive rows are 74-76 tokens
  assert data.length_buckets == (80, L)
  assert next(data.sft_batches())['input_ids'].shape == (16, 80)
  assert next(data.cpo_batches())['rejected_loss_mask'].shape == (16, 80)
  for spec, match in (
    ('16,80', 'cannot hold the 16 image tokens'),
    ('80,64', 'strictly increasing'),
  ):
    cfg.data.length_buckets = spec
    with pytest.raises(ValueError, match=rf'data.length_buckets=.*{match}'):
      streams.RunData(cfg, str(tmp_path))
  # Several hosts: each cuts its own half batch to its own bucket (the train loop pads them
  # to one length per step, see sharding.pad_to_common_length).
  cfg.data.length_buckets = '80'
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  data = streams.RunData(cfg, str(tmp_path))
  assert data.length_buckets == (80, L)
  assert next(data.sft_batches())['input_ids'].shape == (8, 80)
