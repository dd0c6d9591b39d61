"""Data-parallel eval on one process: the generate batch is split over the mesh's data-parallel
axes (8 simulated devices), and the answers equal those of the same model unsharded.
Two real processes: tests/test_multihost_train.py (the CLI run's report equals one process's)."""

import functools

from flax import nnx
import jax
import numpy as np
import pytest

from cpo_jax import generate as generate_lib
from cpo_jax import models
from cpo_jax import sharding
from cpo_jax.data import bad_records
from cpo_jax.data import eval_batches
from cpo_jax.data import processors as processors_lib
from cpo_jax.data import sources
from cpo_jax.evaluate import answers
from cpo_jax.evaluate import hosts
from cpo_jax.knowledge import load_graph

BATCH, PROMPT_LEN, NEW_TOKENS = 4, 64, 8


@pytest.fixture(scope='module')
def setup():
  proc = processors_lib.make_processors(None)
  # 10 examples in batches of 4: the last batch holds 2 filler rows (valid=False).
  source = sources.make_source('synth_drive', 'test', num_examples=10)
  model = models.Qwen2_5_VL(models.get_config_for_tokens('tiny', proc.ids), rngs=nnx.Rngs(0))
  # The same parameters, sharded as training leaves them (fsdp splits the weights too).
  mesh = sharding.make_mesh({'data': 4, 'fsdp': 2, 'tensor': 1})
  on_mesh = models.Qwen2_5_VL(models.get_config_for_tokens('tiny', proc.ids), rngs=nnx.Rngs(0))
  state = nnx.state(on_mesh)
  nnx.update(on_mesh, jax.device_put(state, sharding.state_shardings(state, mesh)))
  read = functools.partial(
    eval_batches.make_eval_batches, source, proc, batch_size=BATCH, max_prompt_len=PROMPT_LEN
  )
  return proc, model, on_mesh, mesh, read


def _blank(proc):
  return eval_batches.blank_batch(proc, batch_size=BATCH, max_prompt_len=PROMPT_LEN)


def test_the_batch_rows_are_split_over_the_data_parallel_devices(setup):
  proc, _, on_mesh, mesh, read = setup
  assert generate_lib.mesh_of(on_mesh) is mesh and generate_lib.row_groups(mesh) == (0, 1, 8)
  batch = next(read())
  inputs = {
    'input_ids': batch['input_ids'],
    'pixel_values': batch['pixel_values'],
    'active': np.asarray(batch['valid']),
  }
  placed, grid = generate_lib.place_rows(inputs, batch['image_grid_thw'], mesh)
  # 4 rows padded to the 8 data-parallel shards with inactive copies; one row per device.
  ids = placed['input_ids']
  assert ids.shape == (8, PROMPT_LEN) and len(grid) == 8
  assert {s.data.shape for s in ids.addressable_shards} == {(1, PROMPT_LEN)}
  assert sorted(s.index[0].start for s in ids.addressable_shards) == list(range(8))
  np.testing.assert_array_equal(np.asarray(placed['active']), [True] * 4 + [False] * 4)
  patches = int(np.prod(grid[0]))
  assert {s.data.shape[:2] for s in placed['pixel_values'].addressable_shards} == {(1, patches)}


def test_sharded_greedy_tokens_and_early_stop_equal_the_unsharded(setup):
  proc, model, on_mesh, _, read = setup
  batch = next(read())
  args = [batch[k] for k in ('input_ids', 'attention_mask', 'pixel_values', 'image_grid_thw')]
  kw = dict(max_new_tokens=NEW_TOKENS, pad_token_id=proc.tokenizer.pad_token_id)
  ref = np.asarray(generate_lib.generate(model, *args, eos_token_id=-1, **kw))
  assert len(set(ref[:, 1].tolist())) > 1  # rows differ: a mixed-up row order would show
  got = generate_lib.generate(on_mesh, *args, eos_token_id=-1, **kw)
  np.testing.assert_array_equal(got, ref)
  # Each row ends at its own third token: the loop stops once the last row has ended.
  eos = ref[:, 2].tolist()
  ref, ref_steps = generate_lib.generate(model, *args, eos_token_id=eos, return_steps=True, **kw)
  got, steps = generate_lib.generate(on_mesh, *args, eos_token_id=eos, return_steps=True, **kw)
  np.testing.assert_array_equal(got, np.asarray(ref))
  assert steps == ref_steps < NEW_TOKENS


def test_predictions_on_the_mesh_equal_the_unsharded_model(setup):
  proc, model, on_mesh, _, read = setup
  kw = dict(tokenizer=proc.tokenizer, graph=load_graph('driving'), max_new_tokens=NEW_TOKENS)
  ref = answers.predict_decisions(model, read(), **kw)
  skips = bad_records.SkipCounter()
  split = answers.predict_split(on_mesh, read, blank=lambda: _blank(proc), skips=skips, **kw)
  replicated = answers.predict_decisions(on_mesh, read(), **kw)  # the probes' path
  assert len(ref.texts) == 10 and len(set(ref.texts)) > 1
  for got in (split, replicated):
    assert got.texts == ref.texts
    for a, b in zip(got[:2] + got[3:], ref[:2] + ref[3:]):
      np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(split.indices, np.arange(10))
  assert not skips.counts


def test_blank_batch_has_the_eval_shape_and_no_valid_row(setup):
  proc, _, _, _, read = setup
  real, blank = next(read()), _blank(proc)
  for k, v in blank.items():
    assert (v.shape, v.dtype) == (real[k].shape, real[k].dtype), k
  assert not blank['valid'].any() and (blank['index'] == -1).all()
  image_tokens = lambda b: (b['input_ids'] == proc.ids['image_token_id']).sum(1)
  np.testing.assert_array_equal(image_tokens(blank), image_tokens(real))


def test_lockstep_on_one_process_yields_the_batches_and_raises_a_reading_error():
  assert list(hosts.lockstep(iter([1, 2]), blank=lambda: 0)) == [1, 2]

  def failing():
    yield 1
    raise bad_records.BadRecordError('bad_image', 'test[3]', 'cannot decode')

  steps = hosts.lockstep(failing(), blank=lambda: 0)
  assert next(steps) == 1
  with pytest.raises(bad_records.BadRecordError, match=r'test\[3\]'):
    next(steps)


def test_a_mesh_batch_needs_one_image_grid_per_row(setup):
  _, _, _, mesh, read = setup
  batch = next(read())
  inputs = {'input_ids': batch['input_ids'], 'pixel_values': batch['pixel_values']}
  inputs['active'] = np.ones(BATCH, bool)
  with pytest.raises(ValueError, match='one image per row'):
    generate_lib.place_rows(inputs, batch['image_grid_thw'][:2], mesh)
