"""`python -m dcgan_dist.import_authors PATH`: the authors' released G and D (Newmu/dcgan_code's
.npy files, converted by weights.py) registered in MLflow as new versions of `dcgan-generator`
and `dcgan-discriminator`, both with the alias `authors`.

    python -m dcgan_dist.import_authors ../shared/authors-dcgan            # svhn32, inferred
    python -m dcgan_dist.import_authors models/imagenet_gan_pretrain_128f_relu_lrelu_7l_3x3_256z --preset imagenet32

One MLflow run (experiment `authors` unless --experiment) holds both models, the source folder
and how the BatchNorm statistics were set. `probe --discriminator authors:PATH` and
`explore --generator authors:PATH` read the same folder without registering anything.
Bad input (no such folder, a missing file, a shape that does not fit) exits 2 with one line
naming the file.
"""

from __future__ import annotations

import argparse
import sys

from dcgan_dist.choices import AUTHORS_PRESETS, STATS_BATCH, STATS_BATCHES
from dcgan_dist.util import OneLineErrorParser, run_cli


def build_parser() -> OneLineErrorParser:
    parser = OneLineErrorParser(prog="python -m dcgan_dist.import_authors", description=__doc__.split("\n\n")[0])
    parser.add_argument("path", metavar="PATH", help="the authors' model folder of *_gen_params.jl_NN.npy / *_discrim_params.jl_NN.npy files")
    parser.add_argument("--preset", choices=AUTHORS_PRESETS, help="check the files against this preset (default: inferred from their count)")
    parser.add_argument("--stats-batches", type=int, default=STATS_BATCHES,
                        help=f"batches of {STATS_BATCH} that re-estimate the BatchNorm statistics (default: %(default)s)")
    parser.add_argument("--experiment", default="authors", help="MLflow experiment of the import's run (default: %(default)s)")
    parser.add_argument("--tracking-uri", default="", help="MLflow store (default: MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    return parser


if __name__ == "__main__":  # --help and a bad flag answer before torch and MLflow load; main() parses again
    build_parser().parse_args()

from dcgan_dist.authors import weights as authors  # noqa: E402
from dcgan_dist.tracking import registry  # noqa: E402
from dcgan_dist.tracking.store import TrackingError, check_reachable, ensure_experiment, resolve_tracking_uri  # noqa: E402

ALIAS = "authors"


def import_command(args: argparse.Namespace) -> int:
    import mlflow

    if args.stats_batches < 1:
        raise authors.AuthorsError(f"--stats-batches must be >= 1 (got {args.stats_batches})")
    imported = authors.load_authors(args.path, args.preset, args.stats_batches)  # bad files fail before MLflow is touched
    tracking_uri = resolve_tracking_uri(args.tracking_uri)
    check_reachable(tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    experiment_id = ensure_experiment(tracking_uri, args.experiment)
    source = {"authors.folder": str(imported.folder.resolve()), "authors.epoch": imported.epoch,
              "authors.bn_statistics": imported.statistics}
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"authors-{imported.architecture.preset}", tags=source) as run:
        mlflow.log_params(imported.architecture.to_dict() | {"authors.epoch": imported.epoch})
        versions = registry.log_models(imported.architecture, imported.generator.state_dict(), imported.discriminator.state_dict(), step=0)
        for name, version in versions.items():
            registry.set_alias(name, version, ALIAS, tracking_uri, tags=source)
    print(f"{imported.folder} ({imported.architecture.preset}, epoch {imported.epoch}) -> MLflow run {run.info.run_id}")
    for name, version in versions.items():
        print(f"  models:/{name}@{ALIAS} = version {version}")
    print(f"  BatchNorm statistics: {imported.statistics}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return run_cli(parser.prog, lambda: import_command(args), (TrackingError,))


if __name__ == "__main__":
    sys.exit(main())
