"""Configs: big_vision-style args, overrides, and the fields DESIGN.md promises."""

from absl import flags
from ml_collections import config_flags
import pytest

from cpo_jax import config_defaults

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
