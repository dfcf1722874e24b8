"""The config: flags generated from the dataclasses, file loading, validation, flatten()."""

import dataclasses
import json
import subprocess
import sys

import pytest
import yaml

from dcgan_dist import config
from dcgan_dist.config import Config, ConfigError

REQUIRED_FLAGS = [
    "--preset", "--image-size", "--bn", "--lr", "--beta1", "--batch-size", "--max-steps", "--data",
    "--num-workers", "--use-gpu", "--tracking-uri", "--experiment", "--storage-path", "--seed",
    "--checkpoint-every", "--sample-every", "--config",
]


def run_train_cli(*args: str) -> subprocess.CompletedProcess:
    """The real CLI in a fresh interpreter (a process: the tests that use it are slow)."""
    return subprocess.run(
        [sys.executable, "-m", "dcgan_dist.train", *args], capture_output=True, text=True, timeout=120
    )


@pytest.mark.slow
def test_help_lists_every_option():
    result = run_train_cli("--help")
    assert result.returncode == 0
    for flag in REQUIRED_FLAGS:
        assert flag in result.stdout, flag
    # every config field is a flag
    for path in config.LEAVES:
        assert "--" + path.rsplit(".", 1)[1].replace("_", "-") in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, option",
    [
        (["--lr", "-1"], "--lr"),
        (["--beta1", "1.5"], "--beta1"),
        (["--image-size", "48"], "--image-size"),
        (["--preset", "stylegan"], "--preset"),
        (["--bn", "sometimes"], "--bn"),
        (["--num-workers", "4:2"], "--num-workers"),
        (["--max-steps", "0"], "--max-steps"),
        (["--data", "mnist-from-nowhere"], "--data"),
        (["--preset", "imagenet32", "--image-size", "64"], "--image-size"),
    ],
)
def test_bad_input_exits_2_with_one_line_naming_the_option(args, option):
    result = run_train_cli(*args)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert option in lines[0]
    assert "Ray" not in result.stderr + result.stdout  # rejected before Ray starts


@pytest.mark.slow
def test_bad_value_in_config_file_exits_2(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  beta1: 1.5\n")
    result = run_train_cli("--config", str(path))
    assert result.returncode == 2
    assert "--beta1" in result.stderr


def test_cli_file_flatten_round_trip(tmp_path):
    argv = ["--preset", "paper", "--image-size", "64", "--bn", "g-only", "--lr", "1e-3", "--beta1", "0.9",
            "--batch-size", "64", "--max-steps", "77", "--num-workers", "2", "--use-gpu", "--seed", "5",
            "--experiment", "ablation", "--run-name", "rt-1"]
    from_cli = config.parse(argv)
    for suffix in (".yaml", ".json"):
        path = tmp_path / f"cfg{suffix}"
        tree = dataclasses.asdict(from_cli)  # a sectioned file, as a user writes one
        path.write_text(json.dumps(tree) if suffix == ".json" else yaml.safe_dump(tree))
        from_file = config.load_file(path)
        assert config.flatten(from_file) == config.flatten(from_cli)
    flat = config.flatten(from_cli)
    assert flat["optim.lr"] == 1e-3 and flat["model.bn"] == "g-only" and flat["cluster.use_gpu"] is True
    assert config.from_flat(flat) == from_cli
    # flatten() keys are exactly the dotted field paths, JSON-serialisable for MLflow and Tune
    assert set(flat) == set(config.LEAVES)
    json.dumps(flat)


def test_flags_override_the_file(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("optim:\n  lr: 0.001\n  beta1: 0.9\nmax_steps: 50\n")  # sections or leaf names
    cfg = config.parse(["--config", str(path), "--lr", "5e-4"])
    assert cfg.optim.lr == 5e-4  # the flag wins
    assert cfg.optim.beta1 == 0.9 and cfg.loop.max_steps == 50  # the file fills the rest
    assert cfg.model.preset == Config().model.preset  # defaults elsewhere


def test_file_errors_name_the_problem(tmp_path):
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("model:\n  depth: 3\n")
    with pytest.raises(ConfigError, match="model.depth"):
        config.load_file(unknown)
    wrong_type = tmp_path / "wrong.yaml"
    wrong_type.write_text("batch_size: lots\n")
    with pytest.raises(ConfigError, match="--batch-size: expected int"):
        config.load_file(wrong_type)
    with pytest.raises(ConfigError, match="no such file"):
        config.load_file(tmp_path / "missing.yaml")


def test_short_keys_resolve_to_dotted_paths():
    assert config.resolve_key("lr") == "optim.lr"
    assert config.resolve_key("image-size") == "model.image_size"
    assert config.resolve_key("model.bn") == "model.bn"
    with pytest.raises(KeyError):
        config.resolve_key("learning_rate")


def test_nothing_is_clamped():
    cfg = Config()
    cfg.optim.lr = 0.0
    with pytest.raises(ConfigError, match="--lr"):
        config.validate(cfg)
    assert cfg.optim.lr == 0.0


@pytest.mark.parametrize("preset", ["imagenet32", "svhn32"])
def test_the_authors_32px_presets_refuse_other_sizes(preset):
    cfg = Config()
    cfg.model.preset, cfg.model.image_size = preset, 64
    with pytest.raises(ConfigError, match="--image-size"):
        config.validate(cfg)
    cfg.model.image_size = 32
    config.validate(cfg)


def test_default_is_the_paper_optimiser_and_batch():
    cfg = Config()
    assert (cfg.optim.lr, cfg.optim.beta1, cfg.loop.batch_size, cfg.model.bn) == (2e-4, 0.5, 128, "paper")
    assert cfg.data.data == "digits"


def configured(*argv: str) -> Config:
    """The validated config of a command line (a bad value raises the ConfigError the CLI prints)."""
    return config.from_args(config.build_parser().parse_args(list(argv)))


@pytest.mark.parametrize("num_workers, message", [
    ("4:2", "MIN must not exceed MAX"), ("0:2", "at least 1 worker"), ("0", "at least 1 worker"), ("2:x", "expected N or MIN:MAX"),
    ("1:2:3", "expected N or MIN:MAX"), ("", "expected N or MIN:MAX"), ("2:200", "cannot share a global --batch-size of 128"),
])
def test_a_worker_range_that_cannot_run_names_the_flag(num_workers, message):
    with pytest.raises(ConfigError, match=f"--num-workers: .*{message}"):
        configured("--num-workers", num_workers)


def test_a_worker_range_reaches_every_layer_as_one_value():
    """N is a fixed run, MIN:MAX an elastic one; the flat config (MLflow params, Tune, what Ray
    hands the workers) carries the text, and any world size in the range may split the batch."""
    fixed, elastic = configured("--num-workers", "3"), configured("--num-workers", "2:5", "--resize-interval-s", "5")
    assert fixed.worker_range == (3, 3) and elastic.worker_range == (2, 5)
    assert config.flatten(elastic)["cluster.num_workers"] == "2:5"
    assert config.from_flat(config.flatten(elastic)).worker_range == (2, 5)
    assert config.from_flat({"num_workers": 4}).worker_range == (4, 4)  # a Tune search value may be an int
    for name, value in (("resize_interval_s", "-1"), ("max_preemptions", "-2")):
        with pytest.raises(ConfigError, match="--" + name.replace("_", "-")):
            configured("--" + name.replace("_", "-"), value)


def test_every_flag_help_formats():
    """argparse %-formats each help text: a bare '%' in an option's help breaks --help (in-process,
    so the fast tier catches it; the --help tests start a process)."""
    text = config.build_parser().format_help()
    assert all("--" + path.rsplit(".", 1)[1].replace("_", "-") in text for path in config.LEAVES)
