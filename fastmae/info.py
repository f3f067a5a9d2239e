"""`fastmae info` (also `python -m fastmae.info`): versions, device, and which backend can run which op.

For each op and backend it prints `yes` or the registry's reasons, for a representative input on every
available device type (CPU always; CUDA when present), in each float dtype.
"""
from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys

import torch

from . import __version__, ops
from .bench.common import DTYPES  # torch's names and the short ones `fastmae pretrain --precision` takes
from .ops.registry import BACKENDS, OPS, Inputs

HELP = "print versions, devices and which backend serves which op (or why not)"

# a representative head dim per op: the attention head dim matters, the token ops have none
_HEAD_DIM = {"attention": 64}


def versions() -> dict[str, str]:
    out = {"fastmae": __version__, "python": platform.python_version(), "torch": torch.__version__}
    for name in ("triton", "xformers", "numpy"):
        try:
            out[name] = importlib.import_module(name).__version__
        except Exception as exc:  # noqa: BLE001 - report any import failure as text
            out[name] = "not installed" if isinstance(exc, ModuleNotFoundError) else f"broken ({exc})"
    return out


def devices() -> list[str]:
    out = ["cpu"]
    if torch.cuda.is_available():
        out.append("cuda")
    return out


def device_names() -> dict[str, str]:
    names = {"cpu": platform.processor() or platform.machine()}
    if torch.cuda.is_available():
        cap = torch.cuda.get_device_capability()
        names["cuda"] = f"{torch.cuda.get_device_name()} (sm_{cap[0]}{cap[1]}, CUDA {torch.version.cuda})"
    return names


def tuned_settings(op: str = "attention") -> str:
    """Which GPU architectures have measured launch settings for the op's kernels, `attention` or `loss` (read
    without importing triton)."""
    import json
    from importlib.util import find_spec

    spec = find_spec("fastmae.kernels")
    if spec is None or not spec.submodule_search_locations:
        return "fastmae.kernels is not installed"
    from fastmae.kernels.utils import TUNED_DIR_ENV, tuned_path

    path = tuned_path(os.path.join(list(spec.submodule_search_locations)[0], f"{op}_tuned.json"))
    where = f" (the table in {TUNED_DIR_ENV})" if os.environ.get(TUNED_DIR_ENV) else ""
    table = {}
    try:
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                table = json.load(f)
        archs = [a for a in sorted(table) if a.startswith("sm_")]
        src = table.get("source", {})
        text = "; ".join(f"{a}: {sum(len(v) for v in table[a].values())} settings "
                         f"({src.get(a, {}).get('device', '?')}, {src.get(a, {}).get('date', '?')})" for a in archs)
    except (OSError, ValueError, AttributeError, TypeError) as exc:
        return f"{path} cannot be read ({exc}): every GPU uses the rule"
    if not archs:
        flag = "" if op == "attention" else f" --op {op}"
        return f"none recorded{where}: every GPU uses the rule (fastmae bench tune{flag} --write records them)"
    return text + f"{where}; other GPUs use the rule"


def availability(device: str, dtype: torch.dtype) -> dict[str, dict[str, list[str]]]:
    """op -> backend -> reasons (empty list: available)."""
    table = {}
    for op in OPS:
        inputs = Inputs(torch.device(device), dtype, head_dim=_HEAD_DIM.get(op), options={"op": op})
        table[op] = {b: ops.not_supported_reasons(op, b, inputs) for b in BACKENDS}
    return table


def auto_choice(op: str, device: str, dtype: torch.dtype) -> str:
    """What the automatic order picks for op (whatever FASTMAE_BACKEND asks, shown apart), or "none"."""
    inputs = Inputs(torch.device(device), dtype, head_dim=_HEAD_DIM.get(op), options={"op": op})
    try:
        return ops.resolve(op, inputs, "auto").backend
    except ops.BackendUnavailable:
        return "none"


def requested_backends() -> str:
    """What FASTMAE_BACKEND asks of each op: "auto" (nothing asked), one name for every op, or the ops it names
    ("attention=sdpa, gather_tokens=reference; the other ops auto"), with where it came from. A bad value raises
    ValueError naming FASTMAE_BACKEND."""
    from .cli import check_backend

    check_backend(None)  # FASTMAE_BACKEND alone, its errors named after it
    env = os.environ.get(ops.ENV_VAR, "").strip()
    per_op = {op: ops.requested(op) for op in OPS}
    asked = {op: name for op, name in per_op.items() if name != "auto"}
    if not asked:
        text = "auto"
    elif len(asked) == len(OPS) and len(set(asked.values())) == 1:
        text = f"{next(iter(asked.values()))} for every op"
    else:
        text = ", ".join(f"{op}={name}" for op, name in asked.items())
        text += "; the other ops auto" if len(asked) < len(OPS) else ""
    return text + (f" (from {ops.ENV_VAR})" if env else f" ({ops.ENV_VAR} unset: the automatic order)")


def report(dtypes=(torch.float32, torch.float16, torch.bfloat16)) -> str:
    lines = ["fastmae info", ""]
    for k, v in versions().items():
        lines.append(f"  {k:<9} {v}")
    for dev, name in device_names().items():
        lines.append(f"  {dev:<9} {name}")
    lines.append(f"  backend   {requested_backends()}")
    lines.append(f"  tuned     Triton attention launch settings: {tuned_settings()}")
    lines.append(f"            Triton masked-MSE loss launch settings: {tuned_settings('loss')}")
    for dev in devices():
        for dtype in dtypes:
            dname = str(dtype).replace("torch.", "")
            lines += ["", f"[{dev}, {dname}]  (attention with head dim 64)"]
            table = availability(dev, dtype)
            for op in OPS:
                lines.append(f"  {op}  (automatic choice: {auto_choice(op, dev, dtype)})")
                for b in BACKENDS:
                    reasons = table[op][b]
                    lines.append(f"    {b:<10} {'yes' if not reasons else 'no: ' + '; '.join(reasons)}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", choices=[*DTYPES, "all"], default="all",
                        help="which dtype(s) to report (fp32, fp16 and bf16 name the same ones)")


def run(args: argparse.Namespace) -> int:
    if args.dtype == "all":
        dtypes = (torch.float32, torch.float16, torch.bfloat16)
    else:
        dtypes = (DTYPES[args.dtype],)
    print(report(dtypes))
    return 0


def main(argv=None) -> int:
    from .cli import report_user_error

    parser = argparse.ArgumentParser(prog="python -m fastmae.info", description=HELP)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except ValueError as exc:  # a bad FASTMAE_BACKEND: one line, as `fastmae info` prints it
        report_user_error(parser.prog, exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
