"""The `fastmae` command (also `python -m fastmae`). Each subcommand lives in its own module, which
defines `HELP` (one line), `add_arguments(parser)` and `run(args) -> int`."""
from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "info": "fastmae.info",
    "demo": "fastmae.demo",
    "pretrain": "fastmae.train.pretrain",
    "visualize": "fastmae.train.visualize",
    "linprobe": "fastmae.train.linprobe",
    "bench": "fastmae.bench.cli",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastmae", description="Masked Autoencoders with fused GPU kernels.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in SUBCOMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        p = sub.add_parser(name, help=module.HELP, description=getattr(module, "DESCRIPTION", module.HELP),
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    from .model.checkpoint import CheckpointError
    from .ops.registry import BackendUnavailable

    try:
        return int(args._run(args) or 0)
    except (BackendUnavailable, CheckpointError, FileNotFoundError, ValueError) as exc:
        # bad input or an unavailable backend: a clear message, not a traceback
        print(f"fastmae {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fastmae {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
