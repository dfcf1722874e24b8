"""Small helpers every layer uses: credentials out of URIs, one-line errors, images as uint8,
and the command lines' parser and exit 2 on a known bad input.

No MLflow, Ray or boto3 here (the data layer's loader processes import this); torch and
torchvision are imported only by the image helper.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from typing import Any


def redact(value: Any) -> Any:
    """Drop user:password@ from URIs so credentials never reach params or logs."""
    return re.sub(r"(\w+://)[^/@\s]+@", r"\1", value) if isinstance(value, str) else value


def redact_exception(error: BaseException) -> None:
    """Drop user:password@ from `error` and the exceptions it chains, in place: their string
    arguments and attributes (MLflow's errors name the URL they requested, credentials included,
    and Ray prints and keeps a failed worker's traceback)."""
    pending, seen = [error], set()
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        current.args = tuple(redact(arg) for arg in current.args)
        for name, value in list(vars(current).items()):
            if isinstance(value, str):
                setattr(current, name, redact(value))
        pending += [current.__cause__, current.__context__]


def first_line(error: BaseException) -> str:
    """An exception's first line, short enough for a log line."""
    return (str(error).splitlines() or [type(error).__name__])[0][:200]


def grid_uint8(images, nrow: int = 8):
    """Images in [-1, 1] (N x C x H x W) as one HxWx3 uint8 grid (numpy), 2 px apart."""
    import numpy as np
    from torchvision.utils import make_grid

    grid = make_grid(images.float().cpu(), nrow=nrow, padding=2, normalize=True, value_range=(-1, 1))
    return (grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a bad flag gets one line (not the whole usage block) and exit code 2, and
    a flag must be spelt out: argparse's prefix matching would read the typo --max-step as
    --max-steps. Subcommands' parsers (add_subparsers) are of this class too."""

    def __init__(self, *args, **kwargs):
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def run_cli(prog: str, body: Callable[[], int], known_errors: tuple[type[BaseException], ...]) -> int:
    """body()'s exit code; a known bad input (one of `known_errors`) prints one line naming the
    problem, no traceback, and exits 2."""
    try:
        return body()
    except known_errors as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
