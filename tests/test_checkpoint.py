"""The checkpoint: each rank saves the CPU generator and its own GPU's only; the architecture it is for."""

from __future__ import annotations

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
