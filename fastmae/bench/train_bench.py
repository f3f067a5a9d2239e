"""`fastmae bench train`: one full pretraining step (forward, loss, backward, AdamW step) per variant.

Variants, all with the same preset, batch, dtype, initial weights, images and masking noise:
  official-eager     backend "reference" for every op: explicit attention, the official order of operations
  reference+sdpa     the reference path with PyTorch's SDPA for attention
  reference+compile  the reference path under torch.compile
  fastmae            fastmae's automatic choice (the fastest path the registry knows for this device)
  fastmae+compile    the same under torch.compile
  fastmae+sdpa       fastmae with PyTorch's SDPA for attention (its token and loss kernels as `fastmae`): where
                     the step waits on the host, SDPA's C++ dispatch may cost less than Triton's Python launcher
  fastmae+lean       fastmae with `lean_blocks` (every block recomputes its LayerNorms and GELU in the backward):
                     less activation memory for a few extra elementwise passes
  fastmae+plain-casts  fastmae with autocast's own casts (`group_weight_casts=False`: a kernel per weight and per
                     gradient in every block, where fastmae's CUDA path groups them a few blocks at a time; on a CPU
                     fastmae casts so already, and the variant is skipped)
  fastmae+triton-launch  fastmae with every Triton kernel launched through Triton's own path, which binds and
                     specialises each argument at every launch, where fastmae keeps each specialisation's compiled
                     kernel (`fastmae.kernels.launch`): what that saves a step's host time (CUDA only)
  fastmae+cudagraph  fastmae's step captured whole in a CUDA graph and replayed (`fastmae.train.graphed`; CUDA;
                     float16 with its GradScaler in the graph): the same GPU work without the host's time to issue it
  fastmae+compile+cudagraph  fastmae under torch.compile, its step captured and replayed as fastmae+cudagraph's:
                     Inductor's fused kernels without the host's time to issue them
Eager variants are timed first (the CUDA-graph one last of them), the torch.compile ones last (compiling takes
longest).
The step is `autocast(dtype)` forward + loss, `loss.backward()` (through a GradScaler for float16), AdamW
(betas 0.9/0.95, the official recipe's parameter groups: weight decay 0.05 except on biases and norms) and
`zero_grad`. The reference variants construct AdamW as the official script does (torch's default
implementation: foreach on CUDA, a per-parameter loop on the CPU); the fastmae variants use what
`fastmae pretrain` uses, the fused implementation where torch has it. Every record names its optimizer and the
time of its step alone (`optimizer_ms`), so the share of a speedup that comes from the optimizer is visible.

Figures: images/s from the median step time (each step timed from an idle GPU; every repetition's time is kept, in
order: `samples_ms`), and `back_to_back_images_per_s` from steps issued back to back as a training loop issues them
(the host issuing step i+1 while the GPU runs step i: `timing.back_to_back_ms`), with its own ratio to
official-eager; activations saved for the backward per image (eager variants: the distinct tensors autograd keeps
in one forward, parameters and inputs excluded, as the slope between the batch and half of it, so weight copies that
do not grow with the batch drop out; independent of the allocator and measurable on a CPU); peak memory (CUDA:
`torch.cuda.max_memory_allocated` over the variant's set-up and steps, after a reset, less what was allocated
before; CPU: the increase of the process's resident memory over the same, sampled every 2 ms, labelled as such;
read before the figures that run other work); MFU = model FLOPs per step (see `flops.py`: 3 x forward, linear
layers and attention) / step time / the matmul peak measured in the same run in the step's dtype. With `profile`,
a few more steps under the profiler: the GPU kernels' own time per step by kind of work, and its share of the step
time (`busy_share`: near 1 the step is bound by the GPU, well below by the host; see `profile.py`).
"""
from __future__ import annotations

import os
import statistics
import threading
import time
from typing import Callable, Sequence

import torch

from .. import create_model
from ..model.layers import GROUPED_CAST_DEVICES
from ..ops import BackendUnavailable
from ..train.graphed import GraphedTrainStep, graph_step_reason
from ..train.optim import adamw_impl, build_optimizer
from .common import (autocast, capture_dispatch, dispatch_str, error_line, free, image_grid,
                     path_interpreter_reason, progress)
from .flops import len_keep, train_step_flops
from .limits import dtype_name
from .profile import profile_step
from .records import CUDA_PEAK_KIND, own_peak_mem_mb
from .timing import Timing, back_to_back_ms, measure

REFERENCE_SDPA = {"attention": "sdpa", "gather_patches": "reference", "gather_tokens": "reference",
                  "unshuffle_tokens": "reference", "masked_mse_loss": "reference"}
VARIANTS: dict[str, dict] = {
    "official-eager": {"backend": "reference", "compile": False, "adamw": "default"},
    "reference+sdpa": {"backend": REFERENCE_SDPA, "compile": False, "adamw": "default"},
    "reference+compile": {"backend": "reference", "compile": True, "adamw": "default"},
    "fastmae": {"backend": None, "compile": False, "adamw": "auto"},
    "fastmae+compile": {"backend": None, "compile": True, "adamw": "auto"},
    "fastmae+sdpa": {"backend": {"attention": "sdpa"}, "compile": False, "adamw": "auto", "varies": "fastmae"},
    "fastmae+lean": {"backend": None, "compile": False, "lean_blocks": True, "adamw": "auto"},
    "fastmae+plain-casts": {"backend": None, "compile": False, "group_weight_casts": False, "adamw": "auto"},
    "fastmae+triton-launch": {"backend": None, "compile": False, "kept_launches": False, "adamw": "auto"},
    "fastmae+cudagraph": {"backend": None, "compile": False, "cuda_graph": True, "adamw": "auto"},
    "fastmae+compile+cudagraph": {"backend": None, "compile": True, "cuda_graph": True, "adamw": "auto"},
}


class RssSampler:
    """Peak resident memory of this process while the block runs, sampled from /proc/self/statm."""

    def __init__(self, interval_s: float = 0.002):
        self.interval_s = interval_s
        self.page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self.available = os.path.exists("/proc/self/statm")
        self.start = self.peak = 0
        self._stop = threading.Event()
        self._thread = None

    def rss(self) -> int:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * self.page

    def _loop(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval_s)

    def __enter__(self):
        if self.available:
            self.start = self.peak = self.rss()
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self.rss())

    @property
    def delta_mb(self) -> float | None:
        return (self.peak - self.start) / 2 ** 20 if self.available else None


def make_step(model, forward, opt, imgs, noise, mask_ratio: float, device: torch.device,
              dtype: torch.dtype) -> Callable[[], torch.Tensor]:
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)  # disabled: passes through

    def step():
        with autocast(device, dtype):
            loss = forward(imgs, mask_ratio, noise=noise)[0]
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def run_train(device: torch.device, model_name: str, batch: int, dtype: torch.dtype, *, mask_ratio: float = 0.75,
              variants: Sequence[str] = tuple(VARIANTS), compile_reason: str | None = None,
              peak_tflops: float | None = None, timing: dict | None = None, compile_timing: dict | None = None,
              allow_interpreter: bool = False, on_record: Callable[[dict], None] | None = None,
              show_progress: bool = True, profile: bool = False) -> list[dict]:
    """Records for each variant; `compile_reason` (when set) skips the torch.compile variants with it; `profile`
    adds where each variant's step spends its time (`fastmae.bench.profile`)."""
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")
    # eager variants first (fastmae first of all, the lean one after the plain ones), the torch.compile ones
    # last: compiling takes longest, so a run cut short by a timeout keeps every eager figure
    ordered = sorted(variants, key=lambda v: (VARIANTS[v]["compile"], VARIANTS[v].get("cuda_graph", False),
                                              VARIANTS[v].get("lean_blocks", False), v != "fastmae"))
    records = []
    # the official main_pretrain.py sets cudnn.benchmark for the whole run: the reference path's patch-embedding
    # convolution gets cuDNN's autotuned algorithm (chosen during the warm-up, which is not timed)
    cudnn_benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = cudnn_benchmark or device.type == "cuda"
    try:
        for name in progress(ordered, "bench train", show_progress):
            same = same_as_varied(name, records)
            head = record_head(name, model_name, batch, mask_ratio, dtype)
            rec = {**head, "status": "skipped", "reason": same} if same else \
                run_variant(device, model_name, batch, dtype, name, mask_ratio=mask_ratio,
                            compile_reason=compile_reason, peak_tflops=peak_tflops,
                            timing=compile_timing if VARIANTS[name]["compile"] else timing,
                            allow_interpreter=allow_interpreter, profile=profile)
            records.append(rec)
            add_train_speedups(records)
            if on_record:
                on_record(rec)
    finally:
        torch.backends.cudnn.benchmark = cudnn_benchmark
    return records


def same_as_varied(variant: str, records: Sequence[dict]) -> str | None:
    """Why not to run a variant that changes some ops' backends of another (`varies`) where that one's recorded
    step already ran those backends (fastmae+sdpa on a CPU, where fastmae's choice is SDPA): it would time the
    same step again. None otherwise."""
    cfg = VARIANTS[variant]
    if "varies" not in cfg:
        return None
    base = next((r for r in records if r.get("backend") == cfg["varies"] and r.get("status") == "ok"), None)
    if base is None:
        return None
    served = dict(part.split("=", 1) for part in base.get("dispatch", "").split(", ") if "=" in part)
    if any(served.get(op) != name for op, name in cfg["backend"].items()):
        return None
    return f"{cfg['varies']} already runs this step here ({base['dispatch']})"


def record_head(variant: str, model_name: str, batch: int, mask_ratio: float, dtype: torch.dtype) -> dict:
    """What every record of a variant starts with: what was (or would have been) run, its shape too (a record's
    key: a variant skipped or failed in a later run into the same folder replaces the earlier run's record)."""
    cfg = VARIANTS[variant]
    side, L = image_grid(model_name)
    return {"kind": "train", "model": model_name, "backend": variant, "mode": "step", "mask_ratio": mask_ratio,
            "shape": {"batch": batch, "img": side, "L": L, "K": len_keep(L, mask_ratio)},
            "dtype": dtype_name(dtype), "amp": dtype != torch.float32, "compile": cfg["compile"],
            "backend_spec": cfg["backend"] if cfg["backend"] is not None else "auto",
            **({"cuda_graph": True} if cfg.get("cuda_graph") else {}),
            **({"group_weight_casts": cfg["group_weight_casts"]} if "group_weight_casts" in cfg else {}),
            **({"kept_launches": False} if cfg.get("kept_launches") is False else {})}


def add_train_speedups(records: list[dict]) -> list[dict]:
    """`vs_official_eager` and `vs_reference_compile`: images/s over those variants' images/s
    (`back_to_back_vs_official_eager`: the same for the back-to-back pace);
    `mem_vs_official_eager` and `saved_vs_official_eager`: peak memory and saved activations per image over
    official-eager's."""
    ok = [r for r in records if r.get("kind") == "train" and r.get("status") == "ok"]
    ips = {r["backend"]: r["images_per_s"] for r in ok}
    b2b = {r["backend"]: r.get("back_to_back_images_per_s") for r in ok}
    mem = {r["backend"]: own_peak_mem_mb(r) for r in ok}
    saved = {r["backend"]: r.get("saved_mb_per_image") for r in ok}
    for r in records:
        if r.get("kind") == "train" and r.get("status") == "ok":
            if saved.get("official-eager") and r.get("saved_mb_per_image") is not None:
                r["saved_vs_official_eager"] = r["saved_mb_per_image"] / saved["official-eager"]
            if mem.get("official-eager") and mem.get(r["backend"]) is not None:
                r["mem_vs_official_eager"] = mem[r["backend"]] / mem["official-eager"]
            else:  # one of the peaks is not the variant's own (`own_peak_mem_mb`): no ratio, none kept from before
                r.pop("mem_vs_official_eager", None)
            if ips.get("official-eager"):
                r["vs_official_eager"] = r["images_per_s"] / ips["official-eager"]
            if b2b.get("official-eager") and r.get("back_to_back_images_per_s"):
                r["back_to_back_vs_official_eager"] = r["back_to_back_images_per_s"] / b2b["official-eager"]
            if ips.get("reference+compile"):
                r["vs_reference_compile"] = r["images_per_s"] / ips["reference+compile"]
    return records


def saved_bytes(model, imgs, noise, mask_ratio: float, device: torch.device, dtype: torch.dtype) -> int:
    """Bytes of the distinct tensors autograd keeps for the backward of one forward (parameters and inputs
    excluded)."""
    skip = {p.untyped_storage().data_ptr() for p in model.parameters()}
    skip |= {imgs.untyped_storage().data_ptr(), noise.untyped_storage().data_ptr()}
    seen: set[int] = set()
    total = 0

    def pack(t):
        nonlocal total
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in seen and ptr not in skip:
            seen.add(ptr)
            total += storage.nbytes()
        # detached: a saved output returned as itself would hold its own grad_fn, a cycle through autograd's C++
        # graph that Python's collector cannot see, and every forward here would stay allocated (the backward
        # never runs, so nothing unpacks)
        return t.detach()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast(device, dtype):
        loss = model(imgs, mask_ratio, noise=noise)[0]
    del loss
    return total


def saved_mb_per_image(model, imgs, noise, mask_ratio: float, device: torch.device,
                       dtype: torch.dtype) -> float | None:
    """Activation memory per image: the slope of `saved_bytes` between the batch and half of it, in MiB."""
    b = imgs.shape[0]
    half = b // 2
    if half < 1:
        return None
    full = saved_bytes(model, imgs, noise, mask_ratio, device, dtype)
    part = saved_bytes(model, imgs[:half], noise[:half], mask_ratio, device, dtype)
    return (full - part) / (b - half) / 2 ** 20


def prepare_variant(device: torch.device, model_name: str, batch: int, dtype: torch.dtype, variant: str,
                    mask_ratio: float = 0.75) -> dict:
    """Build one variant: model, optimizer, inputs and the step function (nothing timed yet).

    Returns {"step", "model", "optimizer", "saved_mb_per_image", "flops", "dispatch"} (the shape is the record
    head's); raises BackendUnavailable with the registry's reasons when the variant's backends cannot serve this
    device."""
    cfg = VARIANTS[variant]
    torch.manual_seed(0)
    model = create_model(model_name).to(device)
    model.backend = cfg["backend"]
    model.lean_blocks = cfg.get("lean_blocks", False)
    model.group_weight_casts = cfg.get("group_weight_casts")  # None: the model's own choice
    L = model.num_patches
    gen = torch.Generator(device="cpu").manual_seed(0)
    side = model.patch_embed.img_size[0]
    imgs = torch.randn(batch, model.in_chans, side, side, generator=gen).to(device)
    noise = torch.rand(batch, L, generator=gen).to(device)
    # which backend serves each op, from one eager forward (also surfaces the registry's reasons)
    with capture_dispatch() as seen, torch.no_grad(), autocast(device, dtype):
        model(imgs[:1], mask_ratio, noise=noise[:1])
    graphed = cfg.get("cuda_graph", False)
    opt = build_optimizer(model, 1.5e-4, 0.05, impl=cfg["adamw"], capturable=graphed)
    forward = torch.compile(model) if cfg["compile"] else model
    saved = None if cfg["compile"] or graphed else \
        (lambda: saved_mb_per_image(model, imgs, noise, mask_ratio, device, dtype))
    step = GraphedTrainStep(forward, opt, imgs, noise, mask_ratio, dtype) if graphed else \
        make_step(model, forward, opt, imgs, noise, mask_ratio, device, dtype)
    if cfg.get("kept_launches") is False:
        step = _through_tritons_launch(step)
    return {"step": step, "model": model,
            "optimizer": opt,
            "saved_mb_per_image": saved,
            "flops": train_step_flops(model, batch, mask_ratio), "dispatch": dispatch_str(seen)}


def _through_tritons_launch(step: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """`step` with fastmae's kept Triton launches off while it runs (`kernels.launch.ENABLED`)."""
    from ..kernels import launch

    def run():
        before, launch.ENABLED = launch.ENABLED, False
        try:
            return step()
        finally:
            launch.ENABLED = before

    return run


def variant_reason(variant: str, device: torch.device, dtype: torch.dtype,
                   allow_interpreter: bool = False) -> str | None:
    """Why a variant is not run on this device and dtype (besides the registry's own reasons), or None."""
    cfg = VARIANTS[variant]
    if cfg.get("group_weight_casts") is False and device.type not in GROUPED_CAST_DEVICES:
        return (f"fastmae's step casts each weight on its own here already (it groups the casts on "
                f"{', '.join(GROUPED_CAST_DEVICES).upper()} only): the same step as fastmae's")
    if cfg.get("group_weight_casts") is False and dtype == torch.float32:
        return "a float32 step runs without autocast: no weight is cast, the same step as fastmae's"
    if cfg.get("kept_launches") is False and device.type != "cuda":
        return ("Triton launches compiled kernels on CUDA only (on a CPU its interpreter runs them, through one "
                "path): the same step as fastmae's")
    return path_interpreter_reason(cfg["backend"], device, allow_interpreter) or \
        (graph_step_reason(device, None, dtype) if cfg.get("cuda_graph") else None)


def run_variant(device: torch.device, model_name: str, batch: int, dtype: torch.dtype, variant: str, *,
                mask_ratio: float = 0.75, compile_reason: str | None = None, peak_tflops: float | None = None,
                timing: dict | None = None, allow_interpreter: bool = False, profile: bool = False) -> dict:
    cfg = VARIANTS[variant]
    rec = record_head(variant, model_name, batch, mask_ratio, dtype)
    if cfg["compile"] and compile_reason:
        return {**rec, "status": "skipped", "reason": compile_reason}
    why = variant_reason(variant, device, dtype, allow_interpreter)
    if why:
        return {**rec, "status": "skipped", "reason": why}
    free(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        mem_before = torch.cuda.memory_allocated(device)
    sampler = RssSampler() if device.type == "cpu" else None
    built = None
    try:
        # the peak is the steps' (building, the timed steps and one more): read before the figures below, whose
        # forwards without a backward and zero gradients are not part of training
        with (sampler or _null()):
            built = prepare_variant(device, model_name, batch, dtype, variant, mask_ratio)
            t = measure(built["step"], device, keep_samples=True, **(timing or {}))
            # the steady pace of a training loop: steps issued back to back, the host ahead of the GPU
            b2b = back_to_back_ms(built["step"], device, *back_to_back_runs(t.reps))
            loss = float(built["step"]().detach())
        if device.type == "cuda":
            # the variant's own peak (model, optimizer, inputs, activations): what an earlier variant or caller
            # still holds was allocated before, and is not this variant's
            peak_mb = (torch.cuda.max_memory_allocated(device) - mem_before) / 2 ** 20
        prof = prof_error = None
        if profile:
            try:  # an extra figure, as the optimizer's time below
                prof = profile_step(built["step"], device)
            except Exception as exc:  # noqa: BLE001
                prof_error = error_line(exc, 200)
        saved = built["saved_mb_per_image"]() if built["saved_mb_per_image"] else None
        optimizer = f"AdamW {adamw_impl(built['optimizer'])}"
        if cfg.get("cuda_graph"):  # its step runs inside the graph; the figure below times it eagerly
            optimizer += " capturable (step timed outside the graph)"
        try:  # an extra figure: its failure (memory, say) does not undo the step's
            opt_ms, opt_error = time_optimizer_step(built["optimizer"], device, timing).median_ms, None
        except Exception as exc:  # noqa: BLE001
            opt_ms, opt_error = None, error_line(exc, 200)
    except BackendUnavailable as exc:
        return {**rec, "status": "skipped", "reason": str(exc)}
    except Exception as exc:
        return {**rec, "status": "failed", "reason": error_line(exc)}
    finally:
        flops, dispatch = (built["flops"], built["dispatch"]) if built else (None, "")
        built = None  # release the model and optimizer before the next variant
        if cfg["compile"]:
            torch._dynamo.reset()
    sec = t.median_ms * 1e-3
    out = {**rec, "status": "ok", **t.as_dict(), "dispatch": dispatch, "images_per_s": batch / sec,
           "images_per_s_p20": batch / (t.p80_ms * 1e-3), "images_per_s_p80": batch / (t.p20_ms * 1e-3),
           "back_to_back_ms": b2b, "back_to_back_images_per_s": batch / (statistics.median(b2b) * 1e-3),
           "flops_per_step": flops, "tflops": flops / sec / 1e12, "loss": loss,
           "optimizer": optimizer, "optimizer_ms": opt_ms}
    if opt_error:
        out["optimizer_error"] = opt_error
    if prof is not None:
        out["profile"] = prof
        # on CUDA the kernels' own time against the step timed without the profiler (which slows the host, not
        # the kernels); on a CPU the operators' own time is slowed by the profiler as the whole step is, so it is
        # set against the profiled steps' own time (against the unprofiled step it passed 100%)
        out["busy_share"] = prof["busy_ms"] / (t.median_ms if device.type == "cuda" else prof["step_ms"])
    if prof_error:
        out["profile_error"] = prof_error
    if saved is not None:
        out["saved_mb_per_image"] = saved
    if device.type == "cuda":
        out["peak_mem_mb"] = peak_mb
        out["peak_mem_kind"] = CUDA_PEAK_KIND
        out["mem_before_mb"] = mem_before / 2 ** 20
    else:
        out["peak_mem_mb"] = sampler.delta_mb
        out["peak_mem_kind"] = ("cpu resident-memory increase (sampled)" if sampler.available
                                else "n/a: /proc/self/statm is not available")
        if cfg["compile"] and sampler.available:
            out["peak_mem_kind"] += ", torch.compile's own memory included"
    if peak_tflops:
        out["peak_tflops"] = peak_tflops
        out["mfu"] = out["tflops"] / peak_tflops
    free(device)
    return out


def back_to_back_runs(reps: int) -> tuple[int, int]:
    """(calls, rounds) of the back-to-back figure: 10 steps twice, fewer where the timed run itself took fewer
    (quick runs, slow steps)."""
    return max(1, min(10, reps)), 2 if reps >= 10 else 1


def time_optimizer_step(opt: torch.optim.Optimizer, device: torch.device, timing: dict | None = None) -> Timing:
    """The optimizer's step alone (every parameter given a gradient; no scaler), to show how much of a training
    step it takes, under the run's `timing` with one warm-up call. The update's cost does not depend on the
    values, so the gradients are zeros; the weights move, which is harmless after the figures above."""
    params = [p for g in opt.param_groups for p in g["params"]]
    for p in params:
        p.grad = torch.zeros_like(p)
    try:
        return measure(opt.step, device, **{**(timing or {}), "warmup": 1})
    finally:
        for p in params:
            p.grad = None


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
