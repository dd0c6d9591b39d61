"""The run's throughput metrics: the FLOP formula's parts and the meter's intervals."""

import types

from flax import nnx
import numpy as np

from cpo_jax import models
from cpo_jax.models import lora
from cpo_jax.train import steps
from cpo_jax.train import throughput


def _model():
  config = models.get_config('tiny')
  return models.Qwen2_5_VL(config, rngs=nnx.Rngs(0)), config.text_config


def test_llm_matmul_params_count_the_llm_weights_only():
  model, tc = _model()
  h, i, layers = tc.hidden_size, tc.intermediate_size, tc.num_hidden_layers
  head_dim = h // tc.num_attention_heads
  kv = tc.num_key_value_heads * head_dim
  per_layer = h * h * 2 + h * kv * 2 + 3 * h * i  # q, o; k, v; gate, up, down
  expected = layers * per_layer + h * tc.vocab_size  # + the (tied) vocabulary projection
  lora.apply_lora(model, rank=4, alpha=8, rngs=nnx.Rngs(1))  # adapters are not counted
  _, trainable, frozen = steps.split_model(model, 'lora')
  assert throughput.llm_matmul_params(trainable, frozen) == expected


def test_passes_per_step_follow_what_trains_and_the_reference():
  model, _ = _model()
  _, full, frozen = steps.split_model(model, 'all')
  stage = lambda name, trainable, ref: types.SimpleNamespace(
    name=name, trainable=trainable, reference_fn=ref
  )
  assert throughput.passes_per_step(stage('sft', full, None)) == 3
  lora.apply_lora(model, rank=4, alpha=8, rngs=nnx.Rngs(1))
  _, adapters, _ = steps.split_model(model, 'lora')
  assert throughput.passes_per_step(stage('cpo_plus', adapters, None)) == 3  # + reference
  assert throughput.passes_per_step(stage('cpo_plus', adapters, print)) == 2  # precomputed


def test_the_meter_skips_the_compiling_interval_and_counts_tokens_and_rows():
  model, _ = _model()
  _, trainable, frozen = steps.split_model(model, 'all')
  stage = types.SimpleNamespace(name='sft', trainable=trainable, frozen=frozen, reference_fn=None)
  mesh = types.SimpleNamespace(devices=np.array([types.SimpleNamespace(device_kind='TPU v5p')]))
  meter = throughput.Meter(stage, mesh)
  batch = {'input_ids': np.zeros((4, 10)), 'attention_mask': np.ones((4, 10))}
  meter.add(batch)
  assert meter.report() == {}  # the first interval: compilation
  for _ in range(3):
    meter.add(batch)
  perf = meter.report()
  assert np.isclose(perf['perf/tokens_per_s'] / perf['perf/rows_per_s'], 10)  # 120 / 12
  assert np.isclose(perf['perf/step_s'] * 3 * perf['perf/tokens_per_s'], 120)
  expected_mfu = meter.flops_per_token * 120 / (3 * perf['perf/step_s']) / 459e12
  assert np.isclose(perf['perf/mfu'], expected_mfu)

  cpu = types.SimpleNamespace(devices=np.array([types.SimpleNamespace(device_kind='cpu')]))
  assert throughput.Meter(stage, cpu).peak is None  # no MFU without a known peak


def test_a_restart_leaves_out_what_came_before(monkeypatch):
  model, _ = _model()
  _, trainable, frozen = steps.split_model(model, 'all')
  stage = types.SimpleNamespace(name='sft', trainable=trainable, frozen=frozen, reference_fn=None)
  mesh = types.SimpleNamespace(devices=np.array([types.SimpleNamespace(device_kind='cpu')]))
  clock = iter([0.0, 10.0, 11.0])  # the evaluation takes 10 s, the step after it 1 s
  monkeypatch.setattr(throughput.time, 'perf_counter', lambda: next(clock))
  meter = throughput.Meter(stage, mesh)
  batch = {'input_ids': np.zeros((4, 10)), 'attention_mask': np.ones((4, 10))}
  meter.report()  # t=0: the first interval starts
  meter.add(batch)
  meter.restart()  # t=10: after an evaluation
  meter.add(batch)
  assert meter.report() == {'perf/step_s': 1.0, 'perf/tokens_per_s': 40.0, 'perf/rows_per_s': 4.0}
