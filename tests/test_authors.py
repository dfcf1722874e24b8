"""The authors' released weights (dcgan_dist/authors/weights.py) against a pytensor restatement of their
Theano forward passes (tests/theano_reference.py, with its own copy of the authors' layer numbers),
on random weights in their layout and on their real SVHN GAN (../shared/authors-dcgan/); the
presets' layers against those numbers; plus the import command and its bad input."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from torch import nn

from dcgan_dist import explore
from dcgan_dist.authors import __main__ as import_authors
from dcgan_dist.authors import weights as authors
from dcgan_dist.models import build_models, sample_latent
from dcgan_dist.probe import __main__ as probe
from dcgan_dist.tracking.registry import load_network
from tests import theano_reference as reference

SHARED = Path(__file__).resolve().parents[2] / "shared" / "authors-dcgan"
SVHN_FOLDER = SHARED / "svhn_unsup_all_conv_dcgan_100z_gaussian_lr_0.0005_64mb"
needs_shared = pytest.mark.skipif(not SVHN_FOLDER.is_dir(), reason=f"the authors' SVHN weights are not at {SVHN_FOLDER}")

# The arrays of the authors' gen()/discrim(), in argument order, as their files hold them
# (svhn: ../shared/authors-dcgan/SOURCE; imagenet32: the .npy headers of
# models/imagenet_gan_pretrain_128f_relu_lrelu_7l_3x3_256z/ in Newmu/dcgan_code).
AUTHORS_SHAPES = {
    "svhn32": {
        "gen": [(100, 4096), (4096,), (4096,), (256, 128, 5, 5), (128,), (128,), (128, 64, 5, 5), (64,), (64,), (64, 3, 5, 5)],
        "discrim": [(64, 3, 5, 5), (128, 64, 5, 5), (128,), (128,), (256, 128, 5, 5), (256,), (256,), (4096, 1)],
    },
    "imagenet32": {
        "gen": [(256, 8192), (8192,), (8192,)] + [s for c_in, c_out in ((512, 512), (512, 256), (256, 256), (256, 128), (128, 128))
                                                   for s in ((c_in, c_out, 3, 3), (c_out,), (c_out,))] + [(128, 3, 3, 3)],
        "discrim": [(128, 3, 3, 3)] + [s for c_in, c_out in ((128, 128), (128, 256), (256, 256), (256, 512), (512, 512))
                                       for s in ((c_out, c_in, 3, 3), (c_out,), (c_out,))] + [(8192, 1)],
    },
}


def write_random_weights(folder: Path, preset: str, seed: int = 0) -> dict[str, list[np.ndarray]]:
    """Random arrays in the authors' layout and file names; BN gains near 1, as trained ones are."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for kind, shapes in AUTHORS_SHAPES[preset].items():
        arrays[kind] = []
        for index, shape in enumerate(shapes, start=1):
            is_gain = len(shape) == 1 and AUTHORS_SHAPES[preset][kind][index - 2] != shape  # g follows its layer's weight
            array = (1 + 0.2 * rng.standard_normal(shape) if is_gain else 0.1 * rng.standard_normal(shape)).astype(np.float32)
            np.save(folder / f"7_{kind}_params.jl_{index:02d}.npy", array)
            arrays[kind].append(array)
    return arrays


def running_statistics(model: nn.Module) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(m.running_mean.double().numpy(), m.running_var.double().numpy()) for m in model.modules() if isinstance(m, nn.BatchNorm2d)]


def assert_close(ours: torch.Tensor, theirs: np.ndarray, tolerance: float = 1e-4) -> None:
    np.testing.assert_allclose(ours.detach().double().numpy(), theirs, rtol=tolerance, atol=tolerance)


def compare_with_reference(imported: authors.Imported, arrays: dict[str, list[np.ndarray]], batch: int) -> None:
    """G and D against the reference, with batch statistics (the authors' inference; ours in
    train mode) and with the re-estimated statistics passed in (ours in eval mode)."""
    preset = imported.architecture.preset
    z = sample_latent(batch, preset, rng=torch.Generator().manual_seed(5))
    generator, discriminator = imported.generator, imported.discriminator
    with torch.no_grad():
        assert_close(generator.eval()(z), reference.generator(preset, arrays["gen"], z.numpy(), running_statistics(generator)))
        images = copy.deepcopy(generator).train()(z)  # a copy: train mode moves the running statistics
    assert_close(images, reference.generator(preset, arrays["gen"], z.numpy()))
    for mode, stats in (("eval", running_statistics(discriminator)), ("train", None)):
        blocks, logits = reference.discriminator(preset, arrays["discrim"], images.numpy(), stats)
        with torch.no_grad():
            model = copy.deepcopy(discriminator).train(mode == "train")
            for ours, theirs in zip(model.features(images), blocks, strict=True):
                assert_close(ours, theirs)
            assert_close(model(images), logits)


def test_the_references_networks_fit_the_authors_weight_files():
    """The reference's layer table (from the authors' code) implies the arrays their files hold:
    two records of the same networks, written apart."""
    for preset, shapes in AUTHORS_SHAPES.items():
        assert reference.param_shapes(preset) == shapes, preset


@needs_shared
def test_the_references_svhn_network_fits_the_released_arrays():
    for kind in ("gen", "discrim"):
        arrays = [np.load(p, mmap_mode="r", allow_pickle=False).shape for p in sorted(SVHN_FOLDER.glob(f"200_{kind}_params.jl_*.npy"))]
        assert arrays == reference.param_shapes("svhn32")[kind], kind


@pytest.mark.parametrize("preset", ["svhn32", "imagenet32"])
def test_the_authors_presets_build_the_authors_layers(preset):
    """Our G and D, module by module: each conv's width, kernel, stride and padding, in order, are
    the authors' (the reference's table, written from their code, not from our presets)."""
    network = reference.NETWORKS[preset]
    generator, discriminator = build_models(preset, 32, "paper")

    def convs(model: nn.Module, kind: type[nn.Module]) -> list[tuple[int, int, int, int]]:
        return [(m.out_channels, m.kernel_size[0], m.stride[0], m.padding[0]) for m in model.modules() if isinstance(m, kind)]

    assert convs(generator, nn.ConvTranspose2d) == [(filters, network.kernel, stride, border) for filters, stride, border in network.gen]
    assert convs(discriminator, nn.Conv2d) == [(filters, network.kernel, stride, border) for filters, stride, border in network.discrim]
    assert generator.project.weight.shape == (16 * network.projection, network.z_dim)
    assert generator(sample_latent(2, preset)).shape == (2, 3, 32, 32)


def test_the_reference_convolution_is_pytensors_convolve2d():
    """The reference's conv is a true convolution (pytensor's convolve2d, scipy's semantics), with
    Theano's stride and padding; its deconv is that convolution's adjoint."""
    import pytensor
    import pytensor.tensor as pt
    from pytensor.tensor.signal import convolve2d

    rng = np.random.default_rng(1)
    x, w = rng.standard_normal((2, 3, 8, 8)), rng.standard_normal((4, 3, 5, 5))
    X = pt.tensor4("X")
    ours = pytensor.function([X], reference.conv(X, w, x.shape, 2, 2), mode=reference.UNOPTIMISED)(x)
    padded = np.pad(x, ((0, 0), (0, 0), (2, 2), (2, 2)))
    a, b = pt.matrix("a"), pt.matrix("b")
    convolve = pytensor.function([a, b], convolve2d(a, b, mode="valid"), mode=reference.UNOPTIMISED)
    direct = np.array([[sum(convolve(padded[n, c], w[o, c]) for c in range(3))[::2, ::2] for o in range(4)] for n in range(2)])
    np.testing.assert_allclose(ours, direct, atol=1e-10)
    # <deconv(y), x> = <y, conv(x)>: the gradient of a linear map is its adjoint
    y = rng.standard_normal(ours.shape)
    Y = pt.tensor4("Y")
    back = pytensor.function([Y], reference.deconv(Y, w, y.shape, 2, 2), mode=reference.UNOPTIMISED)(y)
    assert back.shape == x.shape and np.isclose((back * x).sum(), (y * ours).sum())


@pytest.mark.parametrize("preset", ["svhn32", "imagenet32"])
def test_random_weights_in_the_authors_layout_match_the_reference(preset, tmp_path):
    arrays = write_random_weights(tmp_path / "model", preset)
    imported = authors.load_authors(tmp_path / "model", stats_batches=2, stats_batch=8)
    assert imported.architecture.preset == preset and imported.epoch == "7"  # inferred from the file counts
    # the layers the authors' code has no bias for are zero here
    assert not imported.generator.blocks[-3].bias.any() and not imported.discriminator.classify.bias.any()
    compare_with_reference(imported, arrays, batch=4)


def test_reestimated_statistics_are_the_batches_mean_and_biased_variance(tmp_path):
    """One batch: the eval-mode network (running statistics) computes exactly what the
    train-mode one (that batch's statistics) does, so eps and the biased variance agree."""
    write_random_weights(tmp_path / "model", "svhn32")
    imported = authors.load_authors(tmp_path / "model", stats_batches=1, stats_batch=16)
    z = sample_latent(16, "svhn32", rng=torch.Generator().manual_seed(0))  # the seed-0 batch the import drew
    with torch.no_grad():
        torch.testing.assert_close(imported.generator.eval()(z), copy.deepcopy(imported.generator).train()(z), atol=1e-5, rtol=1e-4)
    assert "re-estimated" in imported.statistics


@needs_shared
def test_the_authors_svhn_gan_matches_the_reference():
    """Their real weights (the folder's parent given, as ../shared/authors-dcgan/ lays it out)."""
    imported = authors.load_authors(SHARED, stats_batches=2, stats_batch=64)
    assert (imported.architecture.preset, imported.folder, imported.epoch) == ("svhn32", SVHN_FOLDER, "200")
    arrays = {kind: [np.load(p, allow_pickle=False) for p in sorted(SVHN_FOLDER.glob(f"200_{kind}_params.jl_*.npy"))]
              for kind in ("gen", "discrim")}
    compare_with_reference(imported, arrays, batch=16)


@needs_shared
def test_without_the_kernel_flip_the_samples_are_something_else():
    """The flip is what makes house numbers: the authors' own D (converted the same way) finds
    the flipped G's samples far more real than the unflipped G's, which differ markedly."""
    imported = authors.load_authors(SHARED, stats_batches=4)
    unflipped = copy.deepcopy(imported.generator)
    for module in unflipped.modules():
        if isinstance(module, nn.ConvTranspose2d):
            module.weight.data = module.weight.data.flip(2, 3)  # Theano's kernels read as torch's
    z = sample_latent(128, "svhn32", rng=torch.Generator().manual_seed(1))
    with torch.no_grad():
        flipped_images, unflipped_images = imported.generator.train()(z), unflipped.train()(z)  # batch statistics, as the authors
        realness = {name: imported.discriminator.train()(images).mean().item()
                    for name, images in (("flipped", flipped_images), ("unflipped", unflipped_images))}
    assert realness["flipped"] > realness["unflipped"] + 2.0, realness  # D's logit: > 7x the odds of being real
    assert (flipped_images - unflipped_images).abs().mean() > 0.1  # images in [-1, 1]


# ---------------------------------------------------------------- the import and its bad input


@needs_shared
def test_import_registers_both_networks_with_the_alias(mlflow_sqlite, capsys):
    assert import_authors.main([str(SHARED), "--tracking-uri", mlflow_sqlite, "--stats-batches", "1"]) == 0
    assert "models:/dcgan-generator@authors" in capsys.readouterr().out
    expected = authors.load_authors(SHARED, stats_batches=1)
    client = MlflowClient(mlflow_sqlite)
    for name, network, ours in (("dcgan-generator", "generator", expected.generator), ("dcgan-discriminator", "discriminator", expected.discriminator)):
        version = client.get_model_version_by_alias(name, "authors")
        assert "re-estimated" in version.tags["authors.bn_statistics"]
        registered = load_network(f"models:/{name}@authors", network, mlflow_sqlite)
        assert registered.architecture.preset == "svhn32"
        for key, value in ours.state_dict().items():
            torch.testing.assert_close(registered.network.state_dict()[key], value, rtol=0, atol=0)


@needs_shared
def test_probe_and_explore_take_authors_references(mlflow_sqlite, tmp_path):
    """Both load through registry.load_network, the one loader."""
    d = probe.load_model(f"{authors.PREFIX}{SHARED}", mlflow_sqlite)
    assert d.architecture.preset == "svhn32" and d.run_id is None
    assert probe.extract_features(d.network, torch.zeros(2, 3, 32, 32)).shape == (2, 7168)  # 16 x (64 + 128 + 256)
    files = explore.explore(f"{authors.PREFIX}{SHARED}", tmp_path / "pictures", mlflow_sqlite)
    assert files["samples.png"].is_file()
    client = MlflowClient(mlflow_sqlite)
    run = client.get_run(files["mlflow_run_id"])
    assert client.get_experiment(run.info.experiment_id).name == "explore"


def svhn_copy(tmp_path: Path) -> Path:
    if not SVHN_FOLDER.is_dir():  # the same layout with random values serves as well
        write_random_weights(tmp_path / "copy", "svhn32")
        for path in (tmp_path / "copy").iterdir():
            path.rename(path.with_name(path.name.replace("7_", "200_", 1)))
        return tmp_path / "copy"
    return Path(shutil.copytree(SVHN_FOLDER, tmp_path / "copy"))


@pytest.mark.parametrize("case", ["missing-file", "wrong-shape", "another-network", "no-weights", "not-an-array", "no-such-network"])
def test_bad_authors_files_exit_2_with_one_line_naming_the_file(case, tmp_path, capsys):
    folder = svhn_copy(tmp_path)
    store = tmp_path / "mlflow.db"
    args = [str(folder), "--tracking-uri", f"sqlite:///{store}"]
    if case == "missing-file":
        (folder / "200_discrim_params.jl_05.npy").unlink()
        named = "200_discrim_params.jl_05.npy: missing"
    elif case == "wrong-shape":
        np.save(folder / "200_gen_params.jl_04.npy", np.zeros((256, 128, 3, 3), np.float32))
        named = "200_gen_params.jl_04.npy"
    elif case == "another-network":
        args += ["--preset", "imagenet32"]
        named = "200_gen_params.jl_01.npy"
    elif case == "no-weights":
        shutil.rmtree(folder)
        folder.mkdir()
        named = str(folder)
    elif case == "not-an-array":
        (folder / "200_gen_params.jl_02.npy").write_bytes(b"not numpy")
        named = "200_gen_params.jl_02.npy"
    else:  # 3 and 2 files: no authors' network has those counts
        for path in folder.glob("200_*.npy"):
            if int(path.stem[-2:]) > (3 if "_gen_" in path.name else 2):
                path.unlink()
        named = f"{folder}: 3 generator and 2 discriminator files fit no authors' preset"
    assert import_authors.main(args) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(errors) == 1 and named in errors[0], errors
    assert not store.exists()  # refused before MLflow was touched: nothing registered


def test_probe_names_a_bad_authors_reference(tmp_path, capsys):
    assert probe.main(["--discriminator", f"authors:{tmp_path / 'nowhere'}", "--dataset", "digits", "--no-mlflow"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "nowhere" in errors[0], errors
