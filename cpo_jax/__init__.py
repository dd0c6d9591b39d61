"""cpo_jax: Counterfactual Preference Optimization (CPO / CPO++) for multimodal LLMs in JAX."""

__version__ = '0.1.0'
