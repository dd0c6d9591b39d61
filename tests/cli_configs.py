"""Configs as main.py builds them from the command line, for tests of the CLI paths (no side
effects on import: subprocess workers import it too)."""

SMALL_RUN = (  # a few steps of each stage on a handful of examples: CLI-path tests
  '--config.sft.num_steps=4',
  '--config.cpo.num_steps=2',
  '--config.sft.batch_size=8',
  '--config.cpo.batch_size=8',
  '--config.log_every_steps=1',
  '--config.checkpoint.every_steps=2',
  '--config.data.num_examples.train=32',
  '--config.data.num_examples.test=8',
  '--config.data.num_examples.ood=8',
  '--config.eval.batch_size=8',
  '--config.eval.max_new_tokens=8',
  '--config.eval.robustness_max_examples=8',
)


def cli_config(config, *overrides):
  """The config main.py would build from `--config=<config>` and these overrides."""
  from absl import flags
  from ml_collections import config_flags

  argv = ['prog', f'--config={config}', *overrides]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file('config', flag_values=fv, sys_argv=argv)
  fv(argv, known_only=True)
  return fv.config
