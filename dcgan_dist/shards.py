"""`python -m dcgan_dist.shards`: pack images into WebDataset shards, and inspect a manifest.

    python -m dcgan_dist.shards pack --source lsun --in bedroom_train_lmdb --out s3://bucket/lsun64 --image-size 64
    python -m dcgan_dist.shards inspect s3://bucket/lsun64/manifest.json --preview lsun64.png
"""

from __future__ import annotations

import argparse
import sys

from dcgan_dist.config import IMAGE_SIZES, OneLineErrorParser
from dcgan_dist.data import manifest, pack, s3
from dcgan_dist.data.sources import NAMES
from dcgan_dist.util import redact, run_cli


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="python -m dcgan_dist.shards", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("pack", help="decode, centre-crop, resize and write shards + manifest.json")
    p.add_argument("--source", required=True, choices=NAMES)
    p.add_argument("--in", dest="source_path", metavar="PATH", help="the source's file or folder (not for digits)")
    p.add_argument("--out", required=True, metavar="DIR_OR_S3_PREFIX")
    p.add_argument("--image-size", type=int, required=True, choices=IMAGE_SIZES)
    p.add_argument("--format", dest="image_format", default="jpeg", choices=tuple(pack.FORMATS))
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default: 1000)")
    p.add_argument("--workers", type=int, default=1, help="processes building shards (default: 1)")
    p.add_argument("--no-progress", action="store_true")
    i = commands.add_parser("inspect", help="read every shard back: counts, sizes, sha256, a preview grid")
    i.add_argument("url", help="PATH/manifest.json or s3://bucket/prefix/manifest.json")
    i.add_argument("--preview", metavar="PNG", default="preview.png", help="where the preview grid goes (default: preview.png)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli("python -m dcgan_dist.shards", lambda: pack_command(args) if args.command == "pack" else inspect_command(args),
                   (s3.StorageError, manifest.ManifestError, FileNotFoundError, ValueError))


def pack_command(args: argparse.Namespace) -> int:
    if args.shard_size < 1 or args.workers < 1:
        raise ValueError("--shard-size and --workers must be >= 1")
    report = pack.pack(args.source, args.source_path, args.out, args.image_size, args.image_format,
                       args.shard_size, args.workers, progress=not args.no_progress)
    for line in report["skipped"]:
        print(f"skipped: {line}", file=sys.stderr)
    print(f"{report['samples']} images in {report['shards']} shards ({report['packed_now']} packed now, "
          f"{len(report['skipped'])} unreadable images skipped): {redact(report['manifest'])}")
    return 0


def inspect_command(args: argparse.Namespace) -> int:
    report = run_inspect(args.url, args.preview)
    width = max(len(k) for k in report)
    for key, value in report.items():
        if key != "problems":
            print(f"{key:<{width}}  {redact(value)}")
    for line in report["problems"]:
        print(f"problem: {line}")
    return 1 if report["problems"] else 0  # readable, but not what the manifest promises


def run_inspect(url: str, preview: str) -> dict:
    from dcgan_dist.data.preview import inspect_manifest  # torch and torchvision: only needed here

    return inspect_manifest(url, preview)


if __name__ == "__main__":
    sys.exit(main())
