"""`fastmae bench readme`: the README's results block, rendered from recorded results files.

Finds every `results.json` under the results folder (`<device-slug>/<date>/results.json`), takes the latest
GPU run and the latest CPU run (by the newest record date), and renders their encoder, training and op
tables, each stamped with device, versions, commit and date, plus one plot link per run. Nothing in the
block is typed by hand; the block sits between the two markers below and is replaced whole.
"""
from __future__ import annotations

import os
from typing import Sequence

from .limits import launch_line
from .records import (BUSY_CAPPED_NOTE, busy_cell, newest_run, newest_run_rows, optimizer_cell, own_peak_mem_mb,
                      peak_mem_kind, read_results)

START = "<!-- bench-results:start -->"
END = "<!-- bench-results:end -->"
MEASURED = ("op", "attention", "encoder", "train")


def find_runs(results_root: str) -> list[tuple[str, list[dict]]]:
    """(folder, records) for every results.json under `results_root`."""
    runs = []
    for dirpath, _, files in os.walk(results_root):
        if "results.json" in files:
            try:
                records = read_results(os.path.join(dirpath, "results.json"))
            except (ValueError, OSError):
                continue
            if any(r.get("kind") in MEASURED for r in records):
                runs.append((dirpath, records))
    return runs


def latest_runs(results_root: str) -> dict[str, tuple[str, list[dict]]]:
    """The latest run per device type ("cuda", "cpu"), by the newest record date; ties go to the folder name."""
    best: dict[str, tuple[tuple, str, list[dict]]] = {}
    for folder, records in find_runs(results_root):
        measured = [r for r in records if r.get("kind") in MEASURED and not r.get("quick")]
        if not measured:  # a --quick run (a check of the code paths) is no result to show
            continue
        dtype = max({r.get("device_type", "cpu") for r in measured},
                    key=lambda t: sum(r.get("device_type", "cpu") == t for r in measured))
        key = (max(str(r.get("date", "")) for r in measured), folder)
        if dtype not in best or key > best[dtype][0]:
            best[dtype] = (key, folder, [r for r in records if not r.get("quick")])
    return {t: (folder, records) for t, (_, folder, records) in best.items()}


def _f(v: float | None, digits: int = 3) -> str:
    if v is None:
        return "–"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.{digits}g}"


def _short(reason: str, n: int = 110) -> str:
    """A reason for a table cell: whole if it fits in n characters, else cut before the last parenthesis or clause
    that starts within them, else before the last clause after a colon or comma (mid-word only when none does),
    marked with "…" (results.json has it whole)."""
    reason = (reason or "").replace("|", "/").replace("\n", " ")
    if len(reason) <= n:
        return reason
    head = reason[:n]  # a cut at or before n - 2 leaves room for " …"
    cut = max(head.rfind(" ("), head.rfind("; "))
    if cut < n // 3:
        cut = max(head.rfind(": "), head.rfind(", "))
    return (head[:cut].rstrip() if n // 3 <= cut <= n - 2 else head[: n - 2]) + " …"


def _md_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


def stamp_line(records: Sequence[dict], folder: str, base: str) -> str:
    r = next(x for x in records if x.get("kind") in MEASURED)
    commits = dict.fromkeys(str(x.get("git_commit", "?")) for x in records if x.get("kind") in MEASURED)
    commit = "`, `".join(c[:12] + ("+dirty" if c.endswith("+dirty") else "") for c in commits)
    dates = sorted(str(x.get("date", "")) for x in records if x.get("kind") in MEASURED)
    return (f"{r.get('device', '?')} · torch {r.get('torch', '?')} · triton {r.get('triton', '?')} · "
            f"xformers {r.get('xformers', '?')} · CUDA {r.get('cuda', '?')} · "
            f"commit{'s' if len(commits) > 1 else ''} `{commit}`"
            f" · {dates[0]}{' to ' + dates[-1] if dates[-1] != dates[0] else ''} · "
            f"[`{os.path.relpath(folder, base)}`]({os.path.relpath(folder, base)})")


def encoder_section(records: Sequence[dict]) -> list[str]:
    rows = [r for r in records if r.get("kind") == "encoder"]
    out = []
    for model in sorted({r["model"] for r in rows}):
        mrows = newest_run_rows([r for r in rows if r["model"] == model])
        ratios = sorted({r["mask_ratio"] for r in mrows})
        first = mrows[0]
        out.append(f"**Encoder** `{model}`, batch {first['shape']['batch']}, {first['dtype']}"
                   f"{' autocast' if first.get('amp') else ''}: images/s (speedup over ratio 0, share of the ideal "
                   f"speedup (L+1)/(K+1))")
        out.append("")
        table_rows, skipped = [], {}
        for backend in dict.fromkeys(r["backend"] for r in mrows):
            for mode in ("fwd", "fwd+bwd"):
                cells = {r["mask_ratio"]: r for r in mrows if r["backend"] == backend and r["mode"] == mode}
                if not cells:
                    continue
                if all(c.get("status") != "ok" for c in cells.values()):
                    skipped.setdefault(backend, next(iter(cells.values())).get("reason", ""))
                    continue
                row = [backend, mode]
                for q in ratios:
                    c = cells.get(q)
                    if c is None or c.get("status") != "ok":
                        row.append("–")
                    elif q == 0.0:
                        row.append(_f(c["images_per_s"]))
                    else:
                        sp, of = c.get("speedup"), c.get("of_ideal")
                        extra = f" ({sp:.2f}x, {of:.0%})" if sp is not None and of is not None else ""
                        row.append(_f(c["images_per_s"]) + extra)
                table_rows.append(row)
        out += _md_table(["backend", "mode"] + [f"ratio {q:g}" for q in ratios], table_rows)
        for backend, reason in skipped.items():
            out.append(f"\n`{backend}` not run: {_short(reason)}")
        out.append("")
    return out


def train_section(records: Sequence[dict]) -> list[str]:
    rows = [r for r in records if r.get("kind") == "train"]
    out = []
    for model in sorted({r["model"] for r in rows}):
        mrows = newest_run_rows([r for r in rows if r["model"] == model])
        ok = [r for r in mrows if r.get("status") == "ok"]
        first = ok[0] if ok else mrows[0]
        batch = first.get("shape", {}).get("batch", "?")
        out.append(f"**Training step** `{model}`, batch {batch}, {first['dtype']}"
                   f"{' autocast' if first.get('amp') else ''}, mask ratio {first['mask_ratio']} "
                   f"(forward, loss, backward, AdamW)")
        out.append("")
        table_rows = []
        busy = any(r.get("busy_share") is not None for r in ok)
        b2b = any(r.get("back_to_back_images_per_s") is not None for r in ok)  # records since the figure exists
        for r in mrows:
            if r.get("status") != "ok":
                table_rows.append([r["backend"], f"{r['status']}: {_short(r.get('reason', ''), 80)}", "", "", "",
                                   "", "", "", ""] + [""] * (busy + b2b))
                continue
            mem = own_peak_mem_mb(r)
            pace = r.get("back_to_back_images_per_s")
            table_rows.append(
                [r["backend"], _f(r["images_per_s"])] + ([_f(pace) if pace else "–"] if b2b else [])
                + [f"{r['vs_official_eager']:.2f}x" if r.get("vs_official_eager") else "–",
                   f"{r['vs_reference_compile']:.2f}x" if r.get("vs_reference_compile") else "–",
                   f"{mem:,.0f} MiB" if mem is not None else "n/a",
                   f"{r['saved_mb_per_image']:.1f} MiB" if r.get("saved_mb_per_image") is not None else "–",
                   f"{r['mfu']:.1%}" if r.get("mfu") is not None else "–",
                   optimizer_cell(r) if r.get("optimizer") or r.get("optimizer_ms") is not None else "–"]
                + ([busy_cell(r["busy_share"]) if r.get("busy_share") is not None else "–"] if busy else [])
                + [r.get("dispatch", "")])
        out += _md_table(["variant", "images/s"] + (["back to back"] if b2b else [])
                         + ["vs official-eager", "vs reference+compile", "peak memory", "saved/image", "MFU",
                            "AdamW step"] + (["busy"] if busy else []) + ["served by"], table_rows)
        kinds = sorted({peak_mem_kind(r) for r in ok if r.get("peak_mem_kind")})
        if kinds:
            out.append(f"\nPeak memory: {'; '.join(kinds)}. Saved/image: activations autograd keeps for the "
                       f"backward, per image (eager variants). MFU: model FLOPs (3 x forward, linear layers and "
                       f"attention) per second over the matmul peak measured in the same run."
                       + (" AdamW step: the implementation and the time of the optimizer's step alone (reference "
                          "variants: torch's default, as the official script constructs it)."
                          if any(r.get("optimizer") for r in ok) else "")
                       + (" Busy: the profiled kernels' own time per step (on a CPU: operators' own time) over the "
                          "step time; well below 100% the step waits on the host." if busy else "")
                       + (f" {BUSY_CAPPED_NOTE}." if any(busy_cell(r.get("busy_share")) == "100%*" for r in ok)
                          else ""))
        out.append("")
    return out


def ops_section(records: Sequence[dict]) -> list[str]:
    rows = newest_run([r for r in records if r.get("kind") == "op"])
    if not rows:
        return []
    records = [r for r in records if r.get("date") == rows[0].get("date")]  # that run's limits and launch costs
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    cases = list(dict.fromkeys((r["op"], r["case"]) for r in rows))
    first = rows[0]
    out = [f"**Ops** ({first['dtype']}, batch {first['shape'].get('B', first['shape'].get('T', '?'))}): "
           f"median forward+backward time (forward only where an op has no backward), speedup over "
           f"`reference`, and TFLOP/s or GB/s as a share of the limit measured in the same run (for memory-bound "
           f"ops also of copies that move as many bytes in as many passes, timed with the op)", ""]
    table_rows = []
    for op, case in cases:
        crows = [r for r in rows if r["op"] == op and r["case"] == case]
        mode = "fwd+bwd" if any(r["mode"] == "fwd+bwd" for r in crows) else "fwd"
        row = [f"{op}", case, mode]
        for b in backends:
            m = [r for r in crows if r["backend"] == b and r["mode"] == mode]
            if not m:
                row.append("")
            elif m[0].get("status") != "ok":
                row.append("–")
            else:
                r = m[0]
                sp = f" {r['speedup']:.2f}x" if r.get("speedup") and b != "reference" else ""
                peak = f" ({r['frac_peak']:.0%}" if r.get("frac_peak") is not None else ""
                if peak and r.get("frac_copy_same_bytes") is not None:
                    peak += f"; {r['frac_copy_same_bytes']:.0%} of a same-size copy"
                peak += ")" if peak else ""
                host = f", host {r['host_ms']:.3g} ms" if r.get("launch_hidden") and r.get("host_ms") is not None \
                    else ""
                row.append(f"{r['median_ms']:.3g} ms{sp}{peak}{host}")
        table_rows.append(row)
    out += _md_table(["op", "case", "mode"] + backends, table_rows)
    if any(r.get("launch_hidden") for r in rows):
        out.append("\nTimes are the GPU's: the host's time to issue the call (`host`) was hidden from the events "
                   "(see benchmarks/README.md).")
    limits = [r for r in records if r.get("kind") == "limit" and r.get("case", "bench ops") == "bench ops"
              and r.get("op") in ("matmul", "copy")]
    if limits:
        parts = [f"matmul {r['tflops']:.3g} TFLOP/s ({r['dtype']})" if r["op"] == "matmul"
                 else f"copy {r['gbps']:.3g} GB/s" for r in limits if r.get("status") == "ok"]
        cache = (" The CPU's default shapes fit in its caches, so memory-bound ops can exceed the copy bandwidth."
                 if first.get("device_type") == "cpu" else "")
        out.append("\nLimits measured in the same run: " + ", ".join(dict.fromkeys(parts)) + ". "
                   "`–`: the backend cannot serve the case (reasons in results.json)." + cache)
    launch = launch_line(list(records))
    if launch:
        out.append(f"\nThe {launch[0].lower()}{launch[1:]}.")
    out.append("")
    return out


def attention_section(records: Sequence[dict]) -> list[str]:
    """Triton's forward+backward attention per case and batch, beside the fastest SDPA kernel, SDPA's flash
    kernel and xformers."""
    rows = newest_run([r for r in records if r.get("kind") == "attention" and r.get("mode") == "fwd+bwd"])
    if not rows:
        return []
    out = [f"**Attention** ({rows[0]['dtype']}), forward+backward: triton's TFLOP/s and its speedup over the "
           f"fastest SDPA kernel (named), SDPA's flash kernel and xformers (`fastmae bench attention`)", ""]
    table_rows = []
    for case, shape in dict.fromkeys((r["case"], tuple(sorted(r["shape"].items()))) for r in rows):
        crows = {r["backend"]: r for r in rows if r["case"] == case and tuple(sorted(r["shape"].items())) == shape}
        t = crows.get("triton")
        s = dict(shape)
        if t is None:
            continue
        if t.get("status") != "ok":
            table_rows.append([case, s["B"], "–", _short(t.get("reason", ""), 60), "", "", ""])
            continue

        def x(k):
            return f"{t[k]:.2f}x" if t.get(k) is not None else "–"

        best = crows.get(t.get("sdpa_best", ""), {})
        table_rows.append([case, s["B"], _f(t["tflops"]), x("vs_sdpa_best"),
                           f"{t.get('sdpa_best', '–')} ({_f(best.get('tflops'))})" if best else "–",
                           x("vs_sdpa_flash"), x("vs_xformers")])
    out += _md_table(["case", "batch", "triton TFLOP/s", "vs fastest SDPA", "fastest SDPA kernel (TFLOP/s)",
                      "vs sdpa-flash", "vs xformers"], table_rows)
    out.append("")
    return out


def plot_link(folder: str, base: str) -> list[str]:
    pngs = sorted(f for f in os.listdir(folder) if f.endswith(".png"))
    pick = next((p for p in pngs if p.startswith("encoder_")), pngs[0] if pngs else None)
    if pick is None:
        return []
    rel = os.path.relpath(os.path.join(folder, pick), base)
    return [f"![{pick[:-4]}]({rel})", ""]


def render(results_root: str, base: str) -> str:
    """The block's content (markers excluded); links relative to `base` (the README's folder)."""
    runs = latest_runs(results_root)
    lines = ["", "_Generated by `fastmae bench readme` from the recorded results files; do not edit by hand._", ""]
    for dtype, title in (("cuda", "GPU"), ("cpu", "CPU")):
        lines.append(f"### {title}")
        lines.append("")
        if dtype not in runs:
            how = ("run `benchmarks/gpu_suite.sh` on a GPU machine" if dtype == "cuda"
                   else "run `fastmae bench ops|encoder|train --out benchmarks/results/<device>/<date>`")
            lines += [f"_No {title} results recorded yet: {how}._", ""]
            continue
        folder, records = runs[dtype]
        lines += [stamp_line(records, folder, base), ""]
        lines += encoder_section(records)
        lines += train_section(records)
        lines += ops_section(records)
        lines += attention_section(records)
        lines += plot_link(folder, base)
    return "\n".join(lines)


def replace_block(text: str, block: str) -> str:
    start, end = text.find(START), text.find(END)
    if start < 0 or end < 0 or end < start:
        raise ValueError(f"the README has no results block: add the lines {START} and {END} where the results go")
    return text[: start + len(START)] + "\n" + block.strip("\n") + "\n" + text[end:]


def update_readme(readme: str, results_root: str, write: bool = True) -> str:
    if not os.path.isdir(results_root):
        raise ValueError(f"no results folder at {results_root}")
    base = os.path.dirname(os.path.abspath(readme))
    block = render(results_root, base)
    if write:
        with open(readme, encoding="utf-8") as f:
            text = f.read()
        from ..model.checkpoint import atomic_write_text

        atomic_write_text(readme, replace_block(text, block))  # the README whole or not at all
    return block
