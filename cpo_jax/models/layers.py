"""Building blocks shared by the vision tower and the language model.

Params carry logical axis names as `out_sharding` metadata (eager sharding off: the
train step places them through jit shardings derived from these names).
Linear layers know about LoRA adapters (attached later by `lora.apply_lora`) so that
the same module serves the policy (adapters on) and the reference (adapters off).
"""

from __future__ import annotations

import math

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

Names = tuple[str | None, ...]


def param(value, names: Names, cls=nnx.Param, blocks: tuple[int, ...] | None = None) -> nnx.Param:
  """A Param with logical axis names (one per dim). `blocks`: per dim, the size of the blocks
  a sharding must not cut (attention heads: head_dim), kept as `shard_blocks` metadata."""
  assert len(names) == np.ndim(value), (names, np.shape(value))
  meta = {}
  if blocks is not None and any(b > 1 for b in blocks):
    assert len(blocks) == np.ndim(value), (blocks, np.shape(value))
    meta['shard_blocks'] = tuple(int(b) for b in blocks)
  return cls(value, out_sharding=tuple(names), eager_sharding=False, **meta)


# Rematerialisation of a scanned layer in the backward pass: 'none' stores its activations,
# 'full' stores only its input and recomputes the rest, 'dots' keeps the matmul outputs
# (recomputes norms, activations and softmax: most of the memory back for little compute).
REMAT_MODES = ('none', 'full', 'dots')


def remat(fn, mode: str):
  """`fn` under the rematerialisation `mode` (one of REMAT_MODES)."""
  if mode == 'none':
    return fn
  if mode == 'full':
    return nnx.remat(fn)
  if mode == 'dots':
    return nnx.remat(fn, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
  raise ValueError(f'model.remat={mode!r}; expected one of {REMAT_MODES}.')


def rms_norm(x, weight, eps: float):
  """Qwen RMSNorm: statistics in float32, scale applied after casting back."""
  dtype = x.dtype
  x32 = x.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
  return (weight * x32.astype(dtype)).astype(dtype)


def normal_init(rngs: nnx.Rngs, shape, std: float, dtype):
  """N(0, std^2) values from the params stream.

  Concrete keys draw with numpy (seeded from the key) so that building a model eagerly
  does not compile one XLA program per parameter shape; traced keys (nnx.eval_shape,
  jit) use jax.random.
  """
  key = rngs.params()
  if isinstance(key, jax.core.Tracer):
    return std * jax.random.normal(key, shape, dtype)
  seed = np.asarray(jax.random.key_data(key)).astype(np.uint64).tolist()
  values = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32) * std
  return jnp.asarray(values, dtype)


def stacked(shape, names: Names, stack: int | None):
  """Prepends the scanned-layer axis when the module is a stack of `stack` layers."""
  if stack is None:
    return tuple(shape), tuple(names)
  return (stack, *shape), ('layers', *names)


def activation(name: str):
  if name == 'silu':
    return jax.nn.silu
  if name in ('gelu', 'gelu_pytorch_exact'):
    return lambda x: jax.nn.gelu(x, approximate=False)
  if name in ('gelu_pytorch_tanh', 'gelu_new', 'quick_gelu_tanh'):
    return lambda x: jax.nn.gelu(x, approximate=True)
  if name == 'quick_gelu':
    return lambda x: x * jax.nn.sigmoid(1.702 * x)
  raise ValueError(f'unsupported activation {name!r}')


class RMSNorm(nnx.Module):
  def __init__(self, dim: int, eps: float, *, dtype, param_dtype, stack: int | None = None):
    shape, names = stacked((dim,), ('norm',), stack)
    self.weight = param(jnp.ones(shape, param_dtype), names)
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x):
    return rms_norm(x.astype(self.dtype), self.weight[...].astype(self.dtype), self.eps)


class Linear(nnx.Module):
  """y = x @ kernel + bias (+ LoRA: dropout(x) @ lora_a @ lora_b * lora_scale).

  kernel is [in, out] (transposed w.r.t. torch's nn.Linear weight).
  """

  def __init__(
    self,
    in_features: int,
    out_features: int,
    *,
    use_bias: bool,
    names: Names,
    dtype,
    param_dtype,
    rngs: nnx.Rngs,
    stack: int | None = None,
    blocks: tuple[int, int] = (1, 1),
  ):
    # blocks: (in, out) sizes a sharding must not cut, e.g. (1, head_dim) for a q projection.
    shape, knames = stacked((in_features, out_features), names, stack)
    lead = (1,) * (len(shape) - 2)
    self.kernel = param(
      normal_init(rngs, shape, 1.0 / math.sqrt(in_features), param_dtype),
      knames,
      blocks=lead + tuple(blocks),
    )
    bshape, bnames = stacked((out_features,), names[-1:], stack)
    self.bias = (
      param(jnp.zeros(bshape, param_dtype), bnames, blocks=lead + tuple(blocks[-1:]))
      if use_bias
      else None
    )
    self.dtype = dtype
    self.names = tuple(names)
    # LoRA state; filled by lora.apply_lora.
    self.lora_a = nnx.data(None)
    self.lora_b = nnx.data(None)
    self.lora_scale = 0.0
    self.lora_dropout = 0.0
    self.lora_enabled = True
    # LoRA dropout randomness: per-(layer) seed and call counter (lora.LoRADropoutRng);
    # `deterministic` follows nnx's model.train() / model.eval().
    self.lora_seed = nnx.data(None)
    self.lora_count = nnx.data(None)
    self.deterministic = False

  def __call__(self, x):
    # Tokens flattened into one dimension: a weight's gradient then contracts a single
    # dimension, which XLA's CPU dot takes as is; over [batch, seq] it first copied the
    # output gradient transposed (the small model's CPO++ step: 0.240 -> 0.199 s). A free reshape.
    lead = x.shape[:-1]
    x = x.reshape(-1, x.shape[-1]).astype(self.dtype)
    y = x @ self.kernel[...].astype(self.dtype)
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    if self.lora_a is not None and self.lora_enabled:
      if self.lora_dropout > 0.0 and not self.deterministic:
        key = jax.random.fold_in(jax.random.key(self.lora_seed[...]), self.lora_count[...])
        self.lora_count[...] = self.lora_count[...] + 1
        keep = jax.random.bernoulli(key, 1.0 - self.lora_dropout, x.shape)
        x = jnp.where(keep, x / (1.0 - self.lora_dropout), 0.0).astype(self.dtype)
      low_rank = (x @ self.lora_a[...].astype(self.dtype)) * jnp.asarray(
        self.lora_scale, self.dtype
      )
      y = y + low_rank @ self.lora_b[...].astype(self.dtype)
    return y.reshape(*lead, y.shape[-1])


def segment_gather_plan(cu_seqlens: np.ndarray):
  """Static plan to run attention independently on contiguous segments.

  Segments [cu[i], cu[i+1]) are padded to the longest one: returns gather indices
  [S, M] into the token axis, a validity mask [S, M] and, for every token, its flat
  position in the padded [S*M] layout (to scatter results back).
  """
  cu = np.asarray(cu_seqlens, np.int64)
  lens = cu[1:] - cu[:-1]
  lens = lens[lens > 0]
  starts = cu[:-1][(cu[1:] - cu[:-1]) > 0]
  m = int(lens.max())
  offs = np.arange(m)[None, :]
  valid = offs < lens[:, None]
  idx = np.where(valid, starts[:, None] + offs, 0)
  flat_pos = np.nonzero(valid.reshape(-1))[0]  # token order == segment order
  return idx.astype(np.int32), valid, flat_pos.astype(np.int32)


# Float32 scores of one block of (segment, head) pairs in `segment_attention` on a CPU (what
# generation asks for there): a block's scores stay in a core's cache, where all of a batch's
# at once (16 MB per head of a 1024-patch image, full attention) go through memory and, past
# glibc's mmap threshold, are mapped afresh, page by page, on every call.
CPU_SEGMENT_SCORE_BYTES = 4 << 20


def segment_attention(q, k, v, plan, scale: float, score_bytes: int | None = None):
  """Bidirectional attention within segments. q/k/v: [N, heads, hd] -> [N, heads, hd].

  Each (segment, head) pair is one row of batched products, in blocks of pairs whose scores
  fit `score_bytes` (lax.map over the blocks; at least one pair per block; None: all pairs in
  one block, as an accelerator wants them and `--mode=plan` counts them). Segments of one
  length that tile the tokens in order (whole images; windows of a grid they divide) are a
  reshape, not a gather, and need no key mask.
  """
  idx, valid, flat_pos = plan
  s, m = idx.shape
  n, h, d = q.shape
  dense = bool(valid.all()) and s * m == n and np.array_equal(idx.reshape(-1), np.arange(n))
  to_rows = lambda x: jnp.swapaxes(x, 1, 2).reshape(s * h, m, d)  # [S, M, h, d] -> [S*h, M, d]
  if dense:
    qs, ks, vs = (to_rows(x.reshape(s, m, h, d)) for x in (q, k, v))
    key_valid = None
  else:
    qs, ks, vs = (to_rows(x[idx]) for x in (q, k, v))
    key_valid = jnp.asarray(np.repeat(valid, h, axis=0))  # [S*h, M]
  per_block = s * h if score_bytes is None else max(1, score_bytes // (4 * m * m))
  if s * h <= per_block:
    out = _attend_rows(qs, ks, vs, key_valid, scale)
  else:
    blocks = -(-(s * h) // per_block)
    pad = blocks * per_block - s * h  # filler rows: zero queries, dropped below
    split = lambda x: jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1)).reshape(
      blocks, per_block, *x.shape[1:]
    )
    xs = (split(qs), split(ks), split(vs), None if key_valid is None else split(key_valid))
    out = jax.lax.map(lambda a: _attend_rows(*a, scale), xs).reshape(-1, m, d)[: s * h]
  out = jnp.swapaxes(out.reshape(s, h, m, d), 1, 2)  # [S, M, h, d]
  return out.reshape(n, h, d) if dense else out.reshape(s * m, h, d)[flat_pos]


def _attend_rows(q, k, v, key_valid, scale):
  """Softmax attention per row: q/k/v [R, M, d]; key_valid bool [R, M] or None (all keys).

  Normalised after the value product: the [M, d] output is divided by the row sums, not the
  [M, M] weights (on a CPU that pass over the weights was a fifth of a 1024-token image's
  attention). The max is a constant shift (no gradient through it), as in jax.nn.softmax."""
  logits = jnp.einsum('rmd,rnd->rmn', q, k).astype(jnp.float32) * scale
  if key_valid is not None:
    logits = jnp.where(key_valid[:, None, :], logits, jnp.finfo(jnp.float32).min)
  weights = jnp.exp(logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True)))
  total = jnp.sum(weights, axis=-1, keepdims=True)
  out = jnp.einsum('rmn,rnd->rmd', weights.astype(v.dtype), v)
  return (out.astype(jnp.float32) / total).astype(v.dtype)


def rotate_half(x):
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


def apply_rotary(x, cos, sin):
  """x: [..., heads, hd]; cos/sin broadcastable to [..., 1, hd]."""
  return x * cos + rotate_half(x) * sin
