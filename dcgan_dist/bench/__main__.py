"""`python -m dcgan_dist.bench`: how fast one DCGAN training step is, against the reference.

The command line, the bench's run (every variant of `variants.py`, time-boxed by
--variant-budget-s and --total-budget-s), the table and --output-json. What is measured and how
the parts fit: the package's docstring (`dcgan_dist/bench/__init__.py`).

    python -m dcgan_dist.bench --device cpu                       # the table, 64 px, batch 128
    python -m dcgan_dist.bench --device cuda --batch-size 1024    # a batch that fills an H100
    python -m dcgan_dist.bench --device cpu --extras              # plus the full-run figures
    python -m dcgan_dist.bench --device cuda --output-json bench.json --variant-budget-s 60
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from dcgan_dist.choices import IMAGE_SIZES
from dcgan_dist.util import OneLineErrorParser


def build_parser() -> OneLineErrorParser:
    parser = OneLineErrorParser(prog="python -m dcgan_dist.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--image-size", type=int, default=64, choices=IMAGE_SIZES)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=None, help="steps per variant per repeat (default: 2 on CPU, 50 on CUDA)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats; the table shows each variant's median")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per variant first (default: 2 on CPU, 10 on CUDA)")
    parser.add_argument("--variants", nargs="*", help="only variants whose name contains one of these words")
    parser.add_argument("--variant-budget-s", type=float, default=None,
                        help="seconds each variant may take: build, warm-up and timed steps (default: 180 on CPU, 120 on CUDA)")
    parser.add_argument("--total-budget-s", type=float, default=math.inf, help="seconds for all variants together (default: no limit)")
    parser.add_argument("--run-emulated-bf16", action="store_true", help="time the bf16 variants even where bf16 is emulated (slow)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the chip's dense bf16 peak for the share column (CUDA)")
    parser.add_argument("--output-json", metavar="FILE", help="also write the figures as JSON (rewritten as they come in)")
    parser.add_argument("--extras", action="store_true", help="also time a full training run, MLflow logging and the data pipeline")
    return parser


if __name__ == "__main__":  # --help and a bad flag answer before torch loads; main() parses again
    build_parser().parse_args()

import torch  # noqa: E402

from dcgan_dist.bench.extras import print_extras  # noqa: E402
from dcgan_dist.bench.machine import bf16_emulation, bf16_peak_tflops, describe_machine, matmul_tflops  # noqa: E402
from dcgan_dist.bench.variants import Variant, measure, variants  # noqa: E402

REAL_BATCHES = 4  # real batches rotated through, so no variant reads one cached tensor


def header(peak_tflops: float | None) -> list[str]:
    cells = ["variant", "img/s", "vs reference", "peak memory", "GFLOP/step", "TFLOP/s"]
    return cells + ["share of bf16 peak"] if peak_tflops else cells


def reference_rate(table: list[Variant]) -> float | None:
    """The reference step's img/s, when it was chosen and ran (else "vs reference" is n/a)."""
    return next((v.rate for v in table if v.name.startswith("reference") and v.status == "ok"), None)


def table_rows(table: list[Variant], batch: int, peak_tflops: float | None = None) -> list[list[str]]:
    """The table's rows as cells, every one as wide as the header."""
    width = len(header(peak_tflops))
    reference = reference_rate(table)
    rows = []
    for variant in table:
        if variant.status != "ok":
            why = f"failed: {variant.error}" if variant.error else f"skipped: {variant.skipped}"
            rows.append([variant.name, why] + [""] * (width - 2))
            continue
        rate, tflops = variant.rate, variant.tflops(batch)
        name = variant.name + (f" ({variant.skipped})" if variant.skipped else "")
        cells = [name, f"{rate:,.0f}", f"{rate / reference:.2f}x" if reference else "n/a",
                 f"{variant.peak_bytes / 2**20:,.0f} MiB", f"{variant.flops_per_step / 1e9:,.0f}", f"{tflops:,.2f}"]
        if peak_tflops:
            cells.append(f"{tflops / peak_tflops:.1%}")
        rows.append(cells)
    return rows


def print_table(table: list[Variant], batch: int, peak_tflops: float | None = None) -> None:
    cells = header(peak_tflops)
    print("| " + " | ".join(cells) + " |")
    print("|---|" + "---:|" * (len(cells) - 1))
    for row in table_rows(table, batch, peak_tflops):
        print("| " + " | ".join(row) + " |")


def write_json(path: str, args: argparse.Namespace, table: list[Variant], machine: str, peak_tflops: float | None,
               matmul: float | None) -> None:
    """The figures for scripts: every variant with its status, and the training settings it
    stands for (precision, train_compile), so a caller can pick the fastest that works."""
    reference = reference_rate(table)
    entries = []
    for v in table:
        rate = v.rate
        entries.append({
            "name": v.name, "status": v.status, "why": v.error or v.skipped, "precision": v.precision,
            "train_compile": v.train_compile, "img_per_s": rate, "img_per_s_repeats": v.img_per_s,
            "vs_reference": rate / reference if rate and reference else None,
            "peak_mib": v.peak_bytes / 2**20 if rate else None, "gflop_per_step": v.flops_per_step / 1e9,
            "tflops": v.tflops(args.batch_size),
            "spent_s": round(v.spent_s, 2),
        })
    report = {"device": args.device, "machine": machine, "image_size": args.image_size, "batch_size": args.batch_size,
              "steps": args.steps, "repeats": args.repeats, "warmup": args.warmup,
              "variant_budget_s": args.variant_budget_s, "bf16_peak_tflops": peak_tflops, "matmul_bf16_tflops": matmul,
              "variants": entries}
    partial = Path(path).with_suffix(".partial")
    partial.write_text(json.dumps(report, indent=1))
    partial.replace(path)  # a reader (or a kill) sees the last whole report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch")
    if args.batch_size < 2:
        parser.error("--batch-size: must be at least 2 (BatchNorm needs a batch)")
    cuda = args.device == "cuda"
    args.steps = args.steps or (50 if cuda else 2)
    args.warmup = args.warmup if args.warmup is not None else (10 if cuda else 2)
    args.variant_budget_s = args.variant_budget_s or (120.0 if cuda else 180.0)
    if args.variant_budget_s <= 0 or args.total_budget_s <= 0:
        parser.error("--variant-budget-s and --total-budget-s: must be > 0")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as training does: pick the fastest conv kernels
    machine = describe_machine(device)
    peak, peak_source = bf16_peak_tflops(device, args.peak_tflops)
    matmul = matmul_tflops(device) if device.type == "cuda" else None
    generator = torch.Generator().manual_seed(1)
    reals = [(torch.rand(args.batch_size, 3, args.image_size, args.image_size, generator=generator) * 2 - 1).to(device)
             for _ in range(REAL_BATCHES)]
    table = variants(device, args.image_size, args.batch_size, reals, args.variants)
    emulated = bf16_emulation(device)
    if emulated and not args.run_emulated_bf16:
        for variant in table:
            if variant.precision == "bf16":
                variant.skipped = emulated
    report = (lambda: write_json(args.output_json, args, table, machine, peak, matmul)) if args.output_json else (lambda: None)
    measure(table, device, args.steps, args.repeats, args.warmup, args.batch_size, args.image_size, reals,
            args.variant_budget_s, args.total_budget_s, on_progress=report)
    report()
    print(f"\nDCGAN step, {args.image_size} px, batch {args.batch_size}, {args.device}: {machine}")
    print(f"median of {args.repeats} interleaved repeats of {args.steps} steps each; each variant time-boxed to "
          f"{args.variant_budget_s:.0f} s (build + warm-up + steps)")
    if emulated:
        print(f"{emulated}{': its variants ran anyway (--run-emulated-bf16)' if args.run_emulated_bf16 else ''}")
    if device.type == "cuda":
        print(f"bf16 peak: {f'{peak:,.0f} TFLOP/s ({peak_source})' if peak else peak_source}; "
              f"an 8192^3 bf16 matmul here: {matmul:,.0f} TFLOP/s")
    print()
    print_table(table, args.batch_size, peak)
    if args.extras:
        print_extras(args, table)


if __name__ == "__main__":
    main()
