"""`python -m dcgan_dist.import_authors PATH`: the command of dcgan_dist/authors/__main__.py (also
`python -m dcgan_dist.authors`) under the name the docs and users know."""

from __future__ import annotations

import runpy


def build_parser():
    from dcgan_dist.authors.__main__ import build_parser as authors_parser

    return authors_parser()


if __name__ == "__main__":  # runs the package's __main__ as `python -m` would: --help still answers before torch loads
    runpy.run_module("dcgan_dist.authors", run_name="__main__", alter_sys=True)
