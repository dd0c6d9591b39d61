"""Defaults shared by the domain configs (configs/driving.py, configs/medical.py).

Configs follow big_vision: `get_config(arg)` where `arg` is a comma-separated `key=value`
string (`configs/driving.py:model=tiny,data=synth_drive`). Everything a run uses lives in
the returned ConfigDict so that `--config.a.b=value` can change it.
"""

import ml_collections


def parse_arg(arg, **defaults):
  """Parses 'k1=v1,k2=v2' into a ConfigDict over `defaults`, typed like the defaults."""
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or '').split(',')):
    key, sep, value = item.partition('=')
    if not sep:
      raise ValueError(f'Config arg {item!r} is not key=value (full arg: {arg!r}).')
    if key not in defaults:
      raise ValueError(f'Unknown config arg key {key!r}; known: {sorted(defaults)}.')
    kind = type(defaults[key])
    out[key] = (value.lower() in ('1', 'true', 'yes')) if kind is bool else kind(value)
  return out


def base_config(arg, *, domain, data):
  """The knobs every domain shares; the domain config fills in data and eval."""
  arg = parse_arg(arg, model='tiny', data=data, lora_rank=8)
  c = ml_collections.ConfigDict()
  c.domain = domain
  c.seed = 0
  # Comma-separated so `--config.stages=sft,eval` works from the shell. `sft_more` in place of
  # `cpo_plus` is the compute-matched control: the SFT objective on new LoRA adapters with the
  # CPO++ stage's steps, rows per step (cpo.batch_size) and optimizer (stages.train_sft_more).
  c.stages = 'sft,cpo_plus,eval'
  c.log_every_steps = 10
  # Weights & Biases (process 0), beside metrics.jsonl and TensorBoard, when a project is named;
  # needs `pip install 'cpo_jax[wandb]'`. The WANDB_MODE environment variable overrides the mode.
  c.log = ml_collections.ConfigDict()
  c.log.wandb_project = ''  # '' = no W&B
  c.log.wandb_entity = ''  # '' = the account's default entity
  c.log.wandb_mode = 'online'  # 'online' | 'offline' (upload later: `wandb sync`) | 'disabled'

  c.model = ml_collections.ConfigDict()
  c.model.preset = arg.model
  c.model.init_from = ''  # a Hugging Face directory (save_pretrained); '' = random init.
  # Precision: compute in `dtype` (bfloat16 on TPU), master weights in `param_dtype`, for
  # presets and init_from alike; LoRA adapters in lora.param_dtype.
  c.model.dtype = 'float32'
  c.model.param_dtype = 'float32'
  # Activations recomputed in the backward pass, per scanned layer (decoder and ViT):
  # 'none' | 'full' | 'dots' (keep matmul outputs); see models/layers.py REMAT_MODES.
  c.model.remat = 'none'
  # Text attention in blocks of at most this many query rows, each block's scores recomputed
  # in the backward pass (exact; float32 scores [B, heads, chunk, S] instead of [B, heads, L,
  # S]); 0 = all rows in one shot. Sequences up to this long run in one shot anyway. 512: 4
  # blocks at 2048 tokens, no slower than one shot in bench/bench_attention_chunk.py (CPU and
  # H200), 2.5x less scratch for the 3B step on the H200. See models/attention.py.
  c.model.attention_chunk = 512

  # The paper: LoRA r=8, alpha=32 on all linear layers of the LLM, ViT frozen in CPO.
  c.lora = ml_collections.ConfigDict()
  c.lora.rank = arg.lora_rank
  c.lora.alpha = 32.0
  c.lora.dropout = 0.0
  c.lora.targets = 'q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj'
  c.lora.include_vision = False
  # Adapters (and so their AdamW moments) in float32 whatever the base model's param_dtype.
  c.lora.param_dtype = 'float32'

  c.data = ml_collections.ConfigDict()
  c.data.name = arg.data
  c.data.manual_dir = ''  # where users put real data (MIMIC, CODA-LM, swift JSONL).
  c.data.data_dir = ''  # where prepared datasets are written; '' = <workdir>/data.
  c.data.image_size = 112  # square side the processor keeps (static patch grid).
  # Completion positions projected to the vocabulary; 0 = all that can hold completion
  # tokens (max_len minus the image tokens). A longer completion is an error, never cut.
  c.data.max_completion_len = 0
  # Tokens before the completion (image tokens included) a training thinking pair may have: its
  # prompt then runs once for both sides (cpo.shared_prefix). 0 = the row length. A longer
  # prompt is an error, never cut.
  c.data.max_prompt_len = 0
  c.data.max_len = 96  # static sequence length; longer records are skipped or raise.
  # Shorter static lengths a training batch may be cut to, e.g. '64,80' (max_len is always
  # the last): each batch gets the smallest that holds all its rows, one compile per bucket.
  # '' = off (every batch padded to max_len).
  c.data.length_buckets = ''
  c.data.on_bad_record = 'raise'  # 'raise' | 'skip' (counted and reported).
  # With 'skip': a training stream whose first pass over its shard (at most 1000 records)
  # skips every record, or more than this share of them, stops with the counts by reason.
  c.data.max_skipped_share = 1.0
  c.data.thinking_fraction = 0.5  # share of CPO pairs that are thinking pairs (rest: perception).
  # A thinking pair's rejected chain: 'counterfactual' (the graph rewriter: CPO) or 'random'
  # (another record's chain and answer for the same image: the paper's DPO baseline with random
  # negatives; pairs.random_negative_pair).
  c.data.thinking_negative = 'counterfactual'
  # Which counterfactual a thinking pair rejects (data/thinking_pairs.py): 'random' (a rewrite
  # toward a random other decision), 'shortcut' (toward the decision the record's nuisance
  # predicts; records whose nuisance predicts their own decision keep 'random', counted) or
  # 'shortcut_rerender' (those records' scenes re-rendered to disagree with their nuisance,
  # rejecting the shortcut's answer; synthetic data only) or 'balanced' (as many re-rendered as
  # leave the nuisance predicting nothing on either side of the pairs, random rewrites as the
  # negatives; synthetic data only).
  c.data.thinking_target = 'random'
  # 'reference': the 2 of up to thinking_candidates minimal rewrites that the SFT model finds
  # most probable, scored once before CPO++ (train/counterfactual_selection.py); 'random': off.
  # With thinking_target 'balanced' it picks the rewrite of the scene that target chose.
  c.data.thinking_select = 'random'
  c.data.thinking_candidates = 8
  # 'grouped': every batch holds exactly that share, in fixed row groups, so the step
  # encodes a thinking pair's image once and runs its prompt once (pairs given by the records
  # are split by cpo_source: data/given_pairs.py); 'mixed': each pair is thinking with that
  # probability (given pairs: in the records' own shares).
  c.data.pair_layout = 'grouped'
  # 'hard' | 'far' | 'random' pick another image (METHOD.md section 4); 'counterfactual'
  # re-renders the same synthetic scene with one concept flipped (a minimal pair).
  c.data.perception_negative = 'hard'
  # Which scenes the CPO++ stage (and its compute-matched control, sft_more) makes its pairs
  # on: 'sft' = the SFT stage's train records; 'fresh' = train-split scenes SFT never saw
  # (synthetic data only: rendered past its records), data.cpo_examples of them (0 = one per
  # pair the stage trains on, cpo.num_steps x cpo.batch_size: a single pass, as the paper's one
  # epoch; its preference set is about 3x its SFT set).
  c.data.cpo_scenes = 'sft'
  c.data.cpo_examples = 0
  # The rows of the compute-matched control (stage sft_more): 'records' = the CPO++ stage's
  # records, each with its own chain; 'chosen' = the chosen side of each CPO++ pair, as its
  # stream makes them (re-rendered scenes of data.thinking_target='shortcut_rerender'
  # included): what the preference adds over supervised training on the same data.
  c.data.sft_more_rows = 'records'
  c.data.worker_count = 0  # Grain worker processes (0 = in-process).
  # Processes that read, resize and encode the images when mimic_ccf / codalm files are
  # prepared (-1 = min(8, usable CPUs); 0 or 1 = in this process). Same files for any number.
  c.data.prepare_workers = -1

  # SFT: the paper uses lr 1e-4 cosine with LoRA on a pretrained model. The embedded default
  # trains a random-init tiny model, so it trains all weights at a higher rate.
  c.sft = ml_collections.ConfigDict()
  c.sft.num_steps = 660
  c.sft.batch_size = 16
  # Another workdir whose finished SFT checkpoint this run starts from (restored, never trained
  # here; its data dir, so its tokenizer, too): the arms of an ablation share one SFT model
  # (cpo_jax/ablate.py). '' = this workdir's own SFT stage.
  c.sft.from_workdir = ''
  c.sft.trainable = 'all'  # 'all' | 'lora'
  # Micro-batches per update (batch_size rows in all): the same update as the whole batch.
  # 0 = derived from the mesh: micro_batch_per_device rows per data-parallel device.
  c.sft.grad_accum_steps = 1
  c.sft.micro_batch_per_device = 1
  c.sft.optimizer = _adamw(lr=1e-4)
  # 'val_loss': stop before memorising. Every val_every_steps steps the SFT loss is measured on
  # val_examples held-out train-split scenes (synthetic data only; neither test nor ood); the
  # params of its lowest value are what the stage hands on (to CPO++, to the ablation arms),
  # and after `patience` measurements without a lower one it stops (0 = runs all num_steps).
  # '' = off: the last step's params.
  c.sft.early_stop = ''
  c.sft.val_examples = 256
  c.sft.val_every_steps = 50
  c.sft.patience = 3

  # CPO++ (METHOD.md section 3): new LoRA adapters on the SFT model, reference = adapters off.
  c.cpo = ml_collections.ConfigDict()
  c.cpo.num_steps = 7750
  c.cpo.batch_size = 16
  c.cpo.grad_accum_steps = 1  # as sft.grad_accum_steps
  c.cpo.micro_batch_per_device = 1
  c.cpo.beta = 0.1
  c.cpo.loss_type = 'sigmoid'  # 'sigmoid' | 'ipo' | 'hinge' | 'robust'
  c.cpo.label_smoothing = 0.0
  c.cpo.rpo_alpha = 0.1
  # The weight of the answer tokens (after '</think>') in the preference's log-probs: 1 = the
  # whole completion (the paper's DPO), 0 = the chain only (answers only in the NLL term).
  c.cpo.answer_weight = 1.0
  # The closing end token's weight in the preference, relative to its answer's: 1 = TRL's
  # (the whole completion), 0 = the preference over what the sides say, not where they stop
  # (the NLL term keeps it). README, Ablations: "Where the sides stop".
  c.cpo.end_token_weight = 1.0
  c.cpo.reference = 'adapters_off'  # 'adapters_off' | 'frozen_copy' | 'precomputed'
  c.cpo.source_weights = (1.0, 1.0, 1.0)  # thinking, perception, other.
  c.cpo.normalize_weights = True
  # Extra perception pairs made on device each step: 'kind:severity,...' (kinds of
  # perturb.PERCEPTION_MASKS, applied inside the row's evidence boxes); '' = off.
  c.cpo.device_perturbations = ''
  # A thinking pair's image and prompt run through the LLM once, both completions attend to
  # them (exact; used when it saves tokens: data.max_prompt_len + 2 slab < 2 rows).
  c.cpo.shared_prefix = True
  c.cpo.optimizer = _adamw(lr=1e-4)

  c.eval = ml_collections.ConfigDict()
  c.eval.splits = ''  # '' = the dataset's own (data.sources.EVAL_SPLITS), or e.g. 'test,ood'
  # After CPO++ the report also measures the SFT baseline (adapters off) on the same examples;
  # the ablation harness turns it off (its `sft` arm measures that model once per seed).
  c.eval.baseline = True
  c.eval.max_examples = 256
  # Rows per generate call on each host; every host decodes its own share of a split, and a
  # call's rows are split over the mesh's data-parallel devices (padded to a whole number each).
  c.eval.batch_size = 32
  # Static eval shapes; 0 sizes them to the eval data: prompts to the longest one, new tokens
  # to the longest gold answer plus a quarter (at least 16). Answers cut by a set max_new_tokens
  # are counted as `truncated` in the report.
  c.eval.max_prompt_len = 0
  c.eval.max_new_tokens = 0
  # Interference curves and the drift probe (METHOD.md section 5) on one split.
  # BLEU-1..4, ROUGE-L, METEOR (needs java), CIDEr of the generated chains: on by default for
  # the user's free-text data; the synthetic chains are templates.
  c.eval.text_metrics = c.data.name in ('swift_jsonl', 'mimic_ccf', 'codalm')
  # Every this many steps (0: never) each stage's model answers the first every_steps_examples
  # examples of the first eval split (logged as eval/<split>/accuracy); the trained params of
  # the best step are kept apart in checkpoints/<stage>_best/.
  c.eval.every_steps = 0
  c.eval.every_steps_examples = 64
  # Which params of the last stage --mode=eval / --mode=export (and the eval stage) use: 'last'
  # (the stage's final checkpoint) or 'best' (checkpoints/<stage>_best/; needs eval.every_steps).
  c.eval.checkpoint = 'last'
  c.eval.robustness = True
  c.eval.robustness_split = ''  # '' = the first eval split
  c.eval.robustness_max_examples = 128
  # Teacher-forced readout of each chain concept (eval.max_examples of the robustness split),
  # split by nuisance: which concept the model misreads, and under which sky or marker. On for
  # the synthetic sets (their records carry the nuisance); real chains use other sentences.
  c.eval.concept_readout = c.data.name in ('synth_drive', 'synth_cxr')

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 200
  c.checkpoint.max_to_keep = 2

  # Mesh axes (DESIGN.md, Scale); -1 takes the remaining devices.
  c.mesh = ml_collections.ConfigDict()
  c.mesh.shape = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  if c.model.preset.removeprefix('qwen2_5_vl_') in REAL_PRESETS:
    paper_recipe(c)
  return c


REAL_PRESETS = ('3b', '7b', '32b', '72b')


def paper_recipe(c):
  """The real presets train as the papers do (METHOD.md sections 2 and 6).

  SFT: LoRA r=8, alpha=32 on all linear layers of the LLM, lr 1e-4 cosine to 1e-7, 5% warm-up,
  AdamW (0.9, 0.98), wd 0.05, bf16, max_len 2048, 660 steps at an effective batch of 240
  (15 x 16); the adapters are merged after SFT, and the merged model is both the CPO++ start
  and its reference. The paper also trains the ViT in SFT; here the ViT stays frozen unless
  lora.include_vision is set. CPO++: new adapters, ViT frozen, lr 1e-4 and rpo_alpha 0.1 (the
  CPO++ script; CPO used 2e-5), effective batch 32 (1 x grad-accum 16 x 2 GPUs; CPO used 4 x 8
  x 2 = 64), max_len 2048 (CPO used 4096). Images: the CPO run used 512 x 512; the processor
  keeps a square of whole 28-px merge windows, so 504 x 504 (324 image tokens).
  Gradient accumulation 0 = as many micro-batches as it takes for `micro_batch_per_device`
  rows per data-parallel device on the mesh at hand.
  """
  c.model.dtype = c.model.param_dtype = 'bfloat16'
  c.model.remat = 'full'
  c.data.max_len = 2048
  c.data.image_size = 504
  c.sft.trainable = 'lora'
  c.sft.num_steps = 660
  c.sft.batch_size = 240
  c.sft.optimizer.lr = 1e-4
  c.cpo.batch_size = 32
  c.cpo.optimizer.lr = 1e-4
  for stage in (c.sft, c.cpo):
    stage.grad_accum_steps = 0
    stage.micro_batch_per_device = 1


def embedded_recipe(c):
  """The embedded synthetic runs (preset `tiny`): CPO on counterfactual scenes that break the
  shortcut (README "Why the embedded default departs from the script").

  Thinking pairs on fresh scenes (data.cpo_scenes), as many re-rendered as leave the nuisance
  predicting nothing on either side of the pairs (data.thinking_target='balanced'); at the SFT
  stage's scale of rate (1e-3; the script's 1e-4 moves no answer of this model) with the chosen
  side anchored (rpo_alpha 1; 0.1 collapses at this rate); no perception pairs (alone, at this
  rate, they lower driving `ood` by 8 points); the preference over what the sides say, not
  where they stop (cpo.end_token_weight 0: with it, the rejected side's end token taught the
  driving model not to stop after `stop`). Measured over 5 seeds in the README's ablations.
  Real data cannot be re-rendered: those configs keep the script's recipe.
  """
  c.data.cpo_scenes = 'fresh'
  c.data.thinking_target = 'balanced'
  c.data.thinking_fraction = 1.0
  c.cpo.optimizer.lr = 1e-3
  c.cpo.rpo_alpha = 1.0
  c.cpo.end_token_weight = 0.0


def _adamw(lr):
  # Paper: AdamW (0.9, 0.98), weight decay 0.05, 5% warm-up, cosine to ~0.
  return ml_collections.ConfigDict(
    dict(
      lr=lr, end_lr_ratio=1e-3, warmup_frac=0.05, b1=0.9, b2=0.98, weight_decay=0.05, grad_clip=1.0
    )
  )
