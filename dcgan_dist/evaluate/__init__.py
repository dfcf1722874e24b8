"""Generation quality: FID/KID/IS (fid.py, scores.py), the feature backbones (backbones.py), the
memorisation check (memorisation.py), collapse detection (collapse.py), and training's Evaluator
and best snapshot (evaluator.py); `python -m dcgan_dist.evaluate` scores a generator offline
(__main__.py).

`evaluate.Evaluator`, `evaluate.Best`, `evaluate.SCORE`, ... are evaluator.py's, loaded on first
use: `python -m dcgan_dist.evaluate` imports this package before its __main__, and --help and a bad
flag answer before torch loads.
"""

from __future__ import annotations

import importlib


def __getattr__(name: str):
    if name.startswith("__"):  # import machinery probing the package (__path__, __file__, ...)
        raise AttributeError(name)
    evaluator = importlib.import_module("dcgan_dist.evaluate.evaluator")
    try:
        return getattr(evaluator, name)
    except AttributeError:
        raise AttributeError(f"module 'dcgan_dist.evaluate' has no attribute {name!r}") from None
