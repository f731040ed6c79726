"""docs/benchmarks.md is generated (`python -m benchmarks.docs`): it is what its template and the
committed results give now, it stays small, and its tables come only from the results files."""

from __future__ import annotations

import pytest

from benchmarks import docs


def test_page_is_current():
    assert docs.PAGE.read_text(encoding="utf-8") == docs.render(), (
        "docs/benchmarks.md is stale: run python -m benchmarks.docs")


def test_page_is_small():
    assert len(docs.PAGE.read_bytes()) <= docs.MAX_BYTES


def test_template_has_no_table_of_its_own():
    # a table typed into the template would be a hand copy that a new run does not update
    rows = [line for line in docs.TEMPLATE.read_text(encoding="utf-8").splitlines() if line.startswith("|")]
    assert not rows, rows


def test_a_missing_row_fails_loudly():
    # a renamed rule must break the page, not drop out of it silently
    with pytest.raises(KeyError):
        docs.render('{{table standard.md "Detection (every rule" 1 "rows=no-such-rule"}}\n')
    with pytest.raises(KeyError):
        docs.render('{{cell standard.md "Removal, mean" 1 none "no such column"}}\n')
