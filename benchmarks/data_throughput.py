"""Data pipeline throughput: JPEG decode per core (torchvision vs PIL), shard reading from
local disk vs a loopback S3 endpoint (moto's server on 127.0.0.1), and GAN training steps fed
from each. Prints one table.

    python benchmarks/data_throughput.py [--images 4000] [--image-size 64] [--steps 20]

The images are synthetic but photo-like (smooth colour fields plus grain, JPEG quality 95),
since no data set is downloaded; natural 64 px images decode at a similar rate.
"""

from __future__ import annotations

import os

os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # benchmarks send no telemetry (Ray, MLflow)
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"

import argparse
import io
import os
import tempfile
import time

import numpy as np
import torch
import webdataset as wds
from loopback_s3 import start_moto_server
from PIL import Image

from dcgan_dist.data import manifest, pack, s3, stream
from dcgan_dist.data.decode import decode
from dcgan_dist.models import build_models, sample_latent
from dcgan_dist.step import gan_step, make_optimizers


def synthetic_jpegs(count: int, image_size: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    images = []
    for _ in range(count):
        coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        field = np.asarray(Image.fromarray(coarse).resize((image_size, image_size), Image.Resampling.BICUBIC), dtype=np.int16)
        grain = rng.integers(-12, 13, field.shape, dtype=np.int16)
        images.append(pack.encode(Image.fromarray(np.clip(field + grain, 0, 255).astype(np.uint8)), "jpeg"))
    return images


def pil_decode(data: bytes) -> torch.Tensor:
    array = np.array(Image.open(io.BytesIO(data)).convert("RGB"))
    return torch.from_numpy(array).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def rate(fn, items, repeats: int = 3) -> float:
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        for item in items:
            fn(item)
        best = max(best, len(items) / (time.perf_counter() - start))
    return best


def write_shard_set(out: str, images: list[bytes], shard_size: int, image_size: int) -> str:
    records = []
    for index in range(0, len(images), shard_size):
        buffer = io.BytesIO()
        with wds.TarWriter(buffer) as sink:
            for i, data in enumerate(images[index:index + shard_size]):
                sink.write({"__key__": f"{index + i:09d}", "jpg": data})
        name = pack.shard_name(index // shard_size)
        s3.write_bytes(s3.join(out, name), buffer.getvalue())
        records.append({"url": name, "num_samples": len(images[index:index + shard_size])})
    url = s3.join(out, "manifest.json")
    manifest.write(url, manifest.Manifest(url, "synthetic", image_size, "jpeg", records), "bench")
    return url


def read_all(url: str, image_size: int) -> tuple[float, float]:
    """One pass over every shard, in order, in this process: (img/s, MB/s of shard bytes)."""
    shards = manifest.read(url)
    counters = stream.Counters()
    start = time.perf_counter()
    samples = stream.read_shards(({"url": u} for u in shards.shard_urls), counters, shards.expected_samples(), retries=0)
    count = sum(1 for _ in stream.decode_samples(samples, counters, image_size))
    elapsed = time.perf_counter() - start
    total_bytes = sum(len(s3.read_bytes(u)) for u in shards.shard_urls)
    assert count == shards.num_samples and counters.bad_shards == 0, counters.__dict__
    return count / elapsed, total_bytes / elapsed / 1e6


def train_rate(url: str, image_size: int, steps: int, batch: int) -> float:
    """GAN steps/s (pytorch-examples preset) fed by the shard stream with one loader process."""
    torch.manual_seed(0)
    generator, discriminator = build_models("pytorch-examples", image_size, "paper")
    opt_g, opt_d = make_optimizers(generator, discriminator, 2e-4, 0.5, 0.999)
    batches = stream.ShardBatches(manifest.read(url), batch, 0, 1, seed=0, loader_workers=1, shuffle_buffer=200)
    for _ in range(3):  # warm-up: loader start, first shard, allocator
        gan_step(generator, discriminator, opt_g, opt_d, next(batches), sample_latent(batch, "pytorch-examples"))
    start = time.perf_counter()
    for _ in range(steps):
        gan_step(generator, discriminator, opt_g, opt_d, next(batches), sample_latent(batch, "pytorch-examples"))
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False)
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--shard-size", type=int, default=500)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)  # per core

    images = synthetic_jpegs(args.images, args.image_size)
    rows = [("decode+scale, torchvision decode_image, 1 thread", f"{rate(lambda d: decode(d, args.image_size), images):,.0f} img/s/core"),
            ("decode+scale, PIL Image.open+convert, 1 thread", f"{rate(pil_decode, images):,.0f} img/s/core")]

    server, url = start_moto_server()  # its own process, as a real endpoint would be
    os.environ.update(AWS_ENDPOINT_URL=url, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    import boto3

    boto3.client("s3").create_bucket(Bucket="bench")
    try:
        with tempfile.TemporaryDirectory() as folder:
            local_url = write_shard_set(folder, images, args.shard_size, args.image_size)
            s3_url = write_shard_set("s3://bench/shards", images, args.shard_size, args.image_size)
            for name, url in (("local", local_url), ("loopback S3", s3_url)):
                best = max(read_all(url, args.image_size) for _ in range(3))
                rows.append((f"read+decode all shards, {name}, 1 process", f"{best[0]:,.0f} img/s ({best[1]:.1f} MB/s)"))
            torch.set_num_threads(max(1, (os.cpu_count() or 2) - 1))
            for name, url in (("local", local_url), ("loopback S3", s3_url)):
                rows.append((f"GAN steps fed from {name} shards ({args.image_size} px, batch {args.batch})",
                             f"{train_rate(url, args.image_size, args.steps, args.batch):.2f} steps/s"))
    finally:
        server.terminate()
        server.wait()

    width = max(len(name) for name, _ in rows)
    print(f"{'measurement':<{width}}  result")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main()
