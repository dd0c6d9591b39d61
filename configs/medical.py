r"""CPO++ on chest X-rays. The default is the embedded run on synthetic `synth_cxr` data;
real runs point `data.manual_dir` at MIMIC-CXR + CXR-CounterFact or swift JSONL pairs.

    python -m cpo_jax.main --config=configs/medical.py
    python -m cpo_jax.main --config=configs/medical.py:model=qwen2_5_vl_7b,data=mimic_ccf \
            --config.data.manual_dir=/data/mimic --workdir=gs://bucket/run1
"""

from cpo_jax import config_defaults


def get_config(arg=None):
  c = config_defaults.base_config(arg, domain='medical', data='synth_cxr')
  if c.model.preset == 'tiny':
    c.sft.num_steps = 500
    c.sft.optimizer.lr = 2e-3
    c.cpo.num_steps = 150
    if c.data.name == 'synth_cxr':
      config_defaults.embedded_recipe(c)
    # Prompts are 45 tokens (16 image + 29 text), chains 44-50: a thinking pair runs its prompt
    # once and projects 56 completion positions per row (cpo.shared_prefix; exact).
    c.data.max_prompt_len = 48
    c.data.max_completion_len = 56
  c.data.num_examples = dict(train=4000, test=512, ood=512)
  c.data.spurious_correlation = 0.9
  return c
