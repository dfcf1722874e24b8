"""The names the CLIs' choice flags take, apart from what they stand for (and the few defaults
their help shows): no torch, Ray or MLflow here, so that every CLI builds its parser, and answers
--help or a bad flag, in a fraction of a second before loading them.

A plain list lives here only; its users import it from here. A table keyed by the names stays
in its module (models.PRESETS, step.PRECISIONS, ...), where each key's meaning is, and
tests/test_cli.py checks that its keys are these names.
"""

from __future__ import annotations

# models.py
PRESETS = ("paper", "pytorch-examples", "imagenet32", "svhn32")  # models.PRESETS
AUTHORS_PRESETS = ("imagenet32", "svhn32")  # the presets that are the authors' own networks (authors/weights.py loads their weights)
BN_PLACEMENTS = ("paper", "all", "none", "g-only", "d-only")  # models.BN_PLACEMENTS: the paper's batchnorm-placement ablation
IMAGE_SIZES = (32, 64, 128)
# authors/weights.py: BatchNorm statistics re-estimated as the authors' infer_bnorm_stats does (import_authors --stats-batches)
STATS_BATCHES, STATS_BATCH = 8, 128
# step.py
PRECISIONS = ("fp32", "bf16")  # step.PRECISIONS
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")  # torch.compile modes, or off
# checkpoint_upload.py: how --storage-path gets each checkpoint (auto: async unless it is a local/NFS path)
CHECKPOINT_UPLOADS = ("auto", "sync", "async")
# data/
SOURCES = ("digits", "cifar10", "lsun", "imagenet", "folder")  # data/sources/: what `shards pack --source` reads
FORMATS = ("jpeg", "png", "raw")  # data/pack.FORMATS: how `shards pack --format` writes the images
RAW_GROUP_SIZE = 64  # images per raw member unless --group-size says otherwise (JPEG: one per member)
DECODERS = ("cpu", "gpu")  # --decode: JPEGs in the loader processes, or a batch at a time on the training worker's GPU
SAMPLINGS = ("epochs", "resampled")  # --sampling: each sample once per epoch / shards with replacement
# the linear probe: probe/protocol.py (its data sets are probe/data.DATASETS, which loads no torch)
BN_STATS = ("running", "reestimate")  # D's BatchNorm statistics: those kept in training, or re-estimated on the probe's images
SVM_SOLVERS = ("torch", "liblinear")  # probe.svm.SOLVERS: the L2-SVM's solvers
FEATURE_DTYPES = ("float32", "float16")  # probe.protocol.FEATURE_DTYPES: how the features are held
# The SVM's C values the probe chooses from (--c-grid): the authors' (svhn/svhn_semisup_analysis.py)
# for their unscaled features, one decade further each way: our own D's and the raw pixels' features have other scales.
C_GRID = (1e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 1e-1)
# evaluate/backbones.py
BACKBONES = ("digits", "inception", "fid-inception")
# tracking: which evaluated checkpoints become MLflow LoggedModels (champion.py)
LOGGED_MODELS = ("every-eval", "champion-and-last")
NEEDS_WEIGHTS = ("inception", "fid-inception")  # the backbones that take --inception-weights
