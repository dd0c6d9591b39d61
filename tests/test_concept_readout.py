"""The concept readout on a tiny random model: per record and concept a distribution over the
concept's values, equal to a plain teacher-forced forward, split by the record's nuisance."""

import json

from flax import nnx
import jax
import numpy as np
import pytest

from cpo_jax import models
from cpo_jax.data import eval_batches
from cpo_jax.data import sources
from cpo_jax.evaluate import concept_readout
from cpo_jax.evaluate import plots
from cpo_jax.evaluate import scoring

EXAMPLES, BATCH = 9, 4  # the last batch has 3 filler rows (valid=False); record 8 agrees


@pytest.fixture(scope='module')
def batches(processors):
  # `ood`: the sky is uniform there, so records both agree and disagree with their decision.
  source = sources.make_source('synth_drive', 'ood', num_examples=EXAMPLES)
  return list(
    eval_batches.make_eval_batches(source, processors, batch_size=BATCH, max_prompt_len=64)
  )


@pytest.fixture(scope='module')
def model(processors):
  return models.Qwen2_5_VL(models.get_config_for_tokens('tiny', processors.ids), rngs=nnx.Rngs(0))


@pytest.fixture(scope='module')
def shortcut(graph):
  train = sources.make_source('synth_drive', 'train', num_examples=400)
  return concept_readout.shortcut_map(train, graph)


@pytest.fixture(scope='module')
def rows(model, processors, graph, batches):
  return concept_readout.readout_rows(model, batches, processors=processors, graph=graph)


def test_each_concept_gets_a_distribution_over_its_values(rows, graph, batches):
  assert [r['index'] for r in rows] == list(range(EXAMPLES))  # filler rows left out
  concepts = np.concatenate([b['concepts'][b['valid']] for b in batches])
  for row, gold in zip(rows, concepts):
    assert row['gold'] == gold.tolist()
    assert [len(p) for p in row['p']] == [len(c.values) for c in graph.concepts]
    for p in row['p']:
      assert min(p) > 0
      np.testing.assert_allclose(sum(p), 1.0, rtol=1e-9)


def test_p_gold_equals_a_plain_teacher_forced_forward(rows, model, processors, graph, batches):
  """Concept 1 (pedestrian) of record 2: its sentences scored after '<think>' and the gold
  traffic-light sentence, by one plain model(...) call on unpadded rows."""
  batch, r, ci = batches[0], 2, 1
  tok = processors.tokenizer
  gold = graph.assignment_from_ids(batch['concepts'][r])
  light, concept = graph.concepts[0], graph.concepts[ci]
  prompt = batch['input_ids'][r][batch['attention_mask'][r] == 1].tolist()
  context = f'<think> {light.phrases[gold[light.name]]}'
  context_ids = list(scoring.encode_text(tok, context))
  seqs = [
    prompt + list(scoring.encode_text(tok, f'{context} {concept.phrases[v]}'))
    for v in concept.values
  ]
  assert all(s[len(prompt) : len(prompt) + len(context_ids)] == context_ids for s in seqs)
  length = max(map(len, seqs))
  ids = np.zeros((len(seqs), length), np.int32)
  mask = np.zeros_like(ids)
  for i, s in enumerate(seqs):
    ids[i, : len(s)], mask[i, : len(s)] = s, 1  # right padded: causal, reads come before it
  pixels = np.asarray(batch['pixel_values']).reshape(BATCH, -1, batch['pixel_values'].shape[-1])
  pixels = np.repeat(pixels[r : r + 1], len(seqs), axis=0).reshape(-1, pixels.shape[-1])
  grid = np.repeat(batch['image_grid_thw'][:1], len(seqs), axis=0)
  positions, _ = models.get_rope_index(ids, mask, grid, model.config)
  forward = nnx.jit(
    lambda m, i, a, pv, pos: m(i, a, pixel_values=pv, image_grid_thw=grid, position_ids=pos)
  )
  logits = forward(model, ids, mask, pixels, positions)
  logp = np.asarray(jax.nn.log_softmax(logits.astype(np.float32), -1), np.float64)
  start = len(prompt) + len(context_ids)  # the sentence's first token
  scores = [sum(logp[k, j - 1, s[j]] for j in range(start, len(s))) for k, s in enumerate(seqs)]
  want = scoring.softmax(scores)
  g = concept.values.index(gold[concept.name])
  assert rows[r]['p'][ci][g] == pytest.approx(want[g], abs=1e-5)
  np.testing.assert_allclose(rows[r]['p'][ci], want, atol=1e-5)


def test_the_shortcut_map_of_synth_drive_is_sky_i_to_decision_i(shortcut, graph):
  assert shortcut.predicts == tuple((i,) for i in range(len(graph.nuisance_values)))


def test_summary_splits_by_whether_the_nuisance_agrees(rows, graph, shortcut, batches):
  out = concept_readout.summarize(rows, graph, shortcut)
  json.dumps(out, allow_nan=False)
  valid = np.concatenate([b['valid'] for b in batches])
  decision = np.concatenate([b['decision'] for b in batches])[valid]
  nuisance = np.concatenate([b['nuisance'] for b in batches])[valid]
  agrees = int((decision == nuisance).sum())
  assert 0 < agrees < EXAMPLES  # both halves are exercised
  assert out['n'] == EXAMPLES and out['no_nuisance'] == 0
  for ci, section in enumerate(out['per_concept'].values()):
    assert (section['agrees']['n'], section['disagrees']['n']) == (agrees, EXAMPLES - agrees)
    gold = [r['gold'][ci] for r in rows]
    p_gold = [r['p'][ci][g] for r, g in zip(rows, gold)]
    misread = [int(np.argmax(r['p'][ci])) != g for r, g in zip(rows, gold)]
    assert section['p_gold'] == pytest.approx(np.mean(p_gold))
    assert section['misread'] == pytest.approx(np.mean(misread))
    mask = decision == nuisance
    assert section['agrees']['p_gold'] == pytest.approx(np.mean(np.array(p_gold)[mask]))
    # Every record falls in exactly one (nuisance value, gold value) cell.
    cells = [c for by_gold in section['by_nuisance'].values() for c in by_gold.values()]
    assert sum(c['n'] for c in cells) == EXAMPLES
    v, g = graph.nuisance_values[nuisance[0]], graph.concepts[ci].values[gold[0]]
    cell = section['by_nuisance'][v][g]
    same = [k for k in range(EXAMPLES) if nuisance[k] == nuisance[0] and gold[k] == gold[0]]
    assert cell['n'] == len(same)
    assert cell['p_gold'] == pytest.approx(np.mean([p_gold[k] for k in same]))
    assert sum(cell['mean_p'].values()) == pytest.approx(1.0)
  assert out['misread'] == pytest.approx(
    np.mean([s['misread'] for s in out['per_concept'].values()])
  )


def test_records_without_a_nuisance_give_the_unsplit_form(
  model, processors, graph, batches, shortcut, rows
):
  unknown = [dict(b, nuisance=np.full_like(b['nuisance'], -1)) for b in batches]
  unknown_rows = concept_readout.readout_rows(model, unknown, processors=processors, graph=graph)
  out = concept_readout.summarize(unknown_rows, graph, shortcut)
  assert out['no_nuisance'] == out['n'] == EXAMPLES and 'shortcut' not in out
  split = concept_readout.summarize(rows, graph, shortcut)
  for name, section in out['per_concept'].items():
    assert set(section) == {'p_gold', 'misread', 'n'}
    assert section['p_gold'] == pytest.approx(split['per_concept'][name]['p_gold'], abs=1e-9)
  assert out['misread'] == pytest.approx(split['misread'])


def test_plot_heat_map_and_bars(rows, graph, shortcut, tmp_path):
  section = dict(concept_readout.summarize(rows, graph, shortcut), split='ood')
  concepts, values, table = concept_readout.misread_by_nuisance(section)
  assert concepts == list(graph.concept_names) and table.shape == (len(concepts), len(values))
  unsplit = dict(concept_readout.summarize(rows, graph, None), split='ood')
  report = {
    'stage': 'cpo_plus',
    'concept_readout': section,
    'baseline': {'stage': 'sft', 'concept_readout': section},
  }
  plots.plot_concept_readout(report, tmp_path / 'a.png')
  no_nuisance = [dict(r, nuisance=-1) for r in rows]
  bars = dict(concept_readout.summarize(no_nuisance, graph, None), split='ood')
  plots.plot_concept_readout({'stage': 'sft', 'concept_readout': bars}, tmp_path / 'b.png')
  assert (tmp_path / 'a.png').stat().st_size > 0 and (tmp_path / 'b.png').stat().st_size > 0
  assert 'agrees' not in unsplit['per_concept'][graph.concept_names[0]]
