"""The reader at GPU rates: `shards bench` (training's reader, timed), the raw pixel format
(groups of images per tar member) through packing, the epoch plan and reading, and where JPEGs
are decoded (`--decode`)."""

from __future__ import annotations

import re

import pytest

from dcgan_dist import shards
from tests.test_data import write_shards


@pytest.mark.slow  # DataLoader processes
def test_shards_bench_times_the_training_reader(tmp_path, capsys):
    url = write_shards(str(tmp_path), [40, 25], image_size=8)
    assert shards.main(["bench", url, "--loader-workers", "1", "--batch-size", "16", "--seconds", "0.3",
                        "--step-img-s", "1e9"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("65 8 px jpeg images in 2 shards")
    delivered = float(re.fullmatch(r"shards bench: (\d+) img/s with 1 loader processes", lines[-1]).group(1))
    assert delivered > 0
    per_process = next(line for line in lines if line.startswith("per loader process"))
    assert per_process.split()[-2].replace(",", "") == f"{delivered:,.0f}".replace(",", "")  # one process: the same
    needed = int(re.search(r"to feed 1,000,000,000 img/s +(\d+) loader processes", "\n".join(lines)).group(1))
    assert needed == pytest.approx(1e9 / delivered, rel=1e-3)  # printed img/s is rounded


def test_shards_bench_rejects_bad_input_with_one_line(tmp_path, capsys):
    url = write_shards(str(tmp_path), [40, 25], image_size=8)
    for bad, named in ((["--loader-workers", "-1"], "--loader-workers"), (["--seconds", "0"], "--seconds"),
                       (["--batch-size", "0"], "--batch-size"), (["--step-img-s", "-5"], "--step-img-s"),
                       (["--batch-size", "100"], "larger than a rank's share")):
        assert shards.main(["bench", url, *bad]) == 2
        out, err = capsys.readouterr()
        assert out == "" and len(err.strip().splitlines()) == 1 and named in err
    assert shards.main(["bench", str(tmp_path / "none" / "manifest.json")]) == 2
    assert "none/manifest.json" in capsys.readouterr().err
