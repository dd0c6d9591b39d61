"""cpo_jax.losses against TRL's own code (tests/golden/, made by make_trl_golden.py) and hand-computed cases."""

import json
import os

import jax
import jax.numpy as jnp
from jax.test_util import check_grads
import numpy as np
import pytest

from cpo_jax import losses as L

GOLDEN = json.load(open(os.path.join(os.path.dirname(__file__), "golden", "trl_dpo_losses.json")))
TOL = {"float64": 1e-6, "float32": 1e-5}


def _pairs(dtype):
  """TRL's stacked [chosen; rejected] per-token logps -> our sum/mean logps, chosen/rejected split."""
  p = GOLDEN["pairs"]
  per_token = jnp.asarray(np.array(p["per_token_logps"]), dtype)
  mask = jnp.asarray(np.array(p["completion_mask"])[:, 1:])  # TRL scores labels shifted by one
  s, m, n = L.reduce_sequence(per_token, mask)
  b = s.shape[0] // 2
  ref_c = jnp.asarray(p["ref_chosen_logps"], dtype)
  ref_r = jnp.asarray(p["ref_rejected_logps"], dtype)
  n = n.astype(dtype)
  return dict(
    per_token=per_token,
    mask=mask,
    b=b,
    sum=(s[:b], s[b:], ref_c, ref_r),
    mean=(m[:b], m[b:], ref_c / n[:b], ref_r / n[b:]),
  )


def _check(ours, theirs, tol):
  np.testing.assert_allclose(
    np.asarray(ours, np.float64), np.asarray(theirs, np.float64), rtol=tol, atol=tol
  )


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", sorted(GOLDEN["cases"]))
def test_matches_trl_golden(name, dtype):
  case = GOLDEN["cases"][name]
  tol = TOL[dtype]
  with jax.enable_x64(dtype == "float64"):
    d = _pairs(jnp.dtype(dtype))
    beta, ls = case["beta"], case["label_smoothing"]
    lt = case["loss_types"][0]
    nll_per_pair = jax.vmap(lambda t, m: L.nll_from_token_logps(t[None], m[None]))(
      d["per_token"][: d["b"]], d["mask"][: d["b"]]
    )
    if lt == "sft":
      _check(
        L.nll_from_token_logps(d["per_token"][: d["b"]], d["mask"][: d["b"]]), case["loss"], tol
      )
      _check(nll_per_pair, case["per_example_losses"], tol)
      return
    ours_type = {"aot": "sigmoid"}.get(
      lt, lt
    )  # TRL 1.16 keeps cDPO only in `aot` (identical at B=1)
    logps = L.logps_for_loss(d["sum"], d["mean"], ours_type)
    losses, metrics = L.preference_loss(*logps, beta=beta, loss_type=ours_type, label_smoothing=ls)
    assert losses.dtype == jnp.dtype(dtype)
    if case["loss_types"] == ["sigmoid", "sft"]:  # RPO: sigmoid + alpha * NLL(chosen)
      alpha = case["loss_weights"][1]
      nll = L.nll_from_token_logps(d["per_token"][: d["b"]], d["mask"][: d["b"]])
      _check(losses.mean() + alpha * nll, case["loss"], tol)
      _check(losses + alpha * nll_per_pair, case["per_example_losses"], tol)
    else:
      _check(losses, case["per_example_losses"], tol)
      if lt != "aot":  # aot sorts over the batch; only its per-pair values are cDPO
        _check(losses.mean(), case["loss"], tol)
    # metrics are those of the sum logps in every TRL case (TRL logs rewards from summed logps)
    _, sum_metrics = L.preference_loss(*d["sum"], beta=beta, loss_type="sigmoid")
    assert set(case["metrics"]) == set(sum_metrics)
    for k, v in case["metrics"].items():
      _check(sum_metrics[k], v, tol)


def test_token_logps_match_trl():
  g = GOLDEN["token_logps"]
  hidden, w_vh, labels = (np.array(g[k]) for k in ("hidden", "weight_vh", "labels"))
  with jax.enable_x64(True):
    h, k = jnp.asarray(hidden), jnp.asarray(w_vh.T)
    _check(jax.jit(L.token_logps)(h @ k, jnp.asarray(labels)), g["selective_log_softmax"], 1e-10)
    chunked = jax.jit(L.token_logps_from_hidden, static_argnames="chunk_size")
    for chunk in (4, 9, 64):  # 9 = L; 4 and 64 exercise padding / a single chunk
      _check(
        chunked(h, k, jnp.asarray(labels), chunk_size=chunk), g["selective_log_softmax"], 1e-10
      )
  # float32 against the fused LM head TRL trains with (it accumulates in float32 on CPU)
  out32 = chunked(
    jnp.asarray(hidden, jnp.float32),
    jnp.asarray(w_vh.T, jnp.float32),
    jnp.asarray(labels),
    chunk_size=4,
  )
  _check(out32, g["chunked_fused_lm_head_fp32"], 1e-5)
  _check(out32, g["selective_log_softmax"], 1e-5)


def test_sequence_logps_masks_and_ignores_junk_labels():
  logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25], [0.1, 0.1, 0.8], [1 / 3, 1 / 3, 1 / 3]]]))
  labels = jnp.array([[0, 2, -100]])  # -100 at a masked position must not matter
  mask = jnp.array([[1, 1, 0]])
  s, m, n = L.sequence_logps(logits, labels, mask)
  np.testing.assert_allclose(s, [np.log(0.5) + np.log(0.8)], rtol=1e-6)
  np.testing.assert_allclose(m, [(np.log(0.5) + np.log(0.8)) / 2], rtol=1e-6)
  assert n.tolist() == [2]
  np.testing.assert_allclose(
    L.sft_loss(logits, labels, mask), -(np.log(0.5) + np.log(0.8)) / 2, rtol=1e-6
  )
  # empty completion: sum 0, mean 0, no NaN
  s0, m0, n0 = L.sequence_logps(logits, labels, jnp.zeros_like(mask))
  assert float(s0[0]) == 0.0 and float(m0[0]) == 0.0 and int(n0[0]) == 0
  assert float(L.sft_loss(logits, labels, jnp.zeros_like(mask))) == 0.0


def test_sft_loss_is_token_weighted_mean():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(2, 5, 7)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 7, (2, 5)))
  mask = jnp.array([[0, 1, 1, 1, 1], [0, 0, 0, 1, 0]])
  lp = jax.nn.log_softmax(logits, -1)
  ref = -np.take_along_axis(np.asarray(lp), np.asarray(labels)[..., None], -1)[..., 0][
    np.asarray(mask) == 1
  ].mean()
  np.testing.assert_allclose(L.sft_loss(logits, labels, mask), ref, rtol=1e-6)


def test_bf16_logits_are_computed_in_fp32():
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.normal(scale=30.0, size=(2, 6, 50)), jnp.bfloat16)
  logits = logits.at[0, 0, 3].set(
    3.0e4
  )  # a huge logit: exp would overflow in bf16/fp32 without max-shift
  labels = jnp.asarray(rng.integers(0, 50, (2, 6)))
  mask = jnp.ones((2, 6))
  seq = jax.jit(L.sequence_logps)
  s, m, _ = seq(logits, labels, mask)
  s32, _, _ = seq(logits.astype(jnp.float32), labels, mask)
  assert s.dtype == jnp.float32 and m.dtype == jnp.float32
  assert np.all(np.isfinite(s))
  np.testing.assert_array_equal(s, s32)  # identical: bf16 is upcast before any arithmetic
  g = jax.jit(jax.grad(lambda x: L.sequence_logps(x, labels, mask)[0].sum()))(logits)
  assert g.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(g, np.float32)))


def _sequence_logps_from_hidden(hidden, kernel, labels, loss_mask, *, chunk_size=128):
  """`L.sequence_logps` from hidden states, chunked: the composition the CPO step uses
  (`completion.label_logps`, then `reduce_completion`)."""
  per_token = L.token_logps_from_hidden(hidden, kernel, labels, chunk_size=chunk_size)
  return L.reduce_sequence(per_token, loss_mask)


def test_chunked_equals_full_values_and_grads():
  rng = np.random.default_rng(2)
  b, n, h, v = 2, 11, 8, 29
  hidden = jnp.asarray(rng.normal(size=(b, n, h)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(h, v)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, v, (b, n)))
  mask = jnp.asarray(rng.integers(0, 2, (b, n)))

  def full(hd, k):
    return L.sequence_logps(hd @ k, labels, mask)[0].sum()

  def chunked(hd, k):
    return _sequence_logps_from_hidden(hd, k, labels, mask, chunk_size=4)[0].sum()

  v_full, g_full = jax.jit(jax.value_and_grad(full, (0, 1)))(hidden, kernel)
  v_chunk, g_chunk = jax.jit(jax.value_and_grad(chunked, (0, 1)))(hidden, kernel)
  np.testing.assert_allclose(v_chunk, v_full, rtol=1e-6)
  for a, c in zip(g_full, g_chunk):
    np.testing.assert_allclose(c, a, rtol=1e-5, atol=1e-5)
  # bf16 hidden/kernel: logits accumulate in fp32
  s16 = jax.eval_shape(
    _sequence_logps_from_hidden,
    hidden.astype(jnp.bfloat16),
    kernel.astype(jnp.bfloat16),
    labels,
    mask,
  )[0]
  assert s16.dtype == jnp.float32
  with jax.enable_x64(True):
    f = jax.jit(
      lambda hd: _sequence_logps_from_hidden(
        hd, jnp.asarray(kernel, jnp.float64), labels, mask, chunk_size=3
      )[0]
    )
    check_grads(f, (jnp.asarray(hidden, jnp.float64),), order=1, modes=("rev",), eps=1e-6)


def test_chunked_never_materialises_full_logits():
  b, n, h, v = 2, 512, 32, 4096
  hidden = jax.ShapeDtypeStruct((b, n, h), jnp.float32)
  kernel = jax.ShapeDtypeStruct((h, v), jnp.float32)
  labels = jax.ShapeDtypeStruct((b, n), jnp.int32)
  mask = jax.ShapeDtypeStruct((b, n), jnp.int32)
  full_bytes = b * n * v * 4

  def loss(fn):
    return jax.jit(jax.grad(lambda hd, k, lb, mk: fn(hd, k, lb, mk)[0].sum(), (0, 1)))

  def temp_bytes(fn):
    return (
      loss(fn).lower(hidden, kernel, labels, mask).compile().memory_analysis().temp_size_in_bytes
    )

  full = temp_bytes(lambda hd, k, lb, mk: L.sequence_logps(hd @ k, lb, mk))
  chunked = temp_bytes(
    lambda hd, k, lb, mk: _sequence_logps_from_hidden(hd, k, lb, mk, chunk_size=64)
  )
  assert full >= full_bytes  # the naive path holds at least one [B, L, V] float32 buffer
  assert chunked < full_bytes / 2, (chunked, full)


def _logps4(rng, b, scale=5.0, dtype=jnp.float64):
  return tuple(jnp.asarray(rng.normal(scale=scale, size=b) - 20.0, dtype) for _ in range(4))


@pytest.mark.parametrize(
  "loss_type,ls",
  [("sigmoid", 0.0), ("sigmoid", 0.2), ("robust", 0.1), ("hinge", 0.0), ("ipo", 0.0)],
)
def test_gradients_finite_differences(loss_type, ls):
  with jax.enable_x64(True):
    args = _logps4(np.random.default_rng(3), 6)
    beta = (
      0.05 if loss_type == "hinge" else 0.3
    )  # hinge: keep 1 - beta*delta > 0, away from its kink
    f = jax.jit(
      lambda *a: L.preference_loss(*a, beta=beta, loss_type=loss_type, label_smoothing=ls)[0].sum()
    )
    check_grads(f, args, order=1, modes=("rev",), eps=1e-5)
    w = jax.jit(
      lambda per_example: L.cpo_plus_loss(
        per_example, jnp.array([0, 1, 2, 0, 1, 2]), jnp.arange(1.0, 7.0), (2.0, 1.0, 0.5)
      )
    )
    check_grads(w, (jnp.asarray(np.random.default_rng(4).normal(size=6)),), order=1, modes=("rev",))


def test_tie_is_not_accurate():
  x = jnp.array([-3.0, -7.0])
  for lt in L.LOSS_TYPES:
    losses, m = L.preference_loss(
      x, x - 1.0, x, x - 1.0, beta=0.1, loss_type=lt, label_smoothing=0.1 if lt == "robust" else 0.0
    )
    assert float(m["rewards/accuracies"]) == 0.0
    assert float(m["rewards/margins"]) == 0.0
  losses, _ = L.preference_loss(x, x - 1.0, x, x - 1.0)
  np.testing.assert_allclose(losses, np.log(2.0), rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_extreme_logps_stay_finite(dtype):
  big = jnp.array([1e4, -1e4, 3e4, -3e4], dtype)
  zero = jnp.zeros(4, dtype)
  for lt, ls in [("sigmoid", 0.0), ("sigmoid", 0.3), ("robust", 0.2), ("hinge", 0.0), ("ipo", 0.0)]:
    f = lambda c, lt=lt, ls=ls: L.preference_loss(
      c, zero, zero, zero, beta=0.1, loss_type=lt, label_smoothing=ls
    )[0]
    losses, grads = jax.jit(lambda c, f=f: (f(c), jax.grad(lambda x: f(x).sum())(c)))(big)
    assert np.all(np.isfinite(np.asarray(losses, np.float32))), (lt, losses)
    assert np.all(np.isfinite(np.asarray(grads, np.float32))), (lt, grads)
  losses, _ = L.preference_loss(
    jnp.array([1e4, -1e4], jnp.float32), jnp.zeros(2), jnp.zeros(2), jnp.zeros(2)
  )
  np.testing.assert_allclose(losses, [0.0, 1e3], rtol=1e-6, atol=1e-6)  # -log_sigmoid(-1000) = 1000


def test_cpo_plus_hand_computed():
  losses = jnp.array([1.0, 2.0, 3.0, 4.0])
  source = jnp.array([0, 1, 2, 0])
  sw = jnp.array([1.0, 1.0, 2.0, 0.5])
  # w = [2*1, 1*1, 0.5*2, 2*0.5] = [2, 1, 1, 1]; mean 1.25
  np.testing.assert_allclose(
    L.cpo_plus_loss(losses, source, sw, (2.0, 1.0, 0.5), normalize=False), 11 / 4
  )
  np.testing.assert_allclose(
    L.cpo_plus_loss(losses, source, sw, (2.0, 1.0, 0.5)), 11 / 4 / 1.25, rtol=1e-6
  )
  np.testing.assert_allclose(
    L.cpo_plus_weights(source, sw, (2.0, 1.0, 0.5)), [1.6, 0.8, 0.8, 0.8], rtol=1e-6
  )
  # defaults = the plain CPO mean; a source weight of 0 drops that source
  np.testing.assert_allclose(L.cpo_plus_loss(losses, source), 2.5)
  np.testing.assert_allclose(
    L.cpo_plus_loss(losses, source, None, (1.0, 0.0, 1.0), normalize=False), 8 / 4
  )
  np.testing.assert_allclose(
    L.cpo_plus_loss(losses, source, None, (1.0, 0.0, 1.0)), 8 / 4 / 0.75, rtol=1e-6
  )
  # all-zero weights: 0, not NaN
  assert float(L.cpo_plus_loss(losses, source, jnp.zeros(4))) == 0.0
  # jit with a traced source / weight
  jitted = jax.jit(L.cpo_plus_loss, static_argnames=("source_weights", "normalize"))
  np.testing.assert_allclose(
    jitted(losses, source, sw, source_weights=(2.0, 1.0, 0.5)), 11 / 4 / 1.25, rtol=1e-6
  )


def test_per_source_metrics_and_absent_source():
  pc, pr = jnp.array([-1.0, -2.0, -3.0]), jnp.array([-2.0, -1.0, -3.0])
  rc, rr = jnp.array([-1.5, -2.0, -3.0]), jnp.array([-2.0, -2.0, -3.0])
  per_ex = L.pair_metrics(pc, pr, rc, rr, beta=1.0)
  per_ex["loss"] = jnp.array([0.1, 0.2, 0.3])
  source = jnp.array([0, 0, 2])  # no perception pair in this batch
  m = jax.jit(L.per_source_metrics)(per_ex, source)
  # thinking: pair 0 margin 0.5 - 0 = 0.5 (accurate), pair 1 margin 0 - 1 = -1 (not)
  np.testing.assert_allclose(m["thinking/rewards/margins"], (0.5 - 1.0) / 2)
  np.testing.assert_allclose(m["thinking/rewards/accuracies"], 0.5)
  np.testing.assert_allclose(m["thinking/loss"], 0.15, rtol=1e-6)
  np.testing.assert_allclose(m["other/rewards/accuracies"], 0.0)  # a tie
  assert (
    int(m["thinking/count"]) == 2 and int(m["other/count"]) == 1 and int(m["perception/count"]) == 0
  )
  assert all(np.isfinite(np.asarray(v)).all() for v in m.values())
  assert float(m["perception/rewards/margins"]) == 0.0
  kept = L.drop_absent(jax.device_get(m))
  assert "perception/rewards/margins" not in kept and kept["perception/count"] == 0
  assert "thinking/rewards/accuracies" in kept and "other/logps/chosen" in kept


def test_bad_arguments_raise():
  x = jnp.zeros(2)
  with pytest.raises(ValueError, match="loss_type"):
    L.preference_loss(x, x, x, x, loss_type="cpo")
  with pytest.raises(ValueError, match="robust"):
    L.preference_loss(x, x, x, x, loss_type="robust", label_smoothing=0.5)
  with pytest.raises(ValueError, match="label_smoothing"):
    L.preference_loss(x, x, x, x, label_smoothing=0.7)


def test_compact_completion_projects_only_completion_positions():
  rng = np.random.default_rng(5)
  b, n, h, v = 2, 10, 6, 13
  hidden = jnp.asarray(rng.normal(size=(b, n, h)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(h, v)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, v, (b, n)))
  mask = jnp.array([[0, 0, 0, 1, 1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 1, 1, 1, 1]])
  hc, lc, mc, dropped = jax.jit(L.compact_completion, static_argnums=3)(hidden, labels, mask, 4)
  assert hc.shape == (b, 4, h) and dropped.tolist() == [0, 0]
  assert lc[1].tolist() == labels[1, 6:].tolist() and mc.sum(1).tolist() == [3, 4]
  full = jax.jit(L.sequence_logps)(hidden @ kernel, labels, mask)
  compact = jax.jit(_sequence_logps_from_hidden, static_argnames="chunk_size")(
    hc, kernel, lc, mc, chunk_size=3
  )
  for a, c in zip(full, compact):
    np.testing.assert_allclose(c, a, rtol=1e-6)
  assert jax.jit(L.compact_completion, static_argnums=3)(hidden, labels, mask, 3)[3].tolist() == [
    0,
    1,
  ]  # reported
