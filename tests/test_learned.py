"""Which attributes the head has learned (reid_jax.explain.learned), how the head's test
accuracy is stored with it (reid_jax.checkpoints.restore_head_accuracy), and the report's marks."""

from __future__ import annotations

import json
import math
import re

import markupsafe
import pytest
from test_report import _records, _summary

from reid_jax import checkpoints
from reid_jax.data.attributes import ATTRIBUTE_MEANINGS, ATTRIBUTE_NAMES
from reid_jax.explain import learned, report


def _accuracy(**values):
    out = {n: 0.9 for n in ATTRIBUTE_NAMES}
    out.update(values)
    return out


def test_status_at_the_threshold_and_without_a_measurement():
    assert learned.LEARNED_ACCURACY == 0.8
    assert learned.status(0.8) == learned.LEARNED
    assert learned.status(0.7999) == learned.NOT_LEARNED
    assert learned.status(None) == learned.NOT_MEASURED
    assert learned.status(0.6, min_accuracy=0.5) == learned.LEARNED
    with pytest.raises(ValueError, match=r"min_accuracy must lie in \[0, 1\], got 1.5"):
        learned.status(0.9, min_accuracy=1.5)


def test_cautions_name_the_attribute_its_meaning_and_its_accuracy():
    assert learned.caution("upwhite", 0.97) is None
    text = learned.caution("up", 0.4828)
    assert text.startswith("The model has not learned up (short sleeves)")
    assert "48 % balanced accuracy" in text and "80 % counts as learned" in text
    assert "cannot show where" in text
    unknown = learned.caution("downpink", None)
    assert f"downpink ({ATTRIBUTE_MEANINGS['downpink']})" in unknown
    assert "one class only" in unknown


def test_summary_lists_what_is_not_learned_and_not_measured():
    acc = _accuracy(up=0.48, hat=0.5, age1=None, age4=math.nan)
    s = learned.summary(acc)
    assert s["min_accuracy"] == 0.8
    assert s["not_learned"] == ["up", "hat"]  # in attribute order
    assert s["not_measured"] == ["age1", "age4"]
    assert s["accuracy"]["up"] == 0.48 and s["accuracy"]["age4"] is None
    json.dumps(s, allow_nan=False)
    assert set(learned.cautions(s)) == {"up", "hat", "age1", "age4"}
    assert learned.cautions(None) == {} and learned.summary(None) is None
    assert learned.summary(acc, min_accuracy=0.4)["not_learned"] == []


@pytest.mark.parametrize("bad, message", [
    ([0.9] * 30, "head accuracy must map attribute names to accuracies, got list"),
    ({"up": 0.5}, r"missing \['backpack'"),
    ({**_accuracy(), "sleeves": 0.5}, r"unknown \['sleeves'\]"),
    (_accuracy(up=1.2), r"head accuracy: 'up' must be a number in \[0, 1\] or null, got 1.2"),
    (_accuracy(up="high"), r"head accuracy: 'up' must be .* got 'high'"),
    (_accuracy(up=True), r"head accuracy: 'up' must be .* got True"),
])
def test_bad_accuracies_are_named(bad, message):
    with pytest.raises(ValueError, match=message):
        learned.summary(bad)


def test_restore_head_accuracy_reads_and_checks_the_meta(monkeypatch):
    meta = {"attribute_head": {"embedding_dim": 8, "num_attributes": 30}}
    monkeypatch.setattr(checkpoints, "restore_meta", lambda directory, step=None: meta)
    assert checkpoints.restore_head_accuracy("/ck") is None  # saved by an earlier version
    meta["attribute_head"]["test_accuracy"] = {"up": 0.5, "age1": None}
    assert checkpoints.restore_head_accuracy("/ck") == {"up": 0.5, "age1": None}
    meta["attribute_head"]["test_accuracy"] = {"up": "0.5"}
    with pytest.raises(ValueError, match=r"/ck: meta 'attribute_head.test_accuracy': 'up' "
                                         r"must be a number in \[0, 1\] or null, got '0.5'"):
        checkpoints.restore_head_accuracy("/ck")
    meta["attribute_head"]["test_accuracy"] = [0.5]
    with pytest.raises(ValueError, match="must map attribute names to accuracies, got list"):
        checkpoints.restore_head_accuracy("/ck")


def test_report_marks_rows_and_lists_the_attributes_not_learned(tmp_path):
    records = _records(tmp_path / "data")
    shown = {a["attribute"] for r in records for a in r["selected_attributes"]}
    weak = sorted(shown)[:2]
    head = learned.summary(_accuracy(**{weak[0]: 0.55, weak[1]: 0.61, "age4": None}))
    out = tmp_path / "report"
    report.write_report(out, _summary(head_accuracy=head), records, data_root=tmp_path / "data")
    page = open(out / "queries.html", encoding="utf-8").read()
    rows = re.findall(r'<th class="attr">(!?)(\w+)( <span class="weak" title="([^"]*)">'
                      r'not learned</span>)?</th>', page)
    assert rows
    for _, name, span, title in rows:
        assert bool(span) == (name in weak)
        if span:
            assert title == str(markupsafe.escape(learned.caution(
                name, head["accuracy"][name])))
    index = open(out / "index.html", encoding="utf-8").read()
    fact = re.search(r"<th>attributes not learned</th><td>([^<]*)</td>", index).group(1)
    assert fact.startswith(f"{weak[0]} 55 %, {weak[1]} 61 % (balanced accuracy")
    assert fact.endswith("not measured (one class in the test images): age4")
    # Without the head's accuracy (a head saved by an earlier version) nothing is marked.
    plain = tmp_path / "plain"
    report.write_report(plain, _summary(), records, data_root=tmp_path / "data")
    assert 'class="weak"' not in open(plain / "queries.html", encoding="utf-8").read()
    assert "not known: the attribute head was saved without its test accuracy" in open(
        plain / "index.html", encoding="utf-8").read()
