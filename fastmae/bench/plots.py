"""PNG plots drawn from result records (matplotlib is optional: without it, plots are skipped and said so).

  encoder_<model>.png  images/s vs mask ratio per backend, forward and forward+backward, with the ideal
                       speedup of the fastest backend dashed
  ops.png              speedup over the reference backend per op case (forward+backward where measured)
  train_<model>.png    images/s per training variant
  attention.png        TFLOP/s per attention case and implementation (forward+backward where measured)

A folder several runs wrote into may hold other batches, dtypes or devices: each plot draws the run measured
last (`records.newest_run`; the model plots, the configuration measured last: `records.newest_run_rows`).
"""
from __future__ import annotations

import os
from typing import Sequence

from .records import newest_run, newest_run_rows


def _save(fig, path: str) -> None:
    """The figure as a PNG at `path`, written whole or not at all (a run stopped mid-write keeps the old plot)."""
    from ..model.checkpoint import atomic_write

    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _stamp(records: Sequence[dict]) -> str:
    r = max(records, key=lambda x: str(x.get("date", "")))  # the newest run's
    return f"{r.get('device', '?')} | torch {r.get('torch', '?')} | triton {r.get('triton', '?')} | {r.get('date', '')}"


def plot_encoder(records: Sequence[dict], out_dir: str) -> list[str]:
    plt = _pyplot()
    rows = [r for r in records if r.get("kind") == "encoder" and r.get("status") == "ok"]
    paths = []
    for model in sorted({r["model"] for r in rows}):
        mrows = newest_run_rows([r for r in rows if r["model"] == model])
        modes = [m for m in ("fwd", "fwd+bwd") if any(r["mode"] == m for r in mrows)]
        fig, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes), 4.2), squeeze=False)
        for ax, mode in zip(axes[0], modes):
            best, best_ips = None, -1.0
            for backend in sorted({r["backend"] for r in mrows if r["mode"] == mode}):
                pts = sorted((r["mask_ratio"], r["images_per_s"]) for r in mrows
                             if r["mode"] == mode and r["backend"] == backend)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=backend)
                if pts[0][0] == 0.0 and pts[0][1] > best_ips:
                    best, best_ips = backend, pts[0][1]
            if best is not None:
                pts = sorted((r["mask_ratio"], r["images_per_s"] / r["speedup"] * r["ideal_speedup"]) for r in mrows
                             if r["mode"] == mode and r["backend"] == best and r.get("speedup"))
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "k--", alpha=0.5, label=f"ideal ({best})")
            ax.set_yscale("log")
            ax.set_xlabel("mask ratio")
            ax.set_ylabel("images / s")
            ax.set_title(f"{model} encoder, {mode}, {mrows[0]['dtype']}, batch {mrows[0]['shape']['batch']}",
                         fontsize=9)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(_stamp(mrows), fontsize=8)
        fig.tight_layout()
        path = os.path.join(out_dir, f"encoder_{model}.png")
        _save(fig, path)
        plt.close(fig)
        paths.append(path)
    return paths


def _grouped_bars(labels: list[str], series: dict[str, list[float]], ylabel: str, title: str, path: str,
                  baseline: float | None = None) -> list[str]:
    """One bar per series beside each other at every label (0 where a series has no value), written to `path`."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(labels)), 4.5))
    width = 0.8 / max(1, len(series))
    for i, (name, ys) in enumerate(series.items()):
        ax.bar([j + i * width for j in range(len(labels))], ys, width, label=name)
    if baseline is not None:
        ax.axhline(baseline, color="k", lw=0.8)
    ax.set_xticks([j + width * (len(series) - 1) / 2 for j in range(len(labels))])
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7, ncol=2 if len(series) > 4 else 1)
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return [path]


def plot_ops(records: Sequence[dict], out_dir: str) -> list[str]:
    rows = [r for r in records if r.get("kind") == "op" and r.get("status") == "ok" and r.get("speedup")]
    rows = newest_run(rows)  # by run, not dtype: gather_patches' rows carry the images' float32 in a bf16 run
    if not rows:
        return []
    with_bwd = {(r["op"], r["case"]) for r in rows if r["mode"] == "fwd+bwd"}
    rows = [r for r in rows if r["mode"] == ("fwd+bwd" if (r["op"], r["case"]) in with_bwd else "fwd")]
    labels = list(dict.fromkeys(f"{r['op']}\n{r['case']}" for r in rows))
    series = {}
    for backend in sorted({r["backend"] for r in rows}):
        speedups = {f"{r['op']}\n{r['case']}": r["speedup"] for r in rows if r["backend"] == backend}
        series[backend] = [speedups.get(label, 0.0) for label in labels]
    return _grouped_bars(labels, series, "speedup over reference (fwd+bwd; fwd if none)", _stamp(rows),
                         os.path.join(out_dir, "ops.png"), baseline=1.0)


def plot_train(records: Sequence[dict], out_dir: str) -> list[str]:
    plt = _pyplot()
    rows = [r for r in records if r.get("kind") == "train" and r.get("status") == "ok"]
    paths = []
    for model in sorted({r["model"] for r in rows}):
        mrows = newest_run_rows([r for r in rows if r["model"] == model])
        fig, ax = plt.subplots(figsize=(6.5, 4))
        ax.bar([r["backend"] for r in mrows], [r["images_per_s"] for r in mrows], color="tab:blue")
        for i, r in enumerate(mrows):
            mfu = f"\nMFU {r['mfu']:.0%}" if r.get("mfu") is not None else ""
            ax.text(i, r["images_per_s"], f"{r['images_per_s']:.3g}{mfu}", ha="center", va="bottom", fontsize=7)
        ax.set_ylabel("images / s (one training step)")
        ax.set_title(f"{model}, batch {mrows[0]['shape']['batch']}, {mrows[0]['dtype']}, mask "
                     f"{mrows[0]['mask_ratio']}\n{_stamp(mrows)}", fontsize=8)
        ax.tick_params(axis="x", labelsize=8)
        fig.tight_layout()
        path = os.path.join(out_dir, f"train_{model}.png")
        _save(fig, path)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_attention(records: Sequence[dict], out_dir: str) -> list[str]:
    rows = [r for r in records if r.get("kind") == "attention" and r.get("status") == "ok" and r.get("tflops")]
    rows = newest_run(rows)  # by run, not dtype: gather_patches' rows carry the images' float32 in a bf16 run
    if not rows:
        return []
    mode = "fwd+bwd" if any(r["mode"] == "fwd+bwd" for r in rows) else "fwd"
    rows = [r for r in rows if r["mode"] == mode]
    labels = list(dict.fromkeys(f"{r['case']}\nB={r['shape']['B']}" for r in rows))
    series = {}
    for impl in dict.fromkeys(r["backend"] for r in rows):
        tflops = {f"{r['case']}\nB={r['shape']['B']}": r["tflops"] for r in rows if r["backend"] == impl}
        series[impl] = [tflops.get(label, 0.0) for label in labels]
    return _grouped_bars(labels, series, f"TFLOP/s ({mode}, {rows[0]['dtype']})", _stamp(rows),
                         os.path.join(out_dir, "attention.png"))


def write_plots(records: Sequence[dict], out_dir: str) -> tuple[list[str], str | None]:
    """All plots the records allow; returns (paths written, a reason when none could be drawn)."""
    if _pyplot() is None:
        return [], "matplotlib is not installed (pip install matplotlib); plots skipped"
    paths = (plot_encoder(records, out_dir) + plot_ops(records, out_dir) + plot_train(records, out_dir)
             + plot_attention(records, out_dir))
    return paths, None
