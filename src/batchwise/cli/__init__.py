"""The `batchwise` command line: one module per command group, each a thin layer over the
library."""

from batchwise.cli.main import main

__all__ = ["main"]
