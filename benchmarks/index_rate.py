"""`shards index` and the reader of indexed shards, on a loopback S3 endpoint (moto_server in its
own process on 127.0.0.1). Prints two tables.

    python benchmarks/index_rate.py [--shards 16] [--per-shard 200] [--seconds 20] [--image-size 64]

1. Indexing: shards in img2dataset's layout (webdataset.ShardWriter; a full-size JPEG, .json and
   .txt per sample), of ImageNet-sized photos (about 500 x 375) and of large ones (2000 x 1500):
   shards per second with `--workers` threads, bytes fetched and range GETs per shard against
   the shard's size.
2. Reading: training's reader (`shards bench`: one rank, --sampling epochs) on the indexed
   full-size JPEGs (decoded and resized by PIL in the loader process) beside a `shards pack`ed copy
   of the same images at --image-size (a JPEG of that size, decoded by torchvision), in img/s per
   loader process.

The photos are synthetic but photo-like (smooth colour fields plus grain, JPEG quality 90): no
data set is downloaded. Loopback S3 has no network latency: on a real endpoint a range GET costs
tens of ms, and the index rate depends on --workers more than here.
"""

from __future__ import annotations

import os

os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # benchmarks send no telemetry (Ray, MLflow)
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"

import argparse
import tempfile
import time
from pathlib import Path

import boto3
import numpy as np
import webdataset as wds
from loopback_s3 import start_moto_server
from PIL import Image

from dcgan_dist.data import index, pack, s3, throughput


def photo(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    field = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16)
    grain = rng.integers(-14, 15, field.shape, dtype=np.int16)
    return Image.fromarray(np.clip(field + grain, 0, 255).astype(np.uint8))


def write_shards(folder: Path, shards: int, per_shard: int, size: tuple[int, int], photos: Path | None) -> None:
    """img2dataset-layout shards of photos about `size` (+-10 percent); each also saved under `photos`."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    with wds.ShardWriter(str(folder / "%05d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i in range(shards * per_shard):
            width, height = (int(side * rng.uniform(0.9, 1.1)) for side in size)
            image, key = photo(width, height, rng), f"{i:09d}"
            path = (photos or folder) / f"{key}.jpg"
            image.save(path, quality=90)
            sink.write({"__key__": key, "jpg": path.read_bytes(), "txt": f"photo {i}", "json": {"width": width, "height": height}})
            if photos is None:
                path.unlink()


def upload(folder: Path, bucket: str, prefix: str) -> None:
    client = boto3.client("s3")
    for path in sorted(folder.glob("*.tar")):
        client.upload_file(str(path), bucket, f"{prefix}/{path.name}")


def index_row(name: str, bucket: str, prefix: str, shards: int, workers: int) -> str:
    pattern = f"s3://{bucket}/{prefix}/{{00000..{shards - 1:05d}}}.tar"
    start = time.perf_counter()
    report = index.index([pattern], f"s3://{bucket}/{prefix}/manifest.json", workers=workers, progress=False)
    seconds = time.perf_counter() - start
    per_shard = report["bytes"] / report["shards"]
    return (f"| {name} | {report['samples'] // report['shards']} | {per_shard / 2**20:.1f} MiB | {workers} | "
            f"{report['shards'] / seconds:.1f} | {report['bytes_read'] / report['shards'] / 2**20:.2f} MiB "
            f"({report['bytes_read'] / report['bytes']:.0%}) | {report['requests'] / report['shards']:.0f} |")


def reader_row(name: str, url: str, image_size: int, seconds: float, step_img_s: float) -> str:
    cfg = throughput.reader_config(url, 1, 64, "epochs", 1000, image_size)
    result = throughput.measure(cfg, seconds)
    per_cpu = result["images"] / result["loader_cpu_s"] if result.get("loader_cpu_s") else float("nan")
    return f"| {name} | {result['img_s']:,.0f} | {per_cpu:,.0f} | {throughput.processes_needed(step_img_s, result['img_s'])} |"


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--per-shard", type=int, default=200)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--step-img-s", type=float, default=20000, help="a GPU step's rate: loader processes it needs, as shards bench says")
    args = parser.parse_args()
    server, endpoint = start_moto_server()
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    bucket = "index-bench"
    try:
        boto3.client("s3").create_bucket(Bucket=bucket)
        with tempfile.TemporaryDirectory() as scratch:
            root = Path(scratch)
            (root / "photos").mkdir()
            write_shards(root / "imagenet", args.shards, args.per_shard, (500, 375), root / "photos")
            write_shards(root / "large", max(args.shards // 4, 1), 20, (2000, 1500), None)
            upload(root / "imagenet", bucket, "imagenet")
            upload(root / "large", bucket, "large")
            upload(root / "imagenet", bucket, "imagenet-1")  # a copy indexed on one thread
            print("| shards of | samples/shard | shard size | threads | shards/s | fetched per shard | range GETs per shard |")
            print("|---|---|---|---|---|---|---|")
            print(index_row("~500x375 JPEGs (ImageNet-like)", bucket, "imagenet", args.shards, args.workers))
            print(index_row("~500x375 JPEGs (ImageNet-like)", bucket, "imagenet-1", args.shards, 1))
            print(index_row("~2000x1500 JPEGs", bucket, "large", max(args.shards // 4, 1), args.workers))
            packed = pack.pack("folder", str(root / "photos"), f"s3://{bucket}/packed", args.image_size, "jpeg",
                               shard_size=args.per_shard, workers=1, progress=False)["manifest"]
            print(f"\n| training's reader, 1 loader process, {args.image_size} px out | img/s delivered | img/s per loader CPU second "
                  f"| loader processes for a {args.step_img_s:,.0f} img/s step |")
            print("|---|---|---|---|")
            print(reader_row(f"indexed: full-size JPEGs, PIL decode + crop + bicubic to {args.image_size}",
                             f"s3://{bucket}/imagenet/manifest.json", args.image_size, args.seconds, args.step_img_s))
            print(reader_row(f"packed: {args.image_size} px JPEGs of the same photos, torchvision decode", packed, args.image_size, args.seconds,
                             args.step_img_s))
    finally:
        s3._clients.clear()
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
