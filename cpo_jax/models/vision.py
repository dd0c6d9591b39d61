"""Qwen2.5-VL vision tower: patch embedding, windowed/full attention blocks, 2x2 merger.

Blocks are stacked (leading 'layers' axis) and run with nnx.scan so compile time does not
grow with depth; which blocks attend globally (fullatt_block_indexes) is a scanned flag
selecting between two static attention plans with lax.cond.
"""

from __future__ import annotations

import functools

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from cpo_jax.models import layers
from cpo_jax.models import rope


class VisionBlock(nnx.Module):
  def __init__(self, vc, *, dtype, param_dtype, rngs: nnx.Rngs, stack: int | None = None):
    d, f = vc.hidden_size, vc.intermediate_size
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, stack=stack)
    self.num_heads = vc.num_heads
    self.head_dim = d // vc.num_heads
    self.norm1 = layers.RMSNorm(d, 1e-6, dtype=dtype, param_dtype=param_dtype, stack=stack)
    self.norm2 = layers.RMSNorm(d, 1e-6, dtype=dtype, param_dtype=param_dtype, stack=stack)
    heads = dict(use_bias=True, **kw)  # q, k and v of whole heads: head_dim blocks
    self.qkv = layers.Linear(
      d, 3 * d, names=('vision_embed', 'vision_heads'), blocks=(1, self.head_dim), **heads
    )
    self.proj = layers.Linear(
      d, d, names=('vision_heads', 'vision_embed'), blocks=(self.head_dim, 1), **heads
    )
    self.gate_proj = layers.Linear(d, f, use_bias=True, names=('vision_embed', 'vision_mlp'), **kw)
    self.up_proj = layers.Linear(d, f, use_bias=True, names=('vision_embed', 'vision_mlp'), **kw)
    self.down_proj = layers.Linear(f, d, use_bias=True, names=('vision_mlp', 'vision_embed'), **kw)
    self.act = vc.hidden_act

  def __call__(self, x, cos, sin, is_full, full_attn, window_attn):
    n = x.shape[0]
    h = self.norm1(x)
    qkv = self.qkv(h).reshape(n, 3, self.num_heads, self.head_dim)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    # rotary in float32, as transformers does for the vision tower
    q = layers.apply_rotary(q.astype(jnp.float32), cos[:, None], sin[:, None]).astype(q.dtype)
    k = layers.apply_rotary(k.astype(jnp.float32), cos[:, None], sin[:, None]).astype(k.dtype)
    if full_attn is window_attn:
      o = full_attn(q, k, v)
    else:
      o = jax.lax.cond(is_full, full_attn, window_attn, q, k, v)
    x = x + self.proj(o.reshape(n, -1))
    h = self.norm2(x)
    act = layers.activation(self.act)
    return x + self.down_proj(act(self.gate_proj(h)) * self.up_proj(h))


class PatchMerger(nnx.Module):
  def __init__(self, vc, *, dtype, param_dtype, rngs):
    ctx = vc.hidden_size * vc.spatial_merge_size**2
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.ln_q = layers.RMSNorm(vc.hidden_size, 1e-6, dtype=dtype, param_dtype=param_dtype)
    self.fc1 = layers.Linear(ctx, ctx, use_bias=True, names=(None, 'vision_mlp'), **kw)
    self.fc2 = layers.Linear(
      ctx, vc.out_hidden_size, use_bias=True, names=('vision_mlp', 'embed'), **kw
    )
    self.ctx = ctx

  def __call__(self, x):
    x = self.ln_q(x).reshape(-1, self.ctx)
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


@functools.lru_cache(maxsize=64)
def _vision_plan(grid_key, merge, window_size, patch_size, head_dim, theta):
  """All static index tables for one image_grid_thw (cached: grids repeat across steps)."""
  grid = np.asarray(grid_key, np.int64).reshape(-1, 3)
  window_index, cu_window = rope.vision_window_index(grid, merge, window_size, patch_size)
  unit = merge * merge
  # token-level permutation: whole merge groups move together
  perm = (window_index[:, None] * unit + np.arange(unit)[None]).reshape(-1)
  cos, sin = rope.vision_cos_sin(rope.vision_position_ids(grid, merge), head_dim, theta)
  return dict(
    perm=perm.astype(np.int32),
    inverse=np.argsort(window_index).astype(np.int32),
    cos=cos[perm],
    sin=sin[perm],
    full_plan=layers.segment_gather_plan(rope.vision_cu_seqlens(grid)),
    window_plan=layers.segment_gather_plan(cu_window),
  )


class VisionTower(nnx.Module):
  def __init__(self, vc, *, dtype, param_dtype, rngs: nnx.Rngs, remat: str = 'none'):
    self.dtype = dtype
    self.remat = remat  # layers.REMAT_MODES, for the scanned blocks
    self.spatial_merge_size = vc.spatial_merge_size
    self.window_size = vc.window_size
    self.patch_size = vc.patch_size
    self.num_heads = vc.num_heads
    self.hidden_size = vc.hidden_size
    self.rope_theta = float(vc.rope_parameters['rope_theta'])
    p, t, c = vc.patch_size, vc.temporal_patch_size, vc.in_channels
    if not isinstance(p, int) or not isinstance(t, int):
      raise ValueError(
        f'only square/int patch sizes are supported, got patch_size={p}, temporal={t}'
      )
    self.patch_dim = c * t * p * p
    # Conv3d with stride == kernel over pre-flattened patches == a matmul (no bias).
    self.patch_embed = layers.Linear(
      self.patch_dim,
      vc.hidden_size,
      use_bias=False,
      names=('patch', 'vision_embed'),
      dtype=dtype,
      param_dtype=param_dtype,
      rngs=rngs,
    )
    # all blocks in one module with a leading 'layers' axis (run with nnx.scan)
    self.blocks = VisionBlock(vc, dtype=dtype, param_dtype=param_dtype, rngs=rngs, stack=vc.depth)
    self.merger = PatchMerger(vc, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.full_flags = tuple(bool(i in set(vc.fullatt_block_indexes)) for i in range(vc.depth))

  def __call__(self, pixel_values, grid_thw, score_bytes=None):
    """pixel_values [N, C*T*P*P] (processor layout) -> merged tokens [N / merge^2, out_hidden].

    score_bytes: attention in blocks of (segment, head) pairs whose scores fit this many bytes
    (`layers.segment_attention`); None: every pair at once."""
    grid = np.asarray(grid_thw, np.int64).reshape(-1, 3)
    head_dim = self.hidden_size // self.num_heads
    plan = _vision_plan(
      tuple(grid.reshape(-1).tolist()),
      self.spatial_merge_size,
      self.window_size,
      self.patch_size,
      head_dim,
      self.rope_theta,
    )
    n = int(np.sum(np.prod(grid, -1)))
    if pixel_values.shape != (n, self.patch_dim):
      raise ValueError(
        f'pixel_values has shape {pixel_values.shape}, expected {(n, self.patch_dim)} '
        f'for image_grid_thw {grid.tolist()}'
      )
    x = self.patch_embed(pixel_values)[plan['perm']]
    cos, sin = jnp.asarray(plan['cos']), jnp.asarray(plan['sin'])
    scale = head_dim**-0.5
    attend = functools.partial(layers.segment_attention, scale=scale, score_bytes=score_bytes)
    full = functools.partial(attend, plan=plan['full_plan'])
    window = functools.partial(attend, plan=plan['window_plan'])
    if all(self.full_flags):
      window = full
    elif not any(self.full_flags):
      full = window

    def body(block, x, is_full):
      return block(x, cos, sin, is_full, full, window)

    run = nnx.scan(layers.remat(body, self.remat), in_axes=(0, nnx.Carry, 0), out_axes=nnx.Carry)
    x = run(self.blocks, x, jnp.asarray(self.full_flags))
    return self.merger(x)[plan['inverse']]
