"""The `fastmae` command (also `python -m fastmae`). Each subcommand lives in its own module, which
defines `HELP` (one line), `add_arguments(parser)` and `run(args) -> int`.

The checks the subcommands share live here too: `check_device`, `check_backend`, `check_mask_ratio`,
`check_output_dir` / `check_output_file` (with `discarding_new_dirs`, which removes the folders a failed run
created and left empty) and argparse types for numbers (`positive_int`, ...). They raise ValueError (argparse
types: ArgumentTypeError) with a message naming the flag, which the commands print as
`fastmae <command>: error: ...` with exit status 2 (`report_user_error`). `sigterm_as_exit` turns SIGTERM
into SystemExit(143), so cleanup runs as for Ctrl-C.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import Callable

SUBCOMMANDS = {
    "info": "fastmae.info",
    "demo": "fastmae.demo",
    "pretrain": "fastmae.train.pretrain",
    "visualize": "fastmae.train.visualize",
    "linprobe": "fastmae.train.linprobe",
    "bench": "fastmae.bench.cli",
}


# ------------------------------------------------------------------------------------------ shared checks
def check_device(name: str, other_devices: bool = False):
    """The torch.device a `--device` flag names, or a ValueError saying why this machine cannot run on it.
    `other_devices`: also an available device of another type (mps, xpu, ...), where the reference and sdpa
    backends run (demo, visualize, linprobe); pretraining and the benchmarks take cpu and cuda."""
    import torch
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {name!r} is not a device: use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        runtime = getattr(torch, device.type, None)
        if not other_devices:
            raise ValueError(f"--device {name!r}: this command runs on cpu or cuda")
        if not callable(getattr(runtime, "is_available", None)) or not runtime.is_available():
            raise ValueError(f"--device {name!r}: no such device is available here (use cpu or cuda)")
        return device
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA device is available (use --device cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def check_backend(raw: str | None, flag: str = "--backend"):
    """A `--backend` value checked with `ops.parse_backend` (None / '': automatic), and the `FASTMAE_BACKEND`
    variable with it, which every op reads: a bad choice stops the command before any work, naming where it
    came from. Returns the parsed choice (None, a name or a mapping op -> name)."""
    from . import ops

    def parse(text: str, where: str):
        try:
            return ops.parse_backend(text)
        except ValueError as exc:
            msg = str(exc)
            msg = msg[len("backend: "):] if msg.startswith("backend: ") else msg
            raise ValueError(f"{where}: {msg}") from None

    env = os.environ.get(ops.ENV_VAR, "")
    if env.strip():
        parse(env, f"{ops.ENV_VAR}={env}")
    return parse(raw, f"{flag} {raw}") if raw and raw.strip() else None


def check_mask_ratio(mask_ratio: float, num_patches: int, flag: str = "--mask_ratio") -> None:
    """Refuse a ratio that keeps no patch of the model's `num_patches` (the model keeps int(L * (1 - ratio)))."""
    if int(num_patches * (1 - mask_ratio)) < 1:
        raise ValueError(f"{flag} {mask_ratio} keeps none of the model's {num_patches} patches; use a lower one")


def _probe_dir(folder: Path) -> None:
    """Create `folder` (and its parents) and write and remove a probe file there; raises OSError if it can't."""
    if os.path.lexists(folder) and not os.path.isdir(folder):
        raise NotADirectoryError(20, f"{folder} is a file, not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=".fastmae-probe-", dir=folder)
    os.close(fd)
    os.unlink(probe)


def check_output_dir(path: str | os.PathLike, flag: str = "--output_dir") -> Path:
    """Create folder `path` (and its parents) and check that a file can be written in it (a probe file,
    removed again), so that a place the run cannot write to is refused before any work, not at its first write.
    Raises ValueError "FLAG PATH: cannot write there (reason)"."""
    folder = Path(path).expanduser()
    try:
        _probe_dir(folder)
    except OSError as exc:
        raise ValueError(f"{flag} {path}: cannot write there ({exc.strerror or exc})") from None
    return folder


def check_output_file(path: str | os.PathLike, flag: str = "--output") -> Path:
    """`check_output_dir` for the folder of the file `path`, which must not be a folder itself."""
    file = Path(path).expanduser()
    try:
        if os.path.isdir(file):
            raise IsADirectoryError(21, "it is a folder; name a file")
        _probe_dir(file.parent)
    except OSError as exc:
        raise ValueError(f"{flag} {path}: cannot write there ({exc.strerror or exc})") from None
    return file


def _missing_dirs(path: str | os.PathLike) -> list[Path]:
    """`path` and those of its parents that do not exist yet, deepest first: what creating `path` creates."""
    out = []
    p = Path(path).expanduser().absolute()
    while not os.path.lexists(p) and p != p.parent:
        out.append(p)
        p = p.parent
    return out


def discarding_new_dirs(path: str | os.PathLike | None, fn: Callable[[], int]) -> int:
    """Run `fn()` (a command's body, returning its exit status) for a command that writes into folder `path`.
    If it fails (an exception or a nonzero status), the folders of `path` it created and left empty are
    removed: an error leaves nothing behind."""
    new = _missing_dirs(path) if path else []
    code = 1
    try:
        code = fn()
        return code
    finally:
        if code != 0:
            for d in new:
                try:
                    d.rmdir()
                except OSError:  # not empty (or never created): neither are its parents
                    break


@contextlib.contextmanager
def sigterm_as_exit(message: str | None = None):
    """SIGTERM (what `kill`, `timeout` and cluster schedulers send) raises SystemExit(143) inside the block, so
    that cleanup runs as for Ctrl-C: a file being written is removed, never left half-written, and what atexit
    writes is written. `message` is printed to stderr when that happens. A no-op outside the main thread
    (signal handlers belong to it)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    stopped = []

    def stop(signum, frame):
        if hasattr(signal, "SIGCHLD"):  # DataLoader workers killed with us (scancel, kill -PGID): exiting anyway
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        stopped.append(signum)
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    except SystemExit:
        if stopped and message:
            print(message, file=sys.stderr)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


def _argtype(convert: Callable, test: Callable, what: str, name: str) -> Callable:
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if not test(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value
    parse.__name__ = name
    return parse


positive_int = _argtype(int, lambda v: v >= 1, "a positive integer", "positive_int")
non_negative_int = _argtype(int, lambda v: v >= 0, "a non-negative integer", "non_negative_int")
non_negative_float = _argtype(float, lambda v: v >= 0, "a non-negative number", "non_negative_float")
mask_ratio = _argtype(float, lambda v: 0.0 <= v < 1.0, "a mask ratio in [0, 1)", "mask_ratio")
seed = _argtype(int, lambda v: 0 <= v < 2 ** 63, "a seed in [0, 2**63)", "seed")


def user_path(text: str) -> str:
    """A path flag's value with a leading `~` expanded (the shell leaves `--flag=~/x` and quoted paths alone), so
    that every read and write of the command uses the same place; '' stays '' (a flag's "none")."""
    return os.path.expanduser(text) if text else text


def error_message(exc: BaseException) -> str:
    """`str(exc)`, but for an error a DataLoader worker raised (re-raised in this process with the worker's whole
    traceback in its message: "Caught DataError in DataLoader worker process 0. Original Traceback ...") only the
    worker's own last line, without its type."""
    text = str(exc)
    if "in DataLoader worker process" not in text or "Original Traceback" not in text:
        return text
    last = text.rstrip().splitlines()[-1]
    return last.removeprefix(f"{type(exc).__name__}: ").removeprefix(f"{type(exc).__module__}.{type(exc).__name__}: ")


def report_user_error(prog: str, exc: BaseException) -> bool:
    """Print `exc` as one line, `PROG: error: ...`, and return True when it is the user's to mend: bad input or an
    unavailable backend (ValueError and its kind), a missing file, or a path that cannot be read or written
    (permissions, a file where a folder should be, a full disk). False for an OSError that names no path: a real
    failure, for the caller to re-raise with its traceback."""
    if isinstance(exc, OSError) and exc.filename is not None:
        message = f"{exc.filename}: {exc.strerror or exc}"
    elif isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError):
        return False
    else:
        message = error_message(exc)
    print(f"{prog}: error: {message}", file=sys.stderr)
    return True


# ------------------------------------------------------------------------------------------ the command
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
        # SIGTERM ends every command as Ctrl-C does: what it was writing removed, the folders it made empty gone
        # (pretrain and bench say more in their own handlers, which take precedence while they run)
        with sigterm_as_exit(f"fastmae {args.command}: terminated (SIGTERM)"):
            return int(args._run(args) or 0)
    except (BackendUnavailable, CheckpointError, ValueError, OSError) as exc:
        if not report_user_error(f"fastmae {args.command}", exc):
            raise
        return 2
    except KeyboardInterrupt:
        print(f"fastmae {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
