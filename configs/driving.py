r"""CPO++ on driving scenes. The default is the embedded run: synthetic `synth_drive` data
and the `tiny` Qwen2.5-VL-shaped model, SFT -> CPO++ -> eval, in minutes on a CPU.

    python -m cpo_jax.main --config=configs/driving.py
    python -m cpo_jax.main --config=configs/driving.py:model=qwen2_5_vl_7b,data=codalm \
            --config.data.manual_dir=/data/coda_lm --workdir=gs://bucket/drive1
"""

from cpo_jax import config_defaults


def get_config(arg=None):
  c = config_defaults.base_config(arg, domain='driving', data='synth_drive')
  if c.model.preset == 'tiny':
    # The embedded default: small enough for a 2-core CPU, long enough to learn.
    c.sft.num_steps = 500
    c.sft.batch_size = 16
    c.sft.optimizer.lr = 2e-3
    c.cpo.num_steps = 150
    c.cpo.batch_size = 16
    if c.data.name == 'synth_drive':
      config_defaults.embedded_recipe(c)
    c.eval.max_examples = 256
    # synth_drive rows are 74-76 tokens: batches cut to 80 instead of 96 (exact, faster).
    c.data.length_buckets = '80'
    # Prompts are 43 tokens (16 image + 27 text), chains 31-33: a thinking pair runs its prompt
    # once and projects 40 completion positions per row (cpo.shared_prefix; exact).
    c.data.max_prompt_len = 48
    c.data.max_completion_len = 40
  c.data.num_examples = dict(train=4000, test=512, ood=512)
  c.data.spurious_correlation = 0.9
  return c
