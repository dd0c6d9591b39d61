"""The data side of one run: processors, sources and the three streams (SFT, CPO++, eval).

Built once from the config; the training loop asks it for fresh Grain iterators (whose state
goes into the checkpoints) and the evaluator for eval batches per split. This process reads
only its own shard of the training data (`jax.process_index()` of `jax.process_count()`);
the eval reads a host's share when asked (evaluate.answers.predict_split), and the whole
split for the robustness probes.
"""

import functools

from absl import logging
import jax
import tqdm

from cpo_jax import paths
from cpo_jax.data import bad_records
from cpo_jax.data import datasets
from cpo_jax.data import eval_batches
from cpo_jax.data import examples
from cpo_jax.data import given_pairs
from cpo_jax.data import packing
from cpo_jax.data import processors
from cpo_jax.data import sources
from cpo_jax.data import thinking_pairs
from cpo_jax.knowledge import load_graph

DATASETS = ('synth_drive', 'synth_cxr', 'swift_jsonl', 'mimic_ccf', 'codalm')
CPO_SCENES = ('sft', 'fresh')  # data.cpo_scenes


class RunData:
  def __init__(self, cfg, workdir):
    self.cfg = cfg
    name = cfg.data.name
    if name not in DATASETS:
      raise ValueError(f'config.data.name={name!r} is not available; known: {DATASETS}.')
    self.graph = load_graph(cfg.domain)
    # A run that starts from another workdir's SFT model reads that run's data (its tokenizer).
    data_dir = cfg.data.data_dir or paths.join(cfg.sft.from_workdir or workdir, 'data')
    # The dataset's own eval splits unless the config names some; a split the dataset offers
    # but the user's files lack is skipped with a note, one the config asks for is an error.
    self.eval_splits = [s for s in (cfg.eval.splits or sources.EVAL_SPLITS[name]).split(',') if s]
    if name in ('swift_jsonl', 'mimic_ccf', 'codalm'):  # the user's files under manual_dir.
      make = functools.partial(
        sources.make_source,
        name,
        data_dir=cfg.data.manual_dir,
        on_bad_record=cfg.data.on_bad_record,
      )
      if name != 'swift_jsonl':  # prepared files hold the images at the run's size
        make = functools.partial(
          make, image_size=cfg.data.image_size, prepare_workers=cfg.data.prepare_workers
        )
      self.sources = {'train': make('train')}
      for split in self.eval_splits:
        try:
          self.sources[split] = make(split)
        except bad_records.TooManySkipsError:
          raise  # the split exists but its records were all bad: never skipped quietly
        except (FileNotFoundError, ValueError) as e:
          if cfg.eval.splits:
            raise
          logging.warning('eval split %r skipped: %s', split, e)
      self.eval_splits = [s for s in self.eval_splits if s in self.sources]
    else:
      self.sources = {
        split: sources.make_source(
          name,
          split,
          num_examples=n,
          seed=cfg.seed,
          data_dir=data_dir,
          shortcut_agreement=cfg.data.spurious_correlation,
        )
        for split, n in cfg.data.num_examples.items()
      }
    self.sft_val_source, self.cpo_source = self._held_out_sources(data_dir)
    # A Hugging Face checkpoint brings its own tokenizer; a random-init preset builds one over
    # the domain's words and, for the user's own records, theirs (so a CPU smoke run on one's
    # own data does not skip every record as `unknown_token`).
    tokenizer_dir = cfg.model.init_from or paths.join(data_dir, 'tokenizer')
    user_data = name in ('swift_jsonl', 'mimic_ccf', 'codalm') and not cfg.model.init_from
    self.processors = processors.make_processors(
      tokenizer_dir=tokenizer_dir,
      image_size=cfg.data.image_size,
      extra_texts=(lambda: record_texts(self.sources)) if user_data else None,
    )
    self.skips = bad_records.SkipCounter()
    self.shard = dict(shard_index=jax.process_index(), shard_count=jax.process_count())
    self.grid = self.processors.static_grid  # [3]: (t, h, w) patches of every image.
    self.eval_prompt_len, self.max_new_tokens = self._eval_lengths()
    self.length_buckets = self._length_buckets()
    # Grouped pairs let the step encode a thinking pair's image once (and run its prompt
    # once); pairs given by the records (swift_jsonl, mimic_ccf, codalm) are split by their
    # cpo_source into that layout, or all of the one kind they hold (given_pairs.layout_for).
    if cfg.data.pair_layout not in ('grouped', 'mixed'):
      raise ValueError(f"data.pair_layout={cfg.data.pair_layout!r}; expected 'grouped' or 'mixed'.")
    self.pair_layout = None
    if cfg.data.pair_layout == 'grouped':
      layout = datasets.pair_layout_for(
        cfg.data.thinking_fraction, self._per_host(cfg.cpo.batch_size)
      )
      given = examples.gives_pairs(self.cpo_source)
      self.pair_layout = given_pairs.layout_for(self.cpo_source, layout) if given else layout

  def _eval_lengths(self):
    """(eval prompt length, max new tokens): the config's, or sized to the eval data when 0,
    so a report-length chain is never cut (a cut answer is counted as `truncated`)."""
    c, d = self.cfg.eval, self.cfg.data
    longest = [
      eval_batches.eval_lengths(
        self.sources[s],
        self.processors,
        max_examples=c.max_examples or None,
        max_prompt_len=c.max_prompt_len or None,
        on_bad_record=d.on_bad_record,
        max_skipped_share=d.max_skipped_share,
      )
      for s in self.eval_splits
    ]
    prompt = max((p for p, _ in longest), default=0)
    completion = max((q for _, q in longest), default=0)
    prompt_len = c.max_prompt_len or _round_up(max(prompt, 1), 16)
    # Headroom over the longest gold answer: a model may say more than its reference.
    max_new = c.max_new_tokens or _round_up(completion + max(16, completion // 4), 16)
    if completion > max_new:
      logging.warning(
        'eval.max_new_tokens=%d < the longest gold completion of the eval splits (%d tokens): '
        'such answers are cut (counted as truncated in the report); 0 sizes it to the data.',
        max_new,
        completion,
      )
    return prompt_len, max_new

  def _length_buckets(self):
    c = self.cfg
    buckets = packing.parse_length_buckets(c.data.length_buckets, c.data.max_len)
    n_image = self.processors.num_image_tokens(self.grid)
    if buckets[0] <= n_image:
      raise ValueError(
        f'data.length_buckets={c.data.length_buckets!r}: bucket {buckets[0]} '
        f'cannot hold the {n_image} image tokens of a row; use longer buckets.'
      )
    return buckets

  def _held_out_sources(self, data_dir):
    """(SFT validation source or None, CPO++ source). The synthetic train split is unlimited:
    past the SFT stage's records [0, n) come sft.val_examples scenes that validate SFT
    (sft.early_stop), then, with data.cpo_scenes='fresh', the CPO++ stage's data.cpo_examples
    scenes (0: one per pair it trains on). Same renderer and shortcut, never seen by SFT."""
    c, name = self.cfg, self.cfg.data.name
    if c.data.cpo_scenes not in CPO_SCENES:
      raise ValueError(
        f'config.data.cpo_scenes={c.data.cpo_scenes!r}; expected one of {CPO_SCENES}.'
      )
    wanted = [f'sft.early_stop={c.sft.early_stop!r}'] if c.sft.early_stop else []
    if c.data.cpo_scenes == 'fresh':
      wanted.append("data.cpo_scenes='fresh'")
    if name not in ('synth_drive', 'synth_cxr'):
      if wanted:
        raise ValueError(
          f'{" and ".join(wanted)} need train scenes beyond the SFT records, which only the '
          f'synthetic datasets (synth_drive, synth_cxr) render; {name} has the files it has.'
        )
      return None, self.sources.get('train')
    held_out = functools.partial(
      sources.make_source,
      name,
      'train',
      seed=c.seed,
      data_dir=data_dir,
      shortcut_agreement=c.data.spurious_correlation,
    )
    first, val = c.data.num_examples['train'], None
    if c.sft.early_stop:
      rows = c.sft.batch_size // c.sft.grad_accum_steps
      if c.sft.val_examples < rows:
        raise ValueError(
          f'sft.val_examples={c.sft.val_examples} holds no whole validation batch of {rows} rows '
          '(sft.batch_size / sft.grad_accum_steps); raise it.'
        )
      val = held_out(num_examples=c.sft.val_examples, first_index=first)
      first += c.sft.val_examples
    if c.data.cpo_scenes == 'sft':
      return val, self.sources['train']
    n = c.data.cpo_examples or c.cpo.num_steps * c.cpo.batch_size
    return val, held_out(num_examples=n, first_index=first)

  def _per_host(self, batch_size):
    if batch_size % jax.process_count():
      raise ValueError(f'batch size {batch_size} does not split over {jax.process_count()} hosts.')
    return batch_size // jax.process_count()

  def sft_batches(self, batch_size=None, seed=None, source=None):
    c = self.cfg
    return datasets.make_sft_iterator(
      self.sources['train'] if source is None else source,
      self.processors,
      batch_size=self._per_host(batch_size or c.sft.batch_size),
      max_len=c.data.max_len,
      seed=c.seed if seed is None else seed,
      on_bad_record=c.data.on_bad_record,
      max_skipped_share=c.data.max_skipped_share,
      skips=self.skips,
      worker_count=c.data.worker_count,
      length_buckets=self.length_buckets,
      **self.shard,
    )

  def sft_more_batches(self):
    """The compute-matched control's stream (stage `sft_more`): SFT rows, cpo.batch_size per
    step. data.sft_more_rows='records': the CPO++ stream's records in its shuffle (its seed
    and, with data.cpo_scenes='fresh', its fresh scenes); 'chosen': the chosen sides of the
    CPO++ stream's own pairs (re-rendered scenes included), row for row."""
    rows = self.cfg.data.sft_more_rows
    if rows == 'chosen':
      return self.cpo_batches(make=datasets.make_chosen_sft_iterator)
    if rows != 'records':
      raise ValueError(f"data.sft_more_rows={rows!r}; expected 'records' or 'chosen'.")
    return self.sft_batches(self.cfg.cpo.batch_size, seed=self.cfg.seed + 1, source=self.cpo_source)

  def sft_val_batches(self):
    """The held-out batches of SFT early stopping (sft.early_stop): one pass over
    sft.val_examples scenes in a fixed order, one micro-batch of rows each (what the step holds);
    the same rows every call. Their skips (if any) are not added to the run's counts."""
    c = self.cfg
    if self.sft_val_source is None:
      raise ValueError('no held-out SFT scenes: sft.early_stop is off.')
    return datasets.make_sft_iterator(
      self.sft_val_source,
      self.processors,
      batch_size=self._per_host(c.sft.batch_size // c.sft.grad_accum_steps),
      max_len=c.data.max_len,
      seed=c.seed,
      num_epochs=1,
      on_bad_record=c.data.on_bad_record,
      max_skipped_share=c.data.max_skipped_share,
      length_buckets=self.length_buckets,
      **self.shard,
    )

  def cpo_batches(self, selection=None, make=datasets.make_cpo_iterator):
    """`selection`: the reference-picked counterfactuals (data.thinking_select='reference';
    train/counterfactual_selection.py). `make`: the iterator of those pairs' batches."""
    c = self.cfg
    thinking = thinking_pairs.plan_for(
      self.cpo_source,
      self.graph,
      target=c.data.thinking_target,
      select=c.data.thinking_select,
      negative=c.data.thinking_negative,
      selection=selection,
    )
    return make(
      self.cpo_source,
      self.processors,
      batch_size=self._per_host(c.cpo.batch_size),
      max_len=c.data.max_len,
      seed=c.seed + 1,
      graph=self.graph,
      thinking_fraction=c.data.thinking_fraction,
      perception_mode=c.data.perception_negative,
      thinking_negative=c.data.thinking_negative,
      thinking=thinking,
      on_bad_record=c.data.on_bad_record,
      max_skipped_share=c.data.max_skipped_share,
      skips=self.skips,
      worker_count=c.data.worker_count,
      length_buckets=self.length_buckets,
      pair_layout=self.pair_layout,
      max_prompt_len=c.data.max_prompt_len,
      **self.shard,
    )

  def eval_batches(self, split, max_examples=None, skips=None, shard_index=0, shard_count=1):
    """Eval batches of `split` (with shard_count > 1: every shard_count-th record from
    shard_index); bad records follow data.on_bad_record, skips go to `skips`."""
    c = self.cfg
    return eval_batches.make_eval_batches(
      self.sources[split],
      self.processors,
      batch_size=c.eval.batch_size,
      max_prompt_len=self.eval_prompt_len,
      max_examples=max_examples or c.eval.max_examples,
      graph=self.graph,
      on_bad_record=c.data.on_bad_record,
      skips=skips,
      max_skipped_share=c.data.max_skipped_share,
      shard_index=shard_index,
      shard_count=shard_count,
    )

  def blank_eval_batch(self):
    """eval.batch_size invalid rows of the eval shape (a host that has run out of eval rows
    decodes these while the others finish)."""
    return eval_batches.blank_batch(
      self.processors, batch_size=self.cfg.eval.batch_size, max_prompt_len=self.eval_prompt_len
    )

  def log_skips(self):
    if self.skips.total():
      logging.warning(
        'skipped records: %s (examples: %s)', dict(self.skips.counts), dict(self.skips.examples)
      )


def record_texts(split_sources):
  """Every text of the user's pair records (prompts, chosen and rejected answers), for the
  random-init tokenizer's vocabulary; unreadable records are left to the streams' policy."""
  for split, source in split_sources.items():
    for i in tqdm.tqdm(range(len(source)), desc=f'tokenizer words ({split})', leave=False):
      try:
        rec = source[i]
      except bad_records.BadRecordError:
        continue
      for m in rec['prompt_messages'] + rec.get('rejected_prompt_messages', []):
        yield m['content'].replace('<image>', '')
      yield rec['chosen']
      yield rec['rejected']


def _round_up(n, multiple):
  return -(-int(n) // multiple) * multiple
