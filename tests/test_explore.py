"""`python -m dcgan_dist.explore`: the paper's latent-space pictures for a registered generator."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image

from dcgan_dist import explore
from dcgan_dist.models import Architecture
from dcgan_dist.tracking.run_logger import RunLogger
from dcgan_dist.tracking.store import ensure_experiment


@pytest.fixture
def registered_generator(mlflow_sqlite):
    """G and D logged and registered the way training does, with `champion` on G (no Ray:
    the registry is what explore reads)."""
    ensure_experiment(mlflow_sqlite, "tests")
    logger = RunLogger(mlflow_sqlite, "tests", "source", None)
    logger.log_params({"data.data": "digits"})
    torch.manual_seed(0)
    architecture = Architecture.of("pytorch-examples", 32, "paper")
    generator, discriminator = architecture.build()
    versions = logger.log_models(architecture, generator, discriminator, 5, register=True)
    logger.set_alias("dcgan-generator", versions["dcgan-generator"], "champion", {"champion.step": 5})
    logger.finish()
    return logger.run_id


def test_slerp_keeps_the_ends_and_the_norm():
    a, b = torch.randn(4, 100), torch.randn(4, 100)
    assert torch.allclose(explore.slerp(a, b, 0.0), a, atol=1e-5) and torch.allclose(explore.slerp(a, b, 1.0), b, atol=1e-5)
    middle = explore.slerp(a, b, 0.5)
    # on the arc: the norm stays between the ends' (a straight line would dip towards 0)
    assert (middle.norm(dim=1) > 0.9 * torch.minimum(a.norm(dim=1), b.norm(dim=1))).all()
    assert torch.allclose(explore.slerp(a, a, 0.3), a, atol=1e-5)  # same point: no division by zero


def test_explore_writes_and_logs_its_pictures(registered_generator, mlflow_sqlite, tmp_path, capsys):
    out = tmp_path / "pictures"
    assert explore.main(["--generator", "models:/dcgan-generator@champion", "--output-dir", str(out),
                         "--tracking-uri", mlflow_sqlite]) == 0
    assert Image.open(out / "samples.png").size == (8 * 34 + 2, 8 * 34 + 2)  # 8x8 tiles of 32 px, 2 px padding
    assert Image.open(out / "interpolation.png").size == (10 * 34 + 2, 8 * 34 + 2)
    walk = Image.open(out / "walk.gif")
    assert walk.n_frames == 60 and walk.info.get("loop") == 0
    assert np.asarray(Image.open(out / "arithmetic.png")).shape[1] == 3 * 34 + 2
    measures = json.loads((out / "arithmetic.json").read_text())
    assert {"ink_thin", "ink_thick", "ink_thin_plus_stroke", "groups"} <= set(measures)
    assert measures["ink_thin"] <= measures["ink_thick"]  # exemplars chosen by ink

    client = MlflowClient(mlflow_sqlite)
    runs = client.search_runs([client.get_experiment_by_name("tests").experiment_id], "tags.`explore.source_run_id` != ''")
    assert len(runs) == 1
    assert runs[0].data.tags["mlflow.parentRunId"] == registered_generator
    logged = {a.path for a in client.list_artifacts(runs[0].info.run_id, "explore")}
    assert {"explore/samples.png", "explore/walk.gif", "explore/arithmetic.png", "explore/interpolation.png"} <= logged


@pytest.mark.parametrize("uri, message", [
    ("models:/dcgan-generator@nope", "nope"),
    ("runs:/abc/generator", "expected models:/NAME@ALIAS"),
    ("models:/dcgan-discriminator/1", "not a generator"),
])
def test_bad_generator_uri_exits_2_with_one_line(registered_generator, mlflow_sqlite, tmp_path, capsys, uri, message):
    assert explore.main(["--generator", uri, "--output-dir", str(tmp_path / "out"), "--tracking-uri", mlflow_sqlite]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and message in error
