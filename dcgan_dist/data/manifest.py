"""The manifest that describes a set of WebDataset shards (written by the packer, read by the
stream and the preflight).

    {"format": "dcgan-dist-shards/1", "tool_version": "0.1.0", "source": "lsun",
     "image_size": 64, "image_format": "jpeg", "num_samples": 3033042,
     "shards": [{"url": "shard-000000.tar", "num_samples": 2048, "bytes": 4190208, "sha256": "..."}, ...]}

Shard URLs are relative to the manifest's folder/prefix (absolute paths and URLs also work),
so a packed folder can be synced to a bucket as it is.

A manifest written by `shards index` (shards someone else wrote, images at their original size)
says so: `"original_size": true`, `"image_size": 0`, `"image_format": "original"`, the fields
that count as an image (`"image_keys": ["jpg", ...]`; a sample with none of them is passed over
by the index and the reader alike) and a `"report"` (unreadable shards, samples without an
image). Training reads it at its --image-size (Manifest.at_size), each image centre-cropped and
resized as the packer does (resize.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

from dcgan_dist.data import s3
from dcgan_dist.util import redact

FORMAT = "dcgan-dist-shards/1"
# image_format "raw" (see pack.py): a tar member holds a group of images, KEY.u8.npy (N x 3 x H x W
# uint8) beside KEY.keys.npy (their N keys); counts, the plan and keys are per image, never per member
RAW_PIXELS, RAW_KEYS = "u8.npy", "keys.npy"
# image_format "jpeg" packed with --group-size N > 1: KEY.jpgs (N JPEG files one after another),
# KEY.sizes.npy (their N byte lengths, int64) and KEY.keys.npy; with N = 1 (the default) one
# KEY.jpg per sample, as WebDataset writes them
JPEG_GROUP, JPEG_SIZES = "jpgs", "sizes.npy"
INDEXABLE_KEYS = ("jpg", "jpeg", "png", "webp")  # the image fields `shards index` may count (the decoders' own)
ORIGINAL = "original"  # image_format of an indexed manifest


class ManifestError(ValueError):
    """A manifest that cannot be used; `field` is the manifest field at fault (or "")."""

    def __init__(self, url: str, message: str, field: str = ""):
        super().__init__(f"manifest {redact(url)}: {message}")
        self.field = field


@dataclass
class Manifest:
    url: str
    source: str
    image_size: int
    image_format: str
    shards: list[dict]
    image_keys: tuple[str, ...] | None = None  # an indexed manifest's image fields (None: a packed one, every sample an image)
    original_size: bool = False  # images at their original size (`shards index`), resized when read

    def at_size(self, image_size: int) -> Manifest:
        """An indexed manifest read at a training size: every image centre-cropped and resized to it."""
        return replace(self, image_size=image_size)

    @property
    def num_samples(self) -> int:
        return sum(shard["num_samples"] for shard in self.shards)

    @property
    def shard_urls(self) -> list[str]:
        """Absolute shard URLs (relative ones resolved against the manifest's location)."""
        return [s3.join(s3.parent(self.url), shard["url"]) for shard in self.shards]

    def expected_samples(self) -> dict[str, int]:
        return dict(zip(self.shard_urls, (shard["num_samples"] for shard in self.shards)))


def is_manifest_url(data: str) -> bool:
    return data.endswith(".json")


def read(url: str, fast: bool = False) -> Manifest:
    """Fetch and check a manifest. Raises s3.StorageError (missing, unreachable, access denied)
    or ManifestError (content), both naming the URL."""
    raw = s3.read_bytes(url, fast=fast)
    try:
        doc = json.loads(raw)
    except ValueError as e:
        raise ManifestError(url, f"not valid JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ManifestError(url, f"field 'format' must be {FORMAT!r}", "format")
    for field, kind in (("source", str), ("image_size", int), ("image_format", str), ("shards", list)):
        if not isinstance(doc.get(field), kind):
            raise ManifestError(url, f"field {field!r} is missing or not a {kind.__name__}", field)
    if not doc["shards"]:
        raise ManifestError(url, "field 'shards' is empty", "shards")
    for i, shard in enumerate(doc["shards"]):
        if not (isinstance(shard, dict) and isinstance(shard.get("url"), str)
                and isinstance(shard.get("num_samples"), int) and shard["num_samples"] >= 0):
            raise ManifestError(url, f"shards[{i}] needs a 'url' and a 'num_samples' >= 0", "shards")
    image_keys = doc.get("image_keys")
    if doc.get("original_size") is True and not (isinstance(image_keys, list) and image_keys and set(image_keys) <= set(INDEXABLE_KEYS)):
        raise ManifestError(url, f"field 'image_keys' must list some of {', '.join(INDEXABLE_KEYS)}", "image_keys")
    return Manifest(url, doc["source"], doc["image_size"], doc["image_format"], doc["shards"],
                    tuple(image_keys) if doc.get("original_size") is True else None, doc.get("original_size") is True)


def write(url: str, manifest: Manifest, tool_version: str, report: dict | None = None) -> None:
    doc = {"format": FORMAT, "tool_version": tool_version, "source": manifest.source,
           "image_size": manifest.image_size, "image_format": manifest.image_format,
           "num_samples": manifest.num_samples, "shards": manifest.shards}
    if manifest.original_size:
        doc = {**doc, "original_size": True, "image_keys": list(manifest.image_keys), "report": report or {}}
    s3.write_bytes(url, json.dumps(doc, indent=1).encode())
