"""Concept graphs (as JSON data) and the graph-guided counterfactual rewriter."""
from cpo_jax.knowledge.graph import ConceptGraph, GraphError, load_graph
from cpo_jax.knowledge.rewriter import Counterfactual, rewrite, rewrite_chain, validate_counterfactual
