"""Batches through the shared-memory ring (data/handover.py): intact, in order, in either layout,
and a batch read after its slot was reused is an error, not wrong pixels."""

from __future__ import annotations

import time

import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dcgan_dist.data.decode import stack_images, to_unit_range
from dcgan_dist.data.handover import BatchRing, HandedOver, HandoverError


def image_batch(value: int, channels_last: bool, batch: int = 4, size: int = 8) -> torch.Tensor:
    """A batch whose every pixel tells which batch it is (value) and where it is (channel, row)."""
    pixels = torch.arange(batch * 3 * size * size, dtype=torch.int64).view(batch, 3, size, size)
    images = ((pixels + value * 7) % 251).to(torch.uint8)
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


def test_a_batch_comes_out_as_it_went_in_in_either_layout_and_a_reused_slot_is_an_error():
    ring = BatchRing(workers=1, slots=2, batch=4, image_size=8)
    sent = [image_batch(i, channels_last=i % 2 == 1) for i in range(3)]
    first, second = ring.put(sent[0]), ring.put(sent[1])
    assert (first[2], second[2]) == (False, True)  # the layout travels with the ticket
    for ticket, images in ((first, sent[0]), (second, sent[1])):
        taken = ring.take(ticket, "cpu")
        assert taken.dtype == torch.float32 and taken.stride() == images.stride()  # floats, in the layout put in
        assert torch.allclose(taken, images.double().div(127.5).sub(1).float(), rtol=0, atol=1e-6)
    ring.put(sent[2])  # slot 0 again, now that batch 0 was read
    with pytest.raises(HandoverError, match="batch 0 is not in its slot"):
        ring.take(first, "cpu")


def test_a_batch_built_in_its_claimed_slot_goes_over_in_place_in_either_layout():
    ring = BatchRing(workers=1, slots=2, batch=4, image_size=8)
    for number in range(4):  # twice round the ring, each slot freed by its take
        channels_last = number % 2 == 1
        slot = ring.claim(channels_last)
        assert slot.shape == (4, 3, 8, 8) and slot.is_contiguous(memory_format=torch.channels_last) == channels_last
        stack_images(list(image_batch(number, channels_last)), new_batch=ring.claim)  # as the epoch reader builds a batch
        ticket = ring.put(slot)
        assert ticket == (0, number, channels_last) and slot.data_ptr() == ring.slot_view(0, number % 2, channels_last).data_ptr()
        assert torch.equal(ring.take(ticket, "cpu"), to_unit_range(image_batch(number, channels_last=False)))


def test_decoder_layout_images_stack_as_they_lie_and_scale_to_the_same_floats():
    hwc = [torch.randint(0, 256, (8, 8, 3), dtype=torch.uint8) for _ in range(5)]
    images = [image.permute(2, 0, 1) for image in hwc]  # what torchvision's decoders return
    stacked = stack_images(images)
    assert stacked.is_contiguous(memory_format=torch.channels_last)
    scaled = to_unit_range(stacked)
    assert scaled.is_contiguous(memory_format=torch.channels_last)  # the model's default layout, no transpose
    assert torch.equal(scaled.contiguous(), to_unit_range(torch.stack(images)))
    assert (to_unit_range(torch.tensor([0, 255], dtype=torch.uint8)) == torch.tensor([-1.0, 1.0])).all()
    contiguous = [image.contiguous() for image in images]  # raw images
    assert stack_images(contiguous).is_contiguous()


class Numbered(IterableDataset):
    """Each loader worker's batches 0, 1, ... with its id and number in their pixels."""

    def __init__(self, batches: int):
        self.batches = batches

    def __iter__(self):
        worker = get_worker_info().id
        for number in range(self.batches):
            yield image_batch(100 * worker + number, channels_last=number % 3 == 0), worker, number


@pytest.mark.slow
def test_loader_processes_hand_every_batch_over_intact_and_in_order_even_to_a_slow_reader():
    workers, batches = 2, 12
    ring = BatchRing(workers, slots=3, batch=4, image_size=8)  # prefetch_factor 2 + 1, as ShardBatches gives --prefetch-batches 2
    loader = DataLoader(HandedOver(Numbered(batches), ring), batch_size=None, num_workers=workers, prefetch_factor=2)
    seen = []
    for step, (ticket, worker, number) in enumerate(loader):
        if step % 5 == 0:
            time.sleep(0.2)  # the loader processes run ahead and must wait for free slots
        images = ring.take(ticket, "cpu")
        assert torch.equal(images, to_unit_range(image_batch(100 * worker + number, channels_last=False)))
        seen.append((worker, number))
    assert seen == [(step % workers, step // workers) for step in range(workers * batches)]
