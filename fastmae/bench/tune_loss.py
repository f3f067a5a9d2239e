"""`fastmae bench tune --op loss`: the masked-MSE loss kernels' launch settings, measured on this GPU.

The loss is memory-bound: how close it comes to the copy bandwidth depends on how many bytes each SM keeps
in flight, which the tile (prediction rows per program), the warps and the forward's software pipeline
(consecutive tiles per program) decide together with the registers the compiler gives them. The launch rule
(`fastmae.kernels.loss.default_settings`) was chosen by compiling, not by timing; this part of the tuner times
the alternatives, as the attention part does (see `fastmae.bench.tune` for the screen, check and time steps
and for how winners are recorded), and records the winners in `loss_tuned.json` beside the kernels (or in the
folder FASTMAE_TUNED_DIR names). The masked-only decoder head's launches (`pred_masked_only`: keys with ids1 and
mask0) are not tuned; the rule serves them.

What it times, for each shape (ViT-B/L's 3 x 16 x 16 patches, ViT-H's 3 x 14 x 14; 224 pixels, 75% masking)
and prediction dtype (images in fp32, as training under autocast and `fastmae bench ops` pass them):
- 'fwd': the forward with and without `norm_pix`, each as training launches it (it also writes the gradient
  buffer) and without a gradient (evaluation, `bench ops`' forward rows);
- 'bwd': the backward's scaling of that buffer.
Each candidate's loss (and gradient, where it writes one) is checked against the fp32 reference under the tests'
tolerance rule before it is timed; timings flush the L2 cache between calls, as `bench ops` does for the
memory-bound ops.
"""
from __future__ import annotations

import torch

from ..kernels.utils import cdiv, next_power_of_2  # torch only, never triton
from .common import DTYPES, error_line
from .timing import measure
from .tolerance import error_bound, max_error

# name: (batch or None for --batch, channels, image side, patch side)
SHAPES = {
    "loss-B": (None, 3, 224, 16),  # ViT-B/16 and ViT-L/16: 196 patches of 768 values
    "loss-H": (None, 3, 224, 14),  # ViT-H/14: 256 patches of 588 values (tiles padded to 4 x 16 x 16)
}
QUICK_SHAPES = {"quick-loss": (2, 3, 16, 4)}  # 16 patches of 48 values: small tiles, many rows per tile
MASK_RATIO = 0.75


def kernel_module():
    from ..kernels import loss
    return loss


def resolve_shapes(shapes: dict[str, tuple], batch: int) -> dict[str, tuple]:
    """(batch, channels, image side, patch side) per shape, --batch where the shape names none."""
    return {n: (b or batch, c, side, p) for n, (b, c, side, p) in shapes.items()}


def label(settings) -> str:
    return "r{}/w{}/t{}/s{}".format(*settings)


def _tile(kernel: str, channels: int, patch: int) -> int:
    """Padded values in one row of the kernel's tile (as the launchers pad them)."""
    if kernel == "fwd":
        return next_power_of_2(channels) * next_power_of_2(patch) ** 2
    return next_power_of_2(channels * patch * patch)


def candidates(kernel: str, tile: int, quick: bool = False) -> list[tuple[int, int, int, int]]:
    """[BLOCK_R, num_warps, max_tiles, num_stages] to try: tiles of up to 4096 (forward) or 8192 (backward)
    values, 2 to 16 (forward) or 4 to 32 (backward) values per thread, and 1 to 8 tiles per forward program."""
    loss = kernel_module()
    limit, per_thread, tiles = (4096, (2, 16), (1, 2, 4, 8)) if kernel == "fwd" else (8192, (4, 32), (1,))
    stages = loss.FWD_STAGES if kernel == "fwd" else loss.NUM_STAGES
    out = []
    r = 1
    while r <= loss.MAX_ROWS and r * tile <= limit:
        for w in (2, 4, 8):
            if per_thread[0] <= r * tile // (32 * w) <= per_thread[1]:
                out += [(r, w, t, stages) for t in tiles]
        r *= 2
    return out[:2] if quick else out


def _effective(kernel: str, settings, rows: int) -> tuple:
    """What a launch of `rows` prediction rows does with these settings: tiles per program are capped by the
    pipeline's rule, so two caps above what the rows allow launch the same kernel the same way."""
    if kernel != "fwd":
        return tuple(settings)
    loss = kernel_module()
    r, w, t, s = settings
    return r, w, loss.tiles_per_program(cdiv(rows, r), t), s


def plan(loss, shapes: dict[str, tuple], dtypes: list[torch.dtype], device: torch.device, quick: bool) -> list:
    """Every candidate for each shape and prediction dtype: the forward with and without norm_pix, each as
    training launches it (writing the gradient buffer) and without a gradient (`quick`: two of the four, each
    switch on once and off once); the backward once per dtype and row size. Candidates that launch as another
    one does at the shape are left out."""
    from ..kernels.utils import TRITON_DTYPES
    from .tune import Candidate

    seen, out = set(), []
    for dtype in dtypes:
        label_ = f"{TRITON_DTYPES[dtype]}/fp32"
        for name, (B, C, side, p) in shapes.items():
            rows = B * (side // p) ** 2
            switches = ([(True, True), (False, False)] if quick
                        else [(norm, grad) for grad in (True, False) for norm in (False, True)])
            jobs = [("fwd", loss.fwd_key(dtype, torch.float32, C, p, norm, False, grad)) for norm, grad in switches]
            jobs.append(("bwd", loss.bwd_key(dtype, C * p * p, True)))
            for kernel, key in jobs:
                if (kernel, key) in seen:
                    continue
                seen.add((kernel, key))
                default = tuple(loss.default_settings(kernel, C, p))
                launches = {_effective(kernel, default, rows)}
                out.append(Candidate(name, label_, kernel, key, default, default=True))
                for cfg in candidates(kernel, _tile(kernel, C, p), quick):
                    if _effective(kernel, cfg, rows) not in launches:
                        launches.add(_effective(kernel, cfg, rows))
                        out.append(Candidate(name, label_, kernel, key, cfg))
    return out


def _switches(kernel: str, key: str) -> tuple[bool, bool]:
    """(norm_pix, write_grad) of the forward a key describes; the backward's is the training forward without
    norm_pix."""
    if kernel != "fwd":
        return False, True
    return ",norm1," in key, key.endswith(",grad1")


def _inputs(shape: tuple, dtype: torch.dtype, device, seed: int = 0):
    """(pred in dtype, fp32 images, mask) for MASK_RATIO: normal samples, and a mask drawn as the model draws it."""
    B, C, side, p = shape
    L = (side // p) ** 2
    keep = max(1, int(L * (1 - MASK_RATIO)))
    g = torch.Generator().manual_seed(seed)
    ids_restore = torch.argsort(torch.argsort(torch.rand(B, L, generator=g), dim=1), dim=1)
    mask = torch.gather(torch.cat([torch.zeros(B, keep), torch.ones(B, L - keep)], 1), 1, ids_restore)
    imgs = torch.randn(B, C, side, side, generator=g)
    pred = torch.randn(B, L, C * p * p, generator=g)
    return pred.to(device=device, dtype=dtype), imgs.to(device), mask.to(device)


def _reference(pred, imgs, mask, p, norm_pix, upstream):
    from ..ops import reference

    leaf = pred.detach().requires_grad_(True)
    out = reference.masked_mse_loss(leaf, imgs, mask, p, norm_pix)
    (grad,) = torch.autograd.grad(out, [leaf], torch.tensor(upstream, device=out.device, dtype=out.dtype))
    return out.detach(), grad


def _run(loss, pred, imgs, mask, p, norm_pix, write_grad, upstream):
    """The forward, and with `write_grad` (the training launches) the backward's scaling of its gradient buffer:
    (loss, grad_pred or None, what the backward read or None)."""
    value, g, denom, mask32 = loss.masked_mse_loss_forward(pred, imgs, mask, p, norm_pix, None, write_grad)
    if not write_grad:
        return value, None, None
    go = torch.tensor(upstream, device=pred.device, dtype=torch.float32)
    return value, loss.masked_mse_loss_backward(go, g, denom, mask32, False), (g, denom, mask32, go)


def check_and_time(loss, cands: list, shape: tuple, device: torch.device, max_time: float,
                   quick: bool = False) -> None:
    """Check each screened candidate of one shape and dtype against the tolerance rule, and time its kernel."""
    dtype = DTYPES[cands[0].dtype.split("/")[0]]
    B, C, side, p = shape
    pred, imgs, mask = _inputs(shape, dtype, device)
    upstream = max(float(mask.sum()), 1.0) * C * p * p / 2  # grad_pred = w * (pred - target): of order one
    cases = {}  # norm_pix: (fp32 reference's loss and gradient, the rule's bounds)
    for norm_pix in (False, True):
        truth = _reference(pred.float(), imgs, mask, p, norm_pix, upstream)
        plain = _reference(pred, imgs, mask, p, norm_pix, upstream)
        cases[norm_pix] = (truth, [error_bound(a, t, dtype) for a, t in zip(plain, truth)])
    flush = device.type == "cuda"
    for c in cands:
        if c.problems and not c.default:
            continue
        norm_pix, write_grad = _switches(c.kernel, c.key)
        truth, bounds = cases[norm_pix]
        try:
            with loss.forced_settings(**{c.kernel: loss.LossSettings(*c.settings)}):
                value, grad, read = _run(loss, pred, imgs, mask, p, norm_pix, write_grad, upstream)
                errs = [max_error(value, truth[0])] + ([max_error(grad, truth[1])] if write_grad else [])
                c.error = max(errs)
                if any(not e <= b for e, b in zip(errs, bounds)):  # NaN fails too
                    c.problems.append(f"error {c.error:.3e} beyond the tolerance rule's bound {max(bounds):.3e}")
                    continue
                if c.kernel == "fwd":
                    def fn():
                        return loss.masked_mse_loss_forward(pred, imgs, mask, p, norm_pix, None, write_grad)
                else:
                    def fn():
                        return loss.masked_mse_loss_backward(read[3], *read[:3], False)
                c.median_ms = measure(fn, device, max_time_s=max_time, warmup=1 if quick else 2,
                                      min_reps=1 if quick else 3, flush_cache=flush, hide_launch=True).median_ms
        except Exception as exc:
            c.problems.append("failed: " + error_line(exc, 200))


def screen_items(items: list[dict]) -> list[list[str]]:
    """Worker: the compile check of each candidate for its `arch`, then (on CUDA) one launch of each that
    passes at a one-image shape, which leaves the compiled kernel in Triton's cache. Returns the problems."""
    from ..kernels.compile_check import check_specs

    loss = kernel_module()
    problems: list[list[str]] = [[] for _ in items]
    if items and items[0]["arch"]:
        specs = [loss.settings_spec(it["kernel"], it["key"], loss.LossSettings(*it["settings"])) for it in items]
        for i, report in enumerate(check_specs(specs, [items[0]["arch"]])):
            problems[i] = list(report.problems)
    for it, probs in zip(items, problems):
        if probs or it["device"] != "cuda":
            continue
        _, C, side, p = it["shape"]
        dtype = DTYPES[it["dtype"].split("/")[0]]
        pred, imgs, mask = _inputs((1, C, side, p), dtype, "cuda")
        try:
            with loss.forced_settings(**{it["kernel"]: loss.LossSettings(*it["settings"])}):
                _run(loss, pred, imgs, mask, p, *_switches(it["kernel"], it["key"]), 1.0)
            torch.cuda.synchronize()
        except Exception as exc:  # a launch the compile check missed: drop the candidate, say why
            probs.append("launch failed: " + error_line(exc, 200))
    return problems
