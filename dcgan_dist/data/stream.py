"""The WebDataset reader: endless, per-rank batches streamed from the shards of a manifest.

`--sampling epochs` (the default) reads each sample once per epoch, split across ranks and
loader workers (data/split.py plans it, data/epochs.py reads it). `--sampling resampled` is the
endless stream with replacement below; per rank, and per DataLoader worker inside it:

    ResampledShards (with replacement, seeded by seed/rank/worker/start step/epoch)
      -> read_shards   (open through webdataset.gopen, whose s3:// opener is boto3; retry a
                        shard that fails to open or whose S3 read fails mid-way, going on after
                        the samples already read, in the version first opened (its ETag); then
                        skip and count it; a truncated tar, or a shard replaced while it is
                        read, is counted as a bad shard; S3 retries are counted)
      -> shuffle       (a sample buffer of --shuffle-buffer)
      -> decode        (torchvision.io.decode_image on the encoded bytes to uint8; a raw
                        image is already uint8; corrupt or missing images are skipped and counted)
      -> batched       (full uint8 batches only) -> with_epoch(...)
    and the training process scales each batch to [-1, 1] on its device (ShardBatches).

Shards are resampled, so the stream never ends and every rank takes exactly the steps the loop
asks for, however uneven the shards are: DDP cannot hang on a rank that ran dry. Nominal epochs
are `num_samples // global batch` steps; each rank's batch is its share of the global batch
(split.rank_batches). A resumed run reseeds from its start step: the data order is statistically
the same, not the exact continuation (the bundled digits and `--sampling epochs` continue the
epoch exactly, at any world size).
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Iterator
from functools import partial

import torch
import webdataset as wds
from torch.utils.data import DataLoader, get_worker_info
from webdataset.gopen import gopen
from webdataset.utils import make_seed

from dcgan_dist.data import raw, s3, split, tar
from dcgan_dist.data.decode import (
    IMAGE_KEYS,
    JPEG_KEYS,
    as_tensor,
    decode_jpegs,
    decode_on_device,
    decode_pixels,
    image_key,
    stack_images,
    to_unit_range,
)
from dcgan_dist.data.handover import BatchRing, HandedOver
from dcgan_dist.data.manifest import JPEG_GROUP, RAW_PIXELS, Manifest
from dcgan_dist.data.resize import decode_resized
from dcgan_dist.data.split import Position
from dcgan_dist.util import redact

log = logging.getLogger(__name__)

COUNT_NAMES = ("corrupt_samples", "bad_shards", "samples", "s3_retries", "repeated_samples")
SAMPLE_SHUFFLE = 1  # seed salt (an int: make_seed hashes, and str hashes differ per process)
LOADER_SEEDS = 2  # seed salt of the DataLoader's own generator (its workers' base seed)
MAX_CORRUPT_IN_A_ROW = 1000  # nothing but corrupt images: stop rather than spin


class DataError(RuntimeError):
    """The stream cannot go on (no readable shard, too many corrupt images)."""


class Counters:
    """What one pipeline copy (one DataLoader worker) skipped and read, cumulative."""

    def __init__(self):
        self.corrupt_samples = 0
        self.bad_shards = 0
        self.samples = 0
        self.s3_retries = 0  # requests this pipeline's S3 client retried (throttled, cut, stalled)
        self.repeated_samples = 0  # with --sampling epochs: places of unreadable samples, filled by another image


def _worker_id() -> int:
    info = get_worker_info()
    return info.id if info is not None else 0


def _seed(seed: int, rank: int, start_step: int, *more) -> int:
    return make_seed(seed, rank, _worker_id(), start_step, *more)


def tar_samples(fileobj, url: str, groups: bool = False, image_keys: tuple[str, ...] | None = None) -> Iterator[dict | raw.Group]:
    """The samples of one tar stream, grouped by key ({"__key__", "__url__", "jpg", ...}); a
    grouped member (raw pixels, or JPEGs packed with --group-size) is handed out as its images
    ({"__key__", "__url__", "pixels" or "jpg"}), one sample each, or with `groups` as one
    raw.Group (the epoch reader takes its images a batch at a time). `image_keys` (an indexed
    manifest's): only the samples holding one of them, as `shards index` counted them, with that
    field as their only image."""
    for sample in tar.samples(fileobj, url):
        if image_keys is not None:
            if (found := next((key for key in image_keys if key in sample), None)) is None:
                continue
            for other in IMAGE_KEYS:
                if other != found:
                    sample.pop(other, None)
            yield sample
        elif RAW_PIXELS in sample or JPEG_GROUP in sample:
            group = raw.read_group(sample)
            if groups:
                yield group
            else:
                yield from group.images()
        else:
            yield sample


def read_shard(url: str, counters: Counters, retries: int, groups: bool = False,
               image_keys: tuple[str, ...] | None = None) -> Iterator[dict | raw.Group]:
    """One shard's samples (tar_samples; with `groups`, raw groups whole). A failure to open, or
    an S3 read that fails mid-shard (s3.py has already resumed the body a few times), is retried
    with backoff, `retries` times, going on after the samples already yielded, in the version of
    the object first opened (its ETag): a shard replaced meanwhile ends the read with
    s3.ObjectChanged, never a splice of two versions. A broken tar is not retried (reading it
    again gives the same). Its return value (what `yield from` gives): (images read, opened at
    all, the last error)."""
    count, opened, error, etag = 0, False, None, None
    retries_before = s3.retry_count() - counters.s3_retries  # the counter is cumulative over shards
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(min(0.2 * 2**(attempt - 1), 5.0))
            s3.count_retry()
        try:
            stream = s3.open_read(url, etag=etag) if etag else gopen(url)  # an ETag: an s3:// shard opened before
        except s3.ObjectChanged as e:
            error = e
            break
        except Exception as e:  # noqa: BLE001 - any failure to open is the shard's, counted
            error = e
            continue
        opened, skip, error, etag = True, count, None, s3.etag_of(stream)
        try:
            for sample in tar_samples(stream, url, groups, image_keys):
                size = len(sample) if isinstance(sample, raw.Group) else 1  # a group is read whole or not at all
                if skip:
                    skip -= size
                    continue
                count += size
                counters.s3_retries = s3.retry_count() - retries_before
                yield sample
        except Exception as e:  # noqa: BLE001 - a truncated or broken tar, or S3 failing mid-shard
            error = e
        finally:
            stream.close()
        counters.s3_retries = s3.retry_count() - retries_before
        if not isinstance(error, s3.StorageError) or isinstance(error, s3.ObjectChanged):
            break
    counters.s3_retries = s3.retry_count() - retries_before
    return count, opened, error


def read_shards(shards: Iterator[dict], counters: Counters, expected: dict[str, int], retries: int,
                groups: bool = False, image_keys: tuple[str, ...] | None = None) -> Iterator[dict | raw.Group]:
    """Samples ({"__key__", "jpg"/"png"...}; raw groups whole with `groups`; with `image_keys`,
    those holding one) of each shard; failures are counted and skipped."""
    s3.register()  # in this process (DataLoader workers may be fresh interpreters)
    failures_in_a_row = 0
    for shard in shards:
        url = shard["url"]
        count, opened, error = yield from read_shard(url, counters, retries, groups, image_keys)
        if not opened or count < expected.get(url, 0):
            counters.bad_shards += 1
            reason = f"read {count} of {expected.get(url, '?')} samples" if opened else "could not open"
            detail = error if not opened or count == 0 or isinstance(error, s3.StorageError) else "truncated"
            log.warning("skipping bad shard %s (%s: %s)", redact(url), reason, detail)
            failures_in_a_row += 1
            if failures_in_a_row > max(10, 2 * len(expected)):
                last = error if isinstance(error, s3.StorageError) else f"{redact(url)}: {error}"  # a StorageError names the URL
                raise DataError(f"{failures_in_a_row} shard reads in a row failed; last: {last}")
        else:
            failures_in_a_row = 0


def shuffle_samples(samples: Iterator[dict], bufsize: int, seed: int, rank: int, start_step: int) -> Iterator[dict]:
    if bufsize <= 1:
        yield from samples
        return
    rng = random.Random(_seed(seed, rank, start_step, SAMPLE_SHUFFLE))
    yield from wds.shuffle(bufsize, initial=bufsize, rng=rng)(samples)


def decode_sample(sample: dict, counters: Counters, image_size: int, resize: bool = False) -> torch.Tensor | None:
    """The sample's uint8 image (`resize`: of any size, centre-cropped and resized to image_size
    as `shards pack` does); None (counted and logged) when it is corrupt or has none."""
    key = image_key(sample)
    try:
        if key is None:
            raise KeyError(f"no image ({'/'.join(IMAGE_KEYS)}) among {sorted(sample)}")
        image = decode_resized(sample[key], image_size) if resize else decode_pixels(sample[key], image_size)
    except Exception as e:  # noqa: BLE001 - a corrupt image or a missing key
        counters.corrupt_samples += 1
        log.warning("skipping sample %s of %s: %s", sample.get("__key__"), redact(sample.get("__url__", "?")), e)
        return None
    counters.samples += 1
    return image


def decode_batch(samples: list[dict | None], counters: Counters, image_size: int, resize: bool = False) -> list[torch.Tensor | None]:
    """decode_sample() of each sample (None stays None), the JPEGs first tried all in one call
    (`resize`: one by one, through PIL as the packer decodes them)."""
    images = [None] * len(samples) if resize else decode_jpegs(samples, image_size)
    counters.samples += sum(image is not None for image in images)
    return [image if image is not None or sample is None else decode_sample(sample, counters, image_size, resize)
            for sample, image in zip(samples, images)]


def encoded_jpeg(sample: dict, counters: Counters) -> torch.Tensor | None:
    """--decode gpu: the sample's JPEG as a uint8 tensor of its bytes, for the training process to
    decode on its GPU; None (counted and logged) when it holds no JPEG."""
    key = image_key(sample)
    if key not in JPEG_KEYS:
        counters.corrupt_samples += 1
        log.warning("skipping sample %s of %s: no JPEG (%s) among %s", sample.get("__key__"),
                    redact(sample.get("__url__", "?")), "/".join(JPEG_KEYS), sorted(sample))
        return None
    counters.samples += 1
    return as_tensor(sample[key])


def encoded_samples(samples: Iterator[dict], counters: Counters) -> Iterator[torch.Tensor]:
    for sample in samples:
        if (jpeg := encoded_jpeg(sample, counters)) is not None:
            yield jpeg


def decode_samples(samples: Iterator[dict], counters: Counters, image_size: int, resize: bool = False) -> Iterator[torch.Tensor]:
    """uint8 3 x H x W images; corrupt ones and samples without an image skipped and counted."""
    corrupt_in_a_row = 0
    for sample in samples:
        image = decode_sample(sample, counters, image_size, resize)
        if image is None:
            corrupt_in_a_row += 1
            if corrupt_in_a_row >= MAX_CORRUPT_IN_A_ROW:
                raise DataError(f"{corrupt_in_a_row} corrupt images in a row; last: sample {sample.get('__key__')} of "
                                f"{redact(sample.get('__url__', '?'))} (its error is in the log)")
            continue
        corrupt_in_a_row = 0
        yield image


def with_counts(batches: Iterator[torch.Tensor], counters: Counters) -> Iterator[tuple[torch.Tensor, tuple[int, ...]]]:
    """Each batch travels with its worker's cumulative counters (workers are other processes)."""
    for images in batches:
        yield images, counts_row(counters)


def counts_row(counters: Counters) -> tuple[int, ...]:
    """(worker id, *counts): plain ints, pickled with the batch (a tensor would cost a shared-memory segment per batch)."""
    return (_worker_id(), *(getattr(counters, name) for name in COUNT_NAMES))


def pipeline(manifest: Manifest, per_rank_batch: int, rank: int, seed: int, start_step: int,
             shuffle_buffer: int, shard_retries: int, batches_per_epoch: int, decode: str = "cpu") -> wds.DataPipeline:
    counters = Counters()
    decoded = partial(decode_samples, counters=counters, image_size=manifest.image_size, resize=manifest.original_size) if decode == "cpu" else \
        partial(encoded_samples, counters=counters)
    return wds.DataPipeline(
        wds.ResampledShards(manifest.shard_urls, seed=seed, deterministic=True,
                            worker_seed=partial(_seed, seed, rank, start_step)),
        partial(read_shards, counters=counters, expected=manifest.expected_samples(), retries=shard_retries,
                image_keys=manifest.image_keys),
        partial(shuffle_samples, bufsize=shuffle_buffer, seed=seed, rank=rank, start_step=start_step),
        decoded,
        wds.batched(per_rank_batch, collation_fn=stack_images if decode == "cpu" else list, partial=False),
        partial(with_counts, counters=counters),
    ).with_epoch(batches_per_epoch)


def read_once(manifest: Manifest, batch_size: int, loader_workers: int = 0, shard_retries: int = 3) -> Iterator[torch.Tensor]:
    """Every image of the manifest once, shards in manifest order (split among `loader_workers`
    DataLoader processes, 0 = this process), in batches of up to `batch_size`: a pass over the
    whole set that holds one batch per worker in memory. Bad shards and corrupt images are
    skipped and counted as in training."""
    counters = Counters()
    once = wds.DataPipeline(
        wds.SimpleShardList(manifest.shard_urls), wds.split_by_worker,
        partial(read_shards, counters=counters, expected=manifest.expected_samples(), retries=shard_retries,
                image_keys=manifest.image_keys),
        partial(decode_samples, counters=counters, image_size=manifest.image_size, resize=manifest.original_size),
        wds.batched(batch_size, collation_fn=torch.stack, partial=True),
    )
    yield from DataLoader(once, batch_size=None, num_workers=loader_workers, prefetch_factor=2 if loader_workers > 0 else None)


class ShardBatches:
    """Endless batches for one rank (its share of `global_batch`: split.rank_batches), the counts
    of what was skipped on the way, and where in the epochs the rank is. `epochs`: an
    epochs.EpochBatches to load (--sampling epochs); without it, the resampled pipeline above.
    Batches come out on `device`, as floats in [-1, 1]; `decode="gpu"`: the loader processes
    hand over each batch's JPEGs encoded, decoded here."""

    def __init__(self, manifest: Manifest, global_batch: int, rank: int, world_size: int, seed: int,
                 start_step: int = 0, loader_workers: int = 2, shuffle_buffer: int = 1000, shard_retries: int = 3,
                 pin_memory: bool = False, epochs=None, device: str | torch.device = "cpu", decode: str = "cpu",
                 prefetch_batches: int = 8):
        steps_per_epoch = max(1, split.steps_per_epoch(manifest.num_samples, global_batch))
        self.batch_size = split.rank_batches(global_batch, world_size)[rank]
        if epochs is None:
            dataset = pipeline(manifest, self.batch_size, rank, seed, start_step, shuffle_buffer, shard_retries,
                               batches_per_epoch=math.ceil(steps_per_epoch / max(loader_workers, 1)), decode=decode)
            self.position = Position(*divmod(start_step, steps_per_epoch), steps_per_epoch)
            self.segments = (split.Segment(0, world_size, max(loader_workers, 1)),)
        else:  # one endless pass: worker w gives this rank's batches w, w+L, ... across epochs
            dataset, self.position, self.segments = epochs, Position(epochs.start_epoch, epochs.start_step, steps_per_epoch), epochs.segments
        self.start_epoch = self.position.epoch
        # The DataLoader sends a loader process a request per batch it takes: with only 2 requests
        # out, the process waited for the next one a third to half of the time (raw shards, one
        # process; 8 gave 1.3-1.8x the rate of 2 in alternating runs, see benchmarks/RESULTS.md).
        # Loader processes put decoded batches into shared memory allocated once (handover.py);
        # encoded JPEGs (--decode gpu) are lists of any length and travel as tensors do.
        self.ring = BatchRing(loader_workers, prefetch_batches + 1, self.batch_size, manifest.image_size) \
            if loader_workers > 0 and decode == "cpu" else None
        # persistent workers keep each pipeline's counters and shard RNG epoch across epochs.
        # Its own generator: each DataLoader iterator draws its workers' base seed, and without one
        # it draws from the global RNG the loop has just restored, shifting every latent of a
        # resumed run against the uninterrupted one (the reading order has seeds of its own).
        self.loader = DataLoader(HandedOver(dataset, self.ring) if self.ring else dataset, batch_size=None,
                                 num_workers=loader_workers, persistent_workers=loader_workers > 0,
                                 pin_memory=pin_memory and self.ring is None,
                                 prefetch_factor=prefetch_batches if loader_workers > 0 else None,
                                 generator=torch.Generator().manual_seed(_seed(seed, rank, start_step, LOADER_SEEDS)))
        self.steps_per_epoch = steps_per_epoch
        self._state = ("resampled" if epochs is None else "epochs", global_batch)
        self.keys: list[str] = []  # the sample keys of the last batch (--sampling epochs)
        self.device = device  # where uint8 batches become [-1, 1] floats: 4x fewer bytes to copy there
        self.decode, self.image_size, self.resize = decode, manifest.image_size, manifest.original_size
        self._found_corrupt_here = 0  # --decode gpu: JPEGs that failed on the device, their places filled
        self._batches = iter(self.loader)
        self._counts: dict[int, tuple[int, ...]] = {}

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        for _ in range(2):
            try:
                images, counts, *keys = next(self._batches)
                break
            except StopIteration:  # a nominal epoch ended; the stream goes on
                self._batches = iter(self.loader)
        else:
            raise DataError("the shard stream gave no batch in a whole epoch")
        self._counts[int(counts[0])] = tuple(int(count) for count in counts[1:])  # each loader worker's running totals
        self.keys = keys[0].split("\n") if keys else []
        self.position = self.position.next()
        if self.ring is not None:  # a ticket for a batch in shared memory
            return self.ring.take(images, self.device)
        if self.decode == "gpu":  # a list of encoded JPEGs
            images, corrupt = decode_on_device(images, self.image_size, self.device, self.resize)
            self._found_corrupt_here += corrupt
        return to_unit_range(images.to(self.device, non_blocking=True))

    def counts(self) -> dict[str, int]:
        """{"corrupt_samples", "bad_shards", "samples", "s3_retries", "repeated_samples"}: this rank's totals so far."""
        totals = [sum(column) for column in zip(*self._counts.values())] or [0] * len(COUNT_NAMES)
        counts = dict(zip(COUNT_NAMES, totals))
        for name, change in (("corrupt_samples", 1), ("repeated_samples", 1), ("samples", -1)):
            counts[name] += change * self._found_corrupt_here
        return counts

    def data_position(self) -> dict:
        """The checkpoint's entry: Position.state() of the next batch."""
        return self.position.state(*self._state, split.segments_in(self.position.epoch, self.start_epoch, self.segments))


def check_corrupt_share(corrupt_samples: float, samples: float, max_corrupt_fraction: float) -> None:
    """Raise DataError when corrupt images are more than the allowed share of those read."""
    seen = corrupt_samples + samples
    if seen and corrupt_samples / seen > max_corrupt_fraction:
        raise DataError(
            f"{int(corrupt_samples)} of {int(seen)} images read were corrupt ({corrupt_samples / seen:.1%}), "
            f"more than --max-corrupt-fraction {max_corrupt_fraction}; fix the shards or raise the limit"
        )
