"""Near-duplicate removal as the paper did it for LSUN (section 4.1.1): a 3072-128-3072 de-noising,
dropout-regularised ReLU autoencoder on 32x32 downsampled centre crops (a packed manifest's images
are centre crops already), its 128 code activations thresholded to bits; images whose bits are
equal collide in a hash and are near-duplicates. The first of each group (in manifest order) stays.

Three passes over the shards, none holding the data set: (1) up to `train_samples` thumbnails
(uint8, 3 KiB each) from shards in a seeded order train the autoencoder; (2) every image is coded
(16 bytes each); (3) the kept samples are copied, bytes unchanged, into new shards + manifest.json,
an ordinary manifest the training reader takes as it is. `dedup-report.json` lists the groups.
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from torch import nn
from torch.nn import functional as F

from dcgan_dist.data import decode, manifest, s3, stream
from dcgan_dist.data.pack import TOOL_VERSION, new_shard_file, place_shard, shard_name

SIDE, CODE_BITS = 32, 128
INPUT = 3 * SIDE * SIDE
REPORT_NAME = "dedup-report.json"


@dataclass(frozen=True)
class DedupSettings:
    epochs: int = 10
    train_samples: int = 100_000  # thumbnails the autoencoder learns from (300 MiB at 100k)
    threshold: float = 2.0  # a code unit's bit is 1 where its activation is above this x its mean on the training set
    noise: float = 0.2  # the de-noising: Gaussian noise on the (mean-centred, 0..1) input
    input_dropout: float = 0.2
    code_dropout: float = 0.5
    batch_size: int = 256
    learning_rate: float = 1e-3
    seed: int = 0
    shard_size: int = 0  # samples per written shard; 0: the input's largest shard


class Autoencoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder, self.decoder = nn.Linear(INPUT, CODE_BITS), nn.Linear(CODE_BITS, INPUT)
        self.register_buffer("mean", torch.zeros(INPUT))
        self.register_buffer("unit_mean", torch.ones(CODE_BITS))  # each code unit's mean activation

    def code(self, pixels: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.encoder(pixels - self.mean))

    def corrupted_loss(self, pixels: torch.Tensor, settings: DedupSettings) -> torch.Tensor:
        target = pixels - self.mean
        noisy = F.dropout(target + settings.noise * torch.randn_like(target), settings.input_dropout)
        code = F.dropout(torch.relu(self.encoder(noisy)), settings.code_dropout)
        return F.mse_loss(self.decoder(code), target)


def samples(shards: manifest.Manifest, order: list[int] | None = None) -> Iterator[dict]:
    """Every sample ({"__key__", "jpg"/...}) of the shards, in manifest order (or `order`)."""
    urls, counters = shards.shard_urls, stream.Counters()
    wanted = [{"url": urls[index]} for index in (order if order is not None else range(len(urls)))]
    yield from stream.read_shards(iter(wanted), counters, shards.expected_samples(), retries=3)
    if counters.bad_shards:
        raise ValueError(f"{counters.bad_shards} shard(s) of {shards.url} unreadable or short; check with `shards inspect`")


def thumbnail(sample: dict, image_size: int) -> torch.Tensor | None:
    """The sample's image at 32x32, flattened, 0..1; None when it does not decode."""
    key = decode.image_key(sample)
    try:
        image = (decode.decode(sample[key], image_size) + 1) / 2
    except Exception:  # noqa: BLE001 - a corrupt image is kept and counted, never grouped
        return None
    if image_size != SIDE:
        image = F.interpolate(image[None], size=(SIDE, SIDE), mode="bilinear", antialias=True)[0]
    return image.reshape(INPUT)


def training_set(shards: manifest.Manifest, settings: DedupSettings) -> torch.Tensor:
    """Up to `train_samples` thumbnails as uint8, from the shards in a seeded order."""
    order = list(range(len(shards.shards)))
    random.Random(settings.seed).shuffle(order)
    rows = []
    for sample in samples(shards, order):
        pixels = thumbnail(sample, shards.image_size)
        if pixels is not None:
            rows.append(pixels.mul(255).add_(0.5).to(torch.uint8))  # rounded (Tensor.round is slow here)
        if len(rows) >= settings.train_samples:
            break
    if len(rows) < 2:
        raise ValueError(f"{shards.url}: fewer than 2 readable images to learn the hash from")
    return torch.stack(rows)


def train(thumbnails: torch.Tensor, settings: DedupSettings) -> Autoencoder:
    generator = torch.Generator().manual_seed(settings.seed)
    torch.manual_seed(settings.seed)  # the dropout and noise masks
    model = Autoencoder()
    model.mean.copy_(thumbnails.float().mean(0) / 255)
    optimiser = torch.optim.Adam(model.parameters(), lr=settings.learning_rate)
    for _ in range(settings.epochs):
        for batch in torch.randperm(len(thumbnails), generator=generator).split(settings.batch_size):
            loss = model.corrupted_loss(thumbnails[batch].float() / 255, settings)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
    model.eval()
    with torch.no_grad():  # the bits' scale: each unit's mean activation, so they do not depend on training length
        model.unit_mean.copy_(torch.cat([model.code(batch.float() / 255) for batch in thumbnails.split(4096)]).mean(0))
    return model


def hash_codes(model: Autoencoder, shards: manifest.Manifest, settings: DedupSettings) -> tuple[np.ndarray, np.ndarray]:
    """(N x 16 packed code bits, N bools: readable) for every sample, in manifest order."""
    codes, readable, batch = [], [], []

    def flush() -> None:
        with torch.no_grad():
            bits = (model.code(torch.stack(batch)) > settings.threshold * model.unit_mean).numpy()
        codes.append(np.packbits(bits, axis=1))
        batch.clear()

    for sample in samples(shards):
        pixels = thumbnail(sample, shards.image_size)
        readable.append(pixels is not None)
        batch.append(pixels if pixels is not None else torch.zeros(INPUT))
        if len(batch) == settings.batch_size:
            flush()
    if batch:
        flush()
    return np.concatenate(codes), np.array(readable)


def duplicate_groups(codes: np.ndarray, readable: np.ndarray) -> list[np.ndarray]:
    """Indices of the samples sharing a hash, for each hash held by two or more readable samples;
    each group in sample order (its first is the one kept)."""
    index = np.nonzero(readable)[0]
    _, group_of, counts = np.unique(codes[index], axis=0, return_inverse=True, return_counts=True)
    group_of = group_of.ravel()
    order = np.argsort(group_of, kind="stable")  # by group, each in sample order
    bounds = np.cumsum(counts)[:-1]
    return [index[members] for members in np.split(order, bounds) if len(members) > 1]


def write_kept(shards: manifest.Manifest, removed: set[int], named: set[int], out: str,
               shard_size: int) -> tuple[list[dict], dict[int, str]]:
    """Copy every sample not in `removed` (bytes unchanged) into new shards under `out`; returns
    their records and the keys of the samples in `named`."""
    records, keys, sink, tmp = [], {}, None, None
    try:
        for index, sample in enumerate(samples(shards)):
            if index in named:
                keys[index] = sample["__key__"]
            if index in removed:
                continue
            if sink is None or records[-1]["num_samples"] == shard_size:
                if sink is not None:
                    sink.close()
                    records[-1] |= place_shard(tmp, s3.join(out, records[-1]["url"]))
                tmp = new_shard_file(out)
                sink, records = wds.TarWriter(tmp), records + [{"url": shard_name(len(records)), "num_samples": 0}]
            sink.write({key: value for key, value in sample.items() if key == "__key__" or not key.startswith("__")})
            records[-1]["num_samples"] += 1
        if sink is not None:
            sink.close()
            records[-1] |= place_shard(tmp, s3.join(out, records[-1]["url"]))
    finally:
        if tmp and Path(tmp).exists():
            Path(tmp).unlink()
    return records, keys


def dedup(url: str, out: str, settings: DedupSettings = DedupSettings()) -> dict:
    """De-duplicate the manifest at `url` into shards + manifest.json + dedup-report.json under `out`."""
    shards = manifest.read(url)
    if shards.image_format == "raw":  # the kept samples are copied as they are, one tar member each
        raise ValueError(f"{url}: shards dedup copies JPEG or PNG shards; this manifest holds raw pixel groups "
                         "(de-duplicate the JPEG or PNG shards, then pack raw ones from the source)")
    if not s3.is_s3(out):
        out = str(Path(out).resolve())
        Path(out).mkdir(parents=True, exist_ok=True)
    model = train(training_set(shards, settings), settings)
    codes, readable = hash_codes(model, shards, settings)
    groups = duplicate_groups(codes, readable)
    removed = {int(i) for group in groups for i in group[1:]}
    shard_size = settings.shard_size or max(shard["num_samples"] for shard in shards.shards)
    records, keys = write_kept(shards, removed, {int(i) for group in groups for i in group}, out, shard_size)
    out_url = s3.join(out, "manifest.json")
    manifest.write(out_url, manifest.Manifest(out_url, shards.source, shards.image_size, shards.image_format, records),
                   TOOL_VERSION)
    report = {"manifest": out_url, "input": url, "samples": len(codes), "kept": len(codes) - len(removed),
              "removed": len(removed), "unreadable": int((~readable).sum()),
              "bits_set": round(float(np.unpackbits(codes, axis=1).mean()), 4), "settings": asdict(settings),
              "groups": [[keys[int(i)] for i in group] for group in groups]}
    s3.write_bytes(s3.join(out, REPORT_NAME), json.dumps(report, indent=1).encode())
    return report


# ---------------------------------------------------------------- measuring the hash on planted copies

COPY_KINDS = ("shift", "jpeg", "noise")


def near_copies(pixels: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray | bytes]:
    """Three near-duplicates of an H x W x 3 uint8 image: shifted by one pixel (left or right),
    re-encoded as JPEG of quality 70, and with Gaussian noise of sigma 8/255 (encoded at 95)."""
    noisy = np.clip(pixels + rng.normal(0, 8, pixels.shape), 0, 255).astype(np.uint8)
    return {"shift": _jpeg(np.roll(pixels, int(rng.choice([-1, 1])), axis=1), 95), "jpeg": _jpeg(pixels, 70),
            "noise": _jpeg(noisy, 95)}


def _jpeg(pixels: np.ndarray, quality: int) -> bytes:
    from PIL import Image  # only the planted copies need PIL here

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def planted_digits(out: str, originals: int = 100, seed: int = 0, shard_size: int = 500) -> tuple[str, dict[str, str]]:
    """The bundled digits at 32 px (packed as `shards pack` does) with three near copies of each of
    `originals` of them, all shuffled into shards under `out`; returns the manifest URL and the
    truth: {key: its original's key} for every original with copies and every copy."""
    from dcgan_dist.data import pack
    from dcgan_dist.data.sources import open_source

    source, rng = open_source("digits", None), np.random.default_rng(seed)
    with source.reader() as load:
        images = [pack.encode(pack.preprocess(load(item), SIDE), "jpeg") for item in source.items]
    entries = [(f"{i:06d}", data, f"{i:06d}") for i, data in enumerate(images)]
    for i in rng.choice(len(images), originals, replace=False):
        pixels = decode.decode_pixels(images[i], SIDE).permute(1, 2, 0).numpy()
        entries += [(f"{i:06d}-{kind}", data, f"{i:06d}") for kind, data in near_copies(pixels, rng).items()]
    rng.shuffle(entries)
    truth = {key: original for key, _, original in entries if key != original}
    truth |= {original: original for original in set(truth.values())}
    Path(out).mkdir(parents=True, exist_ok=True)
    records = []
    for first in range(0, len(entries), shard_size):
        with wds.TarWriter(str(Path(out) / shard_name(len(records)))) as sink:
            for key, data, _ in entries[first:first + shard_size]:
                sink.write({"__key__": key, "jpg": data})
        records.append({"url": shard_name(len(records)), "num_samples": len(entries[first:first + shard_size])})
    url = str(Path(out) / "manifest.json")
    manifest.write(url, manifest.Manifest(url, "digits-planted", SIDE, "jpeg", records), TOOL_VERSION)
    return url, truth


def kind_recalls(groups: list[list[str]], truth: dict[str, str]) -> dict[str, float]:
    """The recall of each kind of planted copy: of the pairs (original, its copy of that kind)."""
    return {kind: pair_scores(groups, {key: original for key, original in truth.items() if key == original or key.endswith(f"-{kind}")})["recall"]
            for kind in COPY_KINDS}


def pair_scores(groups: list[list[str]], truth: dict[str, str]) -> dict[str, float]:
    """Precision and recall over pairs: a pair in a found group is right when `truth` gives both
    keys the same original (a key not in `truth` is its own); recall counts the true pairs found."""
    found = right = 0
    for group in groups:
        labels = [truth.get(key, key) for key in group]
        found += len(group) * (len(group) - 1) // 2
        right += sum(labels[i] == labels[j] for i in range(len(labels)) for j in range(i + 1, len(labels)))
    sizes: dict[str, int] = {}
    for key in truth:
        sizes[truth[key]] = sizes.get(truth[key], 0) + 1
    true_pairs = sum(n * (n - 1) // 2 for n in sizes.values())
    return {"precision": right / found if found else 1.0, "recall": right / true_pairs if true_pairs else 1.0,
            "pairs_found": found, "true_pairs": true_pairs}
