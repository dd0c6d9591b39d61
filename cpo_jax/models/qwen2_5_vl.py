"""Qwen2.5-VL (transformers' Qwen2_5_VLForConditionalGeneration) in Flax NNX.

Layout mirrors transformers: `visual` (vision.VisionTower), token embedding, a stack of
decoder layers (GQA with q/k/v bias, M-RoPE, SwiGLU, RMSNorm; stacked on a leading
'layers' axis and run with nnx.scan), final norm and an LM head (or tied embeddings).

Static-shape contract: `image_grid_thw` is a concrete numpy array (the vision tower's
window permutation and rotary tables are computed from it on the host); pass
`position_ids` (from `get_rope_index`) when calling under jit.
"""

from __future__ import annotations

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from cpo_jax import sharding
from cpo_jax.models import attention
from cpo_jax.models import layers
from cpo_jax.models import rope
from cpo_jax.models.vision import VisionTower

get_rope_index = rope.get_rope_index
gqa_attention = attention.gqa_attention


class _HashableConfig:
  """Holds the (unhashable) transformers config as a static module attribute."""

  def __init__(self, config):
    self.config = config
    self._key = config.to_json_string(use_diff=False)

  def __hash__(self):
    return hash(self._key)

  def __eq__(self, other):
    return isinstance(other, _HashableConfig) and other._key == self._key


def check_supported(config):
  """Raise a clear error for config features this implementation does not cover."""
  tc = config.text_config
  rope_type = tc.rope_parameters.get('rope_type', 'default')
  if rope_type not in ('default', 'mrope'):
    raise NotImplementedError(
      f'text rope_type {rope_type!r} is not supported (only default M-RoPE)'
    )
  if getattr(tc, 'use_sliding_window', False) and tc.sliding_window is not None:
    raise NotImplementedError(
      'use_sliding_window=True is not supported (Qwen2.5-VL releases do not use it)'
    )
  if tc.hidden_size % tc.num_attention_heads:
    raise ValueError('text hidden_size must be divisible by num_attention_heads')


class DecoderLayer(nnx.Module):
  def __init__(
    self,
    tc,
    *,
    dtype,
    param_dtype,
    rngs: nnx.Rngs,
    stack: int | None = None,
    attention_chunk: int = 0,
  ):
    h, f = tc.hidden_size, tc.intermediate_size
    self.attention_chunk = attention_chunk  # query rows per attention block; 0 = one shot
    self.num_heads = tc.num_attention_heads
    self.num_kv_heads = tc.num_key_value_heads
    self.head_dim = h // self.num_heads
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, stack=stack)
    self.input_layernorm = layers.RMSNorm(
      h, tc.rms_norm_eps, dtype=dtype, param_dtype=param_dtype, stack=stack
    )
    self.post_attention_layernorm = layers.RMSNorm(
      h, tc.rms_norm_eps, dtype=dtype, param_dtype=param_dtype, stack=stack
    )
    # q/k/v/o in whole heads (head_dim blocks): tensor parallelism never cuts a head.
    q_width, kv_width = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
    into_heads = dict(use_bias=True, blocks=(1, self.head_dim), **kw)
    self.q_proj = layers.Linear(h, q_width, names=('embed', 'heads'), **into_heads)
    self.k_proj = layers.Linear(h, kv_width, names=('embed', 'kv_heads'), **into_heads)
    self.v_proj = layers.Linear(h, kv_width, names=('embed', 'kv_heads'), **into_heads)
    self.o_proj = layers.Linear(
      q_width, h, use_bias=False, names=('heads', 'embed'), blocks=(self.head_dim, 1), **kw
    )
    self.gate_proj = layers.Linear(h, f, use_bias=False, names=('embed', 'mlp'), **kw)
    self.up_proj = layers.Linear(h, f, use_bias=False, names=('embed', 'mlp'), **kw)
    self.down_proj = layers.Linear(f, h, use_bias=False, names=('mlp', 'embed'), **kw)
    self.act = tc.hidden_act

  def project(self, x, cos, sin):
    """x [B, L, H] -> rotated queries [B, L, nH, hd], rotated keys and values [B, L, kv, hd]."""
    b, seq, _ = x.shape
    h = self.input_layernorm(x)
    q = self.q_proj(h).reshape(b, seq, self.num_heads, self.head_dim)
    k = self.k_proj(h).reshape(b, seq, self.num_kv_heads, self.head_dim)
    v = self.v_proj(h).reshape(b, seq, self.num_kv_heads, self.head_dim)
    q = layers.apply_rotary(q, cos[:, :, None], sin[:, :, None])
    k = layers.apply_rotary(k, cos[:, :, None], sin[:, :, None])
    return q, k, v

  def finish(self, x, o):
    """The layer's output from its input x [B, L, H] and attention output o [B, L, nH, hd]."""
    b, seq = o.shape[:2]
    x = x + self.o_proj(o.reshape(b, seq, -1))
    h = self.post_attention_layernorm(x)
    act = layers.activation(self.act)
    return x + self.down_proj(act(self.gate_proj(h)) * self.up_proj(h))

  def __call__(self, x, cos, sin, mask, k_cache=None, v_cache=None, cache_index=None):
    """x [B, L, H]; cos/sin [B, L, hd]; mask bool [B, L, S] (S = L, or cache length).

    With a cache ([B, S, kv, hd]) the new keys/values are written at cache_index and
    attention runs over the whole cache. Returns (x, k_cache, v_cache).
    """
    q, k, v = self.project(x, cos, sin)
    if k_cache is not None:
      k_cache = jax.lax.dynamic_update_slice(
        k_cache, k.astype(k_cache.dtype), (0, cache_index, 0, 0)
      )
      v_cache = jax.lax.dynamic_update_slice(
        v_cache, v.astype(v_cache.dtype), (0, cache_index, 0, 0)
      )
      k, v = k_cache.astype(q.dtype), v_cache.astype(q.dtype)
    o = gqa_attention(q, k, v, mask, self.head_dim**-0.5, self.attention_chunk)
    return self.finish(x, o), k_cache, v_cache


def causal_padding_mask(attention_mask):
  """bool [B, L, L]: causal and key not padding (transformers' create_causal_mask)."""
  seq = attention_mask.shape[1]
  causal = jnp.tril(jnp.ones((seq, seq), bool))
  return causal[None] & attention_mask.astype(bool)[:, None, :]


def splice_image_embeds(embeds, input_ids, image_embeds, image_token_id):
  """Put image_embeds rows, in order, at the image-token positions (masked_scatter)."""
  is_img = input_ids == image_token_id
  flat = is_img.reshape(-1)
  idx = jnp.clip(jnp.cumsum(flat) - 1, 0, image_embeds.shape[0] - 1)
  rows = image_embeds.astype(embeds.dtype)[idx].reshape(embeds.shape)
  return jnp.where(is_img[..., None], rows, embeds)


class Qwen2_5_VL(nnx.Module):
  """Qwen2_5_VLForConditionalGeneration equivalent. See module docstring."""

  def __init__(
    self,
    config,
    *,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    rngs: nnx.Rngs,
    remat: str = 'none',
    attention_chunk: int = 0,
  ):
    check_supported(config)
    layers.remat(lambda: None, remat)  # a bad mode fails here, not in the first step
    attention.check_chunk(attention_chunk)
    tc, vc = config.text_config, config.vision_config
    if vc.out_hidden_size != tc.hidden_size:
      raise ValueError(
        f'vision out_hidden_size {vc.out_hidden_size} != text hidden_size {tc.hidden_size}'
      )
    self._config = _HashableConfig(config)
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.remat = remat
    self.image_token_id = int(config.image_token_id)
    self.head_dim = tc.hidden_size // tc.num_attention_heads
    self.num_kv_heads = tc.num_key_value_heads
    self.num_layers = tc.num_hidden_layers
    self.rope_theta = float(tc.rope_parameters['rope_theta'])
    self.mrope_section = tuple(tc.rope_parameters.get('mrope_section', (16, 24, 24)))
    self.tie_word_embeddings = bool(config.tie_word_embeddings)

    self.visual = VisionTower(vc, dtype=dtype, param_dtype=param_dtype, rngs=rngs, remat=remat)
    self.embed_tokens = layers.param(
      layers.normal_init(rngs, (tc.vocab_size, tc.hidden_size), 0.02, param_dtype),
      ('vocab', 'embed'),
    )
    # all decoder layers in one module with a leading 'layers' axis (run with nnx.scan)
    self.layers = DecoderLayer(
      tc,
      dtype=dtype,
      param_dtype=param_dtype,
      rngs=rngs,
      stack=tc.num_hidden_layers,
      attention_chunk=int(attention_chunk),
    )
    self.norm = layers.RMSNorm(
      tc.hidden_size, tc.rms_norm_eps, dtype=dtype, param_dtype=param_dtype
    )
    self.lm_head = (
      None
      if self.tie_word_embeddings
      else layers.Linear(
        tc.hidden_size,
        tc.vocab_size,
        use_bias=False,
        names=('embed', 'vocab'),
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
      )
    )

  @property
  def config(self):
    return self._config.config

  # ------------------------------------------------------------------ pieces

  def encode_images(self, pixel_values, image_grid_thw, score_bytes=None):
    """[num_patches, C*T*P*P] -> [num_image_tokens, H] (vision tower + merger; score_bytes:
    see VisionTower)."""
    pixel_values = jnp.asarray(pixel_values).astype(self.dtype)
    return self.visual(pixel_values, image_grid_thw, score_bytes)

  def embed(self, input_ids, pixel_values=None, image_grid_thw=None, image_embeds=None):
    """Token embeddings with image features spliced in at image-token positions."""
    x = jnp.take(self.embed_tokens[...], input_ids, axis=0).astype(self.dtype)
    if image_embeds is None and pixel_values is None:
      return x
    if image_embeds is None and image_grid_thw is None:
      raise ValueError('pixel_values given without image_grid_thw')
    n_feat = (
      image_embeds.shape[0]
      if image_embeds is not None
      else int(np.prod(np.asarray(image_grid_thw), -1).sum()) // self.visual.spatial_merge_size**2
    )
    if not isinstance(input_ids, jax.core.Tracer):
      n_tok = int(np.sum(np.asarray(input_ids) == self.image_token_id))
      if n_tok != n_feat:
        raise ValueError(
          f'Image features and image tokens do not match: {n_tok} image tokens in input_ids, '
          f'{n_feat} image feature rows'
        )
    if image_embeds is None:
      image_embeds = self.encode_images(pixel_values, image_grid_thw)
    return splice_image_embeds(x, input_ids, image_embeds, self.image_token_id)

  def position_ids_for(self, input_ids, attention_mask, image_grid_thw):
    """Positions when the caller passes none: host get_rope_index on concrete inputs; for
    text-only traced inputs the same values in-graph (running count of real tokens)."""
    traced = isinstance(input_ids, jax.core.Tracer) or isinstance(attention_mask, jax.core.Tracer)
    if not traced:
      pos, _ = get_rope_index(
        np.asarray(input_ids),
        None if attention_mask is None else np.asarray(attention_mask),
        image_grid_thw,
        self.config,
      )
      return jnp.asarray(pos, jnp.int32)
    if image_grid_thw is not None:
      raise ValueError(
        'position_ids=None with images needs concrete input_ids/attention_mask; under jit compute '
        'them on the host with get_rope_index(...) and pass position_ids'
      )
    mask = (
      jnp.ones(jnp.shape(input_ids), jnp.int32)
      if attention_mask is None
      else attention_mask.astype(jnp.int32)
    )
    pos = jnp.where(mask > 0, jnp.cumsum(mask, axis=-1) - 1, 0)
    return jnp.broadcast_to(pos[None], (3, *pos.shape))

  def rotary(self, position_ids):
    position_ids = jnp.asarray(position_ids)
    if position_ids.ndim == 2:
      position_ids = jnp.broadcast_to(position_ids[None], (3, *position_ids.shape))
    return rope.mrope_cos_sin(
      position_ids, self.head_dim, self.rope_theta, self.mrope_section, self.dtype
    )

  def decoder(self, x, cos, sin, mask, cache=None, cache_index=None):
    """Runs the decoder stack; returns (final-normed hidden, cache or None)."""
    if cache is None:

      def body(layer, x):
        return sharding.rows_over_data(layer(sharding.rows_over_data(x), cos, sin, mask)[0])

      body = layers.remat(body, self.remat)
      x = nnx.scan(body, in_axes=(0, nnx.Carry), out_axes=nnx.Carry)(self.layers, x)
      return self.norm(x), None

    def body_c(layer, x, kc, vc):
      x, kc, vc = layer(sharding.rows_over_data(x), cos, sin, mask, kc, vc, cache_index)
      return sharding.rows_over_data(x), kc, vc

    x, k, v = nnx.scan(body_c, in_axes=(0, nnx.Carry, 0, 0), out_axes=(nnx.Carry, 0, 0))(
      self.layers, x, cache['k'], cache['v']
    )
    return self.norm(x), {'k': k, 'v': v}

  def init_cache(self, batch: int, length: int, dtype=None):
    shape = (self.num_layers, batch, length, self.num_kv_heads, self.head_dim)
    dtype = dtype or self.dtype
    return {'k': jnp.zeros(shape, dtype), 'v': jnp.zeros(shape, dtype)}

  # ------------------------------------------------------------------ public API

  def hidden_states(
    self,
    input_ids,
    attention_mask=None,
    pixel_values=None,
    image_grid_thw=None,
    position_ids=None,
    image_embeds=None,
  ):
    """Final-normed hidden states [B, L, H]."""
    if position_ids is None:
      position_ids = self.position_ids_for(input_ids, attention_mask, image_grid_thw)
    if attention_mask is None:
      attention_mask = jnp.ones(jnp.shape(input_ids), jnp.int32)
    x = self.embed(input_ids, pixel_values, image_grid_thw, image_embeds)
    cos, sin = self.rotary(position_ids)
    h, _ = self.decoder(x, cos, sin, causal_padding_mask(jnp.asarray(attention_mask)))
    return h

  def hidden_states_shared_prefix(
    self,
    prefix_ids,
    prefix_mask,
    suffix_ids,
    suffix_mask,
    pixel_values=None,
    image_grid_thw=None,
    prefix_position_ids=None,
    image_embeds=None,
  ):
    """Runs a shared prefix once and K text continuations of it against its KV cache.

    prefix_ids/prefix_mask [B, P] (LEFT padded; may hold images), suffix_ids/suffix_mask
    [K, B, S] (RIGHT padded, text only). Returns (prefix hidden [B, P, H], suffix hidden
    [K, B, S, H]), equal to hidden_states on each concatenation prefix ++ suffix_k, at the
    cost of one prefix pass (e.g. a thinking pair: image + prompt once, chosen and rejected
    completions as K = 2). Gradients flow through the cache into the prefix.
    """
    k, b, s_len = suffix_ids.shape
    p_len = prefix_ids.shape[1]
    if prefix_position_ids is None:
      prefix_position_ids = self.position_ids_for(prefix_ids, prefix_mask, image_grid_thw)
    prefix_mask = jnp.asarray(prefix_mask)
    x = self.embed(prefix_ids, pixel_values, image_grid_thw, image_embeds)
    cos, sin = self.rotary(prefix_position_ids)
    cache = self.init_cache(b, p_len)
    h_prefix, cache = self.decoder(
      x, cos, sin, causal_padding_mask(prefix_mask), cache=cache, cache_index=0
    )
    # continuations: positions go on after the prefix's largest one, on all three axes
    next_pos = (
      jnp.max(jnp.where(prefix_mask[None] > 0, prefix_position_ids, -1), axis=(0, 2)) + 1
    )  # [B]
    pos = next_pos[None, :, None] + jnp.arange(s_len)[None, None, :]  # [1, B, S]
    pos = jnp.broadcast_to(pos, (k, b, s_len)).reshape(k * b, s_len)
    cos, sin = self.rotary(pos)
    # rows are continuation-major: row kk * B + b continues prefix b
    full = {
      n: jnp.concatenate(
        [
          jnp.tile(c, (1, k, 1, 1, 1)),
          jnp.zeros((c.shape[0], k * b, s_len, *c.shape[3:]), c.dtype),
        ],
        axis=2,
      )
      for n, c in cache.items()
    }
    smask = jnp.asarray(suffix_mask).reshape(k * b, s_len).astype(bool)
    keys_valid = jnp.concatenate(
      [jnp.tile(prefix_mask.astype(bool), (k, 1)), smask], axis=1
    )  # [K*B, P+S]
    q_idx = p_len + jnp.arange(s_len)
    mask = (jnp.arange(p_len + s_len)[None, :] <= q_idx[:, None])[None] & keys_valid[:, None, :]
    h_suffix, _ = self.decoder(
      self.embed(jnp.asarray(suffix_ids).reshape(k * b, s_len)),
      cos,
      sin,
      mask,
      cache=full,
      cache_index=p_len,
    )
    return h_prefix, h_suffix.reshape(k, b, s_len, -1)

  def logits_from_hidden(self, h):
    if self.lm_head is None:
      return h.astype(self.dtype) @ self.embed_tokens[...].astype(self.dtype).T
    return self.lm_head(h)

  def __call__(
    self,
    input_ids,
    attention_mask=None,
    pixel_values=None,
    image_grid_thw=None,
    position_ids=None,
    image_embeds=None,
  ):
    """Logits [B, L, V] (transformers semantics)."""
    return self.logits_from_hidden(
      self.hidden_states(
        input_ids, attention_mask, pixel_values, image_grid_thw, position_ids, image_embeds
      )
    )
