"""The paper's near-duplicate hash (dcgan_dist/data/dedup.py) on the bundled digits with planted
copies (shifted by a pixel, re-encoded, noised): precision and recall of the groups it finds, the
de-duplicated manifest the training reader reads, and the CLI's bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dcgan_dist import shards
from dcgan_dist.data import dedup, epochs, manifest


def test_dedup_finds_planted_near_duplicates_and_writes_a_manifest_training_reads(tmp_path, capsys):
    url, truth = dedup.planted_digits(str(tmp_path / "planted"))
    assert shards.main(["dedup", url, "--out", str(tmp_path / "dedup"), "--epochs", "3"]) == 0
    assert "near-duplicates removed" in capsys.readouterr().out
    report = json.loads((tmp_path / "dedup" / dedup.REPORT_NAME).read_text())
    scores = dedup.pair_scores(report["groups"], truth)
    print(f"planted digits, 3 epochs: {scores}")  # shown with -s; RESULTS has the measured table
    # a hash of raw bytes finds no pair (recall 0), a constant or coarse one joins unrelated digits
    assert scores["precision"] >= 0.8 and scores["recall"] >= 0.08, scores
    re_encoded = {key: original for key, original in truth.items() if key == original or key.endswith("-jpeg")}
    assert dedup.pair_scores(report["groups"], re_encoded)["recall"] >= 0.25

    kept = manifest.read(report["manifest"])
    removed = {key for group in report["groups"] for key in group[1:]}
    assert kept.num_samples == report["kept"] == 1797 + 300 - len(removed) and report["removed"] == len(removed) > 0
    # the training reader's epoch plan reads every kept sample once, and none of the removed
    read = [key for _, key in epochs.planned_keys(kept, 0, 0, 1, 0, 1, 0)]
    assert len(read) == len(set(read)) == kept.num_samples
    assert not removed & set(read) and {group[0] for group in report["groups"]} <= set(read)


def test_duplicate_groups_are_equal_codes_of_readable_samples_in_order():
    codes = np.array([[1, 2], [3, 4], [1, 2], [5, 6], [3, 4], [1, 2], [1, 2]], dtype=np.uint8)
    readable = np.array([True, True, True, True, True, True, False])
    groups = dedup.duplicate_groups(codes, readable)
    assert sorted(group.tolist() for group in groups) == [[0, 2, 5], [1, 4]]
    scores = dedup.pair_scores([["a", "b", "c"], ["d", "e"]], {"a": "a", "b": "a", "d": "d", "e": "d", "f": "d"})
    assert scores == {"precision": 0.5, "recall": 0.5, "pairs_found": 4, "true_pairs": 4}


@pytest.mark.parametrize("args, problem", [
    (["nothing/manifest.json", "--out", "x"], "nothing/manifest.json"),
    (["m.json", "--out", "x", "--epochs", "0"], "--epochs must be >= 1"),
])
def test_dedup_bad_input_exits_2_with_one_line(args, problem, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert shards.main(["dedup", *args]) == 2
    error = capsys.readouterr().err.strip()
    assert problem in error and len(error.splitlines()) == 1
