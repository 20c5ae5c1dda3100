"""`python -m lmforge ...` (also what torchrun launches)."""

from lmforge.cli import main

main()
