"""The arithmetic of the benchmarks, from known numbers: percentiles, speedups, FLOP and byte counts, MFU."""
from __future__ import annotations

import math
import time

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import fastmae
from fastmae.bench import encoder_bench, ops_bench, train_bench
from fastmae.bench.flops import encoder_flops, model_flops, train_step_flops
from fastmae.bench.limits import Limits
from fastmae.bench.timing import (HOLD_MAX_S, Timing, back_to_back_ms, hold_cycles, measure, measure_interleaved,
                                  percentile, sleep_cycles_per_s)


def test_percentile_interpolates_like_numpy():
    vals = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert percentile(vals, 50) == 3.0
    assert percentile(vals, 20) == pytest.approx(1.8)  # position 0.8 between 1 and 2
    assert percentile(vals, 80) == pytest.approx(4.2)
    assert percentile([7.0], 20) == 7.0
    t = Timing.from_samples([10.0, 20.0, 30.0, 40.0, 50.0, 60.0])
    assert (t.median_ms, t.p20_ms, t.p80_ms, t.reps) == (35.0, 20.0, 50.0, 6)
    with pytest.raises(ValueError):
        percentile([], 50)


def test_measure_counts_repetitions_and_orders_percentiles():
    calls = []
    t = measure(lambda: calls.append(1), "cpu", warmup=2, min_reps=4, max_reps=4, max_time_s=0.0)
    assert t.reps == 4 and len(calls) == 6  # 2 warm-up + 4 timed
    assert 0 <= t.p20_ms <= t.median_ms <= t.p80_ms
    seen = []
    res = measure_interleaved({"a": lambda: seen.append("a"), "b": lambda: seen.append("b")}, "cpu", warmup=1,
                              min_reps=3, max_reps=3, max_time_s=0.0)
    assert set(res) == {"a", "b"} and all(r.reps == 3 for r in res.values())
    assert seen == ["a", "b"] * 4  # rounds: one of each per round


def test_a_slow_first_call_does_not_cut_the_repetitions():
    """The first warm-up call may compile a kernel (here: 0.3 s of sleep); the repetitions that fit in
    max_time_s follow the calls after it (about 1 ms), not the average with the compile."""
    calls = []

    def fn():
        time.sleep(0.3 if not calls else 0.001)
        calls.append(1)

    t = measure(fn, "cpu", warmup=2, min_reps=3, max_reps=40, max_time_s=0.2)
    assert t.reps >= 20, t  # about 0.2 s / 1 ms (bounded by 40); the mean with the compile would allow 1, so 3
    assert t.median_ms < 50


def test_ideal_speedup_counts_the_class_token():
    assert encoder_bench.ideal_speedup(196, 0.0) == 1.0
    assert encoder_bench.ideal_speedup(196, 0.75) == pytest.approx(197 / 50)  # K = 49
    assert encoder_bench.ideal_speedup(256, 0.75) == pytest.approx(257 / 65)  # ViT-H/14: K = 64
    assert encoder_bench.ideal_speedup(196, 0.9) == pytest.approx(197 / 20)  # int(19.6) = 19


def _enc(backend, ratio, ips, status="ok", mode="fwd"):
    k = int(196 * (1 - ratio))
    return {"kind": "encoder", "model": "m", "backend": backend, "mode": mode, "mask_ratio": ratio, "dtype": "float32",
            "shape": {"batch": 8, "L": 196, "K": k, "tokens": k + 1}, "status": status, "images_per_s": ips}


def test_back_to_back_times_each_run_per_call():
    """Each run's time over its calls: a call that waits 2 ms gives at least 2 ms per call, in every run; the calls
    are made `calls` x `rounds` times; no calls or no rounds are refused."""
    n = {"calls": 0}

    def wait():
        n["calls"] += 1
        time.sleep(0.002)

    per_call = back_to_back_ms(wait, "cpu", calls=3, rounds=2)
    assert len(per_call) == 2 and all(2.0 <= t < 200 for t in per_call) and n["calls"] == 6
    for calls, rounds in ((0, 1), (1, 0)):
        with pytest.raises(ValueError, match="at least one call"):
            back_to_back_ms(wait, "cpu", calls=calls, rounds=rounds)
    assert train_bench.back_to_back_runs(1) == (1, 1) and train_bench.back_to_back_runs(5) == (5, 1)
    assert train_bench.back_to_back_runs(30) == (10, 2)


def test_encoder_speedups_from_known_timings():
    recs = [_enc("sdpa", 0.0, 100.0), _enc("sdpa", 0.75, 350.0), _enc("sdpa", 0.75, 330.0, mode="fwd+bwd"),
            _enc("sdpa", 0.0, 110.0, mode="fwd+bwd"), _enc("triton", 0.0, None, status="skipped"),
            _enc("triton", 0.75, None, status="skipped")]
    encoder_bench.add_speedups(recs)
    assert recs[0]["speedup"] == 1.0 and recs[0]["of_ideal"] == 1.0
    assert recs[1]["speedup"] == pytest.approx(3.5)
    assert recs[1]["ideal_speedup"] == pytest.approx(197 / 50)
    assert recs[1]["of_ideal"] == pytest.approx(3.5 / (197 / 50))
    assert recs[2]["speedup"] == pytest.approx(3.0)  # against the fwd+bwd baseline, not the fwd one
    assert "speedup" not in recs[5] and recs[5]["ideal_speedup"] == pytest.approx(197 / 50)


def test_op_and_train_speedups_from_known_timings():
    recs = [{"kind": "op", "op": "attention", "case": "c", "mode": "fwd", "backend": "reference", "status": "ok",
             "median_ms": 2.0},
            {"kind": "op", "op": "attention", "case": "c", "mode": "fwd", "backend": "sdpa", "status": "ok",
             "median_ms": 0.5},
            {"kind": "op", "op": "attention", "case": "c", "mode": "fwd+bwd", "backend": "sdpa", "status": "ok",
             "median_ms": 1.0}]
    ops_bench.add_speedups(recs)
    assert recs[0]["speedup"] == 1.0 and recs[1]["speedup"] == 4.0
    assert "speedup" not in recs[2]  # no reference in that mode
    train = [{"kind": "train", "backend": "official-eager", "status": "ok", "images_per_s": 100.0},
             {"kind": "train", "backend": "reference+compile", "status": "ok", "images_per_s": 125.0},
             {"kind": "train", "backend": "fastmae", "status": "ok", "images_per_s": 160.0},
             {"kind": "train", "backend": "fastmae+compile", "status": "skipped"}]
    train_bench.add_train_speedups(train)
    assert train[0]["vs_official_eager"] == 1.0
    assert train[2]["vs_official_eager"] == pytest.approx(1.6)
    assert train[2]["vs_reference_compile"] == pytest.approx(1.28)
    assert "vs_official_eager" not in train[3]


def test_attention_flops_and_figures():
    b, h, n, d = 2, 3, 50, 64
    f = ops_bench.attention_flops(b, h, n, d)
    assert f["fwd"] == 4 * n * n * d * b * h
    assert f["fwd+bwd"] == pytest.approx(3.5 * f["fwd"])  # backward = 2.5 x forward
    case = ops_bench.attention_case("x", b, h, n, d, torch.float32)
    lim = Limits("cpu", "float32", 1024, matmul_tflops=2.0, copy_bytes=1, copy_gbps=10.0)
    fig = ops_bench.figures(case, "fwd", 1.0, lim)  # 1 ms
    assert fig["tflops"] == pytest.approx(f["fwd"] / 1e-3 / 1e12)
    assert fig["frac_peak"] == pytest.approx(fig["tflops"] / 2.0)
    # counted by hand: all matmul work of one forward, through the FLOP counter
    q, k, v = (torch.randn(b, h, n, d) for _ in range(3))
    with FlopCounterMode(display=False) as fc:
        fastmae.ops.attention(q, k, v, backend="reference")
    assert fc.get_total_flops() == f["fwd"]


def test_byte_counts_by_hand():
    # gather_patches: B=2, K=49, P=768 fp32 pixels, read and written, plus int64 indices
    assert ops_bench.gather_patches_bytes(2, 49, 768, 4)["fwd"] == 2 * (2 * 49 * 768 * 4) + 2 * 49 * 8
    # unshuffle: B=1, L=4, K=1, D=2, es=2
    u = ops_bench.unshuffle_bytes(1, 4, 1, 2, 2)
    fwd = 2 * (1 * 2 * 2 + 2 + 5 * 2 + 1 * 5 * 2) + 4 * 8
    assert u["fwd"] == fwd and u["fwd+bwd"] == fwd + 2 * (5 * 2 + 2 * 2 + 2) + 4 * 8
    # the loss reads pred (bf16) and images (fp32) at the 147 removed patches of 196, and the mask (fp32); the
    # backward gets the residual from a bf16 buffer the forward wrote (2 + 2 bytes a pixel, less than 2 + 4)
    # and writes grad_pred at all 196 rows
    lb = ops_bench.loss_bytes(1, 196, 49, 768, 2, 4)
    assert lb["fwd"] == 147 * 768 * (2 + 4) + 196 * 4 + 4
    assert lb["fwd+bwd"] == lb["fwd"] + 147 * 768 * (2 + 2) + 196 * 768 * 2 + 196 * 4
    assert ops_bench.loss_bytes(1, 196, 49, 768, 4, 4)["fwd+bwd"] == \
        147 * 768 * 8 + 196 * 4 + 4 + 147 * 768 * 8 + 196 * 768 * 4 + 196 * 4
    # gather_tokens: B=1, L=4, K=2, D=2, es=2; gathered, grad_x is a view of grad_out: only the class row moves
    g = ops_bench.gather_tokens_bytes(1, 4, 2, 2, 2, gathered=True)
    assert g["fwd+bwd"] - g["fwd"] == 2 * (1 * 2 + 2)
    g = ops_bench.gather_tokens_bytes(1, 4, 2, 2, 2, gathered=False)
    assert g["fwd+bwd"] - g["fwd"] == 2 * (3 * 2 + 4 * 2 + 2) + 2 * 8
    case = ops_bench.gather_patches_case("x", 2, 16)
    fig = ops_bench.figures(case, "fwd", 2.0, Limits("cpu", "float32", 1, 1.0, 1, copy_gbps=100.0))
    assert fig["gbps"] == pytest.approx(case.bytes["fwd"] / 2e-3 / 1e9)
    assert fig["frac_peak"] == pytest.approx(fig["gbps"] / 100.0)


@pytest.mark.parametrize("ratio", [0.0, 0.75])
def test_model_flops_match_the_flop_counter(ratio):
    """The analytic count equals torch's FLOP counter on a forward that does exactly the model's work
    (visible patches embedded as a matrix product, attention written out)."""
    model = fastmae.create_model("mae_vit_tiny_patch4")
    model.backend = {"attention": "reference", "gather_patches": "sdpa", "gather_tokens": "sdpa",
                     "unshuffle_tokens": "sdpa", "masked_mse_loss": "sdpa"}
    imgs = torch.randn(3, 3, 32, 32)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(imgs, ratio)
    assert fc.get_total_flops() == model_flops(model, 3, ratio)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model.forward_encoder(imgs, ratio)
    assert fc.get_total_flops() == encoder_flops(model, 3, ratio)
    assert train_step_flops(model, 3, ratio) == 3 * model_flops(model, 3, ratio)


def test_vit_b_flops_formula():
    """ViT-B encoder at 75%: 12 blocks x (2 * 50 * 12 * 768^2 + 4 * 50^2 * 768) + 49 patches x 2 * 768 * 768."""
    model = fastmae.create_model("mae_vit_base_patch16")
    per_block = 2 * 50 * (12 * 768 ** 2) + 4 * 50 ** 2 * 768
    assert encoder_flops(model, 1, 0.75) == 12 * per_block + 2 * 49 * 768 * 768
    assert math.isclose(encoder_flops(model, 4, 0.75), 4 * encoder_flops(model, 1, 0.75))


def test_hold_cycles_cover_the_host_time():
    """The GPU is held for twice the host's time to issue a call plus 50 µs, capped, and not at all without a
    calibrated sleep."""
    rate = 1.5e9  # cycles per second
    assert abs(hold_cycles(100e-6, rate) - 250e-6 * rate) <= 1
    assert hold_cycles(1.0, rate) == int(HOLD_MAX_S * rate)
    assert hold_cycles(100e-6, None) == 0 and hold_cycles(-1.0, rate) == 0


def test_cpu_timings_carry_no_cuda_fields():
    t = measure(lambda: None, "cpu", warmup=1, min_reps=2, max_reps=2, hide_launch=True)
    assert t.host_ms is None and not t.launch_hidden
    assert set(t.as_dict()) == {"median_ms", "p20_ms", "p80_ms", "reps"}


def _busy_host(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the GPU suite runs it)")
def test_hide_launch_times_the_gpu_work_alone():
    """A call that keeps the host busy 300 µs before a microsecond kernel: timed plainly, the GPU waits for the
    host between the events; with hide_launch the events see the kernel alone, and host_ms says 0.3 ms."""
    assert sleep_cycles_per_s(torch.cuda.current_device()) > 1e8  # a GPU clock, in cycles per second
    x = torch.zeros(1024, device="cuda")

    def call():
        _busy_host(300e-6)
        x.add_(1.0)

    plain = measure(call, "cuda", warmup=2, min_reps=10, max_reps=10)
    hidden = measure(call, "cuda", warmup=2, min_reps=10, max_reps=10, hide_launch=True)
    assert plain.median_ms > 0.25, plain
    # the kernel alone takes a few µs; other processes of the sharded GPU suite may share the GPU, so the bound
    # is relative: without the host's 300 µs between the events, at most a third of the plain time
    assert hidden.launch_hidden and hidden.median_ms < plain.median_ms / 3, (hidden, plain)
    assert hidden.host_ms >= 0.3 and plain.host_ms >= 0.3


class _StandInEvent:
    """A CUDA event that reads the host's clock: the CUDA timing path's bookkeeping, run on a CPU."""

    def __init__(self, enable_timing=False):
        self.t = None

    def record(self):
        self.t = time.perf_counter()

    def elapsed_time(self, end):
        return (end.t - self.t) * 1e3


def _cuda_stand_ins(monkeypatch):
    import contextlib

    from fastmae.bench import timing

    monkeypatch.setattr(torch.cuda, "Event", _StandInEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "_sleep", lambda cycles: None, raising=False)
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(timing, "sleep_cycles_per_s", lambda index: 1e9)


_NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the GPU suite runs it)")


@pytest.mark.parametrize("hide", [False, True])
@pytest.mark.parametrize("cuda", ["stand-ins", pytest.param("device", marks=[pytest.mark.gpu, _NEEDS_CUDA])])
def test_cuda_path_reports_the_median_calls_host_time(monkeypatch, cuda, hide):
    """The CUDA path's host time is the median repetition's time to issue the call, not the last warm-up
    call's (here 3 ms among calls of 300 µs). On a CPU with stand-ins for CUDA's events, syncs and sleep (the
    path's bookkeeping), and on a GPU."""
    x = None
    if cuda == "stand-ins":
        _cuda_stand_ins(monkeypatch)
    else:
        x = torch.zeros(1024, device="cuda")
    calls = []

    def call():
        calls.append(1)
        _busy_host(3e-3 if len(calls) == 2 else 300e-6)  # the second and last warm-up call
        if x is not None:
            x.add_(1.0)

    t = measure(call, "cuda", warmup=2, min_reps=9, max_reps=9, hide_launch=hide)
    assert len(calls) == 11 and t.reps == 9
    assert 0.3 <= t.host_ms < 1.5, t
    # held for 2 x 3 ms + 50 µs, capped at 5 ms: longer than the median call takes to issue
    assert t.launch_hidden == hide


@pytest.mark.parametrize("cuda", [False, "stand-ins", pytest.param("device", marks=[pytest.mark.gpu, _NEEDS_CUDA])])
def test_kept_samples_are_the_repetitions_in_order(monkeypatch, cuda):
    """keep_samples: every repetition's time in the order they ran, their percentiles the reported ones, and each
    warm-up call's time; on CUDA each call's host time too (CUDA's events, syncs and sleep as stand-ins on a CPU,
    and on a GPU). Without it the record has none. Call i busy-waits i x 2 ms on the host, so each time is at
    least its own call's: a list out of order fails that, while a busy machine, which only stretches calls, cannot
    make a list in order fail."""
    device = "cpu" if not cuda else "cuda"
    if cuda == "stand-ins":
        _cuda_stand_ins(monkeypatch)
    x = torch.zeros(1024, device="cuda") if cuda == "device" else None
    calls = []
    step_ms = 2.0

    def call():
        calls.append(1)
        _busy_host(step_ms * 1e-3 * len(calls))
        if x is not None:
            x.add_(1.0)

    def in_order(times_ms, first_call):
        """Each time at least that of the call it names: calls first_call, first_call + 1, ..."""
        return all(t >= step_ms * (first_call + i) - 0.05 for i, t in enumerate(times_ms))

    t = measure(call, device, warmup=2, min_reps=6, max_reps=6, keep_samples=True)
    d = t.as_dict()
    assert len(d["warmup_ms"]) == 2 and in_order(d["warmup_ms"], 1), d  # calls 1 and 2
    assert len(d["samples_ms"]) == t.reps == 6 and in_order(d["samples_ms"], 3), d  # calls 3 to 8
    assert t.median_ms == pytest.approx(percentile(d["samples_ms"], 50), abs=1e-3)
    assert t.p80_ms == pytest.approx(percentile(d["samples_ms"], 80), abs=1e-3)
    if cuda:
        hosts = d["host_samples_ms"]
        assert len(hosts) == 6 and in_order(hosts, 3), hosts
        assert t.host_ms == pytest.approx(percentile(hosts, 50), abs=1e-3)
    else:
        assert "host_samples_ms" not in d
    plain = measure(call, device, warmup=1, min_reps=2, max_reps=2).as_dict()
    assert not {"samples_ms", "host_samples_ms", "warmup_ms"} & set(plain)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the GPU suite runs it)")
def test_interleaved_timing_keeps_each_calls_host_time():
    """A GPU-bound function (2 ms of GPU work) interleaved with a host-bound one (300 µs of host time before a
    tiny kernel): the backlog the first leaves must not let the second be issued before its start event."""
    assert sleep_cycles_per_s(torch.cuda.current_device()) > 1e8
    cycles = int(2e-3 * sleep_cycles_per_s(torch.cuda.current_device()))
    x = torch.zeros(1024, device="cuda")

    def host_bound():
        _busy_host(300e-6)
        x.add_(1.0)

    t = measure_interleaved({"gpu": lambda: torch.cuda._sleep(cycles), "host": host_bound}, "cuda", warmup=2,
                            min_reps=10, max_reps=10)
    assert t["gpu"].median_ms > 1.5 and t["host"].median_ms > 0.25, t
