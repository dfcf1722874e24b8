"""Scores comparable with the literature and the offline evaluate command: the fid-inception
backbone against pytorch-fid itself (a test dependency), the Inception Score, the memorisation
check over a whole training set streamed through the data reader, and `python -m
dcgan_dist.evaluate` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pytorch_fid import inception as pytorch_fid  # the dev extra's reference (never imported by dcgan_dist)

from dcgan_dist.data import every_image
from dcgan_dist.data.digits import digits_dataset
from dcgan_dist.data.pack import pack
from dcgan_dist.evaluate import __main__ as evaluate_cli
from dcgan_dist.evaluate import backbones
from dcgan_dist.evaluate.fid import frechet_distance
from dcgan_dist.evaluate.memorisation import memorisation_check, nearest_training_images
from dcgan_dist.evaluate.scores import inception_score
from tests.test_probe import write_checkpoint


@pytest.fixture(scope="module")
def pt_inception_file(tmp_path_factory):
    """A pt_inception-2015-12-05-style file of random weights, built by pytorch-fid's own
    fid_inception_v3 (its download replaced by the network's own initial weights), with the
    BatchNorm statistics of a batch of digits so that features differ from image to image."""
    captured = {}

    def keep(*args, **kwargs):
        captured["network"] = build(*args, **kwargs)
        return captured["network"]

    build = pytorch_fid._inception_v3
    torch.manual_seed(0)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pytorch_fid, "_inception_v3", keep)
        patch.setattr(pytorch_fid, "load_state_dict_from_url", lambda *args, **kwargs: captured["network"].state_dict())
        network = pytorch_fid.fid_inception_v3()
    for layer in network.modules():
        if isinstance(layer, torch.nn.BatchNorm2d):
            layer.reset_running_stats()
            layer.momentum = None  # the running statistics become the batch's
    images = torch.nn.functional.interpolate(digits_dataset(32).tensors[0][:8], size=(299, 299), mode="bilinear")
    with torch.no_grad():
        network.train()(images)
    path = tmp_path_factory.mktemp("weights") / "pt_inception-2015-12-05-random.pth"
    torch.save(network.state_dict(), path)
    return path


def pytorch_fid_network(monkeypatch, weights: Path, block: int = 3):
    """pytorch-fid's InceptionV3([block]) with the weights in `weights` (its download replaced)."""
    monkeypatch.setattr(pytorch_fid, "load_state_dict_from_url", lambda *args, **kwargs: torch.load(weights, weights_only=True))
    return pytorch_fid.InceptionV3([block]).eval()


def test_fid_inception_features_equal_pytorch_fids(pt_inception_file, monkeypatch):
    images = torch.cat([digits_dataset(32).tensors[0][:3], torch.rand(1, 3, 32, 32) * 2 - 1])
    backbone = backbones.load("fid-inception", str(pt_inception_file))
    features, probabilities = backbone.embed(images)
    with torch.no_grad():
        reference = pytorch_fid_network(monkeypatch, pt_inception_file)((images + 1) / 2)[0].flatten(1).double().numpy()
    assert features.shape == (4, 2048) and probabilities.shape == (4, 1008)
    # to 1e-4 of the features' scale: float32 rounding differs only in where the resize happens
    # (ours on images in [-1, 1], pytorch-fid's on [0, 1] before scaling them to [-1, 1])
    assert np.abs(features - reference).max() < 1e-4 * np.abs(reference).max()
    assert np.abs(reference[0] - reference[1]).max() > 1e-2  # the features tell images apart: the check can fail
    assert backbone.name.startswith("fid-inception-") and backbone.score is inception_score


def test_fid_of_two_folders_equals_pytorch_fids(pt_inception_file, monkeypatch, tmp_path):
    """pytorch-fid's calculate_fid_given_paths is compute_statistics_of_path on each folder, then
    calculate_frechet_distance: both are run here on the same folders. Its scipy sqrtm of a
    2048 x 2048 product takes minutes on 2 CPU cores, so the distances are compared on the first
    256 feature dimensions (the formula does not depend on the size), the statistics on all 2048."""
    from pytorch_fid.fid_score import calculate_frechet_distance, compute_statistics_of_path

    digits = digits_dataset(32).tensors[0]
    folders = [tmp_path / "a", tmp_path / "b"]
    evaluate_cli.save_samples(digits[:6], folders[0])
    evaluate_cli.save_samples(digits[500:506], folders[1])
    network = pytorch_fid_network(monkeypatch, pt_inception_file)
    statistics = [compute_statistics_of_path(str(f), network, 6, 2048, "cpu", num_workers=0) for f in folders]
    backbone = backbones.load("fid-inception", str(pt_inception_file))
    features = [backbone.embed(read_pngs(folder))[0] for folder in folders]
    for ours, (mu, sigma) in zip(features, statistics):
        # 3e-4 of the scale: the two read the PNGs into floats differently (x / 127.5 - 1 against
        # ToTensor's x / 255, then 2x - 1) and resize in different ranges; on an AVX2-only EPYC
        # the means differed by 1.08e-4 of it. A resize or scaling that is not pytorch-fid's
        # (bicubic, or [0, 1] input) is off by orders of magnitude more.
        assert np.abs(ours.mean(0) - mu).max() < 3e-4 * np.abs(mu).max()
        assert np.abs(np.cov(ours, rowvar=False) - sigma).max() < 1e-3 * np.abs(sigma).max()
    dims = slice(0, 256)
    reference = calculate_frechet_distance(*(part[dims] if part.ndim == 1 else part[dims, dims]
                                             for mu_sigma in statistics for part in mu_sigma))
    assert reference > 0.1
    assert frechet_distance(*(ours[:, dims] for ours in features)) == pytest.approx(reference, rel=1e-3)


def read_pngs(folder: Path) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float() / 127.5 - 1
                        for path in sorted(folder.glob("*.png"))])


def test_a_weights_file_of_another_network_is_named(pt_inception_file, tmp_path):
    from torchvision.models import inception_v3

    torchvision_file = tmp_path / "inception_v3_google.pth"
    torch.save(inception_v3(weights=None, aux_logits=True, init_weights=False).state_dict(), torchvision_file)
    with pytest.raises(backbones.BackboneError, match="not a FID Inception") as error:
        backbones.load("fid-inception", str(torchvision_file))
    assert str(torchvision_file) in str(error.value)
    with pytest.raises(backbones.BackboneError, match="not an Inception-v3") as error:
        backbones.load("inception", str(pt_inception_file))
    assert str(pt_inception_file) in str(error.value)


def test_inception_score_closed_forms():
    confident_and_balanced = np.eye(10)[np.arange(1000) % 10]  # each part holds every class equally
    assert inception_score(confident_and_balanced)["inception_score"] == pytest.approx(10)
    assert inception_score(np.eye(10)[np.zeros(1000, dtype=int)])["inception_score"] == pytest.approx(1)  # one class
    assert inception_score(np.full((1000, 1008), 1 / 1008))["inception_score"] == pytest.approx(1)  # no confidence
    half = inception_score(np.eye(4)[np.arange(1000) % 2])  # confident, 2 of 4 classes
    assert half["inception_score"] == pytest.approx(2) and half["inception_score_std"] == pytest.approx(0, abs=1e-9)


@pytest.fixture(scope="module")
def digits_manifest(tmp_path_factory) -> str:
    """The bundled digits packed as PNG shards (lossless: the stream gives back the packed pixels)."""
    out = tmp_path_factory.mktemp("digits-png")
    return pack("digits", None, str(out), 32, image_format="png", shard_size=500, progress=False)["manifest"]


def test_memorisation_finds_a_planted_copy_of_a_training_image_in_the_streamed_set(digits_manifest):
    training = torch.cat(list(every_image(digits_manifest, 32, batch_size=256)))  # the order the stream reads
    assert len(training) == 1797
    planted = 1234
    fresh = torch.roll(training[:20], shifts=(3, 3), dims=(2, 3))  # shifted digits: near, not copies
    samples = torch.cat([fresh[:10], training[planted : planted + 1] + 0.01 * torch.randn(1, 3, 32, 32), fresh[10:]])
    nearest = nearest_training_images(samples, every_image(digits_manifest, 32, batch_size=256))
    assert nearest.compared == 1797 and int(nearest.index[10]) == planted
    assert float(nearest.distance[10]) < 1.0 < float(nearest.distance[torch.arange(21) != 10].min())
    assert torch.equal(nearest.image[10], training[planted])

    metrics, pictures = memorisation_check(samples, every_image(digits_manifest, 32, batch_size=256), training[:200])
    assert metrics["training_images"] == 1797
    # real images are in the set: their nearest *other* image is the baseline, far from 0
    assert metrics["real_nn_distance_median"] > 5 and pictures["pairs"].dtype == np.uint8


def run_evaluate(capsys, *args: str) -> tuple[int, str, str]:
    code = evaluate_cli.main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_evaluate_command_scores_a_checkpoint_on_digits(tmp_path, capsys, digits_manifest):
    checkpoint = write_checkpoint(tmp_path / "ckpt")
    output, samples = tmp_path / "out" / "scores.json", tmp_path / "samples"
    code, out, err = run_evaluate(capsys, "--generator", str(checkpoint), "--backbone", "digits", "--samples", "200",
                                  "--real", "digits", "--output-json", str(output), "--save-samples", str(samples),
                                  "--memorisation-against", digits_manifest)
    assert code == 0, err
    report = json.loads(output.read_text())
    assert report["backbone"].startswith("digits-cnn-") and report["samples"] == 200 and report["real_samples"] == 200
    assert report["fid"] > 0 and np.isfinite(report["kid"]) and 0 <= report["class_balance"] <= 1
    assert report["memorisation"]["training_images"] == 1797 and report["memorisation"]["nn_distance_ratio"] > 0.5  # untrained G
    assert Path(report["memorisation"]["pairs_picture"]).is_file()
    assert len(list(samples.glob("*.png"))) == 200 and "fid:" in out
    # the same latents and real images give the same scores
    assert run_evaluate(capsys, "--generator", str(checkpoint), "--backbone", "digits", "--samples", "200", "--real", "digits",
                        "--output-json", str(tmp_path / "again.json"))[0] == 0
    assert json.loads((tmp_path / "again.json").read_text())["fid"] == report["fid"]


def test_evaluate_command_names_bad_input_in_one_line(tmp_path, capsys, pt_inception_file):
    checkpoint = str(write_checkpoint(tmp_path / "ckpt"))
    text = tmp_path / "notes.txt"
    text.write_text("not weights")
    common = ["--real", "digits", "--output-json", str(tmp_path / "scores.json"), "--samples", "20"]
    for args, named in (
        (["--generator", "not-a-model"], "not-a-model"),
        (["--generator", str(pt_inception_file)], str(pt_inception_file)),  # a file, but no checkpoint
        (["--generator", checkpoint, "--inception-weights", str(tmp_path / "missing.pth")], "missing.pth"),
        (["--generator", checkpoint, "--inception-weights", str(text)], str(text)),
        (["--generator", checkpoint, "--backbone", "inception", "--inception-weights", str(pt_inception_file)], str(pt_inception_file)),
        (["--generator", checkpoint, "--backbone", "digits", "--real", "lsun"], "lsun"),
    ):
        code, _, err = run_evaluate(capsys, *args, *common[2:], *([] if "--real" in args else common[:2]))
        assert code == 2 and named in err and len(err.strip().splitlines()) == 1, (args, err)
        assert "Traceback" not in err


def test_evaluate_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exit_code:
        evaluate_cli.main(["--help"])
    shown = capsys.readouterr().out
    assert exit_code.value.code == 0
    for flag in ("--generator", "--backbone", "--inception-weights", "--samples", "--real", "--output-json", "--save-samples",
                 "--memorisation-against", "fid-inception"):
        assert flag in shown
