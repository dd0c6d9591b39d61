"""Dataset sources: random-access record sources (grain's RandomAccessDataSource protocol).

Kept apart from the processors so reading data does not import transformers. Sources that prepare
files (TFDS: synth_* with a data_dir, mimic_ccf, codalm) do it once per run: with several JAX
processes (after jax.distributed.initialize) process 0 prepares while the others wait, then the
others open the files (see `_prepare_on_process_0`).
"""

from __future__ import annotations

import numpy as np

# Datasets whose records are preference pairs already (the user's files): no pair making; the
# grouped pair layout splits them by their cpo_source (given_pairs.py).
PAIRS_GIVEN = ("swift_jsonl", "mimic_ccf", "codalm")

# The splits each dataset evaluates on (config eval.splits='' takes these).
EVAL_SPLITS = {
  "synth_drive": "test,ood",
  "synth_cxr": "test,ood",
  "swift_jsonl": "test",
  "mimic_ccf": "validate,test",
  "codalm": "val,test",
}


def make_source(
  name: str = "synth_drive",
  split: str = "train",
  *,
  num_examples: int | None = None,
  seed: int = 0,
  data_dir: str | None = None,
  shortcut_agreement: float = 0.9,
  split_sizes: dict[str, int] | None = None,
  on_bad_record: str = "raise",
  prepared_dir: str | None = None,
  view: str | None = None,
  image_size: int | None = None,
  prepare_workers: int = 0,
  first_index: int = 0,
):
  """Random-access source of records. data_dir=None renders on the fly (no files);
  otherwise prepares/reads the TFDS ArrayRecord dataset there (same records).
  User datasets (swift_jsonl, mimic_ccf, codalm): data_dir is data.manual_dir; mimic_ccf and
  codalm prepare TFDS files under prepared_dir (default <manual_dir>/_tfds), applying
  on_bad_record to the published files, with the images at `image_size` (the run's
  data.image_size; None keeps them as published) by `prepare_workers` processes; `view` picks
  mimic_ccf's rows (pairs | records). `first_index` (synth_* only): record i is the split's
  scene first_index + i, so a source from index n on holds scenes one over [0, n) never shows."""
  if first_index and name not in ("synth_drive", "synth_cxr"):
    raise ValueError(
      f"first_index={first_index}: only the synthetic datasets (synth_drive, synth_cxr) can "
      f"render scenes beyond a split's records; {name} reads the files it has"
    )
  if name in ("mimic_ccf", "codalm"):
    if data_dir is None:
      raise ValueError(
        f"{name} needs data_dir (config data.manual_dir) with the published files; see "
        f"cpo_jax/data/{name}.py"
      )
    if name == "mimic_ccf":
      from cpo_jax.data import mimic_ccf

      return _prepare_on_process_0(
        name,
        lambda: mimic_ccf.data_source(
          data_dir,
          split,
          view=view,
          on_bad_record=on_bad_record,
          prepared_dir=prepared_dir,
          image_size=image_size,
          prepare_workers=prepare_workers,
        ),
      )
    from cpo_jax.data import codalm

    return _prepare_on_process_0(
      name,
      lambda: codalm.data_source(
        data_dir,
        split,
        on_bad_record=on_bad_record,
        prepared_dir=prepared_dir,
        image_size=image_size,
        prepare_workers=prepare_workers,
      ),
    )
  if name == "swift_jsonl":  # data_dir = manual_dir holding <split>.jsonl + images
    if data_dir is None:
      raise ValueError(
        "swift_jsonl needs data_dir (config data.manual_dir) with train.jsonl [test.jsonl] and images"
      )
    import os

    from cpo_jax.data.swift_jsonl import SwiftJsonlSource

    return SwiftJsonlSource(os.path.join(data_dir, f"{split}.jsonl"), root=data_dir)
  if name not in ("synth_drive", "synth_cxr"):
    raise ValueError(
      f"unknown dataset {name!r} (available: synth_drive, synth_cxr, swift_jsonl, mimic_ccf, codalm)"
    )
  n = (
    num_examples
    if num_examples is not None
    else (split_sizes or {}).get(split, 4096 if split == "train" else 512)
  )
  if data_dir is None:
    if name == "synth_cxr":
      from cpo_jax.data import synth_cxr

      return synth_cxr.SynthCxrSource(
        split, n, seed, agreement=shortcut_agreement, first_index=first_index
      )
    from cpo_jax.data import synth_drive

    return synth_drive.SynthDriveSource(
      split, n, seed, agreement=shortcut_agreement, first_index=first_index
    )
  from cpo_jax.data import tfds_synth

  # One TFDS config per (split, size, seed, shortcut): preparing a split never generates the others.
  cfg = tfds_synth.SynthConfig(
    name=f"{split}_{n}_seed{seed}_a{round(shortcut_agreement * 100)}"
    + (f"_from{first_index}" if first_index else ""),
    seed=seed,
    agreement=shortcut_agreement,
    first_index=first_index,
    **{f"num_{s}": (n if s == split else 0) for s in ("train", "test", "ood")},
  )
  return _prepare_on_process_0(name, lambda: tfds_synth.data_source(name, data_dir, split, cfg))


def _prepare_on_process_0(name: str, open_source):
  """`open_source()` prepares the files if they are missing, then opens them. With several JAX
  processes, process 0 calls it first while the others wait at a barrier (a broadcast of its
  outcome); then the others call it: on a shared data dir (gs://, NFS) they find the files
  prepared and only read them, on per-host disks each prepares its own copy. If process 0 fails
  (a bad record under on_bad_record='raise'), it raises that error and every other process a
  RuntimeError instead of preparing again. A collective: every process must make the same calls."""
  import jax  # not at module level: a data-only user need not initialise a backend

  if not (jax.distributed.is_initialized() and jax.process_count() > 1):
    return open_source()
  from jax.experimental import multihost_utils

  source, error = None, None
  if jax.process_index() == 0:
    try:
      source = open_source()
    except Exception as e:  # re-raised below, after the others have been told
      error = e
  ok = int(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
  if error is not None:
    raise error
  if not ok:
    raise RuntimeError(
      f"{name}: process 0 failed to prepare the dataset (its log has the error); process "
      f"{jax.process_index()} does not prepare it again"
    )
  return source if jax.process_index() == 0 else open_source()
