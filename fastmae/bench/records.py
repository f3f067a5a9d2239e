"""Result records: the environment stamp, results.json / results.csv, and terminal tables.

A record is a flat dict. Every record carries:
  kind       "op", "encoder", "train" or "limit"
  op / model what was measured (an op name, or a model preset)
  backend    a backend name (ops, encoder), a training variant (train) or "torch" (limits; "triton" for the
             launch probes)
  shape      a dict of sizes; dtype; mask_ratio where it applies; mode ("fwd", "fwd+bwd", "step")
  status     "ok", "skipped" (with `reason`: the registry's or the benchmark's sentence) or "failed"
             (with `reason`: the exception)
  the figures (median_ms, p20_ms, p80_ms, reps and the throughputs), and the stamp: device,
  device_type, torch, triton, xformers, cuda, python, git_commit, tuned_tables (`tuned_tables()`), date.

`write_results(out_dir, records)` merges into `out_dir/results.json` (a record replaces an older one with
the same key: same kind, op/case/model, backend, mode, shape, dtype, mask ratio and device), then rewrites
`results.csv` from the merged list, so several commands can share one output folder.
"""
from __future__ import annotations

import atexit
import csv
import datetime as _dt
import functools
import importlib.metadata
import io
import json
import os
import platform
import re
import subprocess
import sys
import time
from typing import Callable, Iterable, Sequence

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# what makes two records the same measurement (a later run replaces the earlier's); a --quick run's records are
# never the same as a full run's
KEY_FIELDS = ("kind", "op", "case", "model", "backend", "mode", "shape", "dtype", "mask_ratio", "device", "quick")
STAMP_FIELDS = ("device", "device_type", "torch", "triton", "xformers", "cuda", "python", "git_commit",
                "tuned_tables", "date")


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


COMMIT_ENV = "FASTMAE_COMMIT"


def git_commit(repo: str = REPO_ROOT) -> str:
    """The commit named by the environment variable FASTMAE_COMMIT, marked as stated rather than read, when it is
    set: a copy of the checkout may carry a stale .git folder (on a GPU machine the records of a second run once
    named the first run's commit). Else the checked-out commit (with "+dirty" when tracked files are modified),
    or "unknown" where git cannot tell (no .git folder, no git installed)."""
    stated = os.environ.get(COMMIT_ENV, "").strip()
    if stated:
        return f"{stated} (from {COMMIT_ENV})"
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
        if head.returncode == 0:
            commit = head.stdout.strip()
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                                   capture_output=True, text=True, timeout=10)
            return commit + ("+dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def slugify(text: str) -> str:
    text = re.sub(r"\(.*?\)", "", text)  # drop "(R)", "(TM)", core counts
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def device_slug(device: torch.device | str) -> str:
    """A folder name for a device: the GPU's name, or "cpu-" and the processor's name."""
    device = torch.device(device)
    if device.type == "cuda":
        return slugify(torch.cuda.get_device_name(device))
    return "cpu-" + slugify(cpu_name().replace("Processor", ""))


def now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@functools.lru_cache(maxsize=None)
def _static_stamp() -> tuple:
    return (("torch", torch.__version__), ("triton", package_version("triton")),
            ("xformers", package_version("xformers")), ("cuda", torch.version.cuda or "none"),
            ("python", platform.python_version()), ("git_commit", git_commit()))


def tuned_tables() -> str:
    """Which tuned launch-setting tables the Triton launchers read in this process, by a digest of their contents
    (the commit names the kernels' own tables, not a FASTMAE_TUNED_DIR's): 'none', or e.g.
    'loss 3f2a9c01b2de (FASTMAE_TUNED_DIR)'; a table the launchers ignore (unsound, or no triton to launch
    with) is listed as ignored."""
    import hashlib
    import importlib
    from importlib.util import find_spec

    from ..kernels.utils import TUNED_DIR_ENV, tuned_path  # torch only

    spec = find_spec("fastmae.kernels")
    if spec is None or not spec.submodule_search_locations:
        return "none"
    own = list(spec.submodule_search_locations)[0]
    where = f" ({TUNED_DIR_ENV})" if os.environ.get(TUNED_DIR_ENV) else ""
    found = []
    for op in ("attention", "loss"):
        path = tuned_path(os.path.join(own, f"{op}_tuned.json"))
        if not os.path.isfile(path):
            continue
        with open(path, "rb") as f:
            digest = hashlib.sha1(f.read()).hexdigest()[:12]
        try:  # what the launchers read: the same validated, cached read
            used = bool(importlib.import_module(f"fastmae.kernels.{op}").tuned_table())
        except ImportError:
            used = False
        found.append(f"{op} {digest}{where}" + ("" if used else " ignored"))
    return ", ".join(found) or "none"


def environment(device: torch.device | str) -> dict:
    """The stamp every record carries."""
    device = torch.device(device)
    stamp = {"device": device_name(device), "device_type": device.type}
    stamp.update(dict(_static_stamp()))
    stamp["tuned_tables"] = tuned_tables()
    chosen = os.environ.get("FASTMAE_BACKEND")  # (ops.ENV_VAR) it changes what the fastmae and auto rows run
    if chosen:
        stamp["fastmae_backend_env"] = chosen
    stamp["date"] = now_utc()
    return stamp


def newest_group(rows: Sequence[dict], key: Callable[[dict], object]) -> list[dict]:
    """The rows of the configuration `key(row)` (batch, dtype, device, ...) measured last, by the newest date among
    its rows: a folder that several runs wrote into holds other configurations beside it, which one plot or table
    must not mix. [] for no rows."""
    groups: dict = {}
    for r in rows:
        groups.setdefault(json.dumps(key(r), default=str), []).append(r)
    return max(groups.values(), key=lambda g: max(str(r.get("date", "")) for r in g)) if groups else []


def run_config(r: dict) -> tuple:
    """What a model-level record (encoder, train) was measured at, beside its model and variant: batch, dtype,
    device (the CPU's names its thread count), and a training step's mask ratio (an encoder run's rows span the
    ratios)."""
    return (r.get("shape", {}).get("batch"), r.get("dtype"), r.get("device"),
            r.get("mask_ratio") if r.get("kind") == "train" else None)


def newest_run(rows: Sequence[dict]) -> list[dict]:
    """The rows of the command run last: every record of one run carries that run's date stamp. A folder several
    runs wrote into (other batches, dtypes, options) holds theirs beside it, which one table or plot must not
    mix. [] for no rows."""
    if not rows:
        return []
    newest = max(str(r.get("date", "")) for r in rows)
    return [r for r in rows if str(r.get("date", "")) == newest]


def newest_run_rows(rows: Sequence[dict]) -> list[dict]:
    """`newest_group` of model-level rows by `run_config`, in their order, with the rows of its dtype and device
    that have no shape (skipped training variants recorded before their records carried one)."""
    chosen = newest_group([r for r in rows if "shape" in r] or rows, run_config)
    if not chosen:
        return []
    keep = {id(r) for r in chosen}
    dtype, device = chosen[0].get("dtype"), chosen[0].get("device")
    return [r for r in rows
            if id(r) in keep or ("shape" not in r and (r.get("dtype"), r.get("device")) == (dtype, device))]


def stamp(records: Iterable[dict], env: dict) -> list[dict]:
    out = []
    for r in records:
        r = dict(r)
        for k, v in env.items():
            r.setdefault(k, v)
        out.append(r)
    return out


def record_key(r: dict) -> str:
    return json.dumps([r.get(k) for k in KEY_FIELDS], sort_keys=True, default=str)


def merge(old: Sequence[dict], new: Sequence[dict]) -> list[dict]:
    """`old` with every record that `new` measures again replaced, then the rest of `new`, in order."""
    new_keys = {record_key(r) for r in new}
    return [r for r in old if record_key(r) not in new_keys] + list(new)


def read_results(path: str) -> list[dict]:
    """Records from a results.json file, or from the results.json inside a folder. A file that is not a list of
    records (empty, cut short, not JSON, another JSON value) raises ValueError naming the file and what is wrong."""
    if os.path.isdir(path):
        path = os.path.join(path, "results.json")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a results file (not UTF-8 text)") from None
    if not text.strip():
        raise ValueError(f"{path}: empty, not a list of records")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not JSON, or cut short ({exc.msg} at line {exc.lineno} column {exc.colno})") \
            from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a list of records, found a JSON {_json_type(data)}")
    bad = next((i for i, r in enumerate(data) if not isinstance(r, dict)), None)
    if bad is not None:
        raise ValueError(f"{path}: expected a list of records, item {bad} is a JSON {_json_type(data[bad])}")
    return data


def _json_type(value) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")


def _csv_value(v) -> str:
    if isinstance(v, dict):
        return " ".join(f"{k}={x}" for k, x in v.items())
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (list, tuple)):
        return " ".join(str(x) for x in v)
    return "" if v is None else str(v)


def write_csv(path: str, records: Sequence[dict]) -> None:
    """One row per record, one column per field any record has; written whole or not at all (a run stopped
    mid-write leaves the previous file)."""
    from ..model.checkpoint import atomic_write_text

    fields: list[str] = []
    for r in records:
        for k in r:
            if k not in fields:
                fields.append(k)
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(fields)
    for r in records:
        w.writerow([_csv_value(r.get(k)) for k in fields])
    atomic_write_text(path, buf.getvalue())


def write_results(out_dir: str, records: Sequence[dict], old: Sequence[dict] | None = None) -> list[dict]:
    """Merge `records` into out_dir/results.json (or into `old`, the file's records read before) and rewrite
    out_dir/results.csv; returns the merged list."""
    from ..model.checkpoint import atomic_write_text

    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "results.json")
    merged = merge(_results_in(out_dir) if old is None else old, records)
    atomic_write_text(path, json.dumps(merged, indent=1, default=str) + "\n")
    write_csv(os.path.join(out_dir, "results.csv"), merged)
    return merged


def _results_in(out_dir: str) -> list[dict]:
    """The records out_dir/results.json holds ([] when there is none)."""
    path = os.path.join(out_dir, "results.json")
    return read_results(path) if os.path.isfile(path) else []


class Recorder:
    """Collects records and, with an output folder, writes them as they come, at most every `interval_s`
    seconds (so a run cut off by a timeout keeps what it measured, without rewriting a growing file after each
    of hundreds of records), and at `flush()`."""

    def __init__(self, out_dir: str | None, env: dict, interval_s: float = 2.0):
        self.out_dir = out_dir
        self.env = env
        self.interval_s = interval_s
        self.records: list[dict] = []
        self._old: list[dict] | None = None  # what the file held before this run, read once
        self._written = float("-inf")

    def add(self, *records: dict) -> None:
        for r in records:  # stamped in place: figures added to a record later (speedups) are kept
            for k, v in self.env.items():
                r.setdefault(k, v)
            self.records.append(r)
        if self.out_dir:  # written when the process ends if not before (a SIGTERM from a time limit: see cli.run)
            _UNWRITTEN.add(self)
        if time.monotonic() - self._written >= self.interval_s:
            self.flush()

    def earlier(self) -> list[dict]:
        """The records the output folder held before this run (read once; [] without a folder)."""
        if self._old is None:
            self._old = _results_in(self.out_dir) if self.out_dir else []
        return self._old

    def flush(self) -> None:
        if self.out_dir:
            try:
                write_results(self.out_dir, self.records, self.earlier())
            except Exception:  # the caller reports it; retried at exit it would only fail again, as a traceback
                # (a SIGTERM's SystemExit mid-write is no Exception: those records are left to the exit hook)
                _UNWRITTEN.discard(self)
                raise
            self._written = time.monotonic()
            _UNWRITTEN.discard(self)


_UNWRITTEN: set[Recorder] = set()  # recorders holding records not yet written (held only until they are)


@atexit.register
def _flush_unwritten() -> None:
    for recorder in list(_UNWRITTEN):
        try:
            recorder.flush()
        except Exception as exc:  # noqa: BLE001 - on the way out: one line, not an "Exception ignored" traceback
            print_err(f"fastmae bench: the last records were not written to {recorder.out_dir}: "
                      f"{exc.strerror if isinstance(exc, OSError) and exc.strerror else exc}")


# ------------------------------------------------------------------------------------------ terminal
def fmt(v, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v != v:
            return "nan"
        if v == 0:
            return "0"
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.{digits}g}"
    return str(v)


def shape_str(shape) -> str:
    if isinstance(shape, dict):
        return " ".join(f"{k}={v}" for k, v in shape.items())
    return "" if shape is None else str(shape)


def table(headers: Sequence[str], rows: Sequence[Sequence], align: str | None = None) -> str:
    """A plain-text table; numbers right-aligned unless `align` (one of 'l'/'r' per column) says otherwise."""
    cells = [[fmt(c) if not isinstance(c, str) else c for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, c in enumerate(row):
            widths[i] = max(widths[i], len(c))
    if align is None:
        align = "".join("r" if rows and all(isinstance(r[i], (int, float)) or r[i] is None for r in rows) else "l"
                        for i in range(len(headers)))

    def line(row):
        return "  ".join(c.rjust(w) if a == "r" else c.ljust(w) for c, w, a in zip(row, widths, align)).rstrip()

    out = [line(list(headers)), "  ".join("-" * w for w in widths)]
    out += [line(row) for row in cells]
    return "\n".join(out)


def reasons_footnotes(records: Sequence[dict]) -> tuple[dict[str, int], str]:
    """Number each distinct skip/failure reason once; returns (reason -> number, the footnote text)."""
    numbers: dict[str, int] = {}
    for r in records:
        if r.get("status") != "ok" and r.get("reason"):
            numbers.setdefault(r["reason"], len(numbers) + 1)
    text = "\n".join(f"  [{n}] {reason}" for reason, n in numbers.items())
    return numbers, text


def status_cell(r: dict, numbers: dict[str, int]) -> str:
    if r.get("status") == "ok":
        return "ok"
    n = numbers.get(r.get("reason", ""))
    return f"{r.get('status')} [{n}]" if n else str(r.get("status"))


def optimizer_cell(r: dict) -> str:
    """A training record's optimizer and the time of its step alone: "foreach, 4.1 ms"."""
    impl = str(r.get("optimizer", "")).removeprefix("AdamW ").strip()
    if r.get("optimizer_ms") is None:
        return impl or "-"
    return f"{impl}, {fmt(float(r['optimizer_ms']))} ms" if impl else f"{fmt(float(r['optimizer_ms']))} ms"


# A training record's busy share is the profiled kernels' own time per step over the step time: on CUDA the step
# timed without the profiler, on a CPU the profiled steps' own time (the profiler slows the operators it times as
# much as the step, `train_bench.run_variant`), so a CPU share stays within 100%. Records written before the CPU
# share was taken that way passed 100%, which no step can have: the tables cap such a share and mark it.
BUSY_CAPPED_NOTE = ("100%*: the profiled time per step exceeds the step time it is set against (the profiler slows "
                    "what it records, most on a CPU): the excess is that overhead, not work the step holds")


def busy_cell(share: float | None) -> str:
    """A busy share (`busy_share` of a training record) as a percentage, capped at "100%*" (see BUSY_CAPPED_NOTE)."""
    if share is None:
        return "-"
    return "100%*" if round(100 * share) > 100 else f"{100 * share:.0f}%"


def print_err(*args) -> None:
    print(*args, file=sys.stderr)


CUDA_PEAK_KIND = ("cuda max_memory_allocated over the variant's set-up and training steps, less what was allocated "
                  "before it")
# the kind of the records written before that: the process's peak over the whole variant, its saved-activation
# count included, which kept every forward it counted (a leak) and so raised that variant's peak and every later one
_CUDA_PEAK_KIND_LEAKED = "cuda max_memory_allocated"
LEAKED_PEAK_NOTE = ("not shown for runs recorded before the peak was read from the variant's own set-up and steps "
                    "(their peak included forwards the saved-activation count kept alive)")


def own_peak_mem_mb(r: dict) -> float | None:
    """A training record's peak memory in MiB, or None for records whose peak is not the step's (see
    LEAKED_PEAK_NOTE; results.json keeps what they stored)."""
    if r.get("peak_mem_kind") == _CUDA_PEAK_KIND_LEAKED:
        return None
    return r.get("peak_mem_mb")


def peak_mem_kind(r: dict) -> str | None:
    """What a training record's `own_peak_mem_mb` measured, or why it is None."""
    if r.get("peak_mem_kind") == _CUDA_PEAK_KIND_LEAKED:
        return LEAKED_PEAK_NOTE
    return r.get("peak_mem_kind")
