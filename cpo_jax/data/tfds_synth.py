"""TFDS builders `synth_drive` and `synth_cxr` (ArrayRecord files, no TensorFlow) and a reader.

The records are exactly the renderer's `make_example` (same seed -> same bytes), so a prepared
dataset and the on-the-fly sources are interchangeable. Read back with `tfds.data_source`
(`builder.as_data_source`), a random-access source Grain can shuffle and shard.
"""

from __future__ import annotations

import dataclasses
import tempfile

import numpy as np
import tensorflow_datasets as tfds

from cpo_jax import paths
from cpo_jax.data import synth_cxr
from cpo_jax.data import synth_drive


@dataclasses.dataclass
class SynthConfig(tfds.core.BuilderConfig):
  seed: int = 0
  num_train: int = 4096
  num_test: int = 512
  num_ood: int = 512
  agreement: float = 0.9  # shortcut strength in train/test
  first_index: int = 0  # record i of a split is its scene first_index + i (unseen scenes)

  def sizes(self) -> dict[str, int]:
    return {"train": self.num_train, "test": self.num_test, "ood": self.num_ood}


with tfds.core.registered.skip_registration():

  class _SynthBuilder(tfds.core.GeneratorBasedBuilder):
    """Shared by the generated datasets: `RENDERER` is the module with graph() / make_example()."""

    RENDERER = None
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
      SynthConfig(name="default", description="4096/512/512 examples, seed 0"),
      SynthConfig(
        name="tiny",
        description="64/32/32 examples, for tests",
        num_train=64,
        num_test=32,
        num_ood=32,
      ),
    ]

    def _info(self) -> tfds.core.DatasetInfo:
      g = self.RENDERER.graph()
      C = len(g.concepts)
      text = lambda: tfds.features.Tensor(shape=(), dtype=np.object_)  # noqa: E731  (str/bytes, no TF decoding)
      return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict(
          {
            "image": text(),  # PNG bytes, decoded in the pipeline (PIL)
            "question": text(),
            "chain": text(),
            "answer": text(),
            "decision": tfds.features.ClassLabel(names=list(g.decisions)),
            "concepts": tfds.features.Tensor(shape=(C,), dtype=np.int32),
            "nuisance": tfds.features.ClassLabel(names=list(g.nuisance_values)),
            "boxes": tfds.features.Tensor(shape=(C, 4), dtype=np.int32),
            "index": tfds.features.Scalar(dtype=np.int64),
          }
        ),
        supervised_keys=None,
        disable_shuffling=True,  # record i is make_example(seed, split, first_index + i)
        homepage="https://github.com/ (cpo_jax, generated)",
        metadata=tfds.core.MetadataDict(
          image_size=self.RENDERER.IMAGE_SIZE, concepts=list(g.concept_names)
        ),
      )

    def _split_generators(self, dl_manager):
      del dl_manager  # generated data: nothing to download
      # splits of size 0 are not generated (make_source prepares one split per config)
      return {
        s: self._generate_examples(s, n) for s, n in self.builder_config.sizes().items() if n > 0
      }

    def _generate_examples(self, split: str, n: int):
      cfg = self.builder_config
      for i in range(n):
        scene = cfg.first_index + i
        yield i, self.RENDERER.make_example(cfg.seed, split, scene, agreement=cfg.agreement)


class SynthDrive(_SynthBuilder):
  """Procedural road scenes with a time-of-day shortcut (cpo_jax/data/synth_drive.py)."""

  RENDERER = synth_drive


class SynthCxr(_SynthBuilder):
  """Procedural chest-X-ray-like images with a side-band shortcut (cpo_jax/data/synth_cxr.py)."""

  RENDERER = synth_cxr
  VERSION = tfds.core.Version("2.0.0")
  RELEASE_NOTES = {
    "1.0.0": "Initial release.",
    "2.0.0": "A tempting shortcut: full-height side-marker bands, fainter and smaller evidence.",
  }


BUILDERS = {"synth_drive": SynthDrive, "synth_cxr": SynthCxr}


def prepare(name: str, data_dir: str, config: str | SynthConfig = "default"):
  """Generate (once) the ArrayRecord files under data_dir; returns the builder.

  The ArrayRecord writer writes local files only, so a gs:// data_dir is prepared in a local
  temporary directory and uploaded, dataset_info.json last (readers, which read gs:// directly,
  then only ever see a complete version directory)."""
  make = lambda d: BUILDERS[name](config=config, data_dir=d, file_format="array_record")
  builder = make(data_dir)
  if not paths.is_remote(data_dir):
    try:
      builder.download_and_prepare(file_format="array_record")
    except FileExistsError:
      # Another process finished the same version first (runs sharing a data dir): its files
      # hold the same records (a pure function of the config), so this one reads them.
      builder = make(data_dir)
      if not builder.is_prepared():
        raise
    return builder
  if not builder.is_prepared():
    with tempfile.TemporaryDirectory(prefix="cpo_jax_tfds_") as tmp:
      local = make(tmp)
      local.download_and_prepare(file_format="array_record")
      paths.upload_tree(local.data_dir, builder.data_dir, last=("dataset_info.json",))
    builder = make(data_dir)
  return builder


def data_source(name: str, data_dir: str, split: str, config: str | SynthConfig = "default"):
  """Random-access source of records (text fields come back as bytes; `pairs.as_text` reads both)."""
  builder = prepare(name, data_dir, config)
  synth = {"synth_drive": synth_drive.DRIVE, "synth_cxr": synth_cxr.CXR}[name]
  return _WithDomain(builder.as_data_source(split=split), synth, split, builder.builder_config)


class _WithDomain:
  """The TFDS source plus the `domain` attribute the pipeline reads to pick the concept graph,
  and `counterfactual` (re-rendering a record: the files hold make_example's records)."""

  def __init__(self, src, synth, split: str, cfg: SynthConfig):
    self._src, self._synth, self._split, self._cfg = src, synth, split, cfg
    self.domain = self._synth.graph_name

  def counterfactual(self, index: int, assignment: dict[str, str]):
    return self._synth.counterfactual(
      self._cfg.seed,
      self._split,
      self._cfg.first_index + int(index),
      assignment,
      agreement=self._cfg.agreement,
    )

  def __len__(self):
    return len(self._src)

  def __getitem__(self, i):
    return self._src[i]

  def __getitems__(self, idx):
    return self._src.__getitems__(idx)

  def __repr__(self):
    return repr(self._src)
