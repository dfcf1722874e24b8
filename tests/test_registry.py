"""What `mlflow.pytorch.load_model` gives back for the registered G and D: real modules (eval and
train mode, `.to(device)`, any batch, z as (N, z_dim) or (N, z_dim, 1, 1)), the same numbers as
the networks `load_network` rebuilds from the state dict, and no pickled Python run on load.
A real sqlite MLflow store, logged and registered as training does (in process: no server)."""

from __future__ import annotations

import pickle
import sys

import mlflow
import mlflow.pytorch.pickle_module
import numpy as np
import pytest
import torch

from dcgan_dist.models import Architecture
from dcgan_dist.tracking import registry, scripted

GENERATOR, DISCRIMINATOR = "models:/dcgan-generator@champion", "models:/dcgan-discriminator@champion"
BATCHES = (1, 3, 17)  # none of them the input example's 2


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A store holding one registered G/D pair with `champion` on both, their BatchNorm running
    statistics moved off their initial values (so eval mode is told apart from train mode)."""
    folder = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    torch.manual_seed(0)
    architecture = Architecture.of("pytorch-examples", 32, "paper")
    generator, discriminator = architecture.build()
    for module in (*generator.modules(), *discriminator.modules()):
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.2)
            module.running_var.uniform_(0.5, 2.0)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)  # mlruns/ lands here
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment("tests")
        with mlflow.start_run():
            versions = registry.log_models(architecture, generator.state_dict(), discriminator.state_dict(), step=7)
        for name, version in versions.items():
            registry.set_alias(name, version, "champion", uri)
        yield uri


@pytest.fixture
def tracking(store):
    mlflow.set_tracking_uri(store)
    return store


def rebuilt(reference: str, network: str, uri: str) -> torch.nn.Module:
    """The no-pickle path: the plain module from the state dict and architecture the model carries."""
    return registry.load_network(reference, network, uri).network


def test_a_run_registers_each_model_once_per_step(tracking):
    """The models of a step the run registered already (the run's tags saying so lost, say) give
    back those versions, logged and registered no second time: the registry answers."""
    client = mlflow.MlflowClient(tracking)
    names = (registry.GENERATOR_MODEL, registry.DISCRIMINATOR_MODEL)
    first = {name: client.get_model_version_by_alias(name, "champion") for name in names}
    run_id = first[registry.GENERATOR_MODEL].run_id
    assert {name: registry.registered_version(name, run_id, 7, tracking) for name in names} == {
        name: str(version.version) for name, version in first.items()}
    assert registry.registered_version(registry.GENERATOR_MODEL, run_id, 8, tracking) is None  # another step
    generator, discriminator = Architecture.of("pytorch-examples", 32, "paper").build()
    with mlflow.start_run(run_id=run_id):
        again = registry.log_models(Architecture.of("pytorch-examples", 32, "paper"), generator.state_dict(),
                                    discriminator.state_dict(), step=7)
    assert again == {name: str(version.version) for name, version in first.items()}
    assert [len(client.search_model_versions(f"name = '{name}'")) for name in names] == [1, 1]
    logged = mlflow.search_logged_models(experiment_ids=[client.get_run(run_id).info.experiment_id], output_format="list")
    assert len(logged) == 2  # nor logged into the run again


def test_the_registered_generator_is_a_module_for_any_batch_and_either_z_shape(tracking):
    generator = mlflow.pytorch.load_model(GENERATOR)
    assert isinstance(generator, torch.nn.Module)
    generator = generator.eval().to("cpu")  # as PyTorch users chain them
    assert isinstance(generator, torch.nn.Module) and not generator.training
    reference = rebuilt(GENERATOR, "generator", tracking)
    for batch in BATCHES:
        z = torch.rand(batch, 100) * 2 - 1
        with torch.no_grad():
            expected = reference(z)
            for shaped in (z, z[:, :, None, None]):
                images = generator(shaped)
                assert images.shape == (batch, 3, 32, 32)
                assert images.min() >= -1 and images.max() <= 1
                torch.testing.assert_close(images, expected, atol=1e-5, rtol=0)
    assert torch.equal(generator.state_dict()["generator.project.weight"], reference.state_dict()["project.weight"])


def test_the_registered_discriminator_scores_any_batch_and_gives_the_probes_features(tracking):
    discriminator = mlflow.pytorch.load_model(DISCRIMINATOR).eval().to("cpu")
    reference = rebuilt(DISCRIMINATOR, "discriminator", tracking)
    for batch in BATCHES:
        images = torch.rand(batch, 3, 32, 32) * 2 - 1
        with torch.no_grad():
            logits = discriminator(images)
            assert logits.shape == (batch,)
            torch.testing.assert_close(logits, reference(images), atol=1e-5, rtol=0)
            features, expected = discriminator.features(images), reference.features(images)
        assert [f.shape for f in features] == [(batch, 64, 16, 16), (batch, 128, 8, 8), (batch, 256, 4, 4)]
        for got, want in zip(features, expected, strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("reference, network, shape", [(GENERATOR, "generator", (8, 100)), (DISCRIMINATOR, "discriminator", (8, 3, 32, 32))])
def test_train_mode_uses_the_batch_statistics_and_eval_the_running_ones(tracking, reference, network, shape):
    loaded, plain = mlflow.pytorch.load_model(reference), rebuilt(reference, network, tracking)
    x = torch.rand(*shape) * 2 - 1
    with torch.no_grad():
        in_eval = loaded.eval()(x)
        in_train, plain_in_train = loaded.train()(x), plain.train()(x)  # batch statistics, and a running-stats update
        back, plain_back = loaded.eval()(x), plain.eval()(x)
    assert loaded.training is False
    assert (in_train - in_eval).abs().max() > 1e-3  # BatchNorm really switched
    torch.testing.assert_close(in_train, plain_in_train, atol=1e-5, rtol=0)
    assert (back - in_eval).abs().max() > 1e-6  # the train-mode pass moved the running statistics, as in PyTorch
    torch.testing.assert_close(back, plain_back, atol=1e-5, rtol=0)


@pytest.mark.parametrize("reference, bad, expected", [
    (GENERATOR, (4, 50), "(N, 100) or (N, 100, 1, 1), got [4, 50]"),
    (GENERATOR, (4, 100, 2, 1), "(N, 100) or (N, 100, 1, 1), got [4, 100, 2, 1]"),
    (DISCRIMINATOR, (4, 1, 32, 32), "(N, 3, 32, 32), got [4, 1, 32, 32]"),
])
def test_a_wrong_input_shape_is_refused_naming_the_shapes_it_takes(tracking, reference, bad, expected):
    model = mlflow.pytorch.load_model(reference)
    with pytest.raises(torch.jit.Error, match="must be shaped") as error:  # TorchScript's error, carrying the ValueError
        model(torch.zeros(bad))
    assert expected in str(error.value)


def test_pyfunc_predicts_on_numpy_batches(tracking):
    generator = mlflow.pytorch.load_model(GENERATOR)
    z = np.random.default_rng(1).uniform(-1, 1, size=(5, 100)).astype(np.float32)
    images = mlflow.pyfunc.load_model(GENERATOR).predict(z)
    assert isinstance(images, np.ndarray) and images.shape == (5, 3, 32, 32)
    with torch.no_grad():
        np.testing.assert_allclose(images, generator(torch.from_numpy(z)).numpy(), atol=1e-5, rtol=0)
    logits = mlflow.pyfunc.load_model(DISCRIMINATOR).predict(images)
    assert logits.shape == (5,) and np.isfinite(logits).all()


def test_loading_runs_no_pickled_python(tracking, tmp_path, monkeypatch):
    class Refused(pickle.Unpickler):
        def __init__(self, *args, **kwargs):
            raise AssertionError("a Python unpickler was used")

    def refused(*args, **kwargs):
        raise AssertionError("a Python unpickler was used")

    for module in (pickle, mlflow.pytorch.pickle_module):
        monkeypatch.setattr(module, "Unpickler", Refused)
        monkeypatch.setattr(module, "load", refused)
        monkeypatch.setattr(module, "loads", refused)
    # the trap holds: a module saved as pickle cannot be loaded through it
    torch.save(torch.nn.Linear(2, 1), tmp_path / "pickled.pth")
    with pytest.raises(AssertionError, match="unpickler"):
        torch.load(tmp_path / "pickled.pth", weights_only=False, pickle_module=mlflow.pytorch.pickle_module)
    for name in [name for name in sys.modules if name.split(".")[0] == "dcgan_dist"]:
        monkeypatch.setitem(sys.modules, name, None)  # and torch alone loads them: no import of this package
    for reference in (GENERATOR, DISCRIMINATOR):
        assert isinstance(mlflow.pytorch.load_model(reference, map_location="cpu"), torch.jit.ScriptModule)


def test_where_mlflow_refuses_its_pickle_format_the_state_dict_path_still_loads(tracking, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
    with pytest.raises(mlflow.exceptions.MlflowException, match="pickle"):
        mlflow.pytorch.load_model(GENERATOR)
    loaded = registry.load_network(GENERATOR, "generator", tracking)
    assert loaded.step == 7 and not loaded.network.training
    with torch.no_grad():
        assert loaded.network(torch.zeros(3, 100)).shape == (3, 3, 32, 32)


@pytest.mark.parametrize("preset, image_size, bn", [("paper", 32, "all"), ("pytorch-examples", 64, "none"), ("imagenet32", 32, "d-only"),
                                                    ("svhn32", 32, "paper")])
def test_every_architecture_scripts_to_the_same_numbers(preset, image_size, bn):
    generator, discriminator = Architecture.of(preset, image_size, bn).build()
    generator, discriminator = generator.eval(), discriminator.eval()
    scripted_generator, scripted_discriminator = scripted.script(generator), scripted.script(discriminator)
    z = torch.rand(3, generator.z_dim) * 2 - 1
    with torch.no_grad():
        images = generator(z)
        torch.testing.assert_close(scripted_generator(z[:, :, None, None]), images, atol=1e-5, rtol=0)
        torch.testing.assert_close(scripted_discriminator(images), discriminator(images), atol=1e-5, rtol=0)
        assert len(scripted_discriminator.features(images)) == len(discriminator.features(images))
