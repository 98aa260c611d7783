"""pairs.csv parsing and the split by slide."""

from __future__ import annotations

from collections import Counter

import pytest

from vstain_cli.data.manifest import SlidePair, assign_splits, read_pairs
from vstain_cli.errors import InputError


def _csv(tmp_path, text: str):
    p = tmp_path / "pairs.csv"
    p.write_text(text)
    return p


def test_reads_rows_relative_to_the_csv(tmp_path):
    p = _csv(tmp_path, "slide_id,af,he,label\na,af/a.tif,he/a.svs,2\n")
    (pair,) = read_pairs(p)
    assert pair.slide_id == "a" and pair.label == 2 and pair.split is None
    assert pair.af == (tmp_path / "af" / "a.tif").resolve()


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty pairs file"),
        ("slide_id,af,he\n", "missing column"),
        ("slide_id,af,he,label\n", "no slide pairs"),
        ("slide_id,af,he,label\na,x,y,1\na,x,y,2\n", "duplicate slide_id 'a'"),
        ("slide_id,af,he,label\na,x,y,7\n", "label 7 out of range"),
        ("slide_id,af,he,label\na,x,y,high\n", "not an integer"),
        ("slide_id,af,he,label,split\na,x,y,1,training\n", "split 'training'"),
        ("slide_id,af,he,label,split\na,x,y,1,train\nb,x,y,1,\n", "some rows but not all"),
        ("slide_id,af,he,label\na,x,y,1,extra\n", "more fields"),
        ("slide_id,af,he,label\n../a,x,y,1\n", "path separators"),
    ],
)
def test_malformed_files_name_the_problem(tmp_path, text, message):
    p = _csv(tmp_path, text)
    with pytest.raises(InputError, match=message) as e:
        read_pairs(p)
    assert e.value.path == str(p)


def _pairs(labels):
    return [SlidePair(f"s{i:02d}", None, None, lb, None) for i, lb in enumerate(labels)]  # type: ignore[arg-type]


def test_split_ratio_and_stratification():
    labels = [i % 4 for i in range(40)]
    splits = assign_splits(_pairs(labels), seed=3)
    assert Counter(splits.values()) == {"train": 20, "val": 8, "test": 12}
    for lb in range(4):
        per = Counter(s for (sid, s), lab in zip(sorted(splits.items()), labels) if lab == lb)
        assert per["train"] == 5 and per["val"] == 2 and per["test"] == 3


def test_split_is_deterministic_and_seeded():
    p = _pairs([0, 1, 2, 3] * 5)
    assert assign_splits(p, 1) == assign_splits(p, 1)
    assert assign_splits(p, 1) != assign_splits(p, 2)


def test_few_slides_still_fill_every_split():
    assert set(assign_splits(_pairs([0, 1, 2, 3]), 0).values()) == {"train", "val", "test"}


def test_given_split_column_wins(tmp_path):
    p = _csv(tmp_path, "slide_id,af,he,label,split\na,x,y,1,test\nb,x,y,2,test\n")
    assert assign_splits(read_pairs(p)) == {"a": "test", "b": "test"}
