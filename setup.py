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
  python_requires=">=3.10",
  install_requires=[
    "jax>=0.4.35",
    "flax>=0.10",
    "optax",
    "orbax-checkpoint",
    "grain",
    "ml-collections",
    "transformers>=4.50",
    "tokenizers",
    "tensorflow-datasets",
    "importlib_resources",  # tfds imports it without declaring it.
    "array-record",
    "safetensors",
    "numpy",
    "pillow",
    "tqdm",
    "absl-py",
    "matplotlib",
  ],
  extras_require={
    "tpu": ["jax[tpu]"],
    # ruff is pinned: its formatter's output is the project's style (.ci/run checks it).
    "test": ["pytest", "torch==2.13.0", "ruff==0.17.6"],
  },
)
