"""The CPO++ step does less work with the same numbers: images encoded once and shared by
policy and reference, vocabulary projection only at completion positions, a frozen-copy
reference equal to adapters-off; a completion that does not fit is an error."""

import functools

from flax import nnx
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
from cpo_jax.models import layers
from cpo_jax.models import lora
from cpo_jax.train import completion
from cpo_jax.train import naive
from cpo_jax.train import objectives
from cpo_jax.train import optimizer
from cpo_jax.train import pair_images
from cpo_jax.train import shared_prefix
from cpo_jax.train import stages
from cpo_jax.train import steps


@pytest.fixture(scope='module')
def setup():
  proc = processors.make_processors(None)
  source = sources.make_source('synth_drive', 'train', num_examples=32)
  raw = next(datasets.make_cpo_iterator(source, proc, batch_size=4, max_len=128, seed=1))
  assert set(np.unique(raw['source'])) == {0, 1}  # thinking and perception pairs.
  grid = np.asarray(raw['image_grid_thw'][0])
  ids = proc.ids
  make_config = functools.partial(models.get_config_for_tokens, 'tiny', ids)
  batch = stages.step_inputs(
    raw, grid, make_config(), ('chosen_', 'rejected_'), extra=('source', 'sample_weight')
  )
  cfg = config_defaults.base_config('', domain='driving', data='synth_drive').cpo
  return raw, batch, grid, make_config, cfg


def _policy(make_config, *, tied=True, include_vision=False):
  """An 'SFT' model and its policy: adapters with random B, so policy != reference."""
  model = models.Qwen2_5_VL(make_config(tie_word_embeddings=tied), rngs=nnx.Rngs(0))
  sft_copy = nnx.clone(model)
  lora.apply_lora(model, rank=4, alpha=8.0, include_vision=include_vision, rngs=nnx.Rngs(1))
  adapters = nnx.state(model, lora.LoRAParam)
  keys = iter(jax.random.split(jax.random.key(2), len(jax.tree.leaves(adapters))))
  nnx.update(model, jax.tree.map(lambda x: 0.05 * jax.random.normal(next(keys), x.shape), adapters))
  return model, sft_copy


def _loss_and_grads(model, batch, grid, cfg, grads=True, loss_fn=objectives.cpo_loss_fn, **kw):
  """Jitted loss metrics (and gradients w.r.t. the adapters) of `loss_fn`."""
  graphdef, trainable, rest = nnx.split(model, lora.LoRAParam, ...)

  def f(tr):
    return loss_fn(nnx.merge(graphdef, tr, rest, copy=True), batch, grid, cfg, **kw)

  if not grads:
    return jax.jit(f)(trainable)[1], None
  (_, metrics), g = jax.jit(jax.value_and_grad(f, has_aux=True))(trainable)
  return metrics, g


def _assert_same(a, b, atol=1e-5):
  ma, ga = a
  mb, gb = b
  assert set(ma) == set(mb)
  for k in ma:
    np.testing.assert_allclose(
      np.asarray(ma[k]), np.asarray(mb[k]), rtol=1e-5, atol=atol, err_msg=k
    )
  for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=atol)


@pytest.mark.parametrize('tied,include_vision', [(True, False), (False, True)])
def test_optimized_step_equals_the_straightforward_one(setup, tied, include_vision):
  # (False, True): untied lm_head kernel, and adapters in the ViT (each forward encodes).
  raw, batch, grid, make_config, cfg = setup
  model, _ = _policy(make_config, tied=tied, include_vision=include_vision)
  assert objectives.vision_has_adapters(model) == include_vision
  # Gradients once (compiling a backward pass is the slow part on 2 cores).
  fast = _loss_and_grads(model, batch, grid, cfg, grads=tied)
  naive_out = _loss_and_grads(model, batch, grid, cfg, grads=tied, loss_fn=naive.naive_cpo_loss_fn)
  _assert_same(fast, naive_out)
  metrics = fast[0]
  assert abs(float(metrics['rewards/margins'])) > 1e-4  # a real policy/reference gap was compared.
  assert int(metrics['completion_tokens_dropped']) == 0
  # The compact slab is much shorter than the sequence: image tokens are never projected.
  length = raw['chosen_input_ids'].shape[1]
  assert completion.completion_positions(length, grid, model) == length - 16


def test_frozen_copy_reference_equals_adapters_off(setup):
  raw, batch, grid, make_config, cfg = setup
  model, sft_copy = _policy(make_config)
  pair = objectives.PolicyAndReference(model, sft_copy)
  # The copy is frozen state: the trainable split holds only the policy's adapters.
  trainable = nnx.state(pair, lora.LoRAParam)
  assert jax.tree.leaves(trainable) and all(
    'policy' == path[0] for path, _ in nnx.to_flat_state(trainable)
  )
  _assert_same(
    _loss_and_grads(pair, batch, grid, cfg, grads=False),
    _loss_and_grads(model, batch, grid, cfg, grads=False),
  )


def test_sft_loss_projects_only_completions_with_the_same_value(setup):
  raw, _, grid, make_config, _ = setup
  model, _ = _policy(make_config)
  side = {k[len('chosen_') :]: raw[k] for k in raw if k.startswith('chosen_')}
  side['image_grid_thw'] = raw['image_grid_thw']
  batch = stages.step_inputs(side, grid, make_config())
  fast = objectives.sft_loss_fn(model, batch, grid)[0]
  slow = naive.naive_sft_loss_fn(model, batch, grid)[0]
  np.testing.assert_allclose(float(fast), float(slow), rtol=1e-6)


def test_a_completion_longer_than_the_slab_is_an_error_not_a_truncation(setup):
  raw, batch, grid, make_config, cfg = setup
  model, _ = _policy(make_config)
  longest = int(raw['chosen_loss_mask'][:, 1:].sum(1).max())
  # Host check (what the stage's prepare runs on every batch).
  completion.check_completion_lengths(raw, longest, ('chosen_', 'rejected_'))
  with pytest.raises(ValueError, match='completion tokens but the step keeps'):
    completion.check_completion_lengths(raw, longest - 1, ('chosen_',))
  # Eager: raises. Under jit: the loss is NaN (the loop stops on it) and the count says why.
  with pytest.raises(ValueError, match='do not fit'):
    objectives.cpo_loss_fn(model, batch, grid, cfg, max_completion_len=longest - 1)
  metrics, _ = _loss_and_grads(model, batch, grid, cfg, grads=False, max_completion_len=longest - 1)
  assert np.isnan(metrics['loss']) and int(metrics['completion_tokens_dropped']) > 0


def _grouped_batch(raw, grid, make_config, pattern):
  """The pipeline batch's rows rearranged so row r is a thinking pair iff pattern[r]."""
  rows = {
    True: list(np.flatnonzero(raw['source'] == 0)),
    False: list(np.flatnonzero(raw['source'] != 0)),
  }
  order = [rows[thinking][i % len(rows[thinking])] for i, thinking in enumerate(pattern)]
  n = raw['source'].shape[0]
  out = {}
  for key, value in raw.items():
    value = np.asarray(value)
    if key.endswith('pixel_values'):
      out[key] = value.reshape(n, -1, value.shape[-1])[order].reshape(-1, value.shape[-1])
    elif value.shape[:1] == (n,):
      out[key] = value[order]
  return out, stages.step_inputs(
    out, grid, make_config(), ('chosen_', 'rejected_'), extra=('source', 'sample_weight')
  )


@pytest.mark.parametrize('include_vision', [False, True])
def test_thinking_pairs_encode_their_image_once_with_the_same_numbers(
  setup, include_vision, monkeypatch
):
  raw, _, grid, make_config, cfg = setup
  grouped_raw, batch = _grouped_batch(raw, grid, make_config, [True, False, True, False])
  pair_images.check_pair_layout(grouped_raw, (1, 2))
  model, _ = _policy(make_config, include_vision=include_vision)
  encoded = []
  original = models.Qwen2_5_VL.encode_images

  def counting(self, pixel_values, image_grid_thw, score_bytes=None):
    encoded.append(len(image_grid_thw))  # images per call, counted while tracing
    return original(self, pixel_values, image_grid_thw, score_bytes)

  monkeypatch.setattr(models.Qwen2_5_VL, 'encode_images', counting)
  shared = _loss_and_grads(model, batch, grid, cfg, grads=not include_vision, pair_layout=(1, 2))
  images_shared, encoded[:] = sum(encoded), []
  plain = _loss_and_grads(model, batch, grid, cfg, grads=not include_vision)
  _assert_same(shared, plain)
  # 4 pairs, 2 thinking: 4 chosen + 2 perception rejected images instead of 8, once for
  # both models (frozen ViT) or once per model (adapters in the ViT: policy and reference).
  per_model = 2 if include_vision else 1
  assert (images_shared, sum(encoded)) == (6 * per_model, 8 * per_model)
  assert abs(float(shared[0]['rewards/margins'])) > 1e-4


def _decoder_tokens(monkeypatch):
  """Tokens each decoder call runs (rows x length), recorded while tracing."""
  seen = []
  original = models.Qwen2_5_VL.decoder

  def counting(self, x, *args, **kw):
    seen.append(x.shape[0] * x.shape[1])
    return original(self, x, *args, **kw)

  monkeypatch.setattr(models.Qwen2_5_VL, 'decoder', counting)
  return seen


@pytest.mark.parametrize('pattern,layout', [([True, False] * 2, (1, 2)), ([True] * 4, (1, 1))])
def test_shared_prefix_step_equals_the_full_row_step(setup, pattern, layout, monkeypatch):
  raw, _, grid, make_config, cfg = setup
  grouped_raw, batch = _grouped_batch(raw, grid, make_config, pattern)
  prompt = int(np.asarray(grouped_raw['chosen_loss_mask']).argmax(1).max())
  shared_prefix.check_prefix_fits(grouped_raw, layout, prompt)
  model, _ = _policy(make_config)
  tokens = _decoder_tokens(monkeypatch)
  kw = dict(pair_layout=layout, max_completion_len=40)
  shared = _loss_and_grads(model, batch, grid, cfg, max_prompt_len=prompt, **kw)
  shared_tokens, tokens[:] = sum(tokens), []
  plain = _loss_and_grads(model, batch, grid, cfg, shared_prefix_step=False, **kw)
  _assert_same(shared, plain)
  assert abs(float(shared[0]['rewards/margins'])) > 1e-4
  # Per model (policy and reference): the thinking pairs' prompts once, not twice.
  n, length = batch['chosen_input_ids'].shape
  n_t = sum(pattern)
  expected = n_t * (prompt + 2 * 40) + 2 * (n - n_t) * length
  assert (shared_tokens, sum(tokens)) == (2 * expected, 2 * 2 * n * length)


def test_shared_prefix_with_device_made_pairs_equals_the_full_row_step(setup):
  raw, _, grid, make_config, cfg = setup
  grouped_raw, batch = _grouped_batch(raw, grid, make_config, [True, False] * 2)
  batch['boxes'] = jnp.asarray(grouped_raw['boxes'])
  prompt = int(np.asarray(grouped_raw['chosen_loss_mask']).argmax(1).max())
  model, _ = _policy(make_config)
  kw = dict(pair_layout=(1, 2), perturbations=(('blur', 0.5),), max_completion_len=40)
  _assert_same(
    _loss_and_grads(model, batch, grid, cfg, grads=False, max_prompt_len=prompt, **kw),
    _loss_and_grads(model, batch, grid, cfg, grads=False, shared_prefix_step=False, **kw),
  )


def test_a_prompt_longer_than_the_prefix_or_differing_between_sides_is_an_error(setup):
  raw, _, grid, make_config, _ = setup
  grouped_raw, _ = _grouped_batch(raw, grid, make_config, [True, False] * 2)
  prompt = int(np.asarray(grouped_raw['chosen_loss_mask']).argmax(1).max())
  with pytest.raises(ValueError, match='max_prompt_len is'):
    shared_prefix.check_prefix_fits(grouped_raw, (1, 2), prompt - 1)
  grouped_raw['rejected_input_ids'][0, 3] += 1
  with pytest.raises(ValueError, match='prompts differ'):
    shared_prefix.check_prefix_fits(grouped_raw, (1, 2), prompt)
  # No saving (no max_prompt_len, a long slab): the step keeps full rows.
  assert shared_prefix.prefix_sizes(96, 80, 0) is None
  assert shared_prefix.prefix_sizes(96, 40, 48) == (48, 40)
  # Nor without thinking pairs in the layout, or switched off.
  assert shared_prefix.prefix_sizes(96, 40, 48, pair_layout=(0, 1)) is None
  assert shared_prefix.prefix_sizes(96, 40, 48, enabled=False) is None


def test_a_batch_off_its_pair_layout_is_an_error(setup):
  raw, _, grid, make_config, _ = setup
  grouped_raw, _ = _grouped_batch(raw, grid, make_config, [True, False, False, True])
  with pytest.raises(ValueError, match='do not follow the pair layout'):
    pair_images.check_pair_layout(grouped_raw, (1, 2))
  grouped_raw, _ = _grouped_batch(raw, grid, make_config, [True, False, True, False])
  grouped_raw['rejected_pixel_values'] = grouped_raw['rejected_pixel_values'] + 1.0
  with pytest.raises(ValueError, match='rejected image that differs'):
    pair_images.check_pair_layout(grouped_raw, (1, 2))


@pytest.mark.parametrize('dropout', [0.0, 0.5])
def test_lora_dropout_draws_fresh_masks_each_step_and_the_same_on_a_rerun(setup, dropout):
  raw, batch, grid, make_config, cfg = setup
  model = models.Qwen2_5_VL(make_config(), rngs=nnx.Rngs(0))
  lora.apply_lora(model, rank=4, alpha=8.0, dropout=dropout, rngs=nnx.Rngs(1))
  adapters = nnx.state(model, lora.LoRAParam)  # random B: the adapters (and dropout) matter
  nnx.update(
    model, jax.tree.map(lambda x: 0.05 * jax.random.normal(jax.random.key(2), x.shape), adapters)
  )
  run_cfg = config_defaults.base_config('', domain='driving', data='synth_drive')
  run_cfg.cpo.optimizer.lr = 0.0  # params stay put: only the masks can move the loss
  stage, _ = stages.cpo_stage(model, run_cfg, grid)
  mesh = sharding.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1}, jax.devices()[:1])
  shardings = [sharding.state_shardings(s, mesh) for s in (stage.trainable, stage.frozen)]
  opt_sh = optimizer.opt_state_shardings(stage.tx, stage.trainable, shardings[0], mesh)
  step = steps.make_train_step(stage, mesh, (*shardings, opt_sh))

  def losses_of_two_steps():
    # A copy: the step donates its inputs.
    trainable = jax.device_put(jax.tree.map(jnp.array, stage.trainable), shardings[0])
    opt_state = jax.jit(stage.tx.init, out_shardings=opt_sh)(trainable)
    out = []
    for _ in range(2):
      trainable, opt_state, metrics = step(trainable, stage.frozen, opt_state, batch)
      out.append(float(metrics['loss']))
    return out

  first, second = losses_of_two_steps(), losses_of_two_steps()
  assert first == second  # a rerun (or a resumed run) draws the same masks
  if dropout:
    assert abs(first[0] - first[1]) > 1e-4, first  # step 1 drew other masks than step 0
  else:
    assert first[0] == first[1]


def _without_answers(batch):
  """`batch` with the answer tokens (from each side's answer start) out of the loss mask."""
  out = dict(batch)
  for side in ('chosen_', 'rejected_'):
    marked = objectives.mark_answer_tokens(batch[side + 'loss_mask'], batch[side + 'answer_start'])
    out[side + 'loss_mask'] = jnp.where(marked == completion.ANSWER_TOKEN, 0, marked)
  return out


def _without_end(batch):
  """`batch` with each side's closing end token (its last completion token) out of the mask."""
  out = dict(batch)
  for side in ('chosen_', 'rejected_'):
    marked = objectives.mark_end_token(batch[side + 'loss_mask'])
    out[side + 'loss_mask'] = jnp.where(marked == completion.END_TOKEN, 0, marked)
  return out


def _with_answer_starts(grouped_raw, batch):
  return dict(batch, **{key: jnp.asarray(grouped_raw[key]) for key in objectives.ANSWER_START_KEYS})


def _cpo_config(cfg, **changes):
  out = cfg.copy_and_resolve_references()
  out.update(changes)
  return out


@pytest.mark.parametrize('shared', [False, True])
@pytest.mark.parametrize('left_out', ['answer_weight', 'end_token_weight'])
def test_a_weight_of_0_leaves_its_tokens_to_the_nll(setup, shared, left_out):
  """cpo.answer_weight=0 (the chain only) or cpo.end_token_weight=0 (all but the closing end
  token): the preference (loss, rewards, logps, gradients) is the whole-completion one on rows
  without those tokens; the NLL is the full one."""
  raw, _, grid, make_config, cfg = setup
  grouped_raw, batch = _grouped_batch(raw, grid, make_config, [True, False] * 2)
  batch = _with_answer_starts(grouped_raw, batch)
  model, _ = _policy(make_config)
  prompt = int(np.asarray(grouped_raw['chosen_loss_mask']).argmax(1).max())
  kw = dict(pair_layout=(1, 2), max_completion_len=40, shared_prefix_step=shared)
  kw.update(max_prompt_len=prompt if shared else 0)
  part_cfg = _cpo_config(cfg, rpo_alpha=0.0, **{left_out: 0.0})
  whole_cfg = _cpo_config(cfg, rpo_alpha=0.0)
  trim = _without_answers if left_out == 'answer_weight' else _without_end
  part = _loss_and_grads(model, batch, grid, part_cfg, **kw)
  trimmed = _loss_and_grads(model, trim(batch), grid, whole_cfg, **kw)
  whole = _loss_and_grads(model, batch, grid, whole_cfg, grads=False, **kw)
  nll = part[0].pop('nll')
  assert float(trimmed[0].pop('nll')) != pytest.approx(float(nll))
  np.testing.assert_allclose(nll, whole[0]['nll'], rtol=1e-6)
  _assert_same(part, trimmed)
  # The tokens were really left out, and the straightforward loss agrees.
  assert float(part[0]['logps/chosen']) > float(whole[0]['logps/chosen']) + 0.1
  if not shared:
    naive_metrics, _ = _loss_and_grads(
      model, batch, grid, part_cfg, grads=False, loss_fn=naive.naive_cpo_loss_fn
    )
    np.testing.assert_allclose(naive_metrics['loss'], part[0]['loss'], rtol=1e-5)


def test_an_answer_weight_between_mixes_chain_and_answer_log_probs(setup):
  """The step's summed log-probs at weight w are chain + w * answer: linear between the
  w = 0 and w = 1 runs of the same rows."""
  raw, _, grid, make_config, cfg = setup
  grouped_raw, batch = _grouped_batch(raw, grid, make_config, [True, False] * 2)
  batch = _with_answer_starts(grouped_raw, batch)
  model, _ = _policy(make_config)
  logps = {}
  for w in (0.0, 0.25, 1.0):
    metrics, _ = _loss_and_grads(model, batch, grid, _cpo_config(cfg, answer_weight=w), grads=False)
    logps[w] = np.asarray(metrics['logps/chosen'], np.float64)
  assert logps[0.0] > logps[1.0] + 0.1
  np.testing.assert_allclose(logps[0.25], 0.75 * logps[0.0] + 0.25 * logps[1.0], rtol=1e-5)


def test_preference_logps_weigh_the_answer_in_the_sum_and_in_the_mean():
  # Two rows: 6 completion tokens summing to -3 of which 2 answer tokens sum to -1 and the end
  # token -0.5; 4 tokens, no answer, the end token -0.25.
  out = completion.CompletionLogps(
    *map(
      jnp.asarray,
      ([-3.0, -2.0], [-0.5, -0.5], [6, 4], [0, 0], [-1.0, 0.0], [2, 0], [-0.5, -0.25], [1, 1]),
    )
  )
  total, mean = objectives.preference_logps(out, 0.5)
  np.testing.assert_allclose(total, [-2.25, -1.875])  # the end token goes with its answer
  np.testing.assert_allclose(mean, [-2.25 / 4.5, -1.875 / 3.5])
  total, mean = objectives.preference_logps(out, 1.0, 0.0)
  np.testing.assert_allclose(total, [-2.5, -1.75])
  np.testing.assert_allclose(mean, [-2.5 / 5, -1.75 / 3])
  total, _ = objectives.preference_logps(out, 0.5, 0.5)  # the end token at 0.5 * 0.5
  np.testing.assert_allclose(total, [-3.0 + 0.5 * 1.0 + 0.75 * 0.5, -2.0 + 0.75 * 0.25])
  assert objectives.preference_logps(out, 1.0) == (out.total, out.mean)


def test_an_answer_or_end_weight_outside_0_1_is_an_error(setup):
  _, batch, _, _, _ = setup
  with pytest.raises(ValueError, match='answer_weight'):
    objectives.pair_rows(batch, answer_weight=1.5)
  with pytest.raises(ValueError, match='end_token_weight'):
    objectives.pair_rows(batch, end_token_weight=-0.5)


def test_the_end_token_is_each_rows_last_completion_token():
  mask = jnp.asarray([[0, 1, 1, 1, 0], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]])
  np.testing.assert_array_equal(
    objectives.mark_end_token(mask), [[0, 1, 1, 3, 0], [1, 3, 0, 0, 0], [0, 0, 0, 0, 0]]
  )
  answers = objectives.mark_answer_tokens(mask, jnp.asarray([2, 1, 0]))
  np.testing.assert_array_equal(  # the end token is marked apart from its answer
    objectives.mark_end_token(answers), [[0, 1, 2, 3, 0], [1, 3, 0, 0, 0], [0, 0, 0, 0, 0]]
  )


def test_the_cli_step_blocks_the_vision_attention_on_a_cpu_with_the_same_numbers(
  setup, monkeypatch
):
  """On a CPU backend the stage's step encodes images in cache-sized attention blocks (as
  generation does); `--mode=plan` asks for one block. Same loss as the unblocked step."""
  _, batch, grid, make_config, cfg = setup
  model, _ = _policy(make_config)
  seen = []
  original = models.Qwen2_5_VL.encode_images

  def recording(self, pixel_values, image_grid_thw, score_bytes=None):
    seen.append(score_bytes)
    return original(self, pixel_values, image_grid_thw, score_bytes)

  monkeypatch.setattr(models.Qwen2_5_VL, 'encode_images', recording)
  run_cfg = config_defaults.base_config('', domain='driving', data='synth_drive')
  stage, _ = stages.cpo_stage(model, run_cfg, grid)
  blocked = stage.loss_fn(model, batch)[1]
  assert set(seen) == {layers.CPU_SEGMENT_SCORE_BYTES}
  seen.clear()
  stage, _ = stages.cpo_stage(model, run_cfg, grid, score_bytes=None)
  whole = stage.loss_fn(model, batch)[1]
  assert set(seen) == {None}
  stage, _ = stages.cpo_stage(model, run_cfg, grid, score_bytes=1)  # one (image, head) a block
  one_by_one = stage.loss_fn(model, batch)[1]
  for metrics in (blocked, one_by_one):
    np.testing.assert_allclose(metrics['loss'], whole['loss'], rtol=1e-6)
