"""Concept graphs (as JSON data) and the graph-guided counterfactual rewriter."""

from cpo_jax.knowledge.graph import ConceptGraph
from cpo_jax.knowledge.graph import GraphError
from cpo_jax.knowledge.graph import load_graph
from cpo_jax.knowledge.rewriter import Counterfactual
from cpo_jax.knowledge.rewriter import rewrite
from cpo_jax.knowledge.rewriter import rewrite_chain
from cpo_jax.knowledge.rewriter import validate_counterfactual

__all__ = [
  'ConceptGraph',
  'Counterfactual',
  'GraphError',
  'load_graph',
  'rewrite',
  'rewrite_chain',
  'validate_counterfactual',
]
