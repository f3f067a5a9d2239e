"""`fastmae bench encoder`: images per second of `model.forward_encoder` across mask ratios, per backend.

Each backend path (see `common.MODEL_PATHS`) is timed forward (under `torch.no_grad()`) and forward+backward
(`latent.backward(g)` with a fixed random g, gradients reset each repetition), at every mask ratio, with the
same images and the same masking noise. The ratios of one backend and mode are timed interleaved (one
repetition of each per round), so a slow spell on a shared machine hits all ratios alike.

Beside each figure:
  speedup  = images/s at the ratio / images/s at ratio 0 (same backend and mode)
  ideal    = (L + 1) / (K + 1), the tokens the encoder sees at ratio 0 over those at the ratio, class
             token included (K = int(L * (1 - ratio)))
  of_ideal = speedup / ideal

With `cuda_graphs` (CUDA only), fastmae's automatic path is timed once more as the backend `auto+cudagraph`:
each ratio's forward (or forward+backward) captured once in a CUDA graph and replayed (one ratio's graph at a
time), so no Python, dispatch or kernel-launch time is left. Its distance from the eager `auto` rows is the
share of the eager time that is launch overhead, not GPU work.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from .. import create_model
from ..ops import BackendUnavailable
from ..train.graphed import capture, graph_step_reason
from .common import (MODEL_PATHS, autocast, capture_dispatch, dispatch_str, error_line, free, path_interpreter_reason,
                     progress)
from .flops import encoder_flops, len_keep
from .limits import dtype_name
from .timing import measure_interleaved

ENCODER_MODES = ("fwd", "fwd+bwd")


def ideal_speedup(num_patches: int, mask_ratio: float) -> float:
    """Tokens at ratio 0 over tokens at `mask_ratio`, counting the class token: (L + 1) / (K + 1)."""
    return (num_patches + 1) / (len_keep(num_patches, mask_ratio) + 1)


def add_speedups(records: list[dict], one_run: bool = False) -> list[dict]:
    """Fill `speedup`, `ideal_speedup` and `of_ideal` on encoder records, against the ratio-0 record of the
    same model, backend, mode, batch, dtype and device. `one_run`: the records are one run's, on one device, the
    newest perhaps not stamped with it yet (the device is then no part of the key)."""
    def group(r):
        return (r.get("model"), r.get("backend"), r.get("mode"), r["shape"].get("batch"), r.get("dtype"),
                None if one_run else r.get("device"))

    base = {group(r): r["images_per_s"] for r in records
            if r.get("kind") == "encoder" and r.get("status") == "ok" and r.get("mask_ratio") == 0.0}
    for r in records:
        if r.get("kind") != "encoder":
            continue
        r["ideal_speedup"] = ideal_speedup(r["shape"]["L"], r["mask_ratio"])
        b = base.get(group(r))
        if r.get("status") == "ok" and b:
            r["speedup"] = r["images_per_s"] / b
            r["of_ideal"] = r["speedup"] / r["ideal_speedup"]
    return records


def _inputs(model, batch: int, device: torch.device, seed: int = 0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    side = model.patch_embed.img_size[0]
    imgs = torch.randn(batch, model.in_chans, side, side, generator=gen).to(device)
    noise = torch.rand(batch, model.num_patches, generator=gen).to(device)
    return imgs, noise


GRAPH_BACKEND = "auto+cudagraph"


def make_encoder_runner(model, imgs, noise, ratio: float, mode: str, device: torch.device,
                        dtype: torch.dtype, cast_cache: bool = True) -> Callable[[], object]:
    if mode == "fwd":
        def fwd():
            with torch.no_grad(), autocast(device, dtype, cast_cache):
                return model.forward_encoder(imgs, ratio, noise)[0]

        return fwd
    if mode != "fwd+bwd":
        raise ValueError(f"unknown mode {mode!r}")
    grad = {}

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        with autocast(device, dtype, cast_cache):
            latent = model.forward_encoder(imgs, ratio, noise)[0]
        if "g" not in grad:
            gen = torch.Generator(device="cpu").manual_seed(1)
            grad["g"] = torch.randn(latent.shape, generator=gen).to(latent.device, latent.dtype)
        latent.backward(grad["g"])
        # detached: a latent that keeps its autograd graph alive keeps the parameters' gradient accumulators
        # alive too, and a later capture reuses accumulators bound to this call's stream (torch 2.11 on an H200
        # warned of the stream mismatch)
        return latent.detach()

    return fwd_bwd


def make_graphed_runner(model, imgs, noise, ratio: float, mode: str, device: torch.device,
                        dtype: torch.dtype, warmup: int = 3) -> Callable[[], object]:
    """The runner's work captured once in a CUDA graph (`fastmae.train.graphed.capture`: `warmup` eager calls on
    a side stream, gradients set to None, one captured call); the returned function replays it and returns the
    captured output. Gradients of fwd+bwd land in the parameters' .grad, as eager; the output tensor is
    overwritten by every replay."""
    fn = make_encoder_runner(model, imgs, noise, ratio, mode, device, dtype, cast_cache=False)
    graph, out = capture(fn, device, warmup, lambda: model.zero_grad(set_to_none=True))

    def replay():
        with torch.cuda.device(device):
            graph.replay()
        return out

    replay.runner = fn  # what the graph reads (the backward's incoming gradient) lives as long as the graph
    return replay


def run_encoder(device: torch.device, model_name: str, batch: int, dtype: torch.dtype, ratios: Sequence[float],
                backends: Sequence[str], modes: Sequence[str] = ENCODER_MODES, *, timing: dict | None = None,
                allow_interpreter: bool = False, on_record: Callable[[dict], None] | None = None,
                show_progress: bool = True, cuda_graphs: bool = False) -> list[dict]:
    torch.manual_seed(0)
    model = create_model(model_name).to(device)
    L = model.num_patches
    records: list[dict] = []

    def emit(rec):
        records.append(rec)
        add_speedups(records, one_run=True)  # before the record is written: a run cut short keeps its speedups
        if on_record:
            on_record(rec)

    def base(backend, mode, ratio):
        k = len_keep(L, ratio)
        return {"kind": "encoder", "model": model_name, "backend": backend, "mode": mode, "mask_ratio": ratio,
                "dtype": dtype_name(dtype), "amp": dtype != torch.float32,
                "shape": {"batch": batch, "img": model.patch_embed.img_size[0], "L": L, "K": k, "tokens": k + 1}}

    def emit_timings(backend, mode, timings, seen, **extra):
        factor = 1.0 if mode == "fwd" else 3.0  # a backward costs about twice the forward
        for r, t in timings.items():
            sec = t.median_ms * 1e-3
            emit({**base(backend, mode, r), "status": "ok", **t.as_dict(), **extra, "dispatch": dispatch_str(seen),
                  "images_per_s": batch / sec, "images_per_s_p20": batch / (t.p80_ms * 1e-3),
                  "images_per_s_p80": batch / (t.p20_ms * 1e-3),
                  "tflops": factor * encoder_flops(model, batch, r) / sec / 1e12})

    def emit_all(backend, mode, status, reason, rs=ratios):
        for r in rs:
            emit({**base(backend, mode, r), "status": status, "reason": reason})

    def time_ratios(backend, mode, make_runner, seen=None, rs=ratios, **extra) -> bool:
        """Time make_runner(ratio) at the ratios `rs` (all by default), interleaved, and emit the rows (failed ones
        on an error); `seen` is the dispatch to report (default: what building the runners dispatched)."""
        fns = {}
        try:
            with capture_dispatch() as built:
                fns = {r: make_runner(r) for r in rs}
            timings = measure_interleaved(fns, device, keep_samples=True, **(timing or {}))
        except Exception as exc:
            emit_all(backend, mode, "failed", error_line(exc), rs)
            return False
        finally:
            fns = None  # the runners, and with CUDA graphs their memory pools
            model.zero_grad(set_to_none=True)
            free(device)
        emit_timings(backend, mode, timings, built if seen is None else seen, **extra)
        return True

    unknown = [b for b in backends if b not in MODEL_PATHS]
    if unknown:
        raise ValueError(f"unknown backend {unknown[0]!r}; choose from {', '.join(MODEL_PATHS)}")
    try:
        imgs, noise = _inputs(model, batch, device)
    except Exception as exc:  # a batch too large for the memory: every row failed, with the reason
        for backend in backends:
            for mode in modes:
                emit_all(backend, mode, "failed", error_line(exc))
        return records
    # "auto" last: when it resolves to exactly the ops of a path measured before, it is not timed twice
    backends = sorted(backends, key=lambda b: b == "auto")
    measured: dict[tuple[str, str], str] = {}  # (mode, dispatch) -> backend
    jobs = [(b, m) for b in backends for m in modes]
    for backend, mode in progress(jobs, "bench encoder", show_progress):
        spec = MODEL_PATHS[backend]
        model.backend = spec
        reason = path_interpreter_reason(spec, device, allow_interpreter)
        status, seen = "skipped", {}
        if reason is None:
            try:
                with capture_dispatch() as seen, torch.no_grad(), autocast(device, dtype):
                    model.forward_encoder(imgs[:1], ratios[-1], noise[:1])
                status = "ok"
                same = measured.get((mode, dispatch_str(seen)))
                if backend == "auto" and same:
                    status, reason = "skipped", (f"auto resolves to the same backends as {same} "
                                                 f"({dispatch_str(seen)}), timed above")
            except BackendUnavailable as exc:  # the registry's reasons
                reason = str(exc)
            except Exception as exc:
                status, reason = "failed", error_line(exc)
        if status != "ok":
            emit_all(backend, mode, status, reason)
            continue
        if time_ratios(backend, mode, lambda r: make_encoder_runner(model, imgs, noise, r, mode, device, dtype),
                       seen):
            measured.setdefault((mode, dispatch_str(seen)), backend)
    if cuda_graphs:  # last: whatever a capture does to the device, the eager rows are recorded
        model.backend = MODEL_PATHS["auto"]
        for mode in modes:
            reason = graph_step_reason(device)
            if reason is not None:
                emit_all(GRAPH_BACKEND, mode, "skipped", reason)
                continue
            # one graph at a time, each released before the next is captured: on an H200 (torch 2.11) the
            # ViT-B graphs of two ratios timed interleaved made illegal memory accesses, where one alone ran
            for r in ratios:
                time_ratios(GRAPH_BACKEND, mode,
                            lambda r: make_graphed_runner(model, imgs, noise, r, mode, device, dtype), rs=[r],
                            cuda_graph=True)
    model.backend = None
    del model
    free(device)
    return add_speedups(records)
