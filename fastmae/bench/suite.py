"""Helpers for `benchmarks/gpu_suite.sh`: the device's folder name, and the run's summary.md.

    python -m fastmae.bench.suite slug [--device cuda|cpu]
    python -m fastmae.bench.suite summary --parts PARTS.tsv --results DIR --mode gpu|cpu-quick [--out FILE]
    python -m fastmae.bench.suite tests --jobs N --logs DIR [--first WORD ...] -- PYTEST_ARGS...

PARTS.tsv holds one line per part of the suite: name, status (ok / failed / timeout / skipped), exit code,
seconds, note (a skip's reason, a failure's last log line, a result line of some parts), command;
tab-separated.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time

PART_FIELDS = ("name", "status", "rc", "seconds", "note", "command")
ENCODER_TARGET = {"cuda": 0.90, "cpu": 0.80}
TRAIN_TARGETS = {"vs_official_eager": 1.5, "vs_reference_compile": 1.15}
# triton attention, forward+backward: MAE's shapes against the fastest SDPA kernel, long ones against SDPA flash
ATTENTION_TARGETS = {"mae": ("vs_sdpa_best", 1.3, "the fastest SDPA kernel"),
                     "long": ("vs_sdpa_flash", 0.9, "SDPA's flash kernel")}
MEMORY_OP_TARGETS = (0.80, 2.0)  # triton token and loss ops on a GPU: share of copy bandwidth, speedup over reference


def read_parts(path: str) -> list[dict]:
    parts = []
    if not os.path.isfile(path):
        return parts
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            cells = line.split("\t") + [""] * len(PART_FIELDS)
            parts.append(dict(zip(PART_FIELDS, cells[: len(PART_FIELDS)])))
    return parts


def _status(p: dict) -> str:
    s = p["status"]
    if s == "ok":
        return "ok" + (f" ({p['note']})" if p["note"] else "")
    if s == "skipped":
        return f"skipped: {p['note']}"
    if s == "timeout":
        return f"failed: timed out after {p['seconds']} s (exit code {p['rc']})"
    return f"failed with exit code {p['rc']}" + (f" ({p['note']})" if p["note"] else "")


def _auto_aliases(records: list[dict]) -> dict[tuple, str]:
    """(model, batch, mode) -> the path that `auto` resolved to, where auto was not timed twice."""
    out = {}
    for r in records:
        if r.get("kind") == "encoder" and r.get("backend") == "auto" and r.get("status") == "skipped":
            m = re.search(r"same backends as (\w+)", r.get("reason", ""))
            if m:
                out[(r["model"], r["shape"]["batch"], r["mode"])] = m.group(1)
    return out


def key_results(records: list[dict]) -> list[str]:
    """The figures the targets are stated in: encoder share of ideal at 75%, training speedups and MFU.
    Targets are quoted for the fastmae path (`auto`, or the path auto resolved to) on the device they apply to."""
    from .limits import launch_line
    from .records import own_peak_mem_mb
    lines = []
    aliases = _auto_aliases(records)
    enc = [r for r in records if r.get("kind") == "encoder" and r.get("status") == "ok"
           and abs(r.get("mask_ratio", -1) - 0.75) < 1e-9 and r.get("of_ideal") is not None]
    for r in enc:
        target = ENCODER_TARGET.get(r.get("device_type", "cpu"))
        alias = aliases.get((r["model"], r["shape"]["batch"], r["mode"]))
        # the graph-replayed rows too: the same path without the host's time to issue it
        fastmae_path = r["backend"] in ("auto", alias) or bool(r.get("cuda_graph"))
        name = r["backend"] + (" (= auto)" if r["backend"] == alias else "")
        lines.append(f"- encoder `{r['model']}` batch {r['shape']['batch']} {name} {r['mode']} at 75%: speedup "
                     f"{r['speedup']:.2f}x of ideal {r['ideal_speedup']:.2f}x = {r['of_ideal']:.0%}{spread_note(r)}"
                     + (f" (target for the fastmae path on {r.get('device_type')}: >= {target:.0%})"
                        if fastmae_path and target else ""))
    lines += attention_key_results(records) + memory_op_key_results(records)
    launch = launch_line(records)
    if launch:  # what each kernel a host-bound step launches costs it
        lines.append(f"- launch: {launch}")
    train = [r for r in records if r.get("kind") == "train"]
    for r in train:
        if r.get("status") != "ok":
            lines.append(f"- train `{r['model']}` {r['backend']}: {r.get('status')}: {r.get('reason', '')}")
            continue
        extra = []
        for k, target in TRAIN_TARGETS.items():
            if r.get(k) is not None and r["backend"].startswith("fastmae"):  # each a path fastmae offers
                goal = f" (GPU target >= {target}x)" if r.get("device_type") == "cuda" else ""
                extra.append(f"{k.replace('_', ' ')} {r[k]:.2f}x{goal}")
        mfu = f", MFU {r['mfu']:.1%}" if r.get("mfu") is not None else ""
        if r.get("optimizer_ms") is not None:
            mfu += f", {r.get('optimizer', 'optimizer')} step {r['optimizer_ms']:.3g} ms"
        mem_name = "peak" if r.get("device_type") == "cuda" else "resident-memory increase (sampled, coarse)"
        peak = own_peak_mem_mb(r)
        mem = f", {mem_name} {peak:,.0f} MiB" if peak is not None else ""
        if (peak is not None and r.get("mem_vs_official_eager") is not None and r["backend"].startswith("fastmae")
                and r.get("device_type") == "cuda"):  # a CPU's sampled resident memory is too coarse for ratios
            mem += f" ({r['mem_vs_official_eager'] - 1:+.0%} vs official-eager; GPU target <= -20%)"
        if r.get("saved_mb_per_image") is not None:
            mem += f", saved activations {r['saved_mb_per_image']:.3g} MiB/image"
            if r.get("saved_vs_official_eager") is not None and r["backend"] != "official-eager":
                mem += f" ({r['saved_vs_official_eager'] - 1:+.0%} vs official-eager)"
        if r.get("busy_share") is not None:
            where = "GPU kernels" if r.get("device_type") == "cuda" else "CPU operators"
            mem += f", {where} busy {r['busy_share']:.0%} of the step"
            calls = r.get("profile", {}).get("calls")
            if calls and r.get("device_type") == "cuda":  # the host's time per launch, where the host bounds
                own = sum(n for k, n in r["profile"].get("calls_by_kind", {}).items() if k.startswith("fastmae"))
                mine = f", {own:,.0f} of them fastmae's Triton kernels" if own else ""
                mem += f" ({calls:,.0f} kernels{mine}, {r['median_ms'] * 1e3 / calls:.3g} µs of step each)"
        pace = ""
        if r.get("back_to_back_images_per_s"):  # steps issued back to back, as a training loop issues them
            pace = f", back to back {r['back_to_back_images_per_s']:.4g} images/s"
            if r.get("back_to_back_vs_official_eager") and r["backend"] != "official-eager":
                pace += f" ({r['back_to_back_vs_official_eager']:.2f}x official-eager's)"
        lines.append(f"- train `{r['model']}` batch {r['shape']['batch']} {r['backend']}: {r['images_per_s']:.4g} "
                     f"images/s{spread_note(r)}{pace}{mfu}{mem}" + (f"; {', '.join(extra)}" if extra else ""))
    return lines


def spread_note(r: dict) -> str:
    """' (p20-p80 a-b images/s[; steps in order: last warm-up step w ms, first third's median x ms, last third's
    y ms])': how wide a row's spread is and, from the steps kept in order (`warmup_ms`, `samples_ms`), whether its
    slow steps came early (the first third slower than the last: a warm-up too short) or not. For a training row,
    and an encoder row at 75% (the speedups are quotients of medians)."""
    from .timing import percentile
    if r.get("images_per_s_p20") is None or r.get("images_per_s_p80") is None:
        return ""
    def rate(v: float) -> str:
        return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"

    note = f" (p20-p80 {rate(r['images_per_s_p20'])}-{rate(r['images_per_s_p80'])} images/s"
    samples = r.get("samples_ms") or []
    if len(samples) >= 6:
        third = len(samples) // 3
        first, last = percentile(samples[:third], 50), percentile(samples[-third:], 50)
        warm = r.get("warmup_ms") or []
        last_warm = f"last warm-up step {warm[-1]:.3g} ms, " if warm else ""
        note += f"; steps in order: {last_warm}first third's median {first:.3g} ms, last third's {last:.3g} ms"
    return note + ")"


def attention_key_results(records: list[dict]) -> list[str]:
    """Triton's forward+backward attention against SDPA's kernels and xformers, per case and batch; with the
    host's time to issue the call beside SDPA's own choice's (an eager step the host bounds pays that time)."""
    lines = []
    for r in records:
        if not (r.get("kind") == "attention" and r.get("status") == "ok" and r.get("backend") == "triton"
                and r.get("mode") == "fwd+bwd"):
            continue
        key, target, against = ATTENTION_TARGETS["long" if r["case"].startswith("long") else "mae"]
        figures = [f"{r['tflops']:.3g} TFLOP/s"]
        if r.get("vs_sdpa_best") is not None:
            figures.append(f"{r['vs_sdpa_best']:.2f}x the fastest SDPA kernel ({r['sdpa_best']})")
        for k, name in (("vs_sdpa_flash", "sdpa-flash"), ("vs_xformers", "xformers")):
            if r.get(k) is not None:
                figures.append(f"{r[k]:.2f}x {name}")
        issue = (f"; host {r['host_ms'] * 1e3:,.0f} µs to issue (sdpa {r['sdpa_host_ms'] * 1e3:,.0f} µs)"
                 if r.get("host_ms") is not None and r.get("sdpa_host_ms") is not None else "")
        goal = (f" (GPU target: >= {target}x {against})" if r.get("device_type") == "cuda" and r.get(key) is not None
                else "")
        lines.append(f"- attention {r['case']} batch {r['shape']['B']} fwd+bwd, triton: {', '.join(figures)}{goal}"
                     f"{issue}")
    for r in records:  # the other path where triton's choice has one: which is faster at that shape
        if (r.get("kind") == "attention" and r.get("status") == "ok" and r.get("vs_triton") is not None
                and not r["case"].startswith("long")):
            lines.append(f"- attention {r['case']} batch {r['shape']['B']} {r['mode']}, {r['backend']}: "
                         f"{r['vs_triton']:.2f}x triton's own path choice")
    return lines


def memory_op_key_results(records: list[dict]) -> list[str]:
    """Triton's memory-bound ops: GB/s against the copy bandwidth, and the speedup over the reference path."""
    lines = []
    for r in records:
        if not (r.get("kind") == "op" and r.get("status") == "ok" and r.get("backend") == "triton"
                and r.get("gbps") is not None):
            continue
        figures = [f"{r['gbps']:,.0f} GB/s"]
        if r.get("frac_peak") is not None:
            figures.append(f"{r['frac_peak']:.0%} of the copy bandwidth")
        if r.get("frac_copy_same_bytes") is not None:
            figures.append(f"{r['frac_copy_same_bytes']:.0%} of a copy of the same bytes")
        if r.get("speedup") is not None:
            figures.append(f"{r['speedup']:.2f}x reference")
        if r.get("host_ms") is not None:
            figures.append(f"GPU {r['median_ms'] * 1e3:,.1f} µs, host {r['host_ms'] * 1e3:,.1f} µs to issue")
        bw, sp = MEMORY_OP_TARGETS
        # an op of a few MB takes microseconds, a few of which any kernel spends starting and ramping up: the
        # bandwidth target is read against a copy of the same bytes timed alike, the large copy's figure beside it
        goal = (f" (GPU targets: >= {bw:.0%} of copy bandwidth, read against the copy of the same bytes; "
                f">= {sp}x reference)" if r.get("device_type") == "cuda" else "")
        lines.append(f"- {r['op']} {r['case']} {r['mode']}, triton: {', '.join(figures)}{goal}")
    return lines


TUNED_TABLES = (("attention", "attention_tuned.json", "m{}/n{}/w{}/s{}"),
                ("masked-MSE loss", "loss_tuned.json", "r{}/w{}/t{}/s{}"))


def tuned_results(results_dir: str) -> list[str]:
    """What the tuners measured in this run: per kernel and key, the launch rule's time and the fastest
    candidate's (from the tables' `measured` entries, settings written as the tuner writes them), and whether
    the winner was recorded. A table that cannot be read is named instead."""
    import json

    lines = []
    for what, name, form in TUNED_TABLES:
        path = os.path.join(results_dir, name)
        if not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8") as f:
                table = json.load(f)
            mine = []
            for arch, per_kernel in sorted(table.get("measured", {}).items()):
                for kernel, entries in sorted(per_kernel.items()):
                    for key, m in sorted(entries.items()):
                        rule_ms, best_ms = m.get("rule_ms"), m.get("best_ms")
                        kept = key in table.get(arch, {}).get(kernel, {})
                        gain = f", {rule_ms / best_ms:.2f}x" if rule_ms and best_ms else ""
                        rule = f"{rule_ms * 1e3:,.1f} µs" if rule_ms else "not timed"
                        best = f"{best_ms * 1e3:,.1f} µs" if best_ms else "not timed"
                        mine.append(f"- {what} {kernel} [{key}] {arch}, shape {m.get('shape')}: rule "
                                    f"{form.format(*m['rule'])} {rule}, fastest {form.format(*m['best'])} "
                                    f"{best}{gain} ({'recorded' if kept else 'the rule stays'})")
        except (OSError, ValueError, AttributeError, TypeError, KeyError, IndexError) as exc:
            # the rest of the summary still gets written
            lines.append(f"- {what}: {name} could not be read: {type(exc).__name__}: {exc}")
            continue
        lines += mine
    return lines


def write_summary(parts_path: str, results_dir: str, mode: str, out: str) -> str:
    from .records import read_results

    parts = read_parts(parts_path)
    records = []
    res = os.path.join(results_dir, "results.json")
    if os.path.isfile(res):
        records = read_results(res)
    stamp = next((r for r in records if r.get("kind") in ("op", "encoder", "train")), None)
    lines = [f"# fastmae benchmark suite ({mode})", ""]
    if stamp:
        lines.append(f"{stamp.get('device')} · torch {stamp.get('torch')} · triton {stamp.get('triton')} · "
                     f"xformers {stamp.get('xformers')} · CUDA {stamp.get('cuda')} · commit "
                     f"`{stamp.get('git_commit')}` · {stamp.get('date')}")
        lines.append("")
    lines += ["| part | status | seconds | command |", "| --- | --- | --- | --- |"]
    for p in parts:
        cmd = p["command"].replace("|", "\\|")
        lines.append(f"| {p['name']} | {_status(p)} | {p['seconds']} | `{cmd}` |" if cmd else
                     f"| {p['name']} | {_status(p)} | {p['seconds']} | |")
    total = sum(float(p["seconds"] or 0) for p in parts)
    lines += ["", f"Parts' times summed: {total:.0f} s over {len(parts)} parts (more than the run took: the warm-up "
              f"runs beside the GPU tests); "
              f"{sum(p['status'] == 'ok' for p in parts)} ok, {sum(p['status'] == 'skipped' for p in parts)} skipped, "
              f"{sum(p['status'] not in ('ok', 'skipped') for p in parts)} failed. Logs: `logs/<part>.log`.", ""]
    key = key_results(records)
    if key:
        lines += ["## Key results", ""] + key + [""]
    tuned = tuned_results(results_dir)
    if tuned:
        lines += ["## Tuned launch settings (in this run folder; copy a table to kernels/ to use it)", ""] + tuned
        lines.append("")
    prio = os.path.join(results_dir, "priority.json")
    if os.path.isfile(prio):
        import json

        with open(prio, encoding="utf-8") as f:
            data = json.load(f)
        lines += ["## Measured backend order (priority.json)", ""]
        for dev, per_op in data.items():
            if dev != "source":
                lines += [f"- {dev} {op}: {' > '.join(order)}" for op, order in per_op.items()]
        lines.append("")
    files = sorted(f for f in os.listdir(results_dir) if os.path.isfile(os.path.join(results_dir, f)))
    lines += ["## Files", ""] + [f"- `{f}`" for f in sorted(set(files) | {"summary.md"})]
    text = "\n".join(lines).rstrip() + "\n"
    from ..model.checkpoint import atomic_write_text

    atomic_write_text(out, text)
    return text


def collect_tests(pytest_args: list[str]) -> list[str]:
    """The node ids pytest selects for `pytest_args` (paths, -k, -m, ...), in collection order."""
    cmd = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *pytest_args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode not in (0, 5):  # 5: nothing selected
        raise RuntimeError(f"pytest could not collect the tests (exit code {proc.returncode}):\n"
                           + (proc.stdout + proc.stderr)[-3000:])
    return [line.strip() for line in proc.stdout.splitlines() if "::" in line and not line.startswith(" ")]


def shard(ids: list[str], jobs: int, first: tuple[str, ...] = ()) -> list[list[str]]:
    """Round-robin shards, the ids that contain one of the words in `first` at the head of every shard."""
    ordered = sorted(ids, key=lambda i: not any(w in i for w in first))  # stable: collection order otherwise
    shards = [ordered[j::jobs] for j in range(max(1, jobs))]
    return [s for s in shards if s]


def run_sharded_tests(pytest_args: list[str], jobs: int, log_dir: str, first: tuple[str, ...] = ()) -> int:
    """Run the selected tests in `jobs` pytest processes at once; one verbose log per shard in `log_dir`.

    On a GPU machine most of a cold test run is spent compiling Triton kernels, one at a time per process, so
    shards on several cores finish several times sooner; the verbose logs show every finished test even when
    a timeout stops the run. Returns 0 when every shard passed, else the largest pytest exit code.
    """
    ids = collect_tests(pytest_args)
    if not ids:
        print("no tests selected by: pytest " + " ".join(pytest_args))
        return 5
    os.makedirs(log_dir, exist_ok=True)
    shards = shard(ids, jobs, first)
    print(f"{len(ids)} tests in {len(shards)} shards; logs: {log_dir}/tests-shard<i>.log", flush=True)
    t0 = time.time()
    procs = []
    for i, ids_i in enumerate(shards):
        log = open(os.path.join(log_dir, f"tests-shard{i}.log"), "w", encoding="utf-8")
        cmd = [sys.executable, "-m", "pytest", "-v", "-rfE", "-p", "no:cacheprovider", *ids_i]
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log))
    codes = []
    for i, (proc, log) in enumerate(procs):
        codes.append(proc.wait())
        log.close()
        with open(log.name, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
        tail = next((ln for ln in reversed(lines) if ln.startswith("=")), "(no summary line)")
        print(f"shard {i}: exit code {codes[-1]}: {tail.strip('= ')}")
        for ln in lines:
            if ln.startswith(("FAILED ", "ERROR ")):
                print("  " + ln)
    print(f"{len(ids)} tests in {time.time() - t0:.0f} s")
    bad = [c for c in codes if c != 0]
    return max(bad) if bad else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastmae.bench.suite", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("slug", help="print the folder name of a device")
    p.add_argument("--device", default="auto")
    p.add_argument("--import-check", action="store_true", help="also import fastmae.kernels and the bench CLI")
    p = sub.add_parser("summary", help="write summary.md")
    p.add_argument("--parts", required=True)
    p.add_argument("--results", required=True)
    p.add_argument("--mode", default="gpu")
    p.add_argument("--out", default=None)
    p = sub.add_parser("tests", help="run pytest in parallel shards (the GPU suite's tests)")
    p.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1), help="pytest processes at once")
    p.add_argument("--logs", required=True, help="folder for one log per shard")
    p.add_argument("--first", action="append", default=[], help="run ids containing WORD first (repeatable)")
    p.add_argument("pytest_args", nargs=argparse.REMAINDER, help="after --: what to collect (paths, -k, -m)")
    args = parser.parse_args(argv)
    if args.cmd == "tests":
        rest = args.pytest_args[1:] if args.pytest_args[:1] == ["--"] else args.pytest_args
        if args.jobs < 1:
            parser.error("--jobs must be at least 1")
        return run_sharded_tests(rest, args.jobs, args.logs, tuple(args.first))
    if args.cmd == "slug":
        if args.import_check:
            import fastmae.kernels  # noqa: F401  (the folder kernels/ installed as fastmae.kernels)

            from . import cli  # noqa: F401
        from .common import resolve_device
        from .records import device_slug

        print(device_slug(resolve_device(args.device)))
        return 0
    write_summary(args.parts, args.results, args.mode, args.out or os.path.join(args.results, "summary.md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
