"""Generation quality: FID/KID, backbones, the classifier score, memorisation, collapse
detection, and end to end the best checkpoint registered as `champion`."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from dcgan_dist.data.digits import digits_dataset
from dcgan_dist.evaluate import backbones
from dcgan_dist.evaluate.collapse import CollapseDetector
from dcgan_dist.evaluate.fid import frechet_distance, kernel_inception_distance
from dcgan_dist.evaluate.memorisation import memorisation_check
from dcgan_dist.evaluate.scores import classifier_score
from dcgan_dist.train import main
from tests.conftest import train_args


@pytest.fixture(scope="module")
def digits_features():
    """The bundled digits through the cached digits classifier (trained on first use)."""
    backbone = backbones.load("digits")
    images = digits_dataset(32).tensors[0]
    features, probabilities = backbone.embed(images)
    noise_features, noise_probabilities = backbone.embed(torch.rand(400, 3, 32, 32) * 2 - 1)
    return backbone, images, features, probabilities, noise_features, noise_probabilities


def test_fid_matches_the_closed_form_for_gaussians():
    # N(0, I) vs N(mu, 4 I) in 8 dims: FID = |mu|^2 + 8 * (1 + 4 - 2 * 2) = |mu|^2 + 8
    rng = np.random.default_rng(0)
    a = rng.normal(size=(20000, 8))
    b = rng.normal(size=(20000, 8)) * 2 + 1.5
    assert frechet_distance(a, b) == pytest.approx(8 * 1.5**2 + 8, rel=0.03)


def test_fid_of_sets_smaller_than_the_dimension_matches_the_matrix_square_root():
    import scipy.linalg

    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(40, 64)), rng.normal(size=(50, 64)) * 1.5 + 0.3
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    reference = (((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b)
                 - 2 * np.trace(scipy.linalg.sqrtm(cov_a @ cov_b).real))
    assert frechet_distance(a, b) == pytest.approx(reference, rel=1e-4)


def test_fid_and_kid_rank_a_set_against_itself_halves_and_noise(digits_features):
    _, _, features, _, noise_features, _ = digits_features
    first, second = features[:800], features[800:1600]
    scale = frechet_distance(features, noise_features)
    assert frechet_distance(features, features) < 1e-6 * scale
    assert frechet_distance(first, second) < 0.1 * scale  # two halves of the same data: near
    kid_self, _ = kernel_inception_distance(features, features, subsets=5, subset_size=400)
    kid_halves, _ = kernel_inception_distance(first, second, subsets=5, subset_size=400)
    kid_noise, _ = kernel_inception_distance(features, noise_features, subsets=5, subset_size=400)
    assert abs(kid_self) < 0.01 * kid_noise and kid_halves < 0.1 * kid_noise


def test_digits_classifier_recognises_digits_not_noise(digits_features):
    backbone, _, features, probabilities, _, noise_probabilities = digits_features
    assert backbone.name.startswith("digits-cnn-") and features.shape == (1797, 128)
    real = classifier_score(probabilities)
    assert real["confident_share"] > 0.85 and real["class_balance"] > 0.95
    # classifiers are confident about noise too; but noise all looks like the same digit
    assert classifier_score(noise_probabilities)["class_balance"] < 0.5
    one_class = classifier_score(np.eye(10)[np.zeros(50, dtype=int)])  # a collapsed generator
    assert one_class["class_balance"] == 0.0 and one_class["confident_share"] == 1.0


def test_digits_classifier_is_cached_under_its_recipe(digits_features):
    cached = backbones.cache_dir() / f"digits-cnn-{backbones.recipe_hash()}.pt"
    assert cached.is_file()
    saved = torch.load(cached, weights_only=True)
    assert saved["recipe"] == backbones.DIGITS_RECIPE and saved["holdout_accuracy"] > 0.9


def test_inception_backbone_loads_a_weights_file_and_names_bad_ones(tmp_path):
    from torchvision.models import inception_v3

    weights = tmp_path / "inception.pth"
    torch.manual_seed(0)  # random weights: real ones cannot ship with the tests
    torch.save(inception_v3(weights=None, aux_logits=True, init_weights=False).state_dict(), weights)
    backbone = backbones.load("inception", str(weights))
    features, probabilities = backbone.embed(torch.rand(2, 3, 32, 32) * 2 - 1)
    assert features.shape == (2, 2048) and probabilities is None
    assert backbone.name.startswith("inception-v3-")

    text = tmp_path / "notes.txt"
    text.write_text("not weights")
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv.weight": torch.zeros(3)}, wrong)
    for path, message in ((tmp_path / "missing.pth", "no such file"), (text, "weights_only"), (wrong, "not an Inception-v3")):
        with pytest.raises(backbones.BackboneError, match=message) as error:
            backbones.load("inception", str(path))
        assert str(path) in str(error.value)


@pytest.mark.slow
def test_the_training_cli_refuses_bad_inception_weights_before_ray(tmp_path):
    """Exit 2, one line naming the flag and the file (a fresh interpreter: slow tier)."""
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv.weight": torch.zeros(3)}, wrong)
    result = subprocess.run(
        [sys.executable, "-m", "dcgan_dist.train", "--eval-backbone", "inception", "--inception-weights", str(wrong),
         "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--storage-path", str(tmp_path / "results")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2 and "--inception-weights" in result.stderr and str(wrong) in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_memorisation_check_tells_copies_from_new_samples(digits_features):
    _, images, *_ = digits_features
    train, held_out = images[:1000], images[1000:1300]
    copied, pictures = memorisation_check(train[:200].clone(), train, held_out)
    assert copied["nn_distance_ratio"] < 0.01
    fresh, _ = memorisation_check(images[1300:1500], train, held_out)
    assert 0.7 < fresh["nn_distance_ratio"] < 1.4
    for picture in pictures.values():
        assert picture.dtype == np.uint8 and picture.ndim == 3 and picture.shape[2] == 3


def test_collapse_detector_events():
    healthy = {"grad_norm_d": 2.0, "grad_norm_g": 30.0}
    detector = CollapseDetector(d_loss_floor=1e-3, patience_steps=30)
    assert all(detector.observe_window([0.5] * 10, healthy) == [] for _ in range(5))
    # D wins: mostly exactly 0, with spikes (as at lr 0.1); judged on the median of 30 steps
    collapsed = [0.0, 0.0, 12.0, 0.0, 0.0, 0.0, 150.0, 0.0, 0.0, 0.7]
    assert [detector.observe_window(collapsed, healthy) for _ in range(4)] == [[], [], ["d_loss_vanished"], []]
    assert detector.observe_window([0.5] * 30, healthy) == []  # cleared: may fire again later
    assert detector.observe_window([0.5] * 10, healthy | {"grad_norm_g": 1e4}) == ["grad_exploded"]
    assert detector.observe_window([0.5] * 10, healthy | {"grad_norm_d": float("nan")}) == []  # still under way
    assert detector.observe_window([0.5] * 10, healthy) == []
    assert detector.observe_window([0.5] * 10, healthy | {"grad_norm_d": 1e3}) == ["grad_exploded"]
    assert detector.observe_score(10.0, None) == [] and detector.observe_score(12.0, 10.0) == []
    assert detector.observe_score(16.0, 10.0) == ["score_rebound"]


def metric_steps(client: MlflowClient, run_id: str, name: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, name)}


@pytest.mark.slow
def test_digits_run_keeps_its_best_checkpoint_as_champion(ray_local, mlflow_sqlite, tmp_path):
    args = train_args(tmp_path, mlflow_sqlite, max_steps=150, log_every=10, sample_every=150, checkpoint_every=150,
                      eval_every=50, eval_samples=200)
    assert main(args) == 0
    client = MlflowClient(mlflow_sqlite)
    run = client.search_runs([client.get_experiment_by_name("tests").experiment_id])[0]
    run_id = run.info.run_id

    fid = metric_steps(client, run_id, "eval/fid")
    assert sorted(fid) == [50, 100, 150] and all(np.isfinite(v) and v > 0 for v in fid.values())
    for name in ("eval/kid", "eval/confident_share", "eval/class_balance", "memorisation/nn_distance_ratio"):
        assert metric_steps(client, run_id, name), name
    assert run.data.tags["eval.backbone"].startswith("digits-cnn-")
    assert run.data.tags["eval.fake_samples"] == "200" and run.data.tags["eval.real_samples"] == "200"
    images = [a.path for a in client.list_artifacts(run_id, "images")]
    assert any("memorisation_pairs" in path for path in images) and any("memorisation_distances" in path for path in images)
    assert not metric_steps(client, run_id, "collapse/d_loss_vanished")  # a healthy run raises nothing

    best_step = min(fid, key=fid.get)
    for name in ("dcgan-generator", "dcgan-discriminator"):
        champion = client.get_model_version_by_alias(name, "champion")
        latest = client.get_model_version_by_alias(name, "latest")
        assert champion.run_id == run_id and champion.tags["champion.step"] == str(best_step)
        assert float(champion.tags["champion.score"]) == pytest.approx(fid[best_step])
        # `latest` stays the last step's models: a newer version unless the last step was best
        assert (int(latest.version) > int(champion.version)) == (best_step != 150)
    assert run.data.tags["champion.step"] == str(best_step)

    # the best snapshot is part of the checkpoint, so a resumed run keeps it
    import ray.train

    from dcgan_dist import checkpoint

    with ray.train.Result.from_path(str(tmp_path / "ray_results" / "test")).checkpoint.as_directory() as folder:
        state = checkpoint.load_state(folder)
    best = state["best"]
    assert best["step"] == best_step and best["score"] == pytest.approx(fid[best_step])
    assert best["generator"].keys() == state["generator"].keys()


@pytest.mark.slow
def test_a_run_with_lr_0_1_raises_the_collapse_event_and_rolls_back(ray_local, mlflow_sqlite, tmp_path):
    """On 2 gloo workers: rank 0 holds the best snapshot and broadcasts it at a rollback, so
    both replicas continue from the same weights (their checksum spread stays 0)."""
    # At lr 0.1 D's loss vanishes in stretches between spikes: a 20-step median catches the first
    # (in the digits' split.py order 15 of the first 30 steps were below 1e-3, one short for a 30-step one).
    args = train_args(tmp_path, mlflow_sqlite, max_steps=100, log_every=10, sample_every=100, checkpoint_every=50,
                      lr=0.1, eval_every=20, eval_samples=100, collapse_steps=20, num_workers=2)
    assert main(args + ["--rollback-on-collapse", "--no-register-models"]) == 0
    client = MlflowClient(mlflow_sqlite)
    run = client.search_runs([client.get_experiment_by_name("tests").experiment_id])[0]
    vanished = metric_steps(client, run.info.run_id, "collapse/d_loss_vanished")
    assert vanished and set(vanished.values()) == {1.0}
    assert run.data.tags["collapse.d_loss_vanished"].startswith("step ")
    rollbacks = metric_steps(client, run.info.run_id, "collapse/rollback_to_step")
    assert rollbacks and all(target % 20 == 0 and target < step for step, target in rollbacks.items())
    assert min(rollbacks) < 100  # training went on after a rollback, on both ranks
    assert metric_steps(client, run.info.run_id, "ddp/replica_spread") == {50: 0.0, 100: 0.0}
