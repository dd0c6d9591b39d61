"""Decision scoring: unlabelled rows are never scored, an unparsed answer is never correct."""

import json

from cpo_jax.evaluate import answers

NAMES = ("stop", "slow", "go")


def test_unlabelled_rows_are_counted_apart_and_never_scored():
  # Rows 3 and 4 have no gold decision (-1); row 4's answer is unparsed too. Before, the
  # unparsed answer matched the -1 gold (counted correct) and both rows landed in class 'go'.
  m = answers.classification_metrics([0, 1, 1, 2, -1], [0, 1, 2, -1, -1], NAMES)
  assert (m["n"], m["unlabelled"], m["unparsed"]) == (3, 2, 0)
  assert m["accuracy"] == 2 / 3
  assert m["per_class"]["go"]["support"] == 1  # only the labelled 'go' row
  assert sum(map(sum, m["confusion"])) == 3


def test_an_unparsed_answer_is_wrong_and_counted():
  m = answers.classification_metrics([-1, -1, 2], [0, 1, 2], NAMES)
  assert m["accuracy"] == 1 / 3 and m["unparsed"] == 2
  assert [row[-1] for row in m["confusion"]] == [1, 1, 0]  # the 'unparsed' column
  assert m["per_class"]["stop"]["recall"] == 0.0


def test_a_split_without_labels_has_no_accuracy_and_stays_strict_json():
  m = answers.classification_metrics([0, -1], [-1, -1], NAMES)
  assert m["accuracy"] is None and m["macro_f1"] is None
  assert (m["n"], m["unlabelled"]) == (0, 2)
  json.dumps(m, allow_nan=False)


def test_findings_are_read_from_the_answer_part_and_chains_from_the_think_tags():
  from cpo_jax.data.mimic_files import FINDINGS
  from cpo_jax.evaluate import findings

  text = "<think> Edema is absent; the heart is large. </think> The disease of this patient is Cardiomegaly, pleural effusion."
  named = findings.named_findings(text, FINDINGS)
  assert [FINDINGS[i] for i in named.nonzero()[0]] == ["Cardiomegaly", "Pleural Effusion"]
  assert findings.chain_text(text) == "Edema is absent; the heart is large."
  assert findings.chain_text("no tags at all") == "no tags at all"
  cut = "<think> Cardiomegaly is"  # a truncated answer: its chain so far, closed for scoring
  assert findings.thought(cut) == "<think> Cardiomegaly is </think>"
  assert not findings.named_findings(cut, FINDINGS).any()
