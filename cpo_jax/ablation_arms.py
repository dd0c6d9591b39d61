"""The ablation harness's arms: each a config switch that `cpo_jax.main` runs the same way,
and the seed's shared SFT models the arms start from (`cpo_jax.ablate` runs them)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Arm:
  stages: str  # config.stages of the arm's run (SFT comes from the seed's shared model)
  overrides: tuple[tuple[str, object], ...]  # (dotted config key, value)
  what: str
  sft: str = ''  # which of the seed's SFT models it starts from (SFT_MODELS)


# The CPO++ script's recipe (the default of the real-data configs; the embedded synthetic
# configs use config_defaults.embedded_recipe instead): the exploratory arms below are
# variants of it, as they were measured.
PAPER = (
  ('data.cpo_scenes', 'sft'),
  ('data.thinking_target', 'random'),
  ('data.thinking_fraction', 0.5),
  ('cpo.optimizer.lr', 1e-4),
  ('cpo.rpo_alpha', 0.1),
  ('cpo.end_token_weight', 1.0),
)
# Pairs aimed at the shortcut on scenes SFT never saw, trained hard enough to move answers.
RERENDER = PAPER + (
  ('data.cpo_scenes', 'fresh'),
  ('data.thinking_target', 'shortcut_rerender'),
  ('cpo.optimizer.lr', 1e-3),
  ('cpo.rpo_alpha', 1.0),
)

ARMS = {
  'sft': Arm('eval', (), 'the SFT model itself'),
  'sft_more': Arm(
    'sft_more,eval',
    (),
    'SFT continued on new LoRA adapters for the CPO++ stage steps, rows and optimizer '
    '(the compute-matched control)',
  ),
  'sft_more_chosen': Arm(
    'sft_more,eval',
    (('data.sft_more_rows', 'chosen'),),
    'the data-matched control: SFT continued on the chosen side of exactly the CPO++ pairs '
    '(re-rendered scenes included), same steps, rows and optimizer',
  ),
  'dpo_random': Arm(
    'cpo_plus,eval',
    (('data.thinking_fraction', 1.0), ('data.thinking_negative', 'random')),
    'DPO with random negatives: the rejected chain is another record\'s, same image (the same '
    'chosen scenes), as many pairs as CPO++ (the paper\'s "DPO, random negatives, same data '
    'size")',
  ),
  'dpo_random_chain': Arm(
    'cpo_plus,eval',
    (
      ('data.thinking_fraction', 1.0),
      ('data.thinking_negative', 'random'),
      ('cpo.answer_weight', 0.0),
    ),
    'DPO with random negatives, the preference over the chains only (the control of '
    '`cpo_plus_chain`)',
  ),
  'cpo_thinking': Arm(
    'cpo_plus,eval', (('data.thinking_fraction', 1.0),), 'CPO++ with thinking pairs only'
  ),
  'cpo_perception': Arm(
    'cpo_plus,eval', (('data.thinking_fraction', 0.0),), 'CPO++ with perception pairs only'
  ),
  'cpo_both': Arm(
    'cpo_plus,eval',
    (('data.thinking_fraction', 0.5),),
    'CPO++ with both pair sources, half each (the CPO++ script\'s mix)',
  ),
  'cpo_perception_counterfactual': Arm(
    'cpo_plus,eval',
    (('data.thinking_fraction', 0.0), ('data.perception_negative', 'counterfactual')),
    'CPO++ with perception pairs only, each rejecting its chosen scene re-rendered with one '
    'concept flipped (on the balanced scenes under thinking_target=\'balanced\')',
  ),
  'cpo_both_counterfactual': Arm(
    'cpo_plus,eval',
    (('data.thinking_fraction', 0.5), ('data.perception_negative', 'counterfactual')),
    'CPO++ with both pair sources, half each, the perception pairs rejecting a one-concept '
    're-rendering of their chosen scene',
  ),
  'cpo_plus': Arm('cpo_plus,eval', (), 'CPO++ as configured'),
  'cpo_plus_chain': Arm(
    'cpo_plus,eval',
    (('cpo.answer_weight', 0.0),),
    'CPO++ as configured with the preference over the chains only (the answer tokens after '
    '</think> only in the rpo_alpha NLL term)',
  ),
  'cpo_plus_end': Arm(
    'cpo_plus,eval',
    (('cpo.end_token_weight', 1.0),),
    'CPO++ as configured with each side\'s closing end token in the preference too (TRL\'s '
    'sum over the whole completion)',
  ),
  'cpo_plus_selected': Arm(
    'cpo_plus,eval',
    (('data.thinking_select', 'reference'),),
    'CPO++ as configured whose thinking pairs reject the 2 rewrites of their scene (of up to '
    'data.thinking_candidates minimal ones) the SFT model finds most probable: the errors it '
    'is closest to making, on the same chosen scenes',
  ),
  'cpo_plus_paper': Arm(
    'cpo_plus,eval',
    PAPER,
    'CPO++ with the script\'s recipe: pairs on the SFT scenes, random '
    'rewrites, both sources, rate 1e-4, rpo_alpha 0.1',
  ),
  'cpo_plus_shortcut': Arm(
    'cpo_plus,eval',
    PAPER + (('data.thinking_target', 'shortcut'),),
    'the script\'s recipe whose thinking pairs reject the decision the nuisance predicts '
    '(records where it predicts their own decision keep the random rewrite)',
  ),
  'cpo_plus_shortcut_rerender': Arm(
    'cpo_plus,eval',
    PAPER + (('data.thinking_target', 'shortcut_rerender'),),
    'the script\'s recipe aimed at the shortcut, records agreeing with their nuisance '
    're-rendered to disagree (the rejected side is the shortcut\'s answer)',
  ),
  'cpo_plus_adaptive': Arm(
    'cpo_plus,eval',
    PAPER + (('data.thinking_select', 'reference'),),
    'the script\'s recipe whose thinking pairs reject the 2 counterfactuals (of up to '
    'data.thinking_candidates minimal rewrites) the SFT model finds most probable',
  ),
  'cpo_plus_fresh': Arm(
    'cpo_plus,eval',
    PAPER + (('data.cpo_scenes', 'fresh'),),
    'the script\'s recipe with its pairs on train scenes the SFT stage never saw',
  ),
  'sft_more_fresh': Arm(
    'sft_more,eval',
    PAPER + (('data.cpo_scenes', 'fresh'),),
    'the compute-matched control on those fresh scenes: SFT continued on them (what the new '
    'labelled scenes alone give)',
  ),
  'cpo_plus_rerender': Arm(
    'cpo_plus,eval',
    RERENDER,
    'CPO++ on fresh scenes whose thinking pairs are re-rendered to disagree with their nuisance '
    '(rejecting the shortcut\'s chain), at the SFT-scale rate 1e-3 with rpo_alpha 1',
  ),
  'sft_more_rerender': Arm(
    'sft_more,eval',
    RERENDER + (('data.sft_more_rows', 'chosen'),),
    'the control of cpo_plus_rerender: SFT continued on the chosen side of exactly its pairs '
    '(re-rendered scenes included), same steps, rows and optimizer',
  ),
  'sft_early': Arm('eval', (), 'the early-stopped SFT model itself', sft='early'),
  'sft_more_early': Arm(
    'sft_more,eval',
    PAPER,
    'the compute-matched control (script\'s recipe) from the early-stopped SFT model',
    sft='early',
  ),
  'cpo_plus_early': Arm(
    'cpo_plus,eval',
    PAPER,
    'the script\'s recipe from the SFT model that stopped at its lowest held-out loss '
    '(sft.early_stop)',
    sft='early',
  ),
}
REFERENCE_ARM = 'sft'
SFT_MODEL = 'sft_model'  # the seed's shared SFT run
# The seed's SFT models, by the SFT overrides that make them: each trained once per seed, in
# DIR/seed_<s>/sft_model[_<name>], and shared by the arms that name it (Arm.sft).
SFT_MODELS = {'': (), 'early': (('sft.early_stop', 'val_loss'),)}


def sft_model_name(variant: str) -> str:
  return f'{SFT_MODEL}_{variant}' if variant else SFT_MODEL


def is_sft_model(name: str) -> bool:
  return name == SFT_MODEL or name.startswith(SFT_MODEL + '_')
