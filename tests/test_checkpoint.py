"""The checkpoint: each rank saves the CPU generator and its own GPU's only; the architecture it is for."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch

from dcgan_dist import checkpoint
from dcgan_dist.models import Architecture


def test_a_cpu_worker_saves_and_restores_the_cpu_generator_alone():
    torch.manual_seed(3)
    state = checkpoint.rng_state(torch.device("cpu"))
    assert set(state) == {"torch"}  # nothing of any GPU the process might see
    expected = torch.rand(4)
    torch.manual_seed(99)
    checkpoint.set_rng_state(state, torch.device("cpu"))
    assert torch.equal(torch.rand(4), expected)


def test_an_earlier_checkpoints_list_of_gpu_states_is_not_applied_by_ordinal():
    """Checkpoints written before held every visible GPU's state by ordinal; which was this
    rank's is unknown after a restart, so only the CPU state is restored from them."""
    torch.manual_seed(5)
    old = {"torch": torch.get_rng_state(), "cuda": [torch.zeros(16, dtype=torch.uint8)] * 4}
    expected = torch.rand(2)
    checkpoint.set_rng_state(old, torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))
    assert torch.equal(torch.rand(2), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (benchmarks/gpu/check.sh part c runs it there)")
def test_a_gpu_worker_saves_its_own_device_only():
    device = torch.device("cuda", torch.cuda.device_count() - 1)
    torch.cuda.manual_seed_all(7)
    state = checkpoint.rng_state(device)
    assert isinstance(state["cuda"], torch.Tensor)
    expected = torch.rand(4, device=device)
    torch.cuda.manual_seed_all(123)
    checkpoint.set_rng_state(state, device)
    assert torch.equal(torch.rand(4, device=device), expected)


def test_architecture_saved_in_the_checkpoint_or_read_from_an_older_ones_config():
    saved = Architecture.of("paper", 64, "g-only")
    assert checkpoint.architecture_of({"architecture": saved.to_dict()}) == saved
    older = {"config": {"model.preset": "paper", "model.image_size": 64, "model.bn": "g-only"}}  # before the field existed
    assert checkpoint.architecture_of(older) == saved
    with pytest.raises(ValueError, match="z_dim"):
        checkpoint.architecture_of({"architecture": {"preset": "paper", "image_size": 64, "bn": "g-only"}})
    with pytest.raises(ValueError, match="no architecture"):
        checkpoint.architecture_of({"config": {}})


def write_checkpoint(folder, step: int, world_size: int = 2):
    """A checkpoint folder as the loop writes and uploads it: rank 0's state.pt, every rank's RNG
    file, each rank's part staged apart and uploaded with its manifest (checkpoint_upload)."""
    from pyarrow import fs

    from dcgan_dist.checkpoint_upload import upload_verified
    from dcgan_dist.models import build_models

    generator, discriminator = build_models("pytorch-examples", 32, "paper")
    optimizer = torch.optim.Adam(generator.parameters())
    for rank in range(world_size):
        with tempfile.TemporaryDirectory() as staging:
            checkpoint.save(staging, rank=rank, device=torch.device("cpu"), step=step, generator=generator,
                            discriminator=discriminator, opt_g=optimizer, opt_d=optimizer, mlflow_run_id="r",
                            config={"cluster.num_workers": world_size}, architecture=Architecture.of("pytorch-examples", 32, "paper"))
            upload_verified(staging, fs.LocalFileSystem(), str(folder), rank, world_size)
    return folder


def test_resume_picks_the_newest_readable_checkpoint_and_names_the_bad_ones(tmp_path, caplog):
    import ray.train

    from dcgan_dist.restore import RestoreError, newest_readable, older_checkpoints

    run = tmp_path / "run"
    oldest = write_checkpoint(run / "checkpoint_2026-12-02_06-00-00.000001", 10)
    middle = write_checkpoint(run / "checkpoint_2026-12-02_06-00-05.000001", 20)
    latest = write_checkpoint(run / "checkpoint_2026-12-02_06-00-09.000001", 30)
    write_checkpoint(run / "checkpoint_2026-12-02_06-00-12.000001", 40)  # newer than Ray Train's latest: never registered
    (latest / "state.pt").write_bytes((latest / "state.pt").read_bytes()[:1000])  # cut short
    (middle / "rng-rank1.pt").unlink()  # a rank's file missing

    candidates = [ray.train.Checkpoint(str(latest))]
    candidates += older_checkpoints(candidates[0])
    assert [Path(c.path).name for c in candidates] == [latest.name, middle.name, oldest.name]
    index, state = newest_readable(candidates)
    assert index == 2 and state["step"] == 10
    assert len(state["unreadable_checkpoints"]) == 2
    assert latest.name in caplog.text and "rng-rank1.pt is missing" in caplog.text

    (oldest / "state.pt").unlink()
    with pytest.raises(RestoreError, match="no readable checkpoint.*new --run-name"):
        newest_readable(candidates)


def test_register_without_a_run_there_is_one_line_exit_2(tmp_path, capsys):
    from dcgan_dist import register

    assert register.main(["--storage-path", str(tmp_path), "--run-name", "nothing-here"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "nothing-here" in error and "no Ray Train run there" in error, error
