"""TFDS builders over data a user brings (`data.manual_dir`): what mimic_ccf and codalm share.

Each builder prepares ArrayRecord files once (no TensorFlow: text and image bytes are stored as
object tensors) and has one config per (`data.on_bad_record` policy, image side): images are
stored already resized to the run's square (prepared_images.py; side 0 keeps the published
bytes), so a run at another `data.image_size` prepares, and reads, its own files. Beside the
files: a JSON report of the records it skipped and per-split facts, and
`thumbnails.<split>.npy`, every example's `pairs.thumbnail` (also a feature of the files), so
the `hard` perception-negative index is built without decoding an image again.

Preparation streams: the builder's records are read, their images prepared in worker
processes (`data.prepare_workers`; worker_pool.py keeps the record order and a bounded number
in flight) and each example is written to its split's shard as it comes, so host memory does
not grow with the number of records (TFDS's own writer keeps a whole split in memory to sort it
when shuffling is disabled). A progress bar with rate and ETA goes to stderr on a terminal.

Versions: 1.1.0 added the thumbnails; 2.0.0 stores the images at the run's side (configs
`<policy>_<side>px`, or `<policy>_original`) with their published size. Files of an older
version are left alone: a run prepares its own version's once.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import os
import socket
import sys
import tempfile
from typing import Any
from typing import Iterable
from typing import Iterator

from array_record.python import array_record_module
import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import example_serializer
import tqdm

from cpo_jax import paths
from cpo_jax.data import worker_pool
from cpo_jax.data.bad_records import BadRecordPolicy
from cpo_jax.data.bad_records import TooManySkipsError
from cpo_jax.data.pairs import THUMB
from cpo_jax.data.prepared_images import ImageJob
from cpo_jax.data.prepared_images import ImageResult
from cpo_jax.data.prepared_images import prepare_image

REPORT = "cpo_jax_report.json"
SHARD_BYTES = 512 << 20  # a new ArrayRecord shard past this many serialized bytes


def text():
  """A str/bytes feature stored as is (no TF decoding)."""
  return tfds.features.Tensor(shape=(), dtype=np.object_)


def thumbnail_feature():
  return tfds.features.Tensor(shape=(THUMB, THUMB, 3), dtype=np.uint8)


def source_size_feature():
  """(width, height) of the published image (boxes and sizes given in its pixels)."""
  return tfds.features.Tensor(shape=(2,), dtype=np.int32)


def as_str(x) -> str:
  return x.decode("utf-8") if isinstance(x, (bytes, np.bytes_)) else str(x)


@dataclasses.dataclass
class ManualConfig(tfds.core.BuilderConfig):
  policy: str = "raise"  # data.on_bad_record
  image_side: int = 0  # the square side images are stored at; 0 = as published


def manual_config(policy: str, image_side: int = 0) -> ManualConfig:
  size = f"{image_side}px" if image_side else "original"
  return ManualConfig(
    name=f"{policy}_{size}",
    description=f"on_bad_record={policy}, images {size}",
    policy=policy,
    image_side=int(image_side),
  )


Pass = tuple[str, int, Iterator[tuple[Any, ImageJob | None]]]  # (label, records, items)


with tfds.core.registered.skip_registration():

  class ManualBuilder(tfds.core.GeneratorBasedBuilder):
    """A subclass gives `_passes` (its records, read in order, each with the image job its
    examples need), `_examples` (the examples of one record once its image is prepared;
    reporting bad records to `self.policy` in record order) and `_facts` (what the report keeps
    per example)."""

    VERSION = tfds.core.Version("2.0.0")
    RELEASE_NOTES = {
      "1.0.0": "Initial release.",
      "1.1.0": "A thumbnail per example (hard perception negatives).",
      "2.0.0": "Images stored at the run's square side (one config per policy and side), "
      "PNG; the published image's size; files written as they are read.",
    }
    BUILDER_CONFIGS = [manual_config(p) for p in ("raise", "skip")]
    prepare_workers = 0  # set by prepare_manual: data.prepare_workers

    def _passes(self, manual_dir: str) -> list[Pass]:
      raise NotImplementedError

    def _examples(self, context, result: ImageResult | None) -> Iterable[tuple[str, dict]]:
      raise NotImplementedError

    def _facts(self, example: dict) -> dict[str, Any]:
      raise NotImplementedError

    def _split_generators(self, dl_manager):
      raise NotImplementedError("written as read by _download_and_prepare")

    def _generate_examples(self):
      raise NotImplementedError("written as read by _download_and_prepare")

    def _download_and_prepare(self, dl_manager, download_config):
      del download_config
      manual_dir = os.fspath(dl_manager.manual_dir)
      self.policy = BadRecordPolicy(self.builder_config.policy)
      passes = self._passes(manual_dir)
      files: dict[str, _SplitFiles] = {}
      workers = worker_pool.resolve_workers(self.prepare_workers, sum(n for _, n, _ in passes))
      with worker_pool.worker_pool(workers) as pool:
        for label, total, items in passes:
          with _progress(f"{self.name}/{self.builder_config.name} {label}", total) as bar:
            for context, result in worker_pool.ordered_map(pool, prepare_image, items):
              for split, example in self._examples(context, result):
                if split not in files:
                  files[split] = _SplitFiles(self, split)
                files[split].add(example)
              bar.update(1)
              bar.set_postfix_str(_counts(files, self.policy), refresh=False)
      written = [f for f in files.values() if f.count]
      if not written:
        raise TooManySkipsError(
          f"{self.name}: no usable record in split 'train' or any other of {manual_dir}: "
          f"skipped {dict(self.policy.counts)}; first records: {dict(self.policy.examples)}"
        )
      self.info.set_splits(tfds.core.SplitDict([f.close() for f in written]))
      self.facts = collections.defaultdict(dict)  # key -> split -> one value per example
      for f in written:
        for key, values in f.facts.items():
          self.facts[key][f.split] = values


def _progress(desc: str, total: int):
  """Rate and ETA on stderr; off when stderr is not a terminal (tqdm's disable=None)."""
  return tqdm.tqdm(
    total=total, desc=desc, unit=" records", file=sys.stderr, disable=None, mininterval=1.0
  )


def _counts(files, policy) -> str:
  return " ".join(f"{s}={f.count}" for s, f in files.items()) + f" skipped={policy.total()}"


class _SplitFiles:
  """One split being written: ArrayRecord shards as the examples come (renamed to TFDS's
  names when the split ends and their number is known), and the thumbnails and facts of its
  examples, accumulated (8x8x3 bytes and a few numbers per example)."""

  def __init__(self, builder: ManualBuilder, split: str):
    self.split, self.count = split, 0
    self._builder = builder
    self._template = builder._get_filename_template(split)  # noqa: SLF001 (TFDS's file names)
    self._serializer = example_serializer.ExampleSerializer(
      builder.info.features.get_serialized_info()
    )
    self._writer, self._shard_bytes = None, 0
    self._shard_lengths: list[int] = []
    self._num_bytes = 0
    self._thumbnails = bytearray()
    self.facts: dict[str, list] = collections.defaultdict(list)

  def _shard_path(self, i: int) -> str:
    return os.fspath(self._template.data_dir / f".{self.split}-{i:05d}.writing")

  def add(self, example: dict) -> None:
    example = dict(example, index=self.count)
    data = self._serializer.serialize_example(self._builder.info.features.encode_example(example))
    if self._writer is None:
      path = self._shard_path(len(self._shard_lengths))
      self._writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
      self._shard_lengths.append(0)
    self._writer.write(data)
    self._shard_lengths[-1] += 1
    self._shard_bytes += len(data)
    self._num_bytes += len(data)
    self._thumbnails += np.asarray(example["thumbnail"], np.uint8).tobytes()
    for key, value in self._builder._facts(example).items():  # noqa: SLF001
      self.facts[key].append(value)
    self.count += 1
    if self._shard_bytes >= SHARD_BYTES:
      self._close_shard()

  def _close_shard(self) -> None:
    if self._writer is not None:
      self._writer.close()
    self._writer, self._shard_bytes = None, 0

  def close(self) -> tfds.core.SplitInfo:
    """Finishes the split: shards under their TFDS names, thumbnails saved; its SplitInfo."""
    self._close_shard()
    n = len(self._shard_lengths)
    for i in range(n):
      target = self._template.sharded_filepath(shard_index=i, num_shards=n)
      os.replace(self._shard_path(i), os.fspath(target))
    thumbs = np.frombuffer(bytes(self._thumbnails), np.uint8).reshape(-1, THUMB, THUMB, 3)
    np.save(os.fspath(self._template.data_dir / f"thumbnails.{self.split}.npy"), thumbs)
    self._thumbnails = bytearray()
    return tfds.core.SplitInfo(
      name=self.split,
      shard_lengths=self._shard_lengths,
      num_bytes=self._num_bytes,
      filename_template=self._template,
    )


def prepare_manual(
  builder_cls,
  manual_dir: str,
  prepared_dir: str | None,
  on_bad_record: str,
  image_size: int | None = None,
  prepare_workers: int = 0,
):
  """Prepares the files once (the config for on_bad_record and the run's image side:
  processors.static_image_side(image_size); None keeps the published images) and returns
  (builder, report). The report (skips by reason with the first record ids, which host and
  process prepared the files, the side, and the builder's per-split facts) is written last: it
  marks a finished preparation, and files without one are prepared again. A gs:// prepared_dir
  (default <manual_dir>/_tfds) is prepared in a local temporary directory and uploaded, the
  report after everything else. Several processes: sources.make_source lets process 0 first."""
  side = 0
  if image_size:
    from cpo_jax.data.processors import static_image_side  # transformers: only when resizing

    side = static_image_side(image_size)
  config = manual_config(on_bad_record, side)
  if config.name in {c.name for c in builder_cls.BUILDER_CONFIGS}:
    config = config.name  # TFDS refuses an equal object under the name of one of its own
  prepared_dir = prepared_dir or paths.join(manual_dir, "_tfds")
  make = lambda d: builder_cls(config=config, data_dir=d, file_format="array_record")  # noqa: E731
  builder = make(prepared_dir)
  report_path = paths.path(builder.data_dir) / REPORT
  if not report_path.exists():
    if paths.is_remote(prepared_dir):  # the ArrayRecord writer writes local files only
      with tempfile.TemporaryDirectory(prefix="cpo_jax_tfds_") as tmp:
        local = make(tmp)
        report = _prepare(local, manual_dir, prepare_workers)
        paths.upload_tree(local.data_dir, builder.data_dir, last=("dataset_info.json",))
      paths.write_json(report_path, report)
      builder = make(prepared_dir)
    else:
      paths.write_bytes_whole(
        report_path, json.dumps(_prepare(builder, manual_dir, prepare_workers)).encode()
      )
  report = json.loads(report_path.read_text())
  if report.get("image_side", 0) != side:
    raise ValueError(
      f"{builder.data_dir} holds images prepared at side {report.get('image_side', 0)} "
      f"(0 = as published), not this run's {side}; delete that directory to prepare it again"
    )
  return builder, report


def _prepare(builder: ManualBuilder, manual_dir: str, prepare_workers: int) -> dict:
  builder.prepare_workers = prepare_workers
  builder.download_and_prepare(
    file_format="array_record",
    download_config=tfds.download.DownloadConfig(
      manual_dir=manual_dir, download_mode=tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS
    ),
  )
  return {
    "skipped": dict(builder.policy.counts),
    "skipped_examples": dict(builder.policy.examples),
    "prepared_by": {"host": socket.gethostname(), "pid": os.getpid()},
    "image_side": builder.builder_config.image_side,
    **builder.facts,
  }


def missing_split_error(dataset: str, split: str, builder, report) -> ValueError:
  """The error for a split the prepared files lack. When preparing skipped records, it may be
  that all of its records were bad: stop with the counts by reason and the first records (a
  TooManySkipsError, never taken for an optional split the user's files do not have)."""
  where = (
    f"{dataset} has no usable record in split {split!r} (prepared: {sorted(builder.info.splits)})"
  )
  if report["skipped"]:
    return TooManySkipsError(
      f"{where}; preparing the files skipped {sum(report['skipped'].values())} records: "
      f"{report['skipped']}; first records: {report['skipped_examples']}. Fix the files, or "
      "prepare with data.on_bad_record='raise' to see the first error in full."
    )
  return ValueError(where)


def load_thumbnails(builder, split: str) -> np.ndarray:
  """[N, THUMB, THUMB, 3] uint8, record order of the split."""
  data = (paths.path(builder.data_dir) / f"thumbnails.{split}.npy").read_bytes()
  return np.load(io.BytesIO(data), allow_pickle=False)
