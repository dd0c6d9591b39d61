"""Write tests/golden/trl_dpo_losses.json from TRL's own code (run in a separate venv, not at test time).

    python -m venv /work/venvs/trl && /work/venvs/trl/bin/pip install torch==2.13.0 trl
    /work/venvs/trl/bin/python tests/golden/make_trl_golden.py            # -> tests/golden/trl_dpo_losses.json

What is called (TRL 1.16):
* `DPOTrainer._compute_loss` (the method the trainer's `compute_loss` runs) on a trainer object built without
  `__init__` and a stand-in model that returns fixed per-token log-probs in TRL's `FusedCausalLMOutput`
  (zeros at label -100, as TRL's fused LM head returns them). Reference logps come in through TRL's
  `precompute_ref_log_probs` path. Loss and the logged metrics (`self._metrics`) are recorded for the whole
  batch, and the loss alone for every pair on its own (B=1) to get per-example losses.
* TRL 1.16 dropped cDPO label smoothing from `sigmoid`; the same expression
  -(1-eps) logsigmoid(beta d) - eps logsigmoid(-beta d) lives in its `aot` branch, which for one pair
  (B=1: sorting is the identity) is exactly cDPO. Per-pair `aot` values are the cDPO golden.
* RPO (`rpo_alpha`) is TRL 1.16's loss_type=["sigmoid", "sft"] with loss_weights=[1, alpha].
* Per-token log-probs: `trl.trainer.utils.selective_log_softmax` (float64) and the fused LM head's
  `ChunkedLogProbFunction` (hidden @ weight.T without full logits; accumulates in float32 on CPU).
All inputs are generated here from a fixed seed, stored in the JSON, float64.
"""

from collections import defaultdict
import json
import os
import sys
import types

import numpy as np
import torch
import trl
from trl import DPOTrainer
from trl.kernels import ChunkedLogProbFunction
from trl.trainer.utils import FusedCausalLMOutput
from trl.trainer.utils import selective_log_softmax

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "trl_dpo_losses.json")


class _Accel:
  device = torch.device("cpu")

  @staticmethod
  def gather(x):
    return x

  gather_for_metrics = gather


class _StandInModel:
  """Returns fixed per-token logps the way TRL's fused LM head would (shape [2B, L-1], 0 at label -100)."""

  training = True

  def __init__(self, per_token_logps):
    self.per_token_logps = per_token_logps

  def __call__(self, labels=None, fused_lm_head=False, **kwargs):
    assert fused_lm_head
    mask = labels[:, 1:] != -100
    lp = self.per_token_logps.masked_fill(~mask, 0.0)
    zeros = torch.zeros_like(lp)
    return FusedCausalLMOutput(
      loss=None,
      log_probs=lp,
      entropy=zeros,
      mean_logits=zeros,
      is_top1=torch.zeros_like(mask),
      label_mask=mask,
    )


def _trainer(loss_types, loss_weights, beta, label_smoothing):
  t = object.__new__(DPOTrainer)  # why: only the loss math is exercised; no model/dataset setup
  t.accelerator = _Accel()
  t.aux_loss_enabled = False
  t.ld_alpha = None
  t.precompute_ref_logps = True
  t.f_divergence_type = "reverse_kl"
  t.loss_types = list(loss_types)
  t.loss_weights = list(loss_weights)
  t.beta = beta
  t.label_smoothing = label_smoothing
  t.use_weighting = False
  t._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
  t._total_train_tokens = 0
  t._tp_size = 1
  t.args = types.SimpleNamespace(discopop_tau=0.05)
  return t


def _run(trainer, per_token, completion_mask, ref_c, ref_r):
  inputs = {
    "input_ids": torch.ones(completion_mask.shape, dtype=torch.long),
    "attention_mask": torch.ones(completion_mask.shape, dtype=torch.long),
    "completion_mask": completion_mask,
    "ref_chosen_logps": ref_c,
    "ref_rejected_logps": ref_r,
  }
  model = _StandInModel(per_token)
  trainer.model = model
  loss = trainer._compute_loss(model, inputs, return_outputs=False)
  return float(loss)


def make_pairs(rng, b=7, length=14):
  """[chosen; rejected] stacked as TRL does. Prompt lengths vary; completions never start at position 0."""
  completion_mask = np.zeros((2 * b, length), np.int64)
  for i in range(2 * b):
    start = rng.integers(2, 6)
    end = rng.integers(start + 1, length + 1)
    completion_mask[i, start:end] = 1
  per_token = rng.uniform(-6.0, -0.01, size=(2 * b, length - 1))
  per_token = np.where(completion_mask[:, 1:] == 1, per_token, 0.0)
  ref_sums = per_token.sum(1) + rng.normal(0.0, 1.5, size=2 * b)
  # pair 0: a tie (policy == reference on both sides) -> reward accuracy 0 in TRL (strict >)
  ref_sums[0] = per_token[0].sum()
  ref_sums[b] = per_token[b].sum()
  # pair 1: chosen and rejected identical, also a tie
  completion_mask[b + 1] = completion_mask[1]
  per_token[b + 1] = per_token[1]
  ref_sums[b + 1] = ref_sums[1]
  return per_token, completion_mask, ref_sums[:b], ref_sums[b:]


CASES = [  # (name, loss_types, loss_weights, beta, label_smoothing)
  ("sigmoid_b0.1", ["sigmoid"], [1.0], 0.1, 0.0),
  ("sigmoid_b0.5", ["sigmoid"], [1.0], 0.5, 0.0),
  ("cdpo_b0.1_ls0.2", ["aot"], [1.0], 0.1, 0.2),  # per-pair only (see module doc)
  ("robust_b0.1_ls0.1", ["robust"], [1.0], 0.1, 0.1),
  ("robust_b0.3_ls0.25", ["robust"], [1.0], 0.3, 0.25),
  ("hinge_b0.1", ["hinge"], [1.0], 0.1, 0.0),
  ("hinge_b1.0", ["hinge"], [1.0], 1.0, 0.0),
  ("ipo_b0.1", ["ipo"], [1.0], 0.1, 0.0),
  ("ipo_b0.5", ["ipo"], [1.0], 0.5, 0.0),
  ("rpo_sigmoid_sft_a0.1", ["sigmoid", "sft"], [1.0, 0.1], 0.1, 0.0),
  ("sft", ["sft"], [1.0], 0.1, 0.0),
]


def main():
  torch.set_default_dtype(torch.float64)
  rng = np.random.default_rng(20261127)
  per_token, completion_mask, ref_c, ref_r = make_pairs(rng)
  b = ref_c.shape[0]
  t_pt, t_cm = torch.tensor(per_token), torch.tensor(completion_mask)
  t_rc, t_rr = torch.tensor(ref_c), torch.tensor(ref_r)

  cases = {}
  for name, lts, lws, beta, ls in CASES:
    tr = _trainer(lts, lws, beta, ls)
    batch_loss = _run(tr, t_pt, t_cm, t_rc, t_rr)
    metrics = {
      k: v[-1]
      for k, v in tr._metrics["train"].items()
      if k.startswith("rewards/") or k.startswith("logps/")
    }
    per_example = []
    for i in range(b):
      idx = [i, b + i]
      tr1 = _trainer(lts, lws, beta, ls)
      per_example.append(_run(tr1, t_pt[idx], t_cm[idx], t_rc[i : i + 1], t_rr[i : i + 1]))
    cases[name] = {
      "loss_types": lts,
      "loss_weights": lws,
      "beta": beta,
      "label_smoothing": ls,
      "loss": batch_loss,
      "per_example_losses": per_example,
      "metrics": metrics,
    }

  # Per-token logps from logits (float64) and from hidden states through the fused LM head.
  bb, ll, hh, vv = 2, 9, 16, 37
  hidden = rng.normal(size=(bb, ll, hh))
  weight = rng.normal(size=(vv, hh)) * 0.7
  labels = rng.integers(0, vv, size=(bb, ll))
  logits = hidden @ weight.T
  sel = selective_log_softmax(torch.tensor(logits), torch.tensor(labels)).numpy()
  chunked = (
    ChunkedLogProbFunction.apply(
      torch.tensor(hidden, dtype=torch.float32).reshape(-1, hh),
      torch.tensor(weight, dtype=torch.float32),
      None,
      torch.tensor(labels).reshape(-1),
      1.0,
      16,
      None,
      1.0,
      (),
    )[0]
    .reshape(bb, ll)
    .double()
    .numpy()
  )

  golden = {
    "trl_version": trl.__version__,
    "torch_version": torch.__version__,
    "pairs": {
      "per_token_logps": per_token.tolist(),
      "completion_mask": completion_mask.tolist(),
      "ref_chosen_logps": ref_c.tolist(),
      "ref_rejected_logps": ref_r.tolist(),
    },
    "cases": cases,
    "token_logps": {
      "hidden": hidden.tolist(),
      "weight_vh": weight.tolist(),
      "labels": labels.tolist(),
      "selective_log_softmax": sel.tolist(),
      "chunked_fused_lm_head_fp32": chunked.tolist(),
    },
  }
  with open(OUT, "w") as f:
    json.dump(golden, f, indent=1)
  print(
    f"wrote {OUT} (trl {trl.__version__}, torch {torch.__version__}, {os.path.getsize(OUT)} bytes)",
    file=sys.stderr,
  )


if __name__ == "__main__":
  main()
