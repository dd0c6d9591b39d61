"""Training: the optimizer, the jitted step functions of each stage, and the loop.

The model is an nnx.Module; the step is a pure function of (trainable state, frozen state,
optimizer state, batch), made by `nnx.split`ting the model once. The loop around it owns the
side effects: the data iterator, Orbax checkpoints, metrics.jsonl and the progress bar.
"""
import dataclasses
import functools
import json
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import grain
import tqdm
from absl import logging
from flax import nnx

from cpo_jax import losses
from cpo_jax import sharding
from cpo_jax.models import lora

# ----------------------------------------------------------------------------- optimizer

def make_optimizer(opt, num_steps):
    """AdamW with linear warm-up and cosine decay; weight decay on matrices only."""
    warmup = max(1, int(opt.warmup_frac * num_steps))
    schedule = optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=opt.lr, warmup_steps=warmup,
            decay_steps=max(num_steps, warmup + 1), end_value=opt.lr * opt.end_lr_ratio)
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    tx = optax.chain(
            optax.clip_by_global_norm(opt.grad_clip),
            optax.adamw(schedule, b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay,
                                    mask=decay_mask))
    return tx, schedule


# ----------------------------------------------------------------------------- losses

def _completion_logps(model, input_ids, attention_mask, loss_mask, position_ids, *,
                      pixel_values=None, image_grid_thw=None, image_embeds=None):
    """Per-sequence (sum, mean) log-probs of the completion tokens; token t is predicted at t-1.

    `position_ids` is batch-major [B, 3, L] (see `step_inputs`)."""
    hidden = model.hidden_states(
        input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
        image_grid_thw=image_grid_thw, position_ids=jnp.swapaxes(position_ids, 0, 1),
        image_embeds=image_embeds)
    logits = model.logits_from_hidden(hidden[:, :-1])
    sum_logps, mean_logps, n_tokens = losses.sequence_logps(
        logits, input_ids[:, 1:], loss_mask[:, 1:])
    return sum_logps, mean_logps, n_tokens


def _token_mean_nll(sum_logps, n_tokens):
    # Mean over all completion tokens of the batch, as TRL's SFT loss and rpo term.
    return -jnp.sum(sum_logps) / jnp.maximum(jnp.sum(n_tokens), 1)


def _grid_for(batch_size, grid):
    # One static grid row per image; numpy so the vision tower's window tables are constants.
    return np.tile(np.asarray(grid).reshape(1, 3), (batch_size, 1))


def sft_loss_fn(model, batch, grid):
    grid = _grid_for(batch['input_ids'].shape[0], grid)
    sum_logps, _, n_tokens = _completion_logps(
        model, batch['input_ids'], batch['attention_mask'], batch['loss_mask'],
        batch['position_ids'], pixel_values=batch['pixel_values'], image_grid_thw=grid)
    loss = _token_mean_nll(sum_logps, n_tokens)
    return loss, {'loss': loss}


def cpo_loss_fn(model, batch, grid, cfg):
    """CPO++ (METHOD.md section 3): weighted preference loss + rpo_alpha * NLL(chosen).

    Chosen and rejected go through one concatenated forward; the reference policy is the same
    model with its LoRA adapters switched off (the frozen SFT model).
    """
    n = batch['chosen_input_ids'].shape[0]
    cat = lambda k: jnp.concatenate([batch['chosen_' + k], batch['rejected_' + k]], axis=0)
    inputs = dict(input_ids=cat('input_ids'), attention_mask=cat('attention_mask'),
                  loss_mask=cat('loss_mask'),
                  position_ids=cat('position_ids'),
                  pixel_values=cat('pixel_values'),
                  image_grid_thw=_grid_for(2 * n, grid))

    def logps(m):
        total, mean, count = _completion_logps(m, **inputs)
        used = losses.logps_for_loss(total, mean, cfg.loss_type)  # ipo: mean; else sum.
        return used[:n], used[n:], total[:n], count[:n]

    pol_c, pol_r, chosen_sum, chosen_count = logps(model)
    with lora.adapters_disabled(model):
        ref_c, ref_r = jax.lax.stop_gradient(logps(model)[:2])

    per_example, metrics = losses.preference_loss(
        pol_c, pol_r, ref_c, ref_r, beta=cfg.beta, loss_type=cfg.loss_type,
        label_smoothing=cfg.label_smoothing)
    pref = losses.cpo_plus_loss(
        per_example, batch['source'], batch['sample_weight'],
        source_weights=tuple(cfg.source_weights), normalize=cfg.normalize_weights)
    nll = _token_mean_nll(chosen_sum, chosen_count)
    loss = pref + cfg.rpo_alpha * nll
    metrics.update(loss=loss, preference_loss=pref, nll=nll)
    per_pair = losses.pair_metrics(pol_c, pol_r, ref_c, ref_r, beta=cfg.beta)
    metrics.update(losses.per_source_metrics(per_pair, batch['source']))
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


def split_model(model, trainable):
    """`trainable` is 'all' (every Param) or 'lora' (adapters only)."""
    wanted = {'all': nnx.Param, 'lora': lora.LoRAParam}[trainable]
    return nnx.split(model, wanted, ...)


def make_train_step(stage, mesh, state_shardings):
    """A jitted (trainable, frozen, opt_state, batch) -> (trainable, opt_state, metrics)."""
    graphdef, loss_fn, tx = stage.graphdef, stage.loss_fn, stage.tx

    def step(trainable, frozen, opt_state, batch):
        def compute(tr):
            # copy: fresh Variables at this trace level (nnx.scan inside checks it).
            return loss_fn(nnx.merge(graphdef, tr, frozen, copy=True), batch)
        (_, metrics), grads = jax.value_and_grad(compute, has_aux=True)(trainable)
        updates, opt_state = tx.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        metrics['grad_norm'] = optax.global_norm(grads)
        return trainable, opt_state, metrics

    trainable_sh, frozen_sh, opt_sh = state_shardings
    data_sh = sharding.batch_sharding(mesh)
    return jax.jit(
            step,
            in_shardings=(trainable_sh, frozen_sh, opt_sh, data_sh),
            out_shardings=(trainable_sh, opt_sh, sharding.replicated(mesh)),
            donate_argnums=(0, 2))


def init_opt_state(tx, trainable, mesh):
    """Optimizer state placed beside the params; leaves XLA left on one device (optax's step
    counter) are replicated on the mesh, or jit rejects them as on incompatible devices."""
    opt_state = jax.jit(tx.init)(trainable)
    def place(x):
        on_mesh = isinstance(x.sharding, jax.sharding.NamedSharding) and x.sharding.mesh == mesh
        return x if on_mesh else jax.device_put(x, sharding.replicated(mesh))
    return jax.tree.map(place, opt_state)


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


def run_stage(stage, *, mesh, num_steps, make_batches, prepare, workdir, checkpoint_cfg,
              log_every, writer, restore_only=False):
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
    opt_state = init_opt_state(stage.tx, trainable, mesh)

    manager = ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), 'checkpoints', stage.name),
        options=ocp.CheckpointManagerOptions(max_to_keep=checkpoint_cfg.max_to_keep))
    start = manager.latest_step() or 0
    if start >= num_steps or restore_only:
        if start:
            target = jax.tree.map(ocp.utils.to_shape_dtype_struct, trainable)
            trainable = manager.restore(start, args=ocp.args.Composite(
                params=ocp.args.StandardRestore(target)))['params']
        manager.close()
        return trainable, frozen

    batches = make_batches()
    if start:
        abstract = functools.partial(jax.tree.map, ocp.utils.to_shape_dtype_struct)
        restored = manager.restore(start, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract(trainable)),
            opt_state=ocp.args.StandardRestore(abstract(opt_state)),
            data=grain.checkpoint.CheckpointRestore(batches)))
        trainable, opt_state = restored['params'], restored['opt_state']
        logging.info('%s: resumed from step %d.', stage.name, start)

    opt_sh = jax.tree.map(lambda x: x.sharding, opt_state)
    step_fn = make_train_step(stage, mesh, (trainable_sh, frozen_sh, opt_sh))
    data_sh = sharding.batch_sharding(mesh)
    bar = tqdm.tqdm(range(start, num_steps), initial=start, total=num_steps,
                    desc=stage.name, unit='step', dynamic_ncols=True,
                    disable=jax.process_index() != 0)
    try:
        for step in bar:
            batch = jax.device_put(prepare(next(batches)), data_sh)
            trainable, opt_state, metrics = step_fn(trainable, frozen, opt_state, batch)
            done = step + 1
            if done % log_every == 0 or done == num_steps:
                row = _to_row(stage.name, done, metrics, stage.schedule(step))
                writer.write(row)
                bar.set_postfix({k: f'{row[k]:.4g}' for k in ('loss', 'rewards/accuracies')
                                 if k in row})
            if done % checkpoint_cfg.every_steps == 0 or done == num_steps:
                manager.save(done, args=ocp.args.Composite(
                    params=ocp.args.StandardSave(trainable),
                    opt_state=ocp.args.StandardSave(opt_state),
                    data=grain.checkpoint.CheckpointSave(batches)))
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
    from cpo_jax.models import get_rope_index  # host-side numpy, transformers' semantics.
    batch_grid = np.asarray(batch['image_grid_thw'])
    if not (batch_grid == grid).all():
        raise ValueError(f'batch image_grid_thw {np.unique(batch_grid, axis=0).tolist()} differs '
                         f'from the run grid {grid.tolist()}; all images must share a size.')
    out = {k: batch[k] for k in extra}
    for p in prefixes:
        out.update({p + k: batch[p + k] for k in SEQUENCE_KEYS})
        position_ids, _ = get_rope_index(
            np.asarray(batch[p + 'input_ids']), np.asarray(batch[p + 'attention_mask']),
            batch_grid, model_config)
        # Stored batch-major [B, 3, L] so the batch sharding splits its leading dimension.
        out[p + 'position_ids'] = np.asarray(position_ids, np.int32).transpose(1, 0, 2)
    return out


def train_sft(model, cfg, *, mesh, grid, make_batches, workdir, writer, train=True):
    """Stage 1: completion-only cross-entropy on (image, prompt) -> chain + answer."""
    tx, schedule = make_optimizer(cfg.sft.optimizer, cfg.sft.num_steps)
    graphdef, trainable, frozen = split_model(model, cfg.sft.trainable)
    stage = Stage('sft', graphdef, trainable, frozen,
                  functools.partial(sft_loss_fn, grid=grid), tx, schedule)
    prepare = lambda b: step_inputs(b, grid, model.config)
    trainable, frozen = run_stage(
        stage, mesh=mesh, num_steps=cfg.sft.num_steps, restore_only=not train,
        make_batches=make_batches, prepare=prepare, workdir=workdir,
        checkpoint_cfg=cfg.checkpoint, log_every=cfg.log_every_steps, writer=writer)
    model = nnx.merge(graphdef, trainable, frozen)
    return lora.merge_lora(model) if cfg.sft.trainable == 'lora' else model


def train_cpo(model, cfg, *, mesh, grid, make_batches, workdir, writer, train=True):
    """Stage 2 (CPO++): new LoRA adapters on the SFT model; the reference is adapters off."""
    if cfg.lora.dropout:
        # The step would need to carry the dropout RNG state out of the jitted function;
        # until it does, refuse rather than train with one frozen dropout mask.
        raise NotImplementedError('config.lora.dropout > 0 is not supported by the train step yet.')
    lora.apply_lora(model, rank=cfg.lora.rank, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
                    targets=tuple(cfg.lora.targets.split(',')),
                    include_vision=cfg.lora.include_vision, rngs=nnx.Rngs(cfg.seed + 1))
    tx, schedule = make_optimizer(cfg.cpo.optimizer, cfg.cpo.num_steps)
    graphdef, trainable, frozen = split_model(model, 'lora')
    stage = Stage('cpo_plus', graphdef, trainable, frozen,
                  functools.partial(cpo_loss_fn, grid=grid, cfg=cfg.cpo), tx, schedule)
    prepare = lambda b: step_inputs(b, grid, model.config, ('chosen_', 'rejected_'),
                                   extra=('source', 'sample_weight'))
    trainable, frozen = run_stage(
        stage, mesh=mesh, num_steps=cfg.cpo.num_steps, restore_only=not train,
        make_batches=make_batches, prepare=prepare, workdir=workdir,
        checkpoint_cfg=cfg.checkpoint, log_every=cfg.log_every_steps, writer=writer)
    return nnx.merge(graphdef, trainable, frozen)
