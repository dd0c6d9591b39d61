"""Bad-record policy: typed errors that name the record, and a counter for skips.

`data.on_bad_record = raise | skip`: raise stops at the first bad record with its id and the
problem; skip drops it and counts it by reason (never a silent NaN, never silent truncation).
"""

from __future__ import annotations

import collections
import threading


class BadRecordError(ValueError):
  """A record that cannot become a training example; `reason` is the SkipCounter key."""

  def __init__(self, reason: str, record_id, message: str):
    super().__init__(
      f"record {record_id}: {message} [reason={reason}; data.on_bad_record='skip' drops and counts such records]"
    )
    self.reason, self.record_id, self.message = reason, record_id, message

  def __reduce__(self):  # picklable across grain worker processes
    return (BadRecordError, (self.reason, self.record_id, self.message))


class OverlongError(BadRecordError):
  def __init__(self, record_id, message: str):
    super().__init__("overlong", record_id, message)

  def __reduce__(self):
    return (OverlongError, (self.record_id, self.message))


class SkipCounter:
  """Counts skipped records by reason (visible to the caller for logging)."""

  def __init__(self):
    self._lock = threading.Lock()
    self.counts: collections.Counter = collections.Counter()
    self.examples: dict[str, list] = collections.defaultdict(list)

  def add(self, reason: str, record_id) -> None:
    with self._lock:
      self.counts[reason] += 1
      if len(self.examples[reason]) < 5:
        self.examples[reason].append(record_id)

  def total(self) -> int:
    return sum(self.counts.values())

  # Picklable for grain worker processes (their counts stay in the worker: with worker_count > 0
  # use on_bad_record='raise', or count from the batches' index gaps).
  def __getstate__(self):
    return {"counts": self.counts, "examples": self.examples}

  def __setstate__(self, state):
    self.__init__()
    self.counts, self.examples = state["counts"], state["examples"]


def check_policy(policy: str) -> str:
  """`data.on_bad_record`, checked: 'raise' or 'skip'."""
  if policy not in ("raise", "skip"):
    raise ValueError(f"on_bad_record={policy!r}; expected 'raise' or 'skip'")
  return policy


class BadRecordPolicy(SkipCounter):
  """`data.on_bad_record` applied to each BadRecordError: raise it, or count it by reason."""

  def __init__(self, policy: str):
    super().__init__()
    self.policy = check_policy(policy)

  def __call__(self, err: BadRecordError) -> None:
    if self.policy == "raise":
      raise err
    self.add(err.reason, str(err.record_id))

  def __getstate__(self):
    return dict(super().__getstate__(), policy=self.policy)

  def __setstate__(self, state):
    self.__init__(state["policy"])
    self.counts, self.examples = state["counts"], state["examples"]


class Guard:
  """Applies the bad-record policy around a per-example transform of the pipeline: the
  record's error is raised, or counted in the caller's `skips` and the example dropped (None).
  Picklable for Grain workers."""

  def __init__(self, fn, policy: str, skips: SkipCounter):
    self.fn, self.policy, self.skips = fn, check_policy(policy), skips

  def __call__(self, i, *args):
    try:
      return self.fn(i, *args)
    except BadRecordError as e:
      if self.policy == "raise":
        raise
      self.skips.add(e.reason, int(i))
      return None
