"""Evaluation: greedy answers and their metrics, robustness (interference curves, drift probe),
the report with its SFT baseline, and its plots."""
