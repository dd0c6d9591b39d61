"""Benchmark (not a test): a real-shaped checkpoint loads sharded and trains one step per stage.

1. Writes a 3B-shaped Qwen2.5-VL with random weights in bf16 with transformers'
   `save_pretrained` (safetensors, sharded files), with the synthetic tokenizer beside it.
2. In a fresh process with N simulated CPU devices, runs the CLI's path (`main.run`, the model
   from `model.init_from` onto an fsdp=N mesh) and reports the peak host RSS against the
   checkpoint's bytes (target: at most 1.3x the checkpoint + 2 GB) and the most bytes of the
   model any one device holds after loading. With --steps, one SFT and one CPO++ step follow
   at a short length: on the CPU that needs about 3x the checkpoint in host memory (XLA's CPU
   backend keeps float32 copies of bf16 weights for its matmuls, and every simulated device
   lives in host memory), so a 3B step does not fit a 24 GiB machine; `--mode=plan` sizes it.

    JAX_PLATFORMS=cpu python bench/real_checkpoint.py [--preset 3b] [--devices 8] [--steps]

Writes bench/results/real_checkpoint_<date>.json.
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

WRITE = r'''
import sys, torch
from transformers import Qwen2_5_VLForConditionalGeneration
from cpo_jax import models
from cpo_jax.data import tokenizer as tok_lib
from cpo_jax.models.presets import TOKEN_KEYS
path, preset = sys.argv[1], sys.argv[2]
tok = tok_lib.build_tokenizer()
tok_lib.save_tokenizer(tok, path)
ids = tok_lib.special_ids(tok)
# The preset's shapes (vocabulary included), the synthetic tokenizer's special ids.
config = models.get_config(preset, **{k: ids[k] for k in TOKEN_KEYS if k != 'vocab_size'})
torch.set_default_dtype(torch.bfloat16)
Qwen2_5_VLForConditionalGeneration(config).save_pretrained(path, max_shard_size='2GB')
'''

RUN = r'''
import json, resource, sys, time
from absl import flags
from ml_collections import config_flags
import jax
from cpo_jax import main

path, workdir, devices, stages = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
argv = ['prog', '--config=configs/driving.py:model=3b', f'--workdir={workdir}',
        f'--config.model.init_from={path}', f'--config.stages={stages}',
        '--config.sft.num_steps=1', '--config.cpo.num_steps=1',
        f'--config.sft.batch_size={devices}', f'--config.cpo.batch_size={devices}',
        '--config.data.max_len=96', '--config.data.image_size=112',
        '--config.data.num_examples.train=64', '--config.log_every_steps=1',
        '--config.mesh.shape.data=1', f'--config.mesh.shape.fsdp={devices}']
fv = flags.FlagValues()
config_flags.DEFINE_config_file('config', flag_values=fv, sys_argv=argv)
fv(argv, known_only=True)
rss_gb = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
out = {}
build = main.build_model

def build_and_measure(cfg, data, mesh):
  t = time.perf_counter()
  model = build(cfg, data, mesh)
  per_device, total = {}, 0
  for leaf in jax.tree.leaves(__import__('flax').nnx.state(model)):
    total += leaf.nbytes
    for shard in leaf.addressable_shards:
      per_device[shard.device.id] = per_device.get(shard.device.id, 0) + shard.data.nbytes
  out.update(load_s=time.perf_counter() - t, peak_rss_gb_after_load=rss_gb(),
             model_bytes=total, max_device_bytes=max(per_device.values()))
  return model

main.build_model = build_and_measure
t = time.perf_counter()
main.run(fv.config, workdir)
rows = [json.loads(l) for l in open(workdir + '/metrics.jsonl')] if stages else []
out.update(run_s=time.perf_counter() - t, peak_rss_gb=rss_gb(),
           losses={r['stage']: r['loss'] for r in rows})
print('RESULT ' + json.dumps(out))
'''


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--preset', default='3b')
  parser.add_argument('--devices', type=int, default=8)
  parser.add_argument('--dir', default=None, help='where the checkpoint goes (default: a temp dir)')
  parser.add_argument('--steps', action='store_true', help='also one SFT and one CPO++ step')
  args = parser.parse_args()
  root = args.dir or tempfile.mkdtemp(prefix='cpo_jax_ckpt_')
  path, workdir = os.path.join(root, 'model'), os.path.join(root, 'run')
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  t = time.perf_counter()
  if not os.path.exists(os.path.join(path, 'config.json')):
    print(f'writing a random {args.preset} checkpoint in bf16 to {path}', flush=True)
    subprocess.run([sys.executable, '-c', WRITE, path, args.preset], check=True, env=env)
  write_s = time.perf_counter() - t
  ckpt_bytes = sum(
    os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith('.safetensors')
  )
  print(f'checkpoint: {ckpt_bytes / 2**30:.2f} GiB; loading on {args.devices} devices', flush=True)
  flags = f'--xla_force_host_platform_device_count={args.devices}'
  out = subprocess.run(
    [
      sys.executable,
      '-c',
      RUN,
      path,
      workdir,
      str(args.devices),
      'sft,cpo_plus' if args.steps else '',
    ],
    env={**env, 'XLA_FLAGS': flags},
    capture_output=True,
    text=True,
  )
  if out.returncode:
    sys.exit(f'exit status {out.returncode}:\n{out.stderr[-5000:]}')
  result = json.loads(out.stdout.split('RESULT ', 1)[1])
  ckpt_gb = ckpt_bytes / 2**30
  result.update(
    preset=args.preset,
    devices=args.devices,
    steps=args.steps,
    checkpoint_gib=ckpt_gb,
    write_s=write_s,
    peak_rss_over_checkpoint=result['peak_rss_gb'] / ckpt_gb,
    rss_target_gib=1.3 * ckpt_gb + 2,
    within_target=result['peak_rss_gb'] <= 1.3 * ckpt_gb + 2,
    max_device_share_of_model=result['max_device_bytes'] / result['model_bytes'],
    machine=platform.platform(),
    cpus=os.cpu_count(),
  )
  os.makedirs('bench/results', exist_ok=True)
  name = f'bench/results/real_checkpoint_{datetime.date.today().isoformat()}.json'
  with open(name, 'w') as f:
    json.dump(result, f, indent=2)
  print(json.dumps(result, indent=2))


if __name__ == '__main__':
  main()
