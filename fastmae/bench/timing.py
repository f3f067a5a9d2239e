"""Timing: warm up, repeat, report the median and the 20th/80th percentiles.

On CUDA every measured repetition is bracketed by CUDA events (recorded on the current stream, read
after one `torch.cuda.synchronize()` at the end), and the cache can be flushed before each repetition
by zeroing a buffer larger than the L2 (outside the events), so memory-bound ops are not timed from
cache. On the CPU each repetition is timed with `time.perf_counter()`.

The number of repetitions adapts to the op: each warm-up round is timed, and as many repetitions as fit in
`max_time_s` at the fastest round's pace are run (the first round may compile), clamped to `[min_reps, max_reps]`.

With `keep_samples` the record also carries every repetition's time in the order they ran (`samples_ms`, and on
CUDA each call's host time, `host_samples_ms`), and each warm-up call's time to its end (`warmup_ms`): whether
the slow repetitions of a wide spread came first (a warm-up too short) or scattered (a host that stalls now and
then) is in the order, not in the percentiles.

`measure_interleaved` times several functions in rounds (one repetition of each per round). On a shared
or throttling machine a slow spell then hits every function alike, which keeps their ratios (speedups)
honest even when the absolute times drift.

Host launch time on CUDA: the events time the GPU from the start event to the end event, and when issuing a
call takes the host longer than its work takes the GPU (a few-microsecond kernel behind tens of microseconds of
Python, dispatch and Triton's launcher), the GPU waits for the host between the events and the time measured is
the host's. Kernel benchmarks (`bench ops`, `bench attention`) pass `hide_launch=True`: before each repetition
the GPU is kept busy (`torch.cuda._sleep`, calibrated once per device) for twice the host time of one call
measured in the warm-up plus 50 µs (at most `HOLD_MAX_S`), so the call is queued before the start event runs and the
events time the GPU work alone. `host_ms` is the median over the repetitions of the host's time to issue one
call (nothing runs ahead of it on the host: the GPU is held, or idle after a synchronisation), either way: one
call's time alone is a noisy sample. Model benchmarks (encoder,
training step) keep the default: a step's host time is part of what a user waits for. Without `hide_launch` the
device is synchronised before each start event, so no call is issued ahead while the GPU still runs the previous
one: otherwise, with functions interleaved, the backlog a GPU-bound function leaves (a low mask ratio) would let
the host issue the next, host-bound one (a high ratio) before the GPU reached it, and hide its host time.
"""
from __future__ import annotations

import functools
import math
import time
from dataclasses import asdict, dataclass
from typing import Callable, Mapping

import torch

L2_FLUSH_BYTES = 256 * 1024 * 1024  # larger than the L2 of any current GPU
HOLD_MAX_S = 0.005  # the longest the GPU is held busy before a repetition (hide_launch)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between order statistics (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


@dataclass
class Timing:
    """Summary of repeated measurements of one function, in milliseconds."""

    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int
    host_ms: float | None = None  # CUDA: host time to issue one call (median over the repetitions)
    launch_hidden: bool = False  # CUDA: the GPU was held busy while each call was issued (see the docstring)
    samples_ms: list[float] | None = None  # keep_samples: each repetition's time, in the order they ran
    host_samples_ms: list[float] | None = None  # keep_samples on CUDA: each repetition's host time, in order
    warmup_ms: list[float] | None = None  # keep_samples: each warm-up call's time to its end (synchronised)

    @classmethod
    def from_samples(cls, samples_ms: list[float], keep: bool = False, host_samples_ms: list[float] | None = None,
                     warmup_ms: list[float] | None = None, **extra) -> "Timing":
        kept = {"samples_ms": _rounded(samples_ms),
                "host_samples_ms": None if host_samples_ms is None else _rounded(host_samples_ms),
                "warmup_ms": None if warmup_ms is None else _rounded(warmup_ms)} if keep else {}
        return cls(median_ms=percentile(samples_ms, 50), p20_ms=percentile(samples_ms, 20),
                   p80_ms=percentile(samples_ms, 80), reps=len(samples_ms), **kept, **extra)

    def as_dict(self) -> dict:
        """The figures for a record; `host_ms` and `launch_hidden` only where they apply (CUDA), the samples only
        where they were kept."""
        d = asdict(self)
        for key in ("host_ms", "samples_ms", "host_samples_ms", "warmup_ms"):
            if d[key] is None:
                del d[key]
        if not d["launch_hidden"]:
            del d["launch_hidden"]
        return d


def _rounded(values_ms: list[float]) -> list[float]:
    """Times to 0.1 µs: finer than any timer here resolves, and short in a results file."""
    return [round(v, 4) for v in values_ms]


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class _Flusher:
    def __init__(self, device: torch.device, enabled: bool):
        self.buf = None
        if enabled and device.type == "cuda":
            self.buf = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device)

    def __call__(self) -> None:
        if self.buf is not None:
            self.buf.zero_()


@functools.lru_cache(maxsize=None)
def sleep_cycles_per_s(device_index: int) -> float | None:
    """Clock cycles per second of `torch.cuda._sleep` on that GPU, measured once; None where torch lacks it."""
    if not hasattr(torch.cuda, "_sleep"):
        return None
    with torch.cuda.device(device_index):
        cycles = 5_000_000
        torch.cuda._sleep(cycles)  # outside the measurement: the first call, and clocks ramping up from idle
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        end.synchronize()
        ms = start.elapsed_time(end)
    return cycles / (ms * 1e-3) if ms > 0 else None


def hold_cycles(host_s: float, cycles_per_s: float | None) -> int:
    """GPU cycles to stay busy while a call that takes the host `host_s` is issued: twice that plus 50 µs (a
    margin for a clock above the calibration's), at most HOLD_MAX_S; 0 without a calibrated sleep."""
    if not cycles_per_s or host_s < 0:
        return 0
    return int(min(HOLD_MAX_S, 2.0 * host_s + 50e-6) * cycles_per_s)


def _reps_for(per_rep_s: float, max_time_s: float, min_reps: int, max_reps: int) -> int:
    if per_rep_s <= 0:
        return max_reps
    return int(max(min_reps, min(max_reps, max_time_s // per_rep_s)))


def measure(fn: Callable[[], object], device: torch.device | str = "cpu", *, warmup: int = 2, min_reps: int = 3,
            max_reps: int = 100, max_time_s: float = 0.5, flush_cache: bool = False,
            hide_launch: bool = False, keep_samples: bool = False) -> Timing:
    """Time `fn()` on `device`: `warmup` untimed calls, then repetitions as above."""
    return measure_interleaved({"fn": fn}, device, warmup=warmup, min_reps=min_reps, max_reps=max_reps,
                               max_time_s=max_time_s, flush_cache=flush_cache, hide_launch=hide_launch,
                               keep_samples=keep_samples)["fn"]


def measure_interleaved(fns: Mapping[str, Callable[[], object]], device: torch.device | str = "cpu", *,
                        warmup: int = 2, min_reps: int = 3, max_reps: int = 100, max_time_s: float = 0.5,
                        flush_cache: bool = False, hide_launch: bool = False,
                        keep_samples: bool = False) -> dict[str, Timing]:
    """Time several functions in rounds; `max_time_s` bounds the measured time of all of them together.
    `hide_launch` (CUDA): time the GPU work alone, the host's launch time hidden (see the module docstring).
    `keep_samples`: the timings carry every repetition's time, in order (see the module docstring)."""
    device = torch.device(device)
    args = (fns, device, warmup, min_reps, max_reps, max_time_s, flush_cache, hide_launch, keep_samples)
    if device.type == "cuda":  # events, holds and syncs on the timed GPU's streams, whichever GPU is current
        with torch.cuda.device(device):
            return _measure_interleaved(*args)
    return _measure_interleaved(*args)


def _measure_interleaved(fns, device: torch.device, warmup: int, min_reps: int, max_reps: int, max_time_s: float,
                         flush_cache: bool, hide_launch: bool, keep_samples: bool) -> dict[str, Timing]:
    if min_reps < 1 or max_reps < min_reps:
        raise ValueError(f"need 1 <= min_reps <= max_reps, got {min_reps}, {max_reps}")
    flush = _Flusher(device, flush_cache)
    names = list(fns)
    synchronize(device)
    host_s = {n: 0.0 for n in names}
    warm_ms: dict[str, list[float]] = {n: [] for n in names}
    round_s = []
    for _ in range(max(warmup, 1)):  # at least one untimed call: compiles, autotunes, allocates
        r0 = time.perf_counter()
        for name in names:
            flush()
            synchronize(device)  # nothing queued ahead: the host time is this call's own, not a wait on the last
            t = time.perf_counter()
            fns[name]()
            host_s[name] = time.perf_counter() - t  # the last warm-up call's sets the hold (compiled by then)
            if keep_samples:  # the call's time to its end: whether the warm-up had settled by its last call
                synchronize(device)
                warm_ms[name].append((time.perf_counter() - t) * 1e3)
        synchronize(device)
        round_s.append(time.perf_counter() - r0)
    # the repetitions that fit in max_time_s, from the fastest warm-up round: the first one may have compiled
    # a kernel (a second or so), which must not cut a microsecond kernel down to min_reps
    per_round = min(round_s)
    reps = _reps_for(per_round, max_time_s, min_reps, max_reps)

    samples: dict[str, list[float]] = {n: [] for n in names}
    if device.type == "cuda":
        rate = sleep_cycles_per_s(device.index if device.index is not None else torch.cuda.current_device()) \
            if hide_launch else None
        hold = {n: hold_cycles(host_s[n], rate) for n in names}
        if rate and any(hold.values()):  # the holds take GPU time too: keep the rounds within max_time_s
            reps = _reps_for(per_round + sum(hold.values()) / rate, max_time_s, min_reps, max_reps)
        events = {n: [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                      for _ in range(reps)] for n in names}
        issue_s: dict[str, list[float]] = {n: [] for n in names}
        for i in range(reps):
            for name in names:
                if hold[name]:
                    torch.cuda._sleep(hold[name])
                flush()
                if not hold[name]:  # nothing queued ahead: the events see this call's host time (docstring)
                    torch.cuda.synchronize(device)
                start, end = events[name][i]
                start.record()
                t = time.perf_counter()
                fns[name]()
                issue_s[name].append(time.perf_counter() - t)
                end.record()
        torch.cuda.synchronize(device)
        for name in names:
            samples[name] = [s.elapsed_time(e) for s, e in events[name]]
        # hidden only where the hold outlasted the host's issuing of the call (it is capped at HOLD_MAX_S): of the
        # median call, as the time reported is the median repetition's
        host_ms = {n: percentile(issue_s[n], 50) * 1e3 for n in names}
        return {n: Timing.from_samples(samples[n], keep_samples, [s * 1e3 for s in issue_s[n]], warm_ms[n],
                                       host_ms=host_ms[n],
                                       launch_hidden=bool(hold[n]) and hold[n] / rate >= host_ms[n] / 1e3)
                for n in names}
    else:
        for _ in range(reps):
            for name in names:
                t = time.perf_counter()
                fns[name]()
                samples[name].append((time.perf_counter() - t) * 1e3)
    return {n: Timing.from_samples(samples[n], keep_samples, warmup_ms=warm_ms[n]) for n in names}


def runs_per_call_s(fn: Callable[[], object], device: torch.device | str, calls: int, rounds: int, *,
                    until_done: bool) -> list[float]:
    """Seconds per call for each of `rounds` runs of `calls` calls made back to back: the device is synchronised
    before each run, not between its calls; `until_done`: the run's time lasts until the device has finished its
    work (else it is the host's time to issue the calls)."""
    if calls < 1 or rounds < 1:
        raise ValueError(f"need at least one call and one round, got {calls}, {rounds}")
    per_call = []
    for _ in range(rounds):
        synchronize(device)
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        if until_done:
            synchronize(device)
        per_call.append((time.perf_counter() - t) / calls)
    synchronize(device)
    return per_call


def back_to_back_ms(fn: Callable[[], object], device: torch.device | str, calls: int, rounds: int) -> list[float]:
    """Per call, in ms, for each of `rounds` runs of `calls` calls issued back to back, as a training loop issues
    its steps, timed until the device is done: on CUDA the host issues call i+1 while the GPU still runs call i,
    so this is the steady pace of a loop, where `measure` times each call from an idle GPU. (The flushes and
    holds of `measure` do not apply: nothing runs between the calls.)"""
    return _rounded([s * 1e3 for s in runs_per_call_s(fn, device, calls, rounds, until_done=True)])


def synchronized(fn: Callable[[], object], device: torch.device | str) -> Callable[[], object]:
    """`fn` followed by a device synchronisation (what pytest-benchmark must time on CUDA)."""
    device = torch.device(device)
    if device.type != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize(device)
        return out

    return run
