"""`python -m dcgan_dist.shards`: pack images into WebDataset shards or index shards you have, inspect a
manifest, print an epoch's split, remove near-duplicates, and time training's reader on a manifest.

    python -m dcgan_dist.shards pack --source lsun --in bedroom_train_lmdb --out s3://bucket/lsun64 --image-size 64
    python -m dcgan_dist.shards index 's3://bucket/imagenet/train-{000000..001023}.tar' --out s3://bucket/imagenet/manifest.json
    python -m dcgan_dist.shards inspect s3://bucket/lsun64/manifest.json --preview lsun64.png
    python -m dcgan_dist.shards plan s3://bucket/lsun64/manifest.json --world-size 8 --loader-workers 4 --epoch 0
    python -m dcgan_dist.shards plan s3://bucket/lsun64/manifest.json --world-size 6 --loader-workers 4 --resume-step 900 --from-world-size 8
    python -m dcgan_dist.shards dedup s3://bucket/lsun64/manifest.json --out s3://bucket/lsun64-dedup
    python -m dcgan_dist.shards bench s3://bucket/lsun64/manifest.json --loader-workers 4 --step-img-s 40000
"""

from __future__ import annotations

import argparse
import itertools
import sys

from dcgan_dist.choices import DECODERS, FORMATS, IMAGE_SIZES, RAW_GROUP_SIZE, SAMPLINGS, SOURCES
from dcgan_dist.util import OneLineErrorParser, redact, run_cli

DEDUP_FLAGS = (  # flag, type, default, help; each is a field of dedup.DedupSettings
    ("--epochs", int, 10, "autoencoder training epochs"),
    ("--train-samples", int, 100_000, "images the autoencoder learns from"),
    ("--threshold", float, 2.0, "a code unit's bit is 1 above this x its mean activation"),
    ("--seed", int, 0, "the training's seed"),
    ("--shard-size", int, 0, "samples per written shard; 0: the input's largest shard"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="python -m dcgan_dist.shards", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("pack", help="decode, centre-crop, resize and write shards + manifest.json")
    p.add_argument("--source", required=True, choices=SOURCES)
    p.add_argument("--in", dest="source_path", metavar="PATH", help="the source's file or folder (not for digits)")
    p.add_argument("--out", required=True, metavar="DIR_OR_S3_PREFIX")
    p.add_argument("--image-size", type=int, required=True, choices=IMAGE_SIZES)
    p.add_argument("--format", dest="image_format", default="jpeg", choices=FORMATS)
    p.add_argument("--shard-size", type=int, default=1000, help="images per shard (default: 1000)")
    p.add_argument("--group-size", type=int, help=f"images per tar member: --format raw (default {RAW_GROUP_SIZE}) or "
                   "jpeg (default 1, one sample per JPEG as WebDataset writes them; more: read like raw groups, see docs/data.md)")
    p.add_argument("--workers", type=int, default=1, help="processes building shards (default: 1)")
    p.add_argument("--no-progress", action="store_true")
    x = commands.add_parser("index", help="a manifest for WebDataset shards written elsewhere, from their tar headers; "
                            "images stay at their original size, resized as training reads them")
    x.add_argument("sources", nargs="+", metavar="PATTERN_OR_LIST", help="brace patterns (s3://bucket/train-{000000..001023}.tar), "
                   "shard URLs, folders or s3:// prefixes ending in /, or files listing them one a line")
    x.add_argument("--out", required=True, metavar="MANIFEST", help="PATH/manifest.json or s3://bucket/prefix/manifest.json")
    x.add_argument("--image-key", default="jpg,jpeg,png,webp", help="the fields that hold a sample's image, in the order "
                   "they are looked for; samples with none are passed over and counted (default: jpg,jpeg,png,webp)")
    x.add_argument("--workers", type=int, default=8, help="shards read at once, on threads (default: 8)")
    x.add_argument("--no-progress", action="store_true")
    i = commands.add_parser("inspect", help="read every shard back: counts, sizes, sha256, a preview grid")
    i.add_argument("url", help="PATH/manifest.json or s3://bucket/prefix/manifest.json")
    i.add_argument("--preview", metavar="PNG", default="preview.png", help="where the preview grid goes (default: preview.png)")
    p = commands.add_parser("plan", help="print which samples each rank reads in an epoch (--sampling epochs), as RANK<TAB>KEY lines")
    p.add_argument("url", help="PATH/manifest.json or s3://bucket/prefix/manifest.json")
    p.add_argument("--world-size", type=int, required=True, help="training workers (--num-workers)")
    p.add_argument("--loader-workers", type=int, required=True, help="DataLoader processes per training worker")
    p.add_argument("--seed", type=int, default=0, help="training's --seed (default: 0)")
    p.add_argument("--epoch", type=int, default=0, help="which epoch, from 0 (default: 0)")
    p.add_argument("--batch-size", type=int, default=128, help="GLOBAL batch, as training's --batch-size (default: 128)")
    p.add_argument("--shuffle-buffer", type=int, default=1000, help="training's --shuffle-buffer (default: 1000)")
    p.add_argument("--resume-step", type=int, help="print the rest of the epoch from this step of it, read by --world-size "
                   "ranks after a resize there (an elastic run's restart) from --from-world-size ranks")
    p.add_argument("--from-world-size", type=int, help="with --resume-step: the world size before it (default: --world-size)")
    p.add_argument("--from-loader-workers", type=int, help="with --resume-step: the loader workers before it (default: --loader-workers)")
    p.add_argument("--pieces", action="store_true", help="print each loader worker's pieces of shards instead, RANK<TAB>LOADER "
                   "WORKER<TAB>SHARD<TAB>FIRST<TAB>STOP (tar members FIRST to STOP-1): no shard is read, fast at any size")
    p = commands.add_parser("dedup", help="drop near-duplicates (the paper's autoencoder hash): new shards, manifest.json, dedup-report.json")
    p.add_argument("url", help="PATH/manifest.json or s3://bucket/prefix/manifest.json")
    p.add_argument("--out", required=True, metavar="DIR_OR_S3_PREFIX")
    for flag, kind, default, text in DEDUP_FLAGS:
        p.add_argument(flag, type=kind, default=default, help=f"{text} (default: {default})")
    b = commands.add_parser("bench", help="time training's reader on a manifest: img/s delivered, per loader process, processes a step needs")
    b.add_argument("url", help="PATH/manifest.json or s3://bucket/prefix/manifest.json")
    b.add_argument("--loader-workers", type=int, default=2, help="DataLoader processes, as training's --loader-workers (default: 2)")
    b.add_argument("--batch-size", type=int, default=128, help="batch, as training's --batch-size on one worker (default: 128)")
    b.add_argument("--seconds", type=float, default=10.0, help="how long to read, after the first batch (default: 10)")
    b.add_argument("--step-img-s", type=float, help="a training step's rate in img/s: print how many loader processes feed it")
    b.add_argument("--sampling", default="epochs", choices=SAMPLINGS, help="training's --sampling (default: epochs)")
    b.add_argument("--shuffle-buffer", type=int, default=1000, help="training's --shuffle-buffer (default: 1000)")
    b.add_argument("--decode", default="cpu", choices=DECODERS, help="training's --decode; gpu needs CUDA here (default: cpu)")
    b.add_argument("--image-size", type=int, choices=IMAGE_SIZES, help="training's --image-size: needed for an indexed manifest "
                   "(images at their original size, resized as they are read)")
    return parser


if __name__ == "__main__":  # --help and a bad flag answer before torch loads (data/ imports it); main() parses again
    build_parser().parse_args()

from dcgan_dist.data import manifest, pack, s3  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = {"pack": pack_command, "index": index_command, "inspect": inspect_command, "plan": plan_command, "bench": bench_command,
               "dedup": dedup_command}[args.command]
    return run_cli("python -m dcgan_dist.shards", lambda: command(args), (s3.StorageError, manifest.ManifestError, FileNotFoundError, ValueError))


def pack_command(args: argparse.Namespace) -> int:
    if args.shard_size < 1 or args.workers < 1:
        raise ValueError("--shard-size and --workers must be >= 1")
    report = pack.pack(args.source, args.source_path, args.out, args.image_size, args.image_format,
                       args.shard_size, args.workers, progress=not args.no_progress, group_size=args.group_size)
    for line in report["skipped"]:
        print(f"skipped: {line}", file=sys.stderr)
    print(f"{report['samples']} images in {report['shards']} shards ({report['packed_now']} packed now, "
          f"{len(report['skipped'])} unreadable images skipped): {redact(report['manifest'])}")
    return 0


def index_command(args: argparse.Namespace) -> int:
    from dcgan_dist.data import index

    if args.workers < 1:
        raise ValueError("--workers must be >= 1")
    image_keys = tuple(key.strip().lower() for key in args.image_key.split(",") if key.strip())
    report = index.index(args.sources, args.out, image_keys, args.workers, progress=not args.no_progress)
    for shard in report["unreadable_shards"]:
        print(f"unreadable shard, skipped: {redact(shard['url'])}: {redact(shard['error'])}", file=sys.stderr)
    print(f"{report['samples']} images in {report['shards']} shards ({report['indexed_now']} indexed now, "
          f"{len(report['unreadable_shards'])} unreadable shards skipped, {report['samples_without_image']} samples without "
          f"{'/'.join(image_keys)} passed over; {report['bytes_read']} of {report['bytes']} shard bytes read): {redact(report['manifest'])}")
    return 0


def inspect_command(args: argparse.Namespace) -> int:
    if manifest.read(args.url).original_size:
        raise ValueError(f"{redact(args.url)} is an indexed manifest (`shards index`: original-size images); inspect checks packed "
                         "shards: read it with `shards bench --image-size` or `shards plan`")
    report = run_inspect(args.url, args.preview)
    width = max(len(k) for k in report)
    for key, value in report.items():
        if key != "problems":
            print(f"{key:<{width}}  {redact(value)}")
    for line in report["problems"]:
        print(f"problem: {line}")
    return 1 if report["problems"] else 0  # readable, but not what the manifest promises


def plan_command(args: argparse.Namespace) -> int:
    """One line per sample: rank, tab, key; rank by rank, loader worker by worker, in reading order."""
    from dcgan_dist.data import epochs, split  # torch: only needed here

    resized = {"--from-world-size": args.from_world_size, "--from-loader-workers": args.from_loader_workers}
    if args.world_size < 1 or args.loader_workers < 0 or args.epoch < 0 or args.batch_size < 1:
        raise ValueError("--world-size and --batch-size must be >= 1, --loader-workers and --epoch >= 0")
    if args.world_size > args.batch_size:
        raise ValueError(f"--world-size {args.world_size} is more ranks than --batch-size {args.batch_size} has samples")
    if args.resume_step is None and any(value is not None for value in resized.values()):
        raise ValueError(f"{' and '.join(flag for flag, value in resized.items() if value is not None)} need --resume-step")
    shards = manifest.read(args.url)
    counts = [shard["num_samples"] for shard in shards.shards]
    steps = split.check(counts, args.world_size, max(args.loader_workers, 1), args.batch_size)
    segments, resumed = (split.Segment(0, args.world_size, max(args.loader_workers, 1)),), ""
    if args.resume_step is not None:
        from_world_size = args.world_size if args.from_world_size is None else args.from_world_size
        from_loader_workers = args.loader_workers if args.from_loader_workers is None else args.from_loader_workers
        if not 0 < args.resume_step < steps:
            raise ValueError(f"--resume-step {args.resume_step} is not a step inside the epoch (1 to {steps - 1} of its {steps})")
        if not 1 <= from_world_size <= args.batch_size or from_loader_workers < 0:
            raise ValueError("--from-world-size must be from 1 to --batch-size, --from-loader-workers >= 0")
        before = split.Segment(0, from_world_size, max(from_loader_workers, 1))
        segments = (before, split.Segment(args.resume_step, args.world_size, max(args.loader_workers, 1)))
        resumed = (f" from step {args.resume_step}, after {before.world_size} ranks x {before.loader_streams} loader streams "
                   f"read steps 0 to {args.resume_step - 1}")
    if args.pieces:  # the plan itself, from the manifest's counts: each stream's pieces in the order it reads them
        urls = shards.shard_urls
        for plan in split.streams(counts, args.seed, args.epoch, args.batch_size, args.shuffle_buffer, segments):
            sys.stdout.write("".join(f"{plan.rank}\t{plan.index}\t{urls[piece.shard]}\t{piece.start}\t{piece.stop}\n"
                                     for piece in plan.pieces))
    else:
        lines = epochs.planned_keys(shards, args.seed, args.epoch, args.batch_size, args.shuffle_buffer, segments)
        for chunk in iter(lambda: list(itertools.islice(lines, 10000)), []):
            sys.stdout.write("".join(f"{rank}\t{key}\n" for rank, key in chunk))
    batches = split.rank_batches(args.batch_size, args.world_size)
    per_rank = f"{batches[0]}" if batches[0] == batches[-1] else f"{batches[-1]}-{batches[0]}"
    print(f"epoch {args.epoch}{resumed}: {steps - segments[-1].from_step} steps of {per_rank} samples on each of {args.world_size} "
          f"ranks; {shards.num_samples - steps * args.batch_size} of {shards.num_samples} samples not read this epoch", file=sys.stderr)
    return 0


def dedup_command(args: argparse.Namespace) -> int:
    from dcgan_dist.data import dedup  # torch: only needed here

    if args.epochs < 1 or args.train_samples < 2 or args.shard_size < 0:
        raise ValueError("--epochs must be >= 1, --train-samples >= 2 and --shard-size >= 0")
    fields = {flag[2:].replace("-", "_"): getattr(args, flag[2:].replace("-", "_")) for flag, *_ in DEDUP_FLAGS}
    report = dedup.dedup(args.url, args.out, dedup.DedupSettings(**fields))
    print(f"{report['removed']} near-duplicates removed in {len(report['groups'])} groups, {report['kept']} of "
          f"{report['samples']} images kept: {redact(report['manifest'])} (groups: {dedup.REPORT_NAME})")
    return 0


def bench_command(args: argparse.Namespace) -> int:
    from dcgan_dist.data import throughput

    if args.loader_workers < 0 or args.batch_size < 1 or args.shuffle_buffer < 0:
        raise ValueError("--loader-workers and --shuffle-buffer must be >= 0, --batch-size >= 1")
    if not args.seconds > 0 or (args.step_img_s is not None and not args.step_img_s > 0):
        raise ValueError("--seconds and --step-img-s must be > 0")
    shards = manifest.read(args.url)
    if shards.original_size != (args.image_size is not None):
        raise ValueError(f"--image-size is for an indexed manifest (images at their original size), and {redact(args.url)} "
                         + ("is one: give training's --image-size" if shards.original_size else f"holds {shards.image_size} px images"))
    shards = shards.at_size(args.image_size) if shards.original_size else shards
    if args.decode == "gpu":
        import torch

        if not torch.cuda.is_available():
            raise ValueError("--decode gpu decodes on a CUDA device, and this machine has none")
        if not set(shards.image_keys or ()) <= {"jpg", "jpeg"} or shards.image_format not in ("jpeg", manifest.ORIGINAL):
            held = "/".join(shards.image_keys) if shards.original_size else shards.image_format
            raise ValueError(f"--decode gpu decodes JPEG shards; {redact(args.url)} holds {held}")
    if args.sampling == "epochs":  # the split's own check, before any process starts
        from dcgan_dist.data import split

        split.check([shard["num_samples"] for shard in shards.shards], 1, max(args.loader_workers, 1), args.batch_size)
    resized = " (original-size images, resized as read)" if shards.original_size else ""
    print(f"{redact(args.url)}: {shards.num_samples} {shards.image_size} px {shards.image_format} images{resized} in {len(shards.shards)} shards")
    cfg = throughput.reader_config(args.url, args.loader_workers, args.batch_size, args.sampling, args.shuffle_buffer, shards.image_size,
                                   args.decode)
    result = throughput.measure(cfg, args.seconds)
    print("\n".join(throughput.report_lines(result, args.loader_workers, args.step_img_s)))
    return 0


def run_inspect(url: str, preview: str) -> dict:
    from dcgan_dist.data.preview import inspect_manifest  # torch and torchvision: only needed here

    return inspect_manifest(url, preview)


if __name__ == "__main__":
    sys.exit(main())
