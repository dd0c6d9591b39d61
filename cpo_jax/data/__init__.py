"""Data: synthetic renderers (synth_drive), TFDS builders, pairs, tokenizer, Grain pipeline.

Entry points: `cpo_jax.data.pipeline` (make_processors, make_source, make_sft_iterator,
make_cpo_iterator, make_eval_batches). Submodules are imported lazily by their users so that
reading data does not pull in transformers or tensorflow_datasets.
"""
