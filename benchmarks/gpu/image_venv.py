"""A virtual environment HERE that holds only the GPU image's Python packages, to test that the
wheels prepare.sh carries are all that check.sh needs (no GPU, no device time).

    python benchmarks/gpu/image_venv.py /tmp/gpu-image            # then:
    bash benchmarks/gpu/prepare.sh --python-version 3.11 --dest /tmp/wheels311
    PYTHON=/tmp/gpu-image/bin/python bash benchmarks/gpu/check.sh --dry-run --wheels /tmp/wheels311

Each package of image-packages.txt (the image's list) that this interpreter has installed is
linked into the new environment's site-packages; nothing else is there. Versions are this
machine's, not the image's, and packages this machine lacks (jax, ...) are missing: it shows
what is *absent* from the image, which is the question the carried set answers.
"""

from __future__ import annotations

import importlib.metadata as metadata
import sys
import sysconfig
import venv
from pathlib import Path


def main(target: str) -> int:
    root = Path(target)
    venv.create(root, with_pip=False, symlinks=True, clear=True)
    site = next((root / "lib").glob("python3*/site-packages"))
    names = [line.strip() for line in (Path(__file__).parent / "image-packages.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    linked, absent = 0, []
    for name in names:
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            absent.append(name)
            continue
        base = Path(str(dist.locate_file("")))
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops:
            if (base / top).exists() and not (site / top).exists():
                (site / top).symlink_to(base / top)
        linked += 1
    print(f"{root}/bin/python: {linked} of the image's packages linked from {sysconfig.get_paths()['purelib']}; "
          f"not installed here, so absent: {' '.join(absent) or 'none'}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python benchmarks/gpu/image_venv.py DIR")
    sys.exit(main(sys.argv[1]))
