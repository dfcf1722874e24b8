"""Read every shard of a manifest back: counts, sizes, sha256 checks, and a preview grid."""

from __future__ import annotations

import hashlib
import io

import torch
from torchvision.utils import save_image

from dcgan_dist.data import manifest, s3
from dcgan_dist.data.decode import IMAGE_KEYS, decode
from dcgan_dist.data.stream import tar_samples


def inspect_manifest(url: str, preview_path: str | None = None, preview_count: int = 64) -> dict:
    shards = manifest.read(url)
    report = {"manifest": url, "source": shards.source, "image_size": shards.image_size,
              "image_format": shards.image_format, "shards": len(shards.shards),
              "samples_listed": shards.num_samples, "samples_read": 0, "bytes": 0, "problems": []}
    previews: list[torch.Tensor] = []
    for record, shard_url in zip(shards.shards, shards.shard_urls):
        try:
            raw = s3.read_bytes(shard_url)
        except s3.StorageError as e:
            report["problems"].append(str(e))
            continue
        report["bytes"] += len(raw)
        if record.get("sha256") and hashlib.sha256(raw).hexdigest() != record["sha256"]:
            report["problems"].append(f"{shard_url}: sha256 differs from the manifest")
        count = 0
        try:
            for sample in tar_samples(io.BytesIO(raw), shard_url):
                count += 1
                key = next((k for k in IMAGE_KEYS if k in sample), None)
                if key is None:
                    report["problems"].append(f"{shard_url}: sample {sample['__key__']} has no image")
                elif len(previews) < preview_count:
                    try:
                        previews.append(decode(sample[key], shards.image_size))
                    except Exception as e:  # noqa: BLE001
                        report["problems"].append(f"{shard_url}: sample {sample['__key__']}: {e}")
        except Exception as e:  # noqa: BLE001 - a truncated tar
            report["problems"].append(f"{shard_url}: unreadable after {count} samples ({e})")
        if count != record["num_samples"]:
            report["problems"].append(f"{shard_url}: {count} samples, manifest says {record['num_samples']}")
        report["samples_read"] += count
    if preview_path and previews:
        save_image(torch.stack(previews), preview_path, nrow=8, normalize=True, value_range=(-1, 1))
        report["preview"] = preview_path
    return report
