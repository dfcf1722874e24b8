"""Batches from DataLoader processes to the training process through shared memory allocated once.

A tensor a DataLoader worker returns travels in a new shared-memory segment per batch: the
worker allocates and fills it, its file descriptor goes over a Unix socket, the training process
maps it, reads it through fresh page faults and unmaps it. At 64 px that cost as much as a fifth
of a JPEG batch's decode and half of a raw batch's read (benchmarks/RESULTS.md). Here each loader
worker owns a ring of `slots` batch buffers, allocated before the workers start (inherited at
fork, or passed once at spawn); it builds each batch in its next slot (the epoch reader stacks
decoded images or copies raw ones there directly) or copies it there, and hands the DataLoader
only a ticket (worker, sequence number, layout). The training process copies the batch out of
the slot (scaling it on its device) and marks the slot free.

A worker reuses a slot only once the training process has freed the batch that was in it, and
waits for that otherwise. The DataLoader asks a worker for at most `prefetch_factor` batches
ahead of the one being read, so with prefetch_factor + 1 slots it does not wait in practice.
Each slot records the sequence number of the batch it holds: a batch overwritten before it was
read would raise DataError, not train on the wrong pixels.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import torch
from torch.utils.data import IterableDataset, get_worker_info

from dcgan_dist.data.decode import to_unit_range

FREE_POLL_S = 0.0005  # how often a worker with no free slot looks again
PARENT_CHECK_S = 1.0  # how often a waiting worker checks that the training process is still there


class HandoverError(RuntimeError):
    """A batch was overwritten before the training process read it, or the training process is gone."""


class BatchRing:
    """`slots` uint8 batch buffers per loader worker, in shared memory, with their bookkeeping."""

    def __init__(self, workers: int, slots: int, batch: int, image_size: int):
        self.shape = (batch, 3, image_size, image_size)
        self.slots = slots
        self.pixels = torch.empty((workers, slots, batch * 3 * image_size * image_size), dtype=torch.uint8).share_memory_()
        # written[w, s]: the sequence number of the batch in slot s of worker w; freed[w]: the
        # highest sequence number of w that the training process has read (its batches are read in order)
        self.written = torch.full((workers, slots), -1, dtype=torch.int64).share_memory_()
        self.freed = torch.full((workers,), -1, dtype=torch.int64).share_memory_()
        self.owner = os.getpid()
        self._next_sequence = 0  # per process: each worker counts its own batches
        self._views()

    def _views(self) -> None:  # numpy views of the shared counters: scalar reads 10x cheaper than torch's
        self._written, self._freed = self.written.numpy(), self.freed.numpy()

    def __getstate__(self):  # spawn: the tensors go as shared memory, the numpy views are made again
        state = self.__dict__.copy()
        del state["_written"], state["_freed"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._views()

    def slot_view(self, worker: int, slot: int, channels_last: bool) -> torch.Tensor:
        """Slot `slot` of `worker` as an N x 3 x H x W batch, its memory in NCHW or NHWC order."""
        n, c, h, w = self.shape
        flat = self.pixels[worker, slot]
        return flat.view(n, h, w, c).permute(0, 3, 1, 2) if channels_last else flat.view(n, c, h, w)

    def claim(self, channels_last: bool) -> torch.Tensor:
        """In a loader worker: its next slot, once the training process has freed it, for the
        worker to build its next batch in (`put` then hands that batch over without a copy)."""
        worker, sequence = _worker(), self._next_sequence
        self.wait_for_free(worker, sequence - self.slots)
        return self.slot_view(worker, sequence % self.slots, channels_last)

    def put(self, images: torch.Tensor) -> tuple[int, int, bool]:
        """In a loader worker: hand over a uint8 batch through this worker's next slot (copied
        into it, unless it was built there: `claim`); its ticket."""
        worker = _worker()
        sequence, self._next_sequence = self._next_sequence, self._next_sequence + 1
        slot = sequence % self.slots
        self.wait_for_free(worker, sequence - self.slots)
        channels_last = not images.is_contiguous() and images.is_contiguous(memory_format=torch.channels_last)
        view = self.slot_view(worker, slot, channels_last)
        if images.data_ptr() != view.data_ptr():
            view.copy_(images)  # same layout on both sides: a memcpy
        self._written[worker, slot] = sequence
        return worker, sequence, channels_last

    def wait_for_free(self, worker: int, sequence: int) -> None:
        checked = time.monotonic()
        while self._freed[worker] < sequence:
            time.sleep(FREE_POLL_S)
            if time.monotonic() - checked > PARENT_CHECK_S:
                if os.getppid() != self.owner:
                    raise HandoverError("the training process that reads this loader worker's batches is gone")
                checked = time.monotonic()

    def take(self, ticket: tuple[int, int, bool], device: str | torch.device) -> torch.Tensor:
        """In the training process: the ticket's batch as floats in [-1, 1] on `device`, in the layout it was put in; frees its slot."""
        worker, sequence, channels_last = ticket
        slot = sequence % self.slots
        if self._written[worker, slot] != sequence:
            raise HandoverError(f"loader worker {worker}'s batch {sequence} is not in its slot (it holds batch "
                                f"{self._written[worker, slot]})")
        batch = self.slot_view(worker, slot, channels_last)
        # A synchronous copy off the slot (to the device, or the float conversion on the CPU): the
        # slot can be reused as soon as this returns.
        images = to_unit_range(batch.to(device) if torch.device(device).type != "cpu" else batch)
        if self._written[worker, slot] != sequence:
            raise HandoverError(f"loader worker {worker}'s batch {sequence} was overwritten while it was read")
        self._freed[worker] = sequence
        return images


def _worker() -> int:
    info = get_worker_info()
    return info.id if info is not None else 0


class HandedOver(IterableDataset):
    """`dataset`'s (uint8 images, *rest) items with the images put into `ring`: (ticket, *rest).
    A dataset with a `batch_buffer` attribute (epochs.EpochBatches) builds its batches in the
    ring's slots: one copy of the pixels fewer per batch."""

    def __init__(self, dataset: IterableDataset, ring: BatchRing):
        self.dataset, self.ring = dataset, ring
        if hasattr(dataset, "batch_buffer"):
            dataset.batch_buffer = ring.claim

    def __iter__(self) -> Iterator[tuple]:
        for images, *rest in self.dataset:
            yield self.ring.put(images), *rest
