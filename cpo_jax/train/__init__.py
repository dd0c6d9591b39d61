"""Training, one module per concept: optimizer, completion log-probs, the stages' objectives
(and their straightforward `naive` twins), the pair image layout, device-made pairs, the
precomputed reference, gradient accumulation, the jitted step, the loop with checkpoints,
metric writers, and the stages as the CLI runs them."""
