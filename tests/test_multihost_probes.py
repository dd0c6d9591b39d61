"""Two real JAX processes (jax.distributed on localhost, one CPU device each) run the robustness
probes and the findings scorer data-parallel: each host reads, perturbs, decodes and scores
only its share of the probe split (host 1 has fewer rows: it feeds a blank batch while host 0
finishes), and both get the cells, the drift probe and the scores of one process reading the
whole split (this test process, the same model unsharded).

The worker is this file run as a script (see the bottom)."""

import functools
import json
import os
import sys

from flax import nnx
import jax
import numpy as np
import pytest

from cpo_jax import models
from cpo_jax import perturb
from cpo_jax import sharding
from cpo_jax.data import eval_batches
from cpo_jax.data import processors as processors_lib
from cpo_jax.data import sources
from cpo_jax.evaluate import answers
from cpo_jax.evaluate import drift_probe
from cpo_jax.evaluate import findings
from cpo_jax.evaluate import hosts
from cpo_jax.evaluate import interference
from cpo_jax.evaluate import scoring
from cpo_jax.knowledge import load_graph

# 5 records in batches of 2: one process reads 3 batches; two hosts read records 0, 2, 4
# (2 batches) and 1, 3 (1 batch, then a blank one).
EXAMPLES, BATCH, PROMPT_LEN, NEW_TOKENS = 5, 2, 64, 4
# occlude and noise on the hosts' own shares (noise draws per record); image_swap, which reads
# the whole split on every host (answers.predict_decisions, tested in test_multihost_train), is
# left out: its decode would compile generate once more.
KINDS = {'occlude': (1.0,), 'noise': (0.3,), 'synonym': (1,), 'contradict': (1,)}


def _setup():
  proc = processors_lib.make_processors(None)
  model = models.Qwen2_5_VL(models.get_config_for_tokens('tiny', proc.ids), rngs=nnx.Rngs(0))
  source = sources.make_source('synth_drive', 'test', num_examples=EXAMPLES)
  read = functools.partial(
    eval_batches.make_eval_batches, source, proc, batch_size=BATCH, max_prompt_len=PROMPT_LEN
  )
  blank = functools.partial(
    eval_batches.blank_batch, proc, batch_size=BATCH, max_prompt_len=PROMPT_LEN
  )
  return proc, model, read, blank


def _probes(model, proc, read, blank=None):
  """The interference cells, the drift probe and the finding scores (the decisions' names as
  findings) of the split: shared over the hosts with `blank`, else read whole."""
  graph = load_graph('driving')
  kw = dict(processors=proc, graph=graph, blank=blank)
  details = interference.interference_details(
    model, read, kinds_and_severities=KINDS, max_new_tokens=NEW_TOKENS, **kw
  )
  drift = drift_probe.drift_probe(model, read(**hosts.share(model)), **kw)
  decode = dict(tokenizer=proc.tokenizer, graph=graph, max_new_tokens=NEW_TOKENS)
  if blank:
    pred = answers.predict_split(model, read, blank=blank, **decode)
  else:
    pred = answers.predict_decisions(model, read(), **decode)
  texts = dict(zip(pred.indices.tolist(), pred.texts))
  names = [graph.decision_texts[d] for d in graph.decisions]
  scorer = scoring.AnswerScorer(model, proc, graph)
  scores = findings.finding_scores(scorer, read(**hosts.share(model)), texts, names, blank=blank)
  return {'interference': details, 'drift': drift, 'texts': texts, 'scores': scores.tolist()}


def _run_two():
  from test_multihost_train import two_processes

  return two_processes(__file__, [], 240)


def _assert_close(got, want, path=''):
  """Equal structure, counts and discrete results; floats to float32 rounding (the hosts'
  calls batch and pad the rows differently)."""
  if isinstance(want, dict):
    assert set(got) == set(want), path
    for k in want:
      _assert_close(got[k], want[k], f'{path}.{k}')
  elif isinstance(want, list):
    assert len(got) == len(want), path
    for i, (g, w) in enumerate(zip(got, want)):
      _assert_close(g, w, f'{path}[{i}]')
  elif isinstance(want, float) and not isinstance(want, bool):
    assert got == pytest.approx(want, rel=1e-4, abs=1e-6), path
  else:
    assert got == want, path


def test_two_hosts_share_the_probes_and_get_one_processs_results():
  p0, p1 = _run_two()
  proc, model, read, _ = _setup()
  one = json.loads(json.dumps(_probes(model, proc, read)))  # the workers' JSON types
  assert p0 == p1
  assert one['interference']['none']['0']['n'] == EXAMPLES
  assert sorted(map(int, one['texts'])) == list(range(EXAMPLES))
  drift = one['drift']
  assert drift['outcome_shift'] > 0 and drift['n'] == EXAMPLES
  # Perception cells hold counts only here (4 new tokens never close a chain: all unparsed);
  # that a row's noise does not depend on its batch is tested below.
  _assert_close(p0, one)


@pytest.mark.parametrize('kind', ['noise', 'mask_patches'])
def test_a_random_mask_draws_per_record_not_per_batch(kind):
  """A row's mask is the same in a batch of 4 and in a batch of 2 (as a host's share has it)."""
  proc, _, read, _ = _setup()
  whole = next(read(batch_size=4))
  layout = perturb.PatchLayout.from_processor(proc.image_processor)
  key = jax.random.key(3)
  pixels = lambda b: np.asarray(b['pixel_values']).reshape(len(b['index']), -1, layout.patch_dim)
  masked = pixels(interference.perturb_batch(whole, kind, 0.5, key, layout=layout))
  for rows in (slice(0, 2), slice(2, 4)):
    half = {k: np.asarray(v)[rows] for k, v in whole.items() if k != 'pixel_values'}
    half['pixel_values'] = pixels(whole)[rows].reshape(-1, layout.patch_dim)
    got = pixels(interference.perturb_batch(half, kind, 0.5, key, layout=layout))
    np.testing.assert_array_equal(got, masked[rows])
  change = masked - pixels(whole)
  assert (change != 0).any((1, 2)).all() and not np.array_equal(change[0], change[1])  # own draws


def _worker(port, process_id):
  jax.distributed.initialize(
    coordinator_address=f'127.0.0.1:{port}',
    num_processes=2,
    process_id=process_id,
    initialization_timeout=60,
  )
  proc, model, read, blank = _setup()
  mesh = sharding.make_mesh({'data': -1, 'fsdp': 1, 'tensor': 1})
  state = nnx.state(model)
  nnx.update(model, jax.device_put(state, sharding.state_shardings(state, mesh)))
  assert hosts.share(model) == {'shard_index': process_id, 'shard_count': 2}
  print(json.dumps(_probes(model, proc, read, blank)), flush=True)
  # Both leave together, then skip the interpreter's teardown: collecting this run's compiled
  # programs at exit took minutes on a loaded machine, and the host that finished first timed
  # out in JAX's shutdown barrier.
  jax.distributed.shutdown()
  os._exit(0)


if __name__ == '__main__':
  _worker(int(sys.argv[1]), int(sys.argv[2]))
