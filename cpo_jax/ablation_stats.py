"""Statistics of an ablation over seeds (cpo_jax/ablate.py): pure functions of per-seed values.

Per arm and metric: the mean over seeds with its 95% t-interval (Student's t with n - 1 degrees
of freedom, sample standard deviation), and the paired comparison against a reference arm (the
SFT model): per seed the arm's value minus the reference's value on the same seed (the same SFT
checkpoint, data and evaluation examples), summarised the same way. Pairing removes the spread
between seeds that both arms share, which on the embedded default is larger than the
differences between arms. NaN (or None) marks a value that was not measured; it is left out,
and `n` says how many seeds remain. With one seed the interval is NaN (not zero width).
"""

from __future__ import annotations

import math
from typing import Mapping
from typing import NamedTuple
from typing import Sequence

import numpy as np
from scipy import stats  # a dependency of jax


class Interval(NamedTuple):
  mean: float
  low: float
  high: float
  n: int  # values the summary is over (finite ones)

  def as_dict(self) -> dict:
    """JSON-ready: NaN becomes None (strict JSON has no NaN)."""
    return {k: finite_or_none(v) for k, v in self._asdict().items()}


def finite_or_none(x):
  if isinstance(x, (int, np.integer)):
    return int(x)
  return float(x) if x is not None and math.isfinite(x) else None


def as_float(x) -> float:
  """A measured value, or NaN for None (not measured)."""
  return math.nan if x is None else float(x)


def t_interval(values: Sequence[float | None], confidence: float = 0.95) -> Interval:
  """Mean of the finite values and its two-sided t-interval: mean +- t_{(1+c)/2, n-1} * s / sqrt(n)."""
  x = np.asarray([as_float(v) for v in values], np.float64)
  x = x[np.isfinite(x)]
  n = len(x)
  if n == 0:
    return Interval(math.nan, math.nan, math.nan, 0)
  mean = float(x.mean())
  if n == 1:
    return Interval(mean, math.nan, math.nan, 1)
  half = float(stats.t.ppf((1 + confidence) / 2, n - 1) * x.std(ddof=1) / math.sqrt(n))
  return Interval(mean, mean - half, mean + half, n)


def paired_differences(
  arm: Mapping[int, float | None], reference: Mapping[int, float | None]
) -> dict[int, float]:
  """{seed: arm - reference} over the seeds where both were measured."""
  out = {}
  for seed in sorted(set(arm) & set(reference)):
    a, r = as_float(arm[seed]), as_float(reference[seed])
    if math.isfinite(a) and math.isfinite(r):
      out[seed] = a - r
  return out


def compare(
  values: Mapping[str, Mapping[str, Mapping[int, float | None]]],
  pairs: Sequence[tuple[str, str]],
  confidence: float = 0.95,
) -> dict[str, dict[str, dict]]:
  """{'a - b': {metric: t-summary of the per-seed differences a - b}} for each (a, b) of
  `pairs` whose two arms are in `values`: the paired test of one arm against another."""
  out = {}
  for a, b in pairs:
    if a in values and b in values:
      out[f'{a} - {b}'] = {
        metric: t_interval(
          list(paired_differences(per_seed, values[b].get(metric, {})).values()), confidence
        ).as_dict()
        for metric, per_seed in values[a].items()
      }
  return out


def summarize(
  values: Mapping[str, Mapping[str, Mapping[int, float | None]]],
  reference: str | None = 'sft',
  confidence: float = 0.95,
) -> dict[str, dict[str, dict]]:
  """values[arm][metric][seed] -> {arm: {metric: {'mean', 'low', 'high', 'n', 'paired'}}}, where
  'paired' is the t-summary of the per-seed differences against the `reference` arm (None for
  the reference itself, or when it is not among the arms)."""
  ref = values.get(reference) if reference is not None else None
  out = {}
  for arm, metrics in values.items():
    out[arm] = {}
    for metric, per_seed in metrics.items():
      row = t_interval(list(per_seed.values()), confidence).as_dict()
      paired = None
      if ref is not None and arm != reference:
        diffs = paired_differences(per_seed, ref.get(metric, {}))
        paired = t_interval(list(diffs.values()), confidence).as_dict()
      out[arm][metric] = dict(row, paired=paired)
  return out
