"""The `yuan` command line. Each subcommand lives beside the code it drives and registers here."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .config import ConfigError
from .convert import CheckpointError
from .utils import Terminated, exit_code, sigterm_raises

# Modules that define `register(subparsers)`; each adds its subcommands with a `func` default.
COMMAND_MODULES = [
    "yuanmoe.info",
    "yuanmoe.plan",
    "yuanmoe.convert.cli",
    "yuanmoe.training.commands",
    "yuanmoe.evaluation.cli",
    "yuanmoe.inference.commands",
    "yuanmoe.experiments",
    "yuanmoe.quant.convert",
]


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(prog="yuan", description="Yuan 2.0-M32 in PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


class _StderrHandler(logging.Handler):
    """The library's info lines (which RoPE and quantization a loaded checkpoint uses) on stderr,
    wherever sys.stderr points when they are written."""

    def emit(self, record: logging.LogRecord) -> None:
        print(self.format(record), file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    logger = logging.getLogger("yuanmoe")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        logger.addHandler(_StderrHandler())
        logger.setLevel(logging.INFO)
    try:
        with sigterm_raises():
            args = build_parser().parse_args(argv)
            return int(args.func(args) or 0)
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError, OSError) as exc:
        if os.environ.get("YUAN_DEBUG"):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (utils.Terminated): outputs were cleaned up on the way
        print("terminated" if isinstance(exc, Terminated) else "interrupted", file=sys.stderr)
        return exit_code(exc)


if __name__ == "__main__":
    sys.exit(main())
