"""Configs: big_vision-style args, overrides, and the fields DESIGN.md promises."""

from absl import flags
import jax
from ml_collections import config_flags
import pytest

from cpo_jax import config_defaults
from cpo_jax import sharding
from cpo_jax.train import stages

CONTRACT_FIELDS = (
  'stages',
  'sft.num_steps',
  'cpo.num_steps',
  'data.manual_dir',
  'eval.max_examples',
  'checkpoint.every_steps',
  'mesh.shape.data',
  'mesh.shape.fsdp',
  'mesh.shape.tensor',
  'seed',
)


def _get(config, dotted):
  for part in dotted.split('.'):
    config = config[part]
  return config


@pytest.mark.parametrize('path', ['configs/driving.py', 'configs/medical.py'])
def test_contract_fields_exist(path):
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file('config', flag_values=fv)
  fv(['prog', f'--config={path}'])
  config = fv.config
  for field in CONTRACT_FIELDS:
    _get(config, field)
  assert config.stages.split(',') == ['sft', 'cpo_plus', 'eval']


def test_arg_string_sets_model_and_data():
  c = config_defaults.base_config(
    'model=small,data=swift_jsonl,lora_rank=16', domain='medical', data='synth_cxr'
  )
  assert (c.model.preset, c.data.name, c.lora.rank) == ('small', 'swift_jsonl', 16)


@pytest.mark.parametrize('bad', ['model', 'colour=red'])
def test_arg_string_errors_name_the_problem(bad):
  with pytest.raises(ValueError, match=bad.split('=')[0]):
    config_defaults.parse_arg(bad, model='tiny')


def test_command_line_overrides():
  argv = [
    'prog',
    '--config=configs/driving.py:model=tiny',
    '--config.sft.num_steps=7',
    '--config.mesh.shape.fsdp=2',
    '--config.stages=sft,eval',
    '--config.data.manual_dir=/data/x',
    '--config.cpo.beta=0.25',
  ]
  fv = flags.FlagValues()
  # config_flags registers the override flags from the argv it is given at definition.
  config_flags.DEFINE_config_file('config', flag_values=fv, sys_argv=argv)
  fv(argv)
  c = fv.config
  assert (c.sft.num_steps, c.mesh.shape.fsdp, c.stages) == (7, 2, 'sft,eval')
  assert (c.data.manual_dir, c.cpo.beta) == ('/data/x', 0.25)


def _load(path, arg):
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file('config', flag_values=fv)
  fv(['prog', f'--config={path}:{arg}'])
  return fv.config


def test_real_presets_take_the_papers_recipe():
  cfg = _load('configs/medical.py', 'model=7b')
  assert (cfg.model.dtype, cfg.model.param_dtype, cfg.model.remat) == ('bfloat16',) * 2 + ('full',)
  assert (cfg.data.max_len, cfg.data.image_size % 28) == (2048, 0)
  assert cfg.sft.trainable == 'lora' and cfg.lora.rank == 8 and cfg.lora.alpha == 32
  assert (cfg.sft.batch_size, cfg.cpo.batch_size) == (240, 32)
  assert cfg.sft.optimizer.lr == cfg.cpo.optimizer.lr == 1e-4
  assert _load('configs/driving.py', 'model=tiny').model.dtype == 'float32'  # the showroom
  # Accumulation follows the mesh: 8 data-parallel devices, one row each per micro-batch.
  mesh = sharding.make_mesh({'data': -1, 'fsdp': 1, 'tensor': 1})
  resolved = stages.resolve_accumulation(cfg, mesh)
  assert (resolved.sft.grad_accum_steps, resolved.cpo.grad_accum_steps) == (30, 4)
  assert cfg.sft.grad_accum_steps == 0  # the config itself is left as written
  # One device, one pair per micro-batch: a micro-batch still holds a whole (thinking,
  # perception) group of the grouped layout.
  one = sharding.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1}, jax.devices()[:1])
  assert stages.resolve_accumulation(cfg, one).cpo.grad_accum_steps == 16
  cfg.data.pair_layout = 'mixed'
  assert stages.resolve_accumulation(cfg, one).cpo.grad_accum_steps == 32
  cfg.cpo.batch_size = 12  # 12 pairs cannot split over 8 devices
  with pytest.raises(ValueError, match='does not split over the 8 data-parallel devices'):
    stages.resolve_accumulation(cfg, mesh)


@pytest.mark.parametrize(
  'path,synthetic,real',
  [
    ('configs/driving.py', 'synth_drive', 'codalm'),
    ('configs/medical.py', 'synth_cxr', 'mimic_ccf'),
  ],
)
def test_only_the_embedded_synthetic_runs_take_the_embedded_recipe(path, synthetic, real):
  recipe = lambda c: (  # noqa: E731
    c.data.cpo_scenes, c.data.thinking_target, c.data.thinking_fraction,
    c.cpo.optimizer.lr, c.cpo.rpo_alpha,
  )  # fmt: skip
  assert recipe(_load(path, f'model=tiny,data={synthetic}')) == (
    'fresh',
    'balanced',
    1.0,
    1e-3,
    1.0,
  )
  # Real data cannot be re-rendered: it keeps the CPO++ script's recipe, as the real presets do.
  script = ('sft', 'random', 0.5, 1e-4, 0.1)
  assert recipe(_load(path, f'model=tiny,data={real}')) == script
  assert recipe(_load(path, f'model=7b,data={real}')) == script
