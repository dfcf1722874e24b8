"""The shard packer: images from a source -> centre-crop -> resize -> JPEG/PNG (one image per tar
member, as WebDataset writes them) or raw pixels (`raw`: groups of `group_size` images per member;
JPEGs too with --group-size > 1) -> WebDataset tar shards of `shard_size` images + manifest.json,
on local disk or under an s3:// prefix.

A raw group is two members under the key of its first image: `KEY.u8.npy`, the uint8 pixels as
an N x 3 x H x W array (grey images made RGB), and `KEY.keys.npy`, the N image keys (a unicode
array); both are read with `numpy.load(allow_pickle=False)` and need no image decoder. A JPEG
group is `KEY.jpgs` (the N JPEG files back to back), `KEY.sizes.npy` (their lengths) and
`KEY.keys.npy`: a quarter of raw's bytes at 64 px, with raw's per-group reading (other WebDataset
tools read only one-image members). The reader (raw.py, via stream.tar_samples) hands a group out
as its N images, so every count (the manifest's `num_samples`, the epoch plan, `shards plan` and
`inspect`) is in images, whatever the format.

Shards are built by a pool of processes, each writing a whole shard to a local temporary file
and then moving it into place (a rename, or a multipart upload to S3), so a shard is either
complete or absent. `pack-state.json` beside the shards records each finished shard; running
the same command again skips them, and refuses to mix shards packed with other settings.
Images that cannot be read are skipped and counted in the report, never silently.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from dcgan_dist.choices import RAW_GROUP_SIZE
from dcgan_dist.data import manifest, s3
from dcgan_dist.data.resize import preprocess  # the one crop + resize, shared with the reader of indexed shards
from dcgan_dist.data.sources import Source, open_source

TOOL_VERSION = "0.1.0"
FORMATS = {"jpeg": ("jpg", {"quality": 95}), "png": ("png", {"compress_level": 6}), "raw": (manifest.RAW_PIXELS, {})}
GROUPED_FORMATS = ("raw", "jpeg")
STATE_NAME = "pack-state.json"


@dataclass(frozen=True)
class PackSettings:
    source: str
    image_size: int
    image_format: str
    shard_size: int
    num_items: int
    group_size: int = 1  # images per tar member (raw, or jpeg with --group-size)


def encode(image: Image.Image, image_format: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format.upper(), **FORMATS[image_format][1])
    return buffer.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def group_members(keys: list[str], images: list[np.ndarray] | list[bytes]) -> dict:
    """The tar members of one group: its N 3 x H x W uint8 images as one array (raw), or its N
    JPEG files back to back with their lengths; and their keys."""
    if isinstance(images[0], bytes):
        grouped = {manifest.JPEG_GROUP: b"".join(images), manifest.JPEG_SIZES: npy_bytes(np.array([len(data) for data in images], np.int64))}
    else:
        grouped = {manifest.RAW_PIXELS: npy_bytes(np.stack(images))}
    return {"__key__": keys[0], **grouped, manifest.RAW_KEYS: npy_bytes(np.array(keys))}


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


# The source and settings of the running pack; worker processes inherit them by fork.
_job: tuple[Source, PackSettings, str] | None = None


def write_shard(index: int) -> dict:
    """Build shard `index` and move it into place; returns its manifest record."""
    source, settings, out = _job
    first = index * settings.shard_size
    items = source.items[first:first + settings.shard_size]
    extension = FORMATS[settings.image_format][0]
    tmp = new_shard_file(out)
    written, skipped = 0, []
    group_keys, group_images = [], []  # with group_size > 1: pixels (raw) or JPEG bytes
    try:
        # An int mtime: a float one (TarWriter's default, time.time()) costs every member a pax header, which readers parse
        with source.reader() as load, wds.TarWriter(tmp, mtime=int(time.time())) as sink:
            for offset, item in enumerate(items):
                key = f"{first + offset:09d}"
                try:
                    with load(item) as image:
                        image = preprocess(image, settings.image_size)
                        if settings.image_format == "raw":
                            data, pixels = None, np.asarray(image.convert("RGB")).transpose(2, 0, 1)
                        else:
                            data = encode(image, settings.image_format)
                except Exception as e:  # noqa: BLE001 - an unreadable image is skipped and reported
                    skipped.append(f"{item!r}: {e}")
                    continue
                written += 1
                if data is not None and settings.group_size == 1:
                    sink.write({"__key__": key, extension: data})
                    continue
                group_keys.append(key)
                group_images.append(pixels if data is None else data)
                if len(group_keys) == settings.group_size:
                    sink.write(group_members(group_keys, group_images))
                    group_keys, group_images = [], []
            if group_keys:  # a shard's last group may be short
                sink.write(group_members(group_keys, group_images))
        placed = place_shard(tmp, s3.join(out, shard_name(index)))
    finally:
        if Path(tmp).exists():
            Path(tmp).unlink()
    return {"url": shard_name(index), "num_samples": written, **placed, "skipped": skipped}


def new_shard_file(out: str) -> str:
    """A temporary file for a shard being written: beside its place on local disk (a rename moves it)."""
    fd, tmp = tempfile.mkstemp(suffix=".tar", dir=None if s3.is_s3(out) else out)
    os.close(fd)
    os.chmod(tmp, 0o644)
    return tmp


def place_shard(tmp: str, url: str) -> dict:
    """Move a finished shard file to `url`; its manifest facts {"bytes", "sha256"}."""
    with open(tmp, "rb") as written_tar:  # hashed in chunks: a shard is never held in memory
        digest = hashlib.file_digest(written_tar, "sha256").hexdigest()
    size = Path(tmp).stat().st_size
    s3.upload_file(Path(tmp), url)
    return {"bytes": size, "sha256": digest}


def read_state(out: str, settings: PackSettings) -> dict[int, dict]:
    """Finished shards of an earlier, interrupted pack with the same settings."""
    state_url = s3.join(out, STATE_NAME)
    if not s3.exists(state_url):
        return {}
    state = json.loads(s3.read_bytes(state_url))
    if dict({"group_size": 1}, **state["settings"]) != asdict(settings):  # packs from before group_size had 1
        raise ValueError(f"{state_url}: {out} holds a pack with other settings {state['settings']}; "
                         "use another --out or delete it")
    return {int(index): record for index, record in state["shards"].items()
            if s3.exists(s3.join(out, record["url"]))}


def pack(source_name: str, source_path: str | None, out: str, image_size: int, image_format: str = "jpeg",
         shard_size: int = 1000, workers: int = 1, progress: bool = True, group_size: int | None = None) -> dict:
    """Pack a source into shards + manifest.json under `out`; returns a short report.
    `group_size`: images per tar member, raw (default RAW_GROUP_SIZE) or jpeg (default 1)."""
    global _job
    if group_size is not None and (group_size < 1 or (image_format not in GROUPED_FORMATS and group_size != 1)):
        raise ValueError(f"--group-size must be >= 1, and is for --format raw or jpeg only (got {group_size} with {image_format})")
    group_size = group_size or (RAW_GROUP_SIZE if image_format == "raw" else 1)
    source = open_source(source_name, source_path)
    if not s3.is_s3(out):
        out = str(Path(out).resolve())
        Path(out).mkdir(parents=True, exist_ok=True)
    settings = PackSettings(source_name, image_size, image_format, shard_size, len(source.items), group_size)
    num_shards = -(-len(source.items) // shard_size)
    done = read_state(out, settings)
    todo = [index for index in range(num_shards) if index not in done]
    state_url = s3.join(out, STATE_NAME)

    _job = (source, settings, out)
    bar = tqdm(total=num_shards, initial=len(done), unit="shard", disable=not progress, desc=f"pack {source_name}")
    pool = None
    try:
        if workers > 1 and len(todo) > 1:
            pool = multiprocessing.get_context("fork").Pool(min(workers, len(todo)))
            records = pool.imap_unordered(write_shard, todo)
        else:
            pool, records = None, map(write_shard, todo)
        for index, record in zip(todo, records) if pool is None else ((int(r["url"][6:12]), r) for r in records):
            done[index] = record
            s3.write_bytes(state_url, json.dumps({"settings": asdict(settings), "shards": done}).encode())
            bar.update()
        if pool is not None:
            pool.close()
            pool.join()
            pool = None
    finally:
        if pool is not None:  # a shard failed: stop the others; finished ones stay recorded
            pool.terminate()
        bar.close()
        _job = None

    shards = [{key: value for key, value in done[index].items() if key != "skipped"} for index in range(num_shards)]
    manifest.write(s3.join(out, "manifest.json"),
                   manifest.Manifest(s3.join(out, "manifest.json"), source_name, image_size, image_format, shards),
                   TOOL_VERSION)
    skipped = [line for index in range(num_shards) for line in done[index].get("skipped", [])]
    return {"manifest": s3.join(out, "manifest.json"), "shards": num_shards, "packed_now": len(todo),
            "samples": sum(shard["num_samples"] for shard in shards), "skipped": skipped}
