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


class LeftOut(Exception):
  """A good record a stream does not use (e.g. a pair with weight 0 in the CPO stream): dropped
  and counted under `reason` whatever the bad-record policy, never counted as bad."""

  def __init__(self, reason: str, record_id):
    super().__init__(f"record {record_id}: {reason}")
    self.reason, self.record_id = reason, record_id

  def __reduce__(self):
    return (LeftOut, (self.reason, self.record_id))


class TooManySkipsError(ValueError):
  """A stream whose records are (nearly) all bad: stop at once, never loop over skips forever."""


class Guard:
  """Applies the bad-record policy around a per-example transform of the pipeline: the
  record's error is raised, or counted in the caller's `skips` and the example dropped (None).

  A stream that skips every record of its first `window` (a pass over the shard, at most
  1000), or more than `max_skipped_share` of them, stops with the counts by reason and the
  first record ids: with an infinite stream, skipping everything would otherwise hang the
  run. Picklable for Grain workers (each worker then checks its own records)."""

  def __init__(self, fn, policy: str, skips: SkipCounter, *, window=1000, max_skipped_share=1.0):
    # window=None: no check (a finite stream).
    self.fn, self.policy, self.skips = fn, check_policy(policy), skips
    self.window = None if window is None else max(1, int(window))
    self.max_skipped_share = float(max_skipped_share)
    self.seen, self.own, self.left_out = 0, SkipCounter(), SkipCounter()

  def __call__(self, i, *args):
    self.seen += 1
    try:
      return self.fn(i, *args)
    except LeftOut as e:
      self.skips.add(e.reason, int(i))
      self.left_out.add(e.reason, e.record_id)
      self._check()
      return None
    except BadRecordError as e:
      if self.policy == "raise":
        raise
      self.skips.add(e.reason, int(i))
      self.own.add(e.reason, e.record_id)
      self._check()
      return None

  def _check(self):
    skipped = self.own.total()
    if self.window is None or self.seen < self.window:
      return
    if skipped + self.left_out.total() == self.seen and self.left_out.total():
      raise TooManySkipsError(
        f"none of the first {self.seen} records is usable here: {skipped} bad "
        f"{dict(self.own.counts)}, {self.left_out.total()} left out "
        f"{dict(self.left_out.counts)} (first: {dict(self.left_out.examples)})"
      )
    if skipped == self.seen or skipped / self.seen > self.max_skipped_share:
      raise TooManySkipsError(
        f"{skipped} of the first {self.seen} records were skipped (data.max_skipped_share="
        f"{self.max_skipped_share}): {dict(self.own.counts)}; first records: "
        f"{dict(self.own.examples)}. Fix the data (or the tokenizer, max_len, image size), "
        f"or run with data.on_bad_record='raise' to see the first error in full."
      )
