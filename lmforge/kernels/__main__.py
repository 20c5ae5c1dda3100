"""`python -m lmforge.kernels NAME`: builds the CPU kernel NAME into the cache (`kernels.prebuild` runs one
such process per kernel, at the same time)."""

import sys

from lmforge.kernels.build import build, build_args

if __name__ == "__main__":
    name = sys.argv[1]
    args = build_args(name)
    if args is None:
        sys.exit(f"lmforge: {name} cannot be built here")
    build(name, *args)
