"""Training: the optimizer, the jitted step functions of each stage, and the loop.

The model is an nnx.Module; the step is a pure function of (trainable state, frozen state,
optimizer state, batch), made by `nnx.split`ting the model once. The loop around it owns the
side effects: the data iterator, Orbax checkpoints, metrics.jsonl and the progress bar.
"""

import dataclasses
import functools
import hashlib
import json
import os
from typing import Any
from typing import Callable

from absl import logging
from flax import nnx
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import tqdm

from cpo_jax import losses
from cpo_jax import perturb
from cpo_jax import sharding
from cpo_jax.models import get_rope_index  # host-side numpy, transformers' semantics.
from cpo_jax.models import lora

# ----------------------------------------------------------------------------- optimizer


def make_optimizer(opt, num_steps):
  """AdamW with linear warm-up and cosine decay; weight decay on matrices only."""
  warmup = max(1, int(opt.warmup_frac * num_steps))
  schedule = optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=opt.lr,
    warmup_steps=warmup,
    decay_steps=max(num_steps, warmup + 1),
    end_value=opt.lr * opt.end_lr_ratio,
  )
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  tx = optax.chain(
    optax.clip_by_global_norm(opt.grad_clip),
    optax.adamw(schedule, b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay, mask=decay_mask),
  )
  return tx, schedule


# ----------------------------------------------------------------------------- losses
#
# Doing less work per CPO++ step, same numbers (DESIGN.md, "Where the time goes"):
#  * the vocabulary projection runs only at completion positions (`compact_completion` moves
#    them to the front of a static-size slab, then a chunked projection fused with the
#    log-softmax), never over the image and prompt;
#  * when the vision tower carries no adapters, policy and reference see identical image
#    embeddings, so the images are encoded once per step and shared by both forwards.
# `naive=True` in `cpo_loss_fn` is the straightforward computation the tests compare against.

# The reference policy: the SFT model as the adapters-off policy (one model in memory), a
# separate frozen copy, or its log-probs computed once over the stream before training and
# streamed with each batch (no reference forward in the step; see `ReferenceTable`).
REFERENCE_MODES = ('adapters_off', 'frozen_copy', 'precomputed')


class PolicyAndReference(nnx.Module):
  """cpo.reference='frozen_copy': the policy beside a separate frozen copy of the SFT model.

  The copy's Params are not LoRAParams, so `split_model(..., 'lora')` puts them in the frozen
  state: they travel to the step as (sharded) arguments, never as baked-in constants."""

  def __init__(self, policy, reference):
    self.policy = policy
    self.reference = reference


def vision_has_adapters(model):
  """True when LoRA adapters live in the vision tower (then policy and reference images differ)."""
  return bool(jax.tree.leaves(nnx.state(model.visual, lora.LoRAParam)))


def _lm_head_kernel(model):
  """The [H, V] matrix `model.logits_from_hidden` applies, in the compute dtype; None when the
  head is more than a matrix (a bias or an adapter on it): callers then use the model's head."""
  if model.lm_head is None:  # tied embeddings
    return model.embed_tokens[...].astype(model.dtype).T
  head = model.lm_head
  if head.bias is not None or (head.lora_a is not None and head.lora_enabled):
    return None
  return head.kernel[...].astype(model.dtype)


def completion_positions(seq_len, grid, model, max_completion_len=0):
  """Static number of label slots that can hold completion tokens.

  Every sequence carries exactly prod(grid) / merge^2 image tokens and they are never
  completion tokens; labels are input_ids[:, 1:], so at least all but one of them sit
  among the labels: at most seq_len - n_image completion labels. `max_completion_len`
  (config data.max_completion_len, 0 = unset) tightens it; a row with more completion
  tokens is an error (`check_completion_lengths`, and the in-graph count)."""
  merge = model.config.vision_config.spatial_merge_size
  n_image = int(np.prod(np.asarray(grid))) // merge**2
  bound = max(1, int(seq_len) - n_image)
  return min(bound, int(max_completion_len)) if max_completion_len else bound


def check_completion_lengths(batch, num_positions, prefixes=('',)):
  """Host-side: raise if any row has more completion labels than the static slab holds."""
  for p in prefixes:
    counts = np.asarray(batch[p + 'loss_mask'])[:, 1:].astype(bool).sum(axis=1)
    if counts.max(initial=0) > num_positions:
      row = int(counts.argmax())
      raise ValueError(
        f'{p}loss_mask row {row} has {int(counts[row])} completion tokens but the step '
        f'keeps {num_positions} (data.max_completion_len); raise data.max_completion_len '
        f'(0 = derive it from max_len and the image size). Tokens are never dropped.'
      )


def _completion_logps(
  model,
  input_ids,
  attention_mask,
  loss_mask,
  position_ids,
  *,
  pixel_values=None,
  image_grid_thw=None,
  image_embeds=None,
  num_positions=None,
):
  """Per-sequence (sum, mean, count, dropped) log-probs of the completion tokens; token t is
  predicted at t-1. `position_ids` is batch-major [B, 3, L] (see `step_inputs`).

  num_positions=None projects every position to the vocabulary (the straightforward way);
  an int projects only the first `num_positions` completion labels of each row (chunked,
  no [B, L, V] logits) and `dropped` counts completion tokens beyond them (must be 0)."""
  hidden = model.hidden_states(
    input_ids,
    attention_mask=attention_mask,
    pixel_values=pixel_values,
    image_grid_thw=image_grid_thw,
    position_ids=jnp.swapaxes(position_ids, 0, 1),
    image_embeds=image_embeds,
  )
  hidden, labels, mask = hidden[:, :-1], input_ids[:, 1:], loss_mask[:, 1:]
  if num_positions is None:
    total, mean, count = losses.sequence_logps(model.logits_from_hidden(hidden), labels, mask)
    return total, mean, count, jnp.zeros_like(count)
  hidden, labels, mask, dropped = losses.compact_completion(hidden, labels, mask, num_positions)
  kernel = _lm_head_kernel(model)
  if kernel is None:
    total, mean, count = losses.sequence_logps(model.logits_from_hidden(hidden), labels, mask)
  else:
    total, mean, count = losses.sequence_logps_from_hidden(hidden, kernel, labels, mask)
  return total, mean, count, dropped


def _token_mean_nll(sum_logps, n_tokens):
  # Mean over all completion tokens of the batch, as TRL's SFT loss and rpo term.
  return -jnp.sum(sum_logps) / jnp.maximum(jnp.sum(n_tokens), 1)


def _guard_dropped(loss, dropped):
  """A completion token that did not fit the static slab is an error, never a silent
  truncation: raised at once on concrete values; under jit the host check in the stage's
  `prepare` raises first, and this NaN (plus the count metric) stops the loop if it did not."""
  total = jnp.sum(dropped)
  if not isinstance(total, jax.core.Tracer) and int(total) > 0:
    raise ValueError(
      f'{int(total)} completion tokens do not fit the static completion slab; '
      f'raise data.max_completion_len.'
    )
  return jnp.where(total > 0, jnp.nan, loss), total


def _grid_for(batch_size, grid):
  # One static grid row per image; numpy so the vision tower's window tables are constants.
  return np.tile(np.asarray(grid).reshape(1, 3), (batch_size, 1))


def sft_loss_fn(model, batch, grid, *, max_completion_len=0, naive=False):
  b, length = batch['input_ids'].shape
  positions = None if naive else completion_positions(length, grid, model, max_completion_len)
  sum_logps, _, n_tokens, dropped = _completion_logps(
    model,
    batch['input_ids'],
    batch['attention_mask'],
    batch['loss_mask'],
    batch['position_ids'],
    pixel_values=batch['pixel_values'],
    image_grid_thw=_grid_for(b, grid),
    num_positions=positions,
  )
  loss, n_dropped = _guard_dropped(_token_mean_nll(sum_logps, n_tokens), dropped)
  return loss, {'loss': loss, 'completion_tokens_dropped': n_dropped}


# Device-made perception pairs (config cpo.device_perturbations, METHOD.md section 4 (b)).
# For each (kind, severity) every row of the batch gets one extra pair: chosen = the row's
# chosen (image, chain), rejected = the same chain with the chosen image perturbed inside the
# row's evidence boxes. Their source id is 'perception': they are perception pairs (same text,
# counterfactual image), so cpo.source_weights[1] weighs them with the data's perception pairs
# and 'other' (2) keeps its meaning (ingested pairs of unknown kind). Metrics: the top-level
# and per-source ones count every pair the loss sees (so 'perception/...' includes them);
# 'perturbed/...' (count, rewards, logps, loss) is the device-made pairs alone.
# Boxes are in pixels of the processed image (the pipeline rescales them with the image).
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
  std, patch sizes), else the Qwen2-VL processor defaults (what `pipeline.make_processors`
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


def check_pair_layout(batch, layout):
  """Host-side: the batch really has the grouped layout the step assumes (else raise)."""
  t, g = layout
  n = batch['source'].shape[0]
  if n % g:
    raise ValueError(
      f'batch of {n} pairs does not split into groups of {g} (pair layout {layout}).'
    )
  is_thinking = (np.arange(n) % g) < t
  source = np.asarray(batch['source'])
  if not (np.all(source[is_thinking] == 0) and np.all(source[~is_thinking] != 0)):
    raise ValueError(
      f'batch sources {source.tolist()} do not follow the pair layout {layout}: rows '
      f'r with r % {g} < {t} must be thinking pairs (source 0), the others not.'
    )
  chosen = _per_row(np.asarray(batch['chosen_pixel_values']), n)[is_thinking]
  rejected = _per_row(np.asarray(batch['rejected_pixel_values']), n)[is_thinking]
  if not np.array_equal(chosen, rejected):
    raise ValueError(
      'a thinking pair of the batch has a rejected image that differs from its chosen one.'
    )


def _per_row(x, rows, groups=None):
  """[rows * P, D] -> [rows, P, D]; with `groups`: [rows / groups, groups, P, D]."""
  x = x.reshape(rows, -1, x.shape[-1])
  return x if groups is None else x.reshape(rows // groups, groups, *x.shape[1:])


def pair_image_embeds(model, batch, grid, layout=None, extra_pixels=None):
  """Image embeddings of the concatenated rows (chosen [n], rejected [n], extra [k * n]).

  With a pair `layout` (t, g), a thinking pair's rejected image is its chosen image: it is
  encoded once and its embedding reused, so a step encodes n + n * (g - t) / g + k * n
  images instead of (2 + k) * n. The reshape keeps each row group on its data shard."""
  n = batch['chosen_input_ids'].shape[0]
  encode = lambda pixels, rows: model.encode_images(pixels, _grid_for(rows, grid))
  chosen = encode(batch['chosen_pixel_values'], n)
  t, g = layout or (0, 1)
  if t == 0:
    rejected = encode(batch['rejected_pixel_values'], n)
  else:
    own_rows = n // g * (g - t)
    parts = [_per_row(chosen, n, g)[:, :t]]
    if own_rows:
      own = _per_row(batch['rejected_pixel_values'], n, g)[:, t:]
      own = encode(own.reshape(-1, own.shape[-1]), own_rows)
      parts.append(_per_row(own, own_rows, g - t))
    rejected = jnp.concatenate(parts, axis=1).reshape(chosen.shape)
  if extra_pixels is not None:
    patches = batch['chosen_pixel_values'].shape[0] // n
    return jnp.concatenate(
      [chosen, rejected, encode(extra_pixels, extra_pixels.shape[0] // patches)]
    )
  return jnp.concatenate([chosen, rejected])


def _pair_logps_fn(
  model,
  batch,
  grid,
  cfg,
  *,
  max_completion_len=0,
  naive=False,
  encode_once=None,
  compact=True,
  perturbations=(),
  layout=None,
  seed=0,
  pair_layout=None,
):
  """The concatenated rows of a CPO batch and `logps(m)` over them (see `cpo_loss_fn`).

  Returns (policy, reference or None, n, k, logps); logps(m) -> (chosen [n], rejected
  [(1 + k) n] log-probs as the loss uses them, chosen sums, chosen counts, dropped)."""
  if naive:
    encode_once, compact = False, False
  policy, reference = (
    (model.policy, model.reference) if isinstance(model, PolicyAndReference) else (model, None)
  )
  vision_adapters = vision_has_adapters(policy)
  if encode_once and vision_adapters:
    raise ValueError(
      'encode_once=True but the vision tower has LoRA adapters: policy and '
      'reference image embeddings differ.'
    )
  n, length = batch['chosen_input_ids'].shape
  k = len(perturbations)
  extra = (
    perturbed_pixels(batch, grid, perturbations, layout or layout_for(policy.config), seed=seed)
    if k
    else None
  )

  def cat(key):
    # Rows: chosen [n], rejected [n], then K blocks of the perturbed rejected sides [n]
    # (the chosen chain over a perturbed chosen image).
    parts = [batch['chosen_' + key], batch['rejected_' + key]]
    if k:
      parts += [extra] if key == 'pixel_values' else [batch['chosen_' + key]] * k
    return jnp.concatenate(parts, axis=0)

  inputs = dict(
    input_ids=cat('input_ids'),
    attention_mask=cat('attention_mask'),
    loss_mask=cat('loss_mask'),
    position_ids=cat('position_ids'),
  )
  if compact:
    inputs['num_positions'] = completion_positions(length, grid, policy, max_completion_len)
  # Who encodes the images: the step once for both models (frozen ViT without adapters:
  # identical embeddings, no gradient into them), the step per model (adapters in the
  # ViT), or every forward from pixels (naive / encode_once=False).
  if encode_once is None:
    encode_once = not vision_adapters
  per_model = encode_once is False and vision_adapters and not naive
  if encode_once:
    inputs['image_embeds'] = jax.lax.stop_gradient(
      pair_image_embeds(policy, batch, grid, pair_layout, extra)
    )
  elif not per_model:
    inputs.update(pixel_values=cat('pixel_values'), image_grid_thw=_grid_for((2 + k) * n, grid))

  def logps(m):
    embeds = pair_image_embeds(m, batch, grid, pair_layout, extra) if per_model else None
    total, mean, count, dropped = _completion_logps(
      m, **inputs, **({'image_embeds': embeds} if per_model else {})
    )
    used = losses.logps_for_loss(total, mean, cfg.loss_type)  # ipo: mean; else sum.
    # Rejected: the batch's, then the perturbed ones. The perturbed rows copy chosen rows'
    # tokens, so only the first 2n rows can add dropped tokens of their own.
    return used[:n], used[n:], total[:n], count[:n], dropped[: 2 * n]

  return policy, reference, n, k, logps


def _reference_of(policy, reference, logps):
  """The reference's (chosen, rejected) log-probs: the adapters-off policy or the copy."""
  if reference is None:
    with lora.adapters_disabled(policy):
      return jax.lax.stop_gradient(logps(policy)[:2])
  return jax.lax.stop_gradient(logps(reference)[:2])


def reference_logps(model, batch, grid, cfg, **kw):
  """[n, 2 + k] reference log-probs per pair row (chosen, rejected, then each device-made
  rejected side), as `cpo_loss_fn` uses them: what cpo.reference='precomputed' streams."""
  policy, reference, n, k, logps = _pair_logps_fn(model, batch, grid, cfg, **kw)
  ref_c, ref_r = _reference_of(policy, reference, logps)
  return jnp.concatenate([ref_c[:, None], ref_r.reshape(1 + k, n).T], axis=1)


def cpo_loss_fn(model, batch, grid, cfg, **kw):
  """CPO++ (METHOD.md section 3): weighted preference loss + rpo_alpha * NLL(chosen).

  Chosen and rejected go through one concatenated forward. The reference is the same model
  with its LoRA adapters off, or `model.reference` when `model` is a PolicyAndReference.
  Default path: images encoded by the step, once per distinct image: a thinking pair's
  rejected image is not re-encoded when the batch has a `pair_layout` (t, g) (see
  `pipeline.pair_layout_for`), and when the vision tower has no adapters one encoding
  serves policy and reference. The vocabulary projection runs at completion positions only.
  `naive=True`: pixel_values into every forward and full-vocabulary logits (same numbers,
  more work). `encode_once` / `compact` switch the two savings one at a time (benchmarks;
  encode_once=False feeds pixels to every forward).
  `perturbations` ((kind, severity), ...) adds K * B device-made perception pairs (see
  `perturbed_pixels`; needs batch['boxes'] and the run's `layout`): only their rejected side
  is forwarded, their chosen side is the batch's chosen row. `seed`: their rng stream.
  A batch with 'reference_logps' ([n, 2 + k], see `reference_logps`) brings its reference
  (cpo.reference='precomputed'): no reference forward.
  Keywords: max_completion_len, naive, encode_once, compact, perturbations, layout, seed,
  pair_layout.
  """
  policy, reference, n, k, logps = _pair_logps_fn(model, batch, grid, cfg, **kw)
  pol_c, pol_r, chosen_sum, chosen_count, dropped = logps(policy)
  if 'reference_logps' in batch:
    ref = batch['reference_logps']
    ref_c, ref_r = ref[:, 0], ref[:, 1:].T.reshape(-1)
  else:
    ref_c, ref_r = _reference_of(policy, reference, logps)
  source, sample_weight = batch['source'], batch['sample_weight']
  if k:
    # Each extra pair's chosen side is its batch row's chosen side: tile, no forward.
    pol_c, ref_c = jnp.tile(pol_c, 1 + k), jnp.tile(ref_c, 1 + k)
    source = jnp.concatenate([source, jnp.full((k * n,), PERTURBED_SOURCE, source.dtype)])
    sample_weight = jnp.concatenate([sample_weight, jnp.ones((k * n,), sample_weight.dtype)])

  per_example, metrics = losses.preference_loss(
    pol_c,
    pol_r,
    ref_c,
    ref_r,
    beta=cfg.beta,
    loss_type=cfg.loss_type,
    label_smoothing=cfg.label_smoothing,
  )
  pref = losses.cpo_plus_loss(
    per_example,
    source,
    sample_weight,
    source_weights=tuple(cfg.source_weights),
    normalize=cfg.normalize_weights,
  )
  nll = _token_mean_nll(chosen_sum, chosen_count)
  loss, n_dropped = _guard_dropped(pref + cfg.rpo_alpha * nll, dropped)
  metrics.update(loss=loss, preference_loss=pref, nll=nll, completion_tokens_dropped=n_dropped)
  per_pair = losses.pair_metrics(pol_c, pol_r, ref_c, ref_r, beta=cfg.beta)
  metrics.update(losses.per_source_metrics(per_pair, source))
  if k:
    extra_pairs = {key: v[n:] for key, v in per_pair.items()}
    extra_pairs['loss'] = per_example[n:]
    metrics.update(
      losses.per_source_metrics(
        extra_pairs, jnp.zeros((k * n,), jnp.int32), names=(PERTURBED_PREFIX,)
      )
    )
  return loss, metrics


# ----------------------------------------------------------------------------- step


@dataclasses.dataclass
class Stage:
  """What one training stage needs: a model split into trainable / frozen, and a loss."""

  name: str
  graphdef: Any
  trainable: Any
  frozen: Any
  loss_fn: Callable  # (model, batch) -> (loss, metrics)
  tx: optax.GradientTransformation
  schedule: Callable
  # cpo.reference='precomputed': (model, batch) -> [n, 2 + k] reference log-probs.
  reference_fn: Callable | None = None


def split_model(model, trainable):
  """`trainable` is 'all' (every Param) or 'lora' (adapters only)."""
  wanted = {'all': nnx.Param, 'lora': lora.LoRAParam}[trainable]
  return nnx.split(model, wanted, ...)


def make_train_step(stage, mesh, state_shardings):
  """A jitted (trainable, frozen, opt_state, batch) -> (trainable, opt_state, metrics)."""
  graphdef, loss_fn, tx = stage.graphdef, stage.loss_fn, stage.tx

  def step(trainable, frozen, opt_state, batch):
    # The number of updates so far (traced, checkpointed with the optimizer): losses that
    # draw random numbers fold it into their key, deterministic and resumable.
    batch = dict(batch, step=update_count(opt_state))

    def compute(tr):
      # copy: fresh Variables at this trace level (nnx.scan inside checks it).
      model = nnx.merge(graphdef, tr, frozen, copy=True)
      lora.start_dropout_step(model, batch['step'])  # fresh LoRA dropout masks per step
      return loss_fn(model, batch)

    (_, metrics), grads = jax.value_and_grad(compute, has_aux=True)(trainable)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    metrics['grad_norm'] = optax.tree.norm(grads)
    return trainable, opt_state, metrics

  trainable_sh, frozen_sh, opt_sh = state_shardings
  data_sh = sharding.batch_sharding(mesh)
  return jax.jit(
    step,
    in_shardings=(trainable_sh, frozen_sh, opt_sh, data_sh),
    out_shardings=(trainable_sh, opt_sh, sharding.replicated(mesh)),
    donate_argnums=(0, 2),
  )


def update_count(opt_state):
  """The optimizer's update count (optax's `count` leaves all equal it; the first is taken)."""
  counts = optax.tree_utils.tree_get_all_with_path(opt_state, 'count')
  if not counts:
    raise ValueError('the optimizer state has no update count.')
  return counts[0][1]


def opt_state_shardings(tx, trainable, trainable_sh, mesh):
  """Optimizer moments shard like their params; everything else (the step count) is
  replicated on the mesh, or jit rejects it as living on incompatible devices."""
  abstract = jax.eval_shape(tx.init, trainable)
  return optax.tree_utils.tree_map_params(
    tx,
    lambda _, sh: sh,
    abstract,
    trainable_sh,
    transform_non_params=lambda _: sharding.replicated(mesh),
    is_leaf=lambda x: isinstance(x, jax.sharding.NamedSharding),
  )


# ----------------------------------------------------------------------------- loop


class MetricsWriter:
  """Appends one JSON object per logged step to <workdir>/metrics.jsonl."""

  def __init__(self, workdir):
    self.path = os.path.join(workdir, 'metrics.jsonl')

  def write(self, row):
    if jax.process_index() != 0:
      return
    with open(self.path, 'a') as f:
      f.write(json.dumps(row) + '\n')


def _to_row(stage, step, metrics, lr):
  row = {'stage': stage, 'step': step, 'lr': float(lr)}
  for k, v in losses.drop_absent(jax.device_get(metrics)).items():
    if not np.isfinite(v):
      raise FloatingPointError(f'{stage} step {step}: metric {k} is {v}; stopping.')
    row[k] = float(v)
  return row


def has_checkpoint(workdir, stage_name):
  path = os.path.join(os.path.abspath(workdir), 'checkpoints', stage_name)
  return os.path.isdir(path) and any(name.isdigit() for name in os.listdir(path))


def batch_fingerprint(batch):
  """64-bit hash of a step's input arrays: checks that a precomputed reference row belongs
  to the batch it is attached to (same stream, same data, same seed)."""
  h = hashlib.blake2b(digest_size=8)
  for key in sorted(batch):
    h.update(key.encode())
    h.update(np.ascontiguousarray(batch[key]).tobytes())
  return np.uint64(int.from_bytes(h.digest(), 'little'))


class ReferenceTable:
  """Reference log-probs of every step's batch, computed once before training.

  The stream is deterministic (a resumed run sees exactly the batches an uninterrupted one
  would), so row s belongs to step s; a fingerprint of the batch guards the pairing and a
  mismatch is an error, never a silent wrong reference. Stored per process as .npz (plain
  arrays, loaded without pickle) under <workdir>/reference/.
  """

  def __init__(self, rows, fingerprints, path):
    self.rows, self.fingerprints, self.path = rows, fingerprints, path

  @classmethod
  def load_or_compute(
    cls, stage, trainable, frozen, *, mesh, num_steps, make_batches, prepare, workdir
  ):
    path = os.path.join(
      os.path.abspath(workdir), 'reference', f'{stage.name}.process{jax.process_index()}.npz'
    )
    if os.path.exists(path):
      with np.load(path, allow_pickle=False) as f:
        table = cls(f['rows'], f['fingerprints'], path)
      if len(table.rows) >= num_steps:
        return table
      logging.info('%s has %d of %d steps; recomputing.', path, len(table.rows), num_steps)

    @jax.jit
    def reference(trainable, frozen, batch, step):
      model = nnx.merge(stage.graphdef, trainable, frozen, copy=True)
      # The update count the train step will see (device-made pairs fold it in).
      return stage.reference_fn(model, dict(batch, step=step))

    batches, rows, fingerprints = make_batches(), [], []
    for step in tqdm.tqdm(
      range(num_steps),
      desc=f'{stage.name} reference log-probs',
      unit='step',
      dynamic_ncols=True,
      disable=jax.process_index() != 0,
    ):
      batch = prepare(next(batches))
      fingerprints.append(batch_fingerprint(batch))
      out = reference(trainable, frozen, sharding.global_batch(batch, mesh), np.int32(step))
      rows.append(sharding.process_rows(out))
    table = cls(np.stack(rows).astype(np.float32), np.asarray(fingerprints, np.uint64), path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + '.tmp', 'wb') as f:  # whole or absent: a preempted pass reruns
      np.savez(f, rows=table.rows, fingerprints=table.fingerprints)
    os.replace(path + '.tmp', path)
    return table

  def attach(self, batch, step):
    if step >= len(self.rows) or batch_fingerprint(batch) != self.fingerprints[step]:
      raise ValueError(
        f'step {step}: the batch is not the one the precomputed reference in {self.path} '
        f'was computed for (data, seed, batch size or perturbations changed since); '
        f'delete that file to recompute it.'
      )
    return dict(batch, reference_logps=self.rows[step])


def run_stage(
  stage,
  *,
  mesh,
  num_steps,
  make_batches,
  prepare,
  workdir,
  checkpoint_cfg,
  log_every,
  writer,
  restore_only=False,
):
  """Trains `stage` for `num_steps`, resuming from its latest checkpoint in the workdir.

  `make_batches()` returns a Grain iterator of numpy batches; its state is saved with every
  checkpoint, so a resumed run sees exactly the batches an uninterrupted one would.
  `prepare(batch)` turns a pipeline batch into the step's input. Returns the trained
  (trainable, frozen); with `restore_only`, the latest checkpoint as it is (--mode=eval).
  """
  trainable_sh = sharding.state_shardings(stage.trainable, mesh)
  frozen_sh = sharding.state_shardings(stage.frozen, mesh)
  trainable = jax.device_put(stage.trainable, trainable_sh)
  frozen = jax.device_put(stage.frozen, frozen_sh)
  opt_sh = opt_state_shardings(stage.tx, trainable, trainable_sh, mesh)
  opt_state = jax.jit(stage.tx.init, out_shardings=opt_sh)(trainable)

  manager = ocp.CheckpointManager(
    os.path.join(os.path.abspath(workdir), 'checkpoints', stage.name),
    options=ocp.CheckpointManagerOptions(max_to_keep=checkpoint_cfg.max_to_keep),
  )
  start = manager.latest_step() or 0
  if start >= num_steps or restore_only:
    if start:
      target = jax.tree.map(ocp.utils.to_shape_dtype_struct, trainable)
      trainable = manager.restore(
        start, args=ocp.args.Composite(params=ocp.args.StandardRestore(target))
      )['params']
    manager.close()
    return trainable, frozen

  batches = make_batches()
  if start:
    abstract = functools.partial(jax.tree.map, ocp.utils.to_shape_dtype_struct)
    restored = manager.restore(
      start,
      args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract(trainable)),
        opt_state=ocp.args.StandardRestore(abstract(opt_state)),
        data=grain.checkpoint.CheckpointRestore(batches),
      ),
    )
    trainable, opt_state = restored['params'], restored['opt_state']
    logging.info('%s: resumed from step %d.', stage.name, start)

  table = None
  if stage.reference_fn is not None:  # cpo.reference='precomputed': a pass before training.
    table = ReferenceTable.load_or_compute(
      stage,
      trainable,
      frozen,
      mesh=mesh,
      num_steps=num_steps,
      make_batches=make_batches,
      prepare=prepare,
      workdir=workdir,
    )
  step_fn = make_train_step(stage, mesh, (trainable_sh, frozen_sh, opt_sh))
  bar = tqdm.tqdm(
    range(start, num_steps),
    initial=start,
    total=num_steps,
    desc=stage.name,
    unit='step',
    dynamic_ncols=True,
    disable=jax.process_index() != 0,
  )
  try:
    for step in bar:
      batch = prepare(next(batches))
      if table is not None:
        batch = table.attach(batch, step)
      batch = sharding.global_batch(batch, mesh)
      trainable, opt_state, metrics = step_fn(trainable, frozen, opt_state, batch)
      done = step + 1
      if done % log_every == 0 or done == num_steps:
        row = _to_row(stage.name, done, metrics, stage.schedule(step))
        writer.write(row)
        bar.set_postfix({k: f'{row[k]:.4g}' for k in ('loss', 'rewards/accuracies') if k in row})
      if done % checkpoint_cfg.every_steps == 0 or done == num_steps:
        manager.save(
          done,
          args=ocp.args.Composite(
            params=ocp.args.StandardSave(trainable),
            opt_state=ocp.args.StandardSave(opt_state),
            data=grain.checkpoint.CheckpointSave(batches),
          ),
        )
  finally:
    # Also on an interrupt: let the last (async) save land so a rerun resumes from it.
    manager.wait_until_finished()
    manager.close()
  return trainable, frozen


# ----------------------------------------------------------------------------- stages

SEQUENCE_KEYS = ('input_ids', 'attention_mask', 'loss_mask', 'pixel_values')


def step_inputs(batch, grid, model_config, prefixes=('',), extra=()):
  """The arrays a step consumes, plus Qwen2.5-VL's 3D (M-RoPE) position ids computed on
  host as the HF processor would. The image grid is static per run (it shapes the vision
  tower), so a batch with another grid is an error, not a recompile."""
  batch_grid = np.asarray(batch['image_grid_thw'])
  if not (batch_grid == grid).all():
    raise ValueError(
      f'batch image_grid_thw {np.unique(batch_grid, axis=0).tolist()} differs '
      f'from the run grid {grid.tolist()}; all images must share a size.'
    )
  out = {k: batch[k] for k in extra}
  for p in prefixes:
    out.update({p + k: batch[p + k] for k in SEQUENCE_KEYS})
    position_ids, _ = get_rope_index(
      np.asarray(batch[p + 'input_ids']),
      np.asarray(batch[p + 'attention_mask']),
      batch_grid,
      model_config,
    )
    # Stored batch-major [B, 3, L] so the batch sharding splits its leading dimension.
    out[p + 'position_ids'] = np.asarray(position_ids, np.int32).transpose(1, 0, 2)
  return out


def sft_stage(model, cfg, grid):
  """Stage 1 (SFT): completion-only cross-entropy on (image, prompt) -> chain + answer.

  Returns the Stage and the host-side `prepare(batch)` that feeds its step."""
  tx, schedule = make_optimizer(cfg.sft.optimizer, cfg.sft.num_steps)
  graphdef, trainable, frozen = split_model(model, cfg.sft.trainable)
  max_completion_len = cfg.data.max_completion_len
  stage = Stage(
    'sft',
    graphdef,
    trainable,
    frozen,
    functools.partial(sft_loss_fn, grid=grid, max_completion_len=max_completion_len),
    tx,
    schedule,
  )

  def prepare(b):
    check_completion_lengths(
      b, completion_positions(b['input_ids'].shape[1], grid, model, max_completion_len)
    )
    return step_inputs(b, grid, model.config)

  return stage, prepare


def attach_adapters(model, cfg):
  """Adds new LoRA adapters to the SFT model (in place) for CPO++. Returns the model the
  stage trains: the adapted model (reference = adapters off) or, with
  cpo.reference='frozen_copy', the policy beside a copy of the SFT model taken first."""
  reference = cfg.cpo.reference
  if reference not in REFERENCE_MODES:
    raise ValueError(f'config.cpo.reference={reference!r}; expected one of {REFERENCE_MODES}.')
  ref_model = nnx.clone(model) if reference == 'frozen_copy' else None
  lora.apply_lora(
    model,
    rank=cfg.lora.rank,
    alpha=cfg.lora.alpha,
    dropout=cfg.lora.dropout,
    targets=tuple(cfg.lora.targets.split(',')),
    include_vision=cfg.lora.include_vision,
    rngs=nnx.Rngs(cfg.seed + 1),
  )
  return model if ref_model is None else PolicyAndReference(model, ref_model)


def _policy(stage_model):
  return stage_model.policy if isinstance(stage_model, PolicyAndReference) else stage_model


def cpo_stage(stage_model, cfg, grid, image_processor=None, pair_layout=None):
  """Stage 2 (CPO++) on the output of `attach_adapters`: only the adapters train.

  `image_processor`: the run's (for the patch layout of cpo.device_perturbations); None =
  the Qwen2-VL defaults that `pipeline.make_processors` uses. `pair_layout`: (t, g) when
  the stream groups its pairs (`pipeline.pair_layout_for`); checked on every batch."""
  policy = _policy(stage_model)
  tx, schedule = make_optimizer(cfg.cpo.optimizer, cfg.cpo.num_steps)
  graphdef, trainable, frozen = split_model(stage_model, 'lora')
  max_completion_len = cfg.data.max_completion_len
  perturbations = parse_device_perturbations(cfg.cpo.device_perturbations)
  extra = ('source', 'sample_weight') + (('boxes',) if perturbations else ())
  kw = dict(grid=grid, cfg=cfg.cpo, max_completion_len=max_completion_len, pair_layout=pair_layout)
  if perturbations:
    kw.update(
      perturbations=perturbations, seed=cfg.seed, layout=layout_for(policy.config, image_processor)
    )
  precomputed = cfg.cpo.reference == 'precomputed'
  stage = Stage(
    'cpo_plus',
    graphdef,
    trainable,
    frozen,
    functools.partial(cpo_loss_fn, **kw),
    tx,
    schedule,
    functools.partial(reference_logps, **kw) if precomputed else None,
  )

  def prepare(b):
    check_completion_lengths(
      b,
      completion_positions(b['chosen_input_ids'].shape[1], grid, policy, max_completion_len),
      ('chosen_', 'rejected_'),
    )
    if pair_layout is not None:
      check_pair_layout(b, pair_layout)
    return step_inputs(b, grid, policy.config, ('chosen_', 'rejected_'), extra=extra)

  return stage, prepare


def _run(stage, prepare, cfg, num_steps, train, **loop):
  trainable, frozen = run_stage(
    stage,
    num_steps=num_steps,
    restore_only=not train,
    prepare=prepare,
    checkpoint_cfg=cfg.checkpoint,
    log_every=cfg.log_every_steps,
    **loop,
  )
  return nnx.merge(stage.graphdef, trainable, frozen)


def train_sft(model, cfg, *, grid, train=True, **loop):
  """Runs (or resumes, or with train=False restores) the SFT stage; returns the model."""
  stage, prepare = sft_stage(model, cfg, grid)
  model = _run(stage, prepare, cfg, cfg.sft.num_steps, train, **loop)
  return lora.merge_lora(model) if cfg.sft.trainable == 'lora' else model


def train_cpo(model, cfg, *, grid, train=True, image_processor=None, pair_layout=None, **loop):
  """Runs (or resumes, or with train=False restores) the CPO++ stage; returns the policy."""
  stage, prepare = cpo_stage(attach_adapters(model, cfg), cfg, grid, image_processor, pair_layout)
  return _policy(_run(stage, prepare, cfg, cfg.cpo.num_steps, train, **loop))
