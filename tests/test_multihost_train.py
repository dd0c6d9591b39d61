"""Two real JAX processes (jax.distributed on localhost, one CPU device each, gloo collectives)
train on one global batch whose halves each host cut to a different length bucket: the hosts
agree on the longest (sharding.pad_to_common_length) and the step is the one-device step over
both halves. They evaluate data-parallel (each host decodes its share of the split) and get
the answers, and the report, of one process.

The worker is this file run as a script (see the bottom)."""

import functools
import json
import os
import socket
import subprocess
import sys
import time

from etils import epath
from flax import nnx
import jax
import numpy as np

from cpo_jax import config_defaults
from cpo_jax import models
from cpo_jax import sharding
from cpo_jax.data import bad_records
from cpo_jax.data import datasets
from cpo_jax.data import eval_batches
from cpo_jax.data import processors
from cpo_jax.data import sources
from cpo_jax.evaluate import answers
from cpo_jax.knowledge import load_graph
from cpo_jax.train import objectives
from cpo_jax.train import stages
from cpo_jax.train import writers

PER_HOST = 4
# synth_drive rows are 74-76 tokens; with these seeds host 0's first batch holds a 76-token row
# and host 1's longest is 75, so the buckets cut them to different lengths (asserted below).
BUCKETS, MAX_LEN, SEEDS = '75,76', 96, {'sft': 23, 'cpo': 1}


def _setup():
  proc = processors.make_processors(None)
  ids = proc.ids
  model_config = models.get_config_for_tokens('tiny', ids)
  source = sources.make_source('synth_drive', 'train', num_examples=64)
  return proc, model_config, source


class _SomeUnreadable:
  """An eval split whose records `bad` cannot be read: skipped and counted as bad records."""

  def __init__(self, source, bad):
    self.source, self.bad = source, set(bad)

  def __len__(self):
    return len(self.source)

  def __getitem__(self, i):
    if i in self.bad:
      raise OSError(f'record {i} is corrupt')
    return self.source[i]


def _eval_predictions(model, proc, sharded):
  """Greedy answers to 11 test examples in batches of 4, records 1 and 3 unreadable. `sharded`
  (predict_split) on two hosts: host 0 reads records 0, 2, ..., 10 (2 batches) and host 1 the
  3 readable odd ones (1 batch, then a blank one); else (predict_decisions) every process
  reads all 9 (3 batches)."""
  source = _SomeUnreadable(sources.make_source('synth_drive', 'test', num_examples=11), {1, 3})
  read = functools.partial(
    eval_batches.make_eval_batches,
    source,
    proc,
    batch_size=4,
    max_prompt_len=64,
    graph=load_graph('driving'),
    on_bad_record='skip',
  )
  skips = bad_records.SkipCounter()
  kw = dict(tokenizer=proc.tokenizer, graph=load_graph('driving'), max_new_tokens=6)
  if sharded:
    blank = lambda: eval_batches.blank_batch(proc, batch_size=4, max_prompt_len=64)
    pred = answers.predict_split(model, read, blank=blank, skips=skips, **kw)
  else:
    pred = answers.predict_decisions(model, read(skips=skips), **kw)
  return {
    'texts': pred.texts,
    'indices': pred.indices.tolist(),
    'predicted': pred.predicted.tolist(),
    'gold': pred.gold.tolist(),
    'skipped': dict(skips.counts),
  }


def _batches(kind, proc, source, host):
  make = {'sft': datasets.make_sft_iterator, 'cpo': datasets.make_cpo_iterator}[kind]
  return make(
    source,
    proc,
    batch_size=PER_HOST,
    max_len=MAX_LEN,
    seed=SEEDS[kind],
    length_buckets=BUCKETS,
    shard_index=host,
    shard_count=2,
  )


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def two_processes(script, args, timeout):
  """Runs `script args port i` as processes i = 0, 1 of one JAX job; returns the last JSON line
  each printed."""
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  # One CPU device per process; compiling dominates the run, and unoptimised code compiles
  # in about half the time (the losses agree with the optimised test process's to 1e-5).
  # Eigen's pool off as in conftest.py (a pair once stalled until its timeout in CI).
  env['XLA_FLAGS'] = '--xla_backend_optimization_level=0 --xla_cpu_multi_thread_eigen=false'
  procs = [
    subprocess.Popen(
      [sys.executable, script, *args, str(port), str(i)],
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      env=env,
    )
    for i in range(2)
  ]
  outs = []
  try:
    for p in procs:
      try:
        out, err = p.communicate(timeout=timeout)
      except subprocess.TimeoutExpired:
        # Say where each process was, not only that one of them hung.
        for q in procs:
          q.kill()
        tails = [q.communicate()[1][-2000:] for q in procs]
        raise AssertionError(
          f'timed out after {timeout} s; stderr of process 0:\n{tails[0]}\n'
          f'stderr of process 1:\n{tails[1]}'
        ) from None
      lines = [ln for ln in out.splitlines() if ln.startswith('{')]
      assert p.returncode == 0 and lines, err[-3000:]
      outs.append(json.loads(lines[-1]))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  return outs


def _run_two(kind, workdir):
  return two_processes(__file__, [kind, str(workdir)], 300 if kind == 'cli' else 120)


def _pad(batch, length):
  return {
    k: np.pad(v, [(0, 0)] * (v.ndim - 1) + [(0, length - v.shape[-1])])
    if k.endswith(('input_ids', 'attention_mask', 'loss_mask'))
    else v
    for k, v in batch.items()
  }


def test_two_hosts_with_different_buckets_train_on_one_global_batch(tmp_path):
  t0 = time.time()
  p0, p1 = _run_two('sft', tmp_path)
  elapsed = time.time() - t0
  proc, model_config, source = _setup()
  iters = [_batches('sft', proc, source, host) for host in (0, 1)]
  steps = [[next(it) for it in iters] for _ in range(2)]  # [step][host]
  widths = [[b['input_ids'].shape[1] for b in step] for step in steps]
  assert widths == [[76, 75], [75, 76]]  # each host pads at one of the steps
  # Each host cut its own rows to its own bucket, and both placed one [8, 76] array.
  assert [p['local'] for p in (p0, p1)] == [list(w) for w in zip(*widths)]
  assert p0['placed'] == p1['placed'] == [[2 * PER_HOST, 76]] * 2
  # Global rows: host 0's, then host 1's (jax.devices() lists process 0's devices first).
  assert (p0['row_start'], p1['row_start']) == (0, PER_HOST)

  rows = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
  assert [(r['stage'], r['step']) for r in rows] == [('sft', 1), ('sft', 2)]
  # Warm-up starts at lr 0, so both steps' losses are the initial model's: each must be the
  # one-device loss over both hosts' rows of that step.
  assert rows[0]['lr'] == 0
  grid = np.asarray(steps[0][0]['image_grid_thw'][0])
  model = models.Qwen2_5_VL(model_config, rngs=nnx.Rngs(0))
  loss_fn = jax.jit(functools.partial(objectives.sft_loss_fn, grid=grid))

  def loss(parts):  # the hosts' rows of a step, host 0's first, padded to 76 columns
    batch = {k: np.concatenate([_pad(b, 76)[k] for b in parts]) for k in parts[0]}
    return float(loss_fn(model, stages.step_inputs(batch, grid, model_config))[0])

  for row, step in zip(rows, steps):
    np.testing.assert_allclose(row['loss'], loss(step), rtol=1e-5)
  # Not a loss that one host's rows alone would give (the same rows twice: the same shape).
  assert abs(loss([steps[0][0]] * 2) - rows[0]['loss']) > 1e-3
  # Data-parallel eval of the initial model: each host decodes its share (different numbers of
  # rows and batches, bad records on one host only), both get every row back in record order,
  # equal to one process decoding the whole split.
  one_host = _eval_predictions(model, proc, sharded=False)
  assert one_host['indices'] == [0, 2, 4, 5, 6, 7, 8, 9, 10]
  assert one_host['skipped'] == {'unreadable_record': 2} and len(set(one_host['texts'])) > 3
  assert p0['eval'] == p1['eval'] == one_host
  assert p0['eval_replicated'] == p1['eval_replicated'] == one_host
  print(f'two-process SFT, 2 steps, and an eval: {elapsed:.1f}s')


def test_two_hosts_precompute_the_reference_and_train_cpo(tmp_path):
  t0 = time.time()
  p0, p1 = _run_two('cpo', tmp_path)
  elapsed = time.time() - t0
  proc, _, source = _setup()
  widths = [
    next(_batches('cpo', proc, source, host))['chosen_input_ids'].shape[1] for host in (0, 1)
  ]
  assert widths[0] != widths[1]
  # Two passes over the stream (reference, then training), each padded per step.
  for p, w in zip((p0, p1), widths):
    assert p['local'][0] == p['local'][2] == w and p['placed'][0] == [2 * PER_HOST, max(widths)]
  for host in (0, 1):
    with np.load(tmp_path / 'reference' / f'cpo_plus.process{host}.npz') as f:
      # [steps, this host's pairs, (chosen, rejected)]
      assert f['rows'].shape == (2, PER_HOST, 2)
  rows = [json.loads(line) for line in open(tmp_path / 'metrics.jsonl')]
  assert [(r['stage'], r['step']) for r in rows] == [('cpo_plus', 1), ('cpo_plus', 2)]
  # New adapters start at zero, so at step 1 the policy is its reference: every reward is 0
  # (no pair's chosen reward above its rejected one) only if each host's reference rows came
  # back to the pairs they were computed for; mixed-up rows would give nonzero ones.
  rewards = {k: v for k, v in rows[0].items() if 'rewards/' in k}
  assert {f'{s}rewards/accuracies' for s in ('', 'thinking/', 'perception/')} <= set(rewards)
  assert rewards['rewards/accuracies'] == 0, rewards
  assert all(abs(v) < 1e-4 for v in rewards.values()), rewards
  print(f'two-process CPO++ with a precomputed reference, 2 steps: {elapsed:.1f}s')


def test_two_hosts_run_the_cli_on_a_gs_workdir_and_export_from_there(gcs_server):
  # Both hosts train, evaluate and export through main.py with a gs:// workdir and data_dir:
  # process 0 prepares the data and uploads it, Orbax writes every host's shards to the bucket,
  # process 0 alone writes metrics, events, the report and the export (gathered tensors).
  # Data-parallel eval: each host decodes its share of a split (test: 9 examples in batches
  # of 4, so host 0 reads 2 batches, host 1 one and then a blank one) and both get every row.
  workdir = 'gs://bucket/two_hosts'
  p0, p1 = _run_two('cli', workdir)
  assert p0['report'] == p1['report'] and set(p0['report']) == {'test', 'ood'}
  assert p0['report']['test']['n'] == 9
  from conftest import bucket_files  # here, not at the top: the workers import this file

  from cpo_jax import main

  # The report equals one process's eval of the same checkpoints (8 devices, data=8): the
  # same metrics, counts and example answers.
  two_hosts = json.loads(epath.Path(workdir, 'eval', 'report.json').read_text())
  one_host = main.run(_cli_config(workdir), workdir, mode='eval')
  assert two_hosts['splits'] == one_host['splits']

  files = set(bucket_files(workdir))
  assert {'config.json', 'metrics.jsonl', 'eval/report.json'} <= files
  assert any(f.startswith('tensorboard/') for f in files)
  assert any(f.startswith('checkpoints/cpo_plus/') for f in files)
  rows = [json.loads(r) for r in epath.Path(workdir, 'metrics.jsonl').read_text().splitlines()]
  assert [(r['stage'], r['step']) for r in rows] == [('sft', 1), ('sft', 2), ('cpo_plus', 1)]
  exported = models.load_hf(workdir + '_export')  # the gathered, merged weights
  tokenizer = processors.make_processors(workdir + '_data/tokenizer').tokenizer
  assert exported.config.text_config.vocab_size == len(tokenizer)
  assert epath.Path(workdir + '_export', 'tokenizer.json').exists()


def _cli_config(workdir):
  from cli_configs import cli_config

  cfg = cli_config(
    'configs/driving.py',
    f'--config.data.data_dir={workdir}_data',
    '--config.data.num_examples.train=32',
    '--config.data.num_examples.test=9',
    '--config.data.num_examples.ood=8',
    '--config.sft.num_steps=2',
    '--config.cpo.num_steps=1',
    '--config.sft.batch_size=4',
    '--config.cpo.batch_size=4',
    '--config.eval.batch_size=4',
    '--config.log_every_steps=1',
    '--config.eval.robustness=False',
    '--config.eval.baseline=False',
    '--config.eval.max_new_tokens=4',
  )
  cfg.mesh.shape = {'data': -1, 'fsdp': 1, 'tensor': 1}
  return cfg


def _cli_worker(workdir):
  from cpo_jax import main

  cfg = _cli_config(workdir)
  report = main.run(cfg, workdir)
  main.export(cfg, workdir, workdir + '_export')
  print(json.dumps({'report': report['splits']}), flush=True)


def _worker(kind, workdir, port, process_id):
  jax.distributed.initialize(
    coordinator_address=f'127.0.0.1:{port}',
    num_processes=2,
    process_id=process_id,
    initialization_timeout=60,
  )
  if kind == 'cli':
    return _cli_worker(workdir)
  seen = {'local': [], 'placed': []}
  pad, place = sharding.pad_to_common_length, sharding.global_batch

  def seq_len(batch):
    return next(v.shape[-1] for k, v in batch.items() if k.endswith('input_ids'))

  def recording_pad(batch):
    seen['local'].append(seq_len(batch))
    return pad(batch)

  def recording_place(batch, mesh, micro=False):
    out = place(batch, mesh, micro)
    ids = next(v for k, v in out.items() if k.endswith('input_ids'))
    seen['placed'].append(list(ids.shape))
    seen['row_start'] = min(s.index[0].start or 0 for s in ids.addressable_shards)
    return out

  sharding.pad_to_common_length, sharding.global_batch = recording_pad, recording_place

  proc, model_config, source = _setup()
  cfg = config_defaults.base_config('', domain='driving', data='synth_drive')
  cfg.log_every_steps, cfg.checkpoint.every_steps = 1, 100
  cfg.sft.num_steps = cfg.cpo.num_steps = 2
  cfg.cpo.reference = 'precomputed'
  mesh = sharding.make_mesh({'data': -1, 'fsdp': 1, 'tensor': 1})
  grid = np.asarray(next(_batches(kind, proc, source, process_id))['image_grid_thw'][0])
  stage = {'sft': stages.train_sft, 'cpo': stages.train_cpo}[kind]
  stage(
    models.Qwen2_5_VL(model_config, rngs=nnx.Rngs(0)),
    cfg,
    grid=grid,
    mesh=mesh,
    make_batches=lambda: _batches(kind, proc, source, process_id),
    workdir=workdir,
    writer=writers.MetricsWriter(workdir),
  )
  if kind == 'sft':  # the initial model, its parameters on the two hosts' mesh
    model = models.Qwen2_5_VL(model_config, rngs=nnx.Rngs(0))
    state = nnx.state(model)
    nnx.update(model, jax.device_put(state, sharding.state_shardings(state, mesh)))
    seen['eval'] = _eval_predictions(model, proc, sharded=True)
    # The probes' path: both hosts read the whole split, each call's rows split over the hosts.
    seen['eval_replicated'] = _eval_predictions(model, proc, sharded=False)
  print(json.dumps(seen), flush=True)


if __name__ == '__main__':
  _worker(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
