"""KV-cache generation equals transformers' generate (greedy), stops on EOS, samples sanely."""

import numpy as np
import pytest

torch = pytest.importorskip('torch')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from transformers import Qwen2_5_VLForConditionalGeneration  # noqa: E402

from cpo_jax.generate import generate  # noqa: E402
from cpo_jax.generate import sample_token  # noqa: E402
from cpo_jax.models import load_hf  # noqa: E402
from cpo_jax.models import testing  # noqa: E402

STEPS = 32


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  cfg = testing.tiny_hf_config(heads=4, kv_heads=1, fullatt=(0,), tied=False)
  torch.manual_seed(0)
  # larger perturbation: peaked, input-dependent next-token distributions
  tmodel = testing.randomize_torch_model(Qwen2_5_VLForConditionalGeneration(cfg).eval(), scale=0.3)
  path = str(tmp_path_factory.mktemp('gen'))
  tmodel.save_pretrained(path)
  # left padding; second sample has two images
  inp = testing.make_inputs(
    [[(1, 8, 8)], [(1, 4, 4), (1, 4, 8)]], [(5, 4), (1, 2)], np.random.default_rng(0)
  )
  mm = (inp['input_ids'] == testing.IMAGE).astype(np.int64)
  with torch.no_grad():
    ref = tmodel.generate(
      input_ids=torch.tensor(inp['input_ids']),
      attention_mask=torch.tensor(inp['attention_mask']),
      pixel_values=torch.tensor(inp['pixel_values']),
      image_grid_thw=torch.tensor(inp['image_grid_thw']),
      mm_token_type_ids=torch.tensor(mm),
      max_new_tokens=STEPS,
      min_new_tokens=STEPS,
      do_sample=False,
      eos_token_id=None,
      pad_token_id=testing.PAD,
    )
  return load_hf(path), inp, ref[:, inp['input_ids'].shape[1] :].numpy()


def _gen(model, inp, **kw):
  kw = {'max_new_tokens': STEPS, 'eos_token_id': [-1, 10_000], 'pad_token_id': testing.PAD, **kw}
  return np.asarray(
    generate(
      model,
      inp['input_ids'],
      inp['attention_mask'],
      inp['pixel_values'],
      inp['image_grid_thw'],
      **kw,
    )
  )


@pytest.mark.parametrize('unroll_layers', [None, False], ids=['default (CPU: unrolled)', 'scanned'])
def test_greedy_matches_transformers(setup, unroll_layers):
  model, inp, ref = setup
  got = _gen(model, inp, unroll_layers=unroll_layers)
  assert len(set(ref[0].tolist())) > 5  # not a degenerate repeat
  np.testing.assert_array_equal(got, ref)


def test_one_new_token_is_the_prefill_token(setup):
  model, inp, ref = setup
  np.testing.assert_array_equal(_gen(model, inp, max_new_tokens=1), ref[:, :1])


def test_stops_at_eos_and_pads(setup):
  model, inp, ref = setup
  eos = int(ref[0, 6])
  first = [int(np.argmax(r == eos)) if (r == eos).any() else STEPS for r in ref]
  got = _gen(model, inp, eos_token_id=[eos, 10_000])
  for row, f in zip(range(len(ref)), first):
    np.testing.assert_array_equal(got[row, : f + 1], ref[row, : f + 1])
    assert (got[row, f + 1 :] == testing.PAD).all()


def test_decoding_stops_when_every_row_has_ended(setup):
  model, inp, ref = setup
  eos = [int(r[3]) for r in ref]  # each row's 4th token ends it
  last = max(int(np.argmax(np.isin(r, eos))) for r in ref)  # the last row to end
  got, steps = generate(
    model,
    inp['input_ids'],
    inp['attention_mask'],
    inp['pixel_values'],
    inp['image_grid_thw'],
    max_new_tokens=STEPS,
    eos_token_id=eos,
    pad_token_id=testing.PAD,
    return_steps=True,
  )
  assert steps == last + 1 < STEPS
  for row, r in zip(got, ref):
    end = int(np.argmax(np.isin(r, eos)))
    np.testing.assert_array_equal(row[: end + 1], r[: end + 1])
    assert (row[end + 1 :] == testing.PAD).all()


def test_sampling(setup):
  model, inp, ref = setup
  # a vanishing nucleus is greedy
  np.testing.assert_array_equal(
    _gen(model, inp, temperature=1.0, top_p=1e-6, rng=jax.random.key(3)), ref
  )
  a = _gen(model, inp, temperature=5.0, rng=jax.random.key(1))
  assert a.shape == ref.shape and a.min() >= 0 and a.max() < testing.VOCAB
  assert (a != ref).any()


def test_sample_token_nucleus():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  draws = [int(sample_token(logits, jax.random.key(i), 1.0, 0.7, False)[0]) for i in range(64)]
  assert set(draws) == {0, 1}  # 0.5 < 0.7 needs the second token; never the tail
  assert int(sample_token(logits, jax.random.key(0), 1.0, 1.0, True)[0]) == 0


def test_rejects_right_padding(setup):
  model, inp, _ = setup
  bad = dict(inp, attention_mask=inp['attention_mask'][:, ::-1].copy())
  with pytest.raises(ValueError, match='LEFT-padded'):
    _gen(model, bad)
