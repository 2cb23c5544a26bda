import datasets
import numpy as np
import pytest

from dsv3.config import DataSection
from dsv3.data.mixture import (
    blend_sources,
    blended_rows,
    mean_shares,
    rows_needed,
    shares_at,
    stream_rows,
    weight_at,
)

MIXTURE = {"corpus": {0.0: 0.2, 0.5: 0.6}, "copy": {0.0: 0.6, 0.5: 0.2}, "math": 0.2}


def test_weights_are_piecewise_constant_from_each_fraction():
    assert weight_at(0.3, 0.9) == 0.3
    assert weight_at({0.0: 1.0, 0.5: 2.0}, 0.49) == 1.0
    assert weight_at({0.0: 1.0, 0.5: 2.0}, 0.5) == 2.0
    assert shares_at(MIXTURE, 0.1) == pytest.approx({"corpus": 0.2, "copy": 0.6, "math": 0.2})
    assert mean_shares(MIXTURE) == pytest.approx({"corpus": 0.4, "copy": 0.4, "math": 0.2})


def test_blend_follows_the_shares_in_every_part_of_the_run():
    sources = blend_sources(MIXTURE, 1000)
    first, second = np.bincount(sources[:500], minlength=3), np.bincount(sources[500:], minlength=3)
    assert list(first) == [100, 300, 100] and list(second) == [300, 100, 100]
    for start in range(0, 1000, 10):  # every 10 consecutive rows (a batch) hold each source within one row
        counts = np.bincount(sources[start : start + 10], minlength=3)
        expected = np.array(list(shares_at(MIXTURE, start / 1000).values())) * 10
        assert np.all(np.abs(counts - expected) <= 1.0 + 1e-9), (start, counts)
    assert rows_needed(MIXTURE, 1000) == {"corpus": 400, "copy": 400, "math": 200}


def test_streams_are_seeded_permutations_per_epoch():
    rows = stream_rows(7, 20, seed=3, source="copy")
    assert sorted(rows[:7]) == list(range(7)) and sorted(rows[7:14]) == list(range(7))
    assert list(stream_rows(7, 20, 3, "copy")) == list(rows)
    assert list(stream_rows(7, 20, 4, "copy")) != list(rows)
    assert list(stream_rows(7, 20, 3, "math")) != list(rows)
    with pytest.raises(ValueError, match="packs into no full row"):
        stream_rows(0, 5, 0, "copy")


def test_blended_rows_come_from_their_source_in_order():
    rows = {name: datasets.Dataset.from_dict({"input_ids": [[k, i] for i in range(n)]}) for k, (name, n) in
            enumerate([("corpus", 50), ("copy", 30), ("math", 20)])}  # fmt: skip
    blended = blended_rows(MIXTURE, rows, 200, seed=0)
    sources = blend_sources(MIXTURE, 200)
    assert [r[0] for r in blended["input_ids"]] == list(sources)
    copy_rows = [r[1] for r in blended["input_ids"] if r[0] == 1]
    assert len(copy_rows) == 80 and sorted(copy_rows[:30]) == list(range(30))  # each epoch a permutation


@pytest.mark.parametrize(
    ("mixture", "message"),
    [
        ({"copy": 1.0}, "must include corpus"),
        ({"corpus": 1.0, "poetry": 1.0}, "poetry unknown"),
        ({"corpus": {0.2: 1.0}}, "start at 0.0"),
        ({"corpus": {0.0: 1.0, 1.5: 1.0}}, r"lie in \[0, 1\)"),
        ({"corpus": -1.0}, ">= 0"),
        ({"corpus": {0.0: 1.0, 0.5: 0.0}, "copy": {0.0: 1.0, 0.5: 0.0}}, "every weight is 0 at training fraction 0.5"),
    ],
)
def test_bad_mixtures_are_refused_in_one_line(mixture, message):
    with pytest.raises(ValueError, match=message):
        DataSection(mixture=mixture)
