"""`fastmae bench encoder` and `fastmae bench train` in quick mode on the tiny preset: fields, speedups
computed from the measured numbers, skipped paths with their reasons, and the timed functions checked
against the reference path."""
from __future__ import annotations

import statistics

import pytest
import torch

from fastmae import create_model, ops
from fastmae.bench import encoder_bench, train_bench
from fastmae.bench.common import MODEL_PATHS

from ..utils import DEVICES, FakeGraphs, assert_close

CPU = torch.device("cpu")
QUICK = dict(warmup=1, min_reps=2, max_reps=2, max_time_s=0.0)
TINY = "mae_vit_tiny_patch4"


@pytest.fixture(scope="module")
def encoder_records():
    return encoder_bench.run_encoder(CPU, TINY, 2, torch.float32, [0.0, 0.75], list(MODEL_PATHS), ["fwd"],
                                     timing=QUICK, show_progress=False)


def test_encoder_records(encoder_records):
    recs = encoder_records
    assert {(r["backend"], r["mask_ratio"]) for r in recs} == {(b, q) for b in MODEL_PATHS for q in (0.0, 0.75)}
    by = {(r["backend"], r["mask_ratio"]): r for r in recs}
    for b in ("reference", "sdpa"):
        r0, r75 = by[(b, 0.0)], by[(b, 0.75)]
        assert r0["status"] == r75["status"] == "ok"
        assert r75["shape"] == {"batch": 2, "img": 32, "L": 64, "K": 16, "tokens": 17}
        assert r75["images_per_s"] == pytest.approx(2 / (r75["median_ms"] * 1e-3))
        assert r75["speedup"] == pytest.approx(r75["images_per_s"] / r0["images_per_s"])
        assert r75["ideal_speedup"] == pytest.approx(65 / 17)
        assert r75["of_ideal"] == pytest.approx(r75["speedup"] / r75["ideal_speedup"])
        assert r75["tflops"] > 0 and r75["dispatch"].startswith("attention=" + b)
        assert len(r75["samples_ms"]) == r75["reps"]  # every repetition, in order (a spread's shape)
    # xformers: the registry's reason; auto on the CPU resolves to sdpa's backends and is not timed twice
    assert by[("xformers", 0.75)]["status"] == "skipped" and "xformers" in by[("xformers", 0.75)]["reason"]
    assert by[("auto", 0.0)]["status"] == "skipped" and "same backends as sdpa" in by[("auto", 0.0)]["reason"]
    assert by[("triton", 0.0)]["status"] == "skipped" and "interpreter" in by[("triton", 0.0)]["reason"]


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_encoder_runner_matches_the_reference_path(mode):
    """The timed function runs the real encoder: sdpa's latent (fwd) and weight gradients (fwd+bwd) equal the
    reference path's within fp32 tolerance (atol 1e-4, rtol 1e-4)."""
    torch.manual_seed(0)
    model = create_model(TINY)
    imgs, noise = encoder_bench._inputs(model, 2, CPU)
    out = {}
    for backend in ("reference", "sdpa"):
        model.backend = backend
        latent = encoder_bench.make_encoder_runner(model, imgs, noise, 0.75, mode, CPU, torch.float32)()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        out[backend] = (latent.detach(), grads)
    assert_close(out["sdpa"][0], out["reference"][0], 1e-4, 1e-4, f"latent {mode}")
    if mode == "fwd+bwd":
        assert out["sdpa"][1].keys() == out["reference"][1].keys() and out["sdpa"][1]
        for name, g in out["reference"][1].items():
            assert_close(out["sdpa"][1][name], g, 1e-4, 1e-4, f"grad {name}")


@pytest.mark.parametrize("device", DEVICES)
def test_cuda_graph_rows(device):
    """`--cuda-graphs`: on CUDA the auto path replayed from graphs is timed as auto+cudagraph; elsewhere every
    such row is skipped with the reason."""
    device = torch.device(device)
    recs = encoder_bench.run_encoder(device, TINY, 2, torch.float32, [0.0, 0.75], ["sdpa"], ["fwd", "fwd+bwd"],
                                     timing=QUICK, show_progress=False, cuda_graphs=True)
    graphed = [r for r in recs if r["backend"] == encoder_bench.GRAPH_BACKEND]
    assert {(r["mode"], r["mask_ratio"]) for r in graphed} == {(m, q) for m in ("fwd", "fwd+bwd") for q in (0.0, 0.75)}
    if device.type == "cuda":
        assert all(r["status"] == "ok" and r["cuda_graph"] and r["images_per_s"] > 0 for r in graphed), graphed
        assert all(r.get("of_ideal") is not None for r in graphed)
    else:
        assert all(r["status"] == "skipped" and "CUDA graphs need a CUDA device" in r["reason"] for r in graphed)


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_graphed_runner_flow(monkeypatch, mode):
    """The capture-and-replay flow on a CPU with stand-in graph calls: warm-up calls, then the gradients set to
    None so the captured backward owns them, one capture, and replays that return the captured output."""
    fake = FakeGraphs(monkeypatch)
    torch.manual_seed(0)
    model = create_model(TINY)
    imgs, noise = encoder_bench._inputs(model, 2, CPU)
    eager = encoder_bench.make_encoder_runner(model, imgs, noise, 0.75, mode, CPU, torch.float32)()
    assert eager.grad_fn is None  # no autograd graph outlives a call (a captured one would pin its accumulators)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    replay = encoder_bench.make_graphed_runner(model, imgs, noise, 0.75, mode, CPU, torch.float32)
    assert fake.captures == 1 and fake.replays == 0
    assert_close(replay().detach(), eager, 1e-6, 1e-6, "captured latent")
    assert fake.replays == 1
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == grads.keys() and (mode == "fwd") == (not grads)
    for name, g in grads.items():  # the 'captured' backward's gradients, not an accumulation over the warm-ups
        assert_close(got[name], g, 1e-6, 1e-6, f"grad {name}")

    # and run_encoder's graph rows, as on CUDA
    FakeGraphs(monkeypatch)
    monkeypatch.setattr(encoder_bench, "graph_step_reason", lambda device: None)
    recs = encoder_bench.run_encoder(CPU, TINY, 2, torch.float32, [0.0, 0.75], ["sdpa"], [mode], timing=QUICK,
                                     show_progress=False, cuda_graphs=True)
    graphed = [r for r in recs if r["backend"] == encoder_bench.GRAPH_BACKEND]
    assert len(graphed) == 2 and all(r["status"] == "ok" and r["cuda_graph"] for r in graphed), graphed
    assert all(r["dispatch"].startswith("attention=sdpa") and r.get("of_ideal") is not None for r in graphed)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the GPU suite runs it)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_graph_replay_matches_eager(mode, dtype):
    """A replayed graph computes what the eager runner computes: the latent and every weight gradient, within
    1e-5 (fp32) or 2e-2 (bf16 autocast, where the graph runs without autocast's cast cache)."""
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = create_model(TINY).to(device)
    imgs, noise = encoder_bench._inputs(model, 4, device)
    latent = encoder_bench.make_encoder_runner(model, imgs, noise, 0.75, mode, device, dtype)().detach().clone()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    replay_first = encoder_bench.make_graphed_runner(model, imgs, noise, 0.5, mode, device, dtype)
    replay = encoder_bench.make_graphed_runner(model, imgs, noise, 0.75, mode, device, dtype)  # a second capture
    replay_first()  # two graphs alive at once: the first replayed between the second's capture and replays
    for _ in range(2):  # every replay recomputes the same thing
        out = replay()
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        assert_close(out.float(), latent.float(), tol, tol, f"latent {mode}")
        got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        assert got.keys() == grads.keys()
        for name, g in grads.items():
            assert_close(got[name].float(), g.float(), tol, tol, f"grad {name}")


def test_train_records():
    recs = train_bench.run_train(CPU, TINY, 2, torch.float32, variants=list(train_bench.VARIANTS),
                                 compile_reason="compile off in this test", peak_tflops=0.05, timing=QUICK,
                                 show_progress=False)
    by = {r["backend"]: r for r in recs}
    assert set(by) == set(train_bench.VARIANTS)
    assert [r["backend"] for r in recs][:3] == ["fastmae", "official-eager", "reference+sdpa"]  # eager first
    for v in ("reference+compile", "fastmae+compile", "fastmae+compile+cudagraph"):
        assert by[v]["status"] == "skipped" and by[v]["reason"] == "compile off in this test"
    for v in ("official-eager", "reference+sdpa", "fastmae"):
        r = by[v]
        assert r["status"] == "ok", r.get("reason")
        assert r["images_per_s"] == pytest.approx(2 / (r["median_ms"] * 1e-3))
        assert r["mfu"] == pytest.approx(r["tflops"] / 0.05)
        assert r["tflops"] == pytest.approx(r["flops_per_step"] / (r["median_ms"] * 1e-3) / 1e12)
        assert r["peak_mem_kind"] and (r["peak_mem_mb"] is None or r["peak_mem_mb"] >= 0)
        assert r["vs_official_eager"] == pytest.approx(r["images_per_s"] / by["official-eager"]["images_per_s"])
        assert len(r["samples_ms"]) == r["reps"]  # every repetition, in order (a spread's shape)
        # steps back to back: runs of up to 10 steps, their median pace, and its own ratio to official-eager
        calls, rounds = train_bench.back_to_back_runs(r["reps"])
        assert len(r["back_to_back_ms"]) == rounds and all(t > 0 for t in r["back_to_back_ms"])
        assert r["back_to_back_images_per_s"] == pytest.approx(2 / (statistics.median(r["back_to_back_ms"]) * 1e-3))
        assert r["back_to_back_vs_official_eager"] == pytest.approx(
            r["back_to_back_images_per_s"] / by["official-eager"]["back_to_back_images_per_s"])
    assert "attention=reference" in by["official-eager"]["dispatch"]
    assert "attention=sdpa" in by["reference+sdpa"]["dispatch"]
    # the reference variants construct AdamW as the official script (torch's default: a loop on the CPU),
    # fastmae's variants as `fastmae pretrain` (fused); each record times its optimizer's step alone
    assert by["official-eager"]["optimizer"] == by["reference+sdpa"]["optimizer"] == "AdamW for-loop"
    assert by["fastmae"]["optimizer"] == by["fastmae+lean"]["optimizer"] == "AdamW fused"
    for v in ("official-eager", "reference+sdpa", "fastmae", "fastmae+lean"):
        assert 0 < by[v]["optimizer_ms"] < by[v]["median_ms"]
    assert "gather_tokens=reference" in by["reference+sdpa"]["dispatch"]
    assert by["fastmae+cudagraph"]["status"] == "skipped"
    assert "CUDA graphs need a CUDA device" in by["fastmae+cudagraph"]["reason"]
    # on a CPU fastmae casts each weight as autocast does: fastmae+plain-casts would be the same step
    assert by["fastmae+plain-casts"]["status"] == "skipped"
    assert "casts each weight on its own here already" in by["fastmae+plain-casts"]["reason"]
    assert by["fastmae+plain-casts"]["group_weight_casts"] is False
    # on a CPU Triton's kernels run in its interpreter, through one launch path: the same step as fastmae's
    assert by["fastmae+triton-launch"]["status"] == "skipped" and by["fastmae+triton-launch"]["kept_launches"] is False
    assert "CUDA only" in by["fastmae+triton-launch"]["reason"]
    # on a CPU fastmae's own choice for attention is SDPA: fastmae+sdpa would time the same step again
    assert "attention=sdpa" in by["fastmae"]["dispatch"]
    assert by["fastmae+sdpa"]["status"] == "skipped" and by["fastmae+sdpa"]["reason"].startswith(
        "fastmae already runs this step here (attention=sdpa")


def test_plain_casts_variant_runs_only_where_fastmae_groups_casts():
    """fastmae+plain-casts differs from fastmae only on CUDA under autocast (bf16, fp16): elsewhere it says why
    it would time fastmae's step again."""
    cuda = torch.device("cuda")
    assert train_bench.variant_reason("fastmae+plain-casts", cuda, torch.bfloat16) is None
    assert train_bench.variant_reason("fastmae+plain-casts", cuda, torch.float16) is None
    assert "no weight is cast" in train_bench.variant_reason("fastmae+plain-casts", cuda, torch.float32)
    assert "on CUDA only" in train_bench.variant_reason("fastmae+plain-casts", CPU, torch.bfloat16)


def test_triton_launch_variant_turns_kept_launches_off_while_its_step_runs():
    """fastmae+triton-launch runs on CUDA only, and its step runs with `kernels.launch.ENABLED` off, restored
    after the step, also when the step raises."""
    from fastmae.kernels import launch

    assert train_bench.variant_reason("fastmae+triton-launch", torch.device("cuda"), torch.bfloat16) is None
    assert "CUDA only" in train_bench.variant_reason("fastmae+triton-launch", CPU, torch.bfloat16)
    seen = []

    def step():
        seen.append(launch.ENABLED)
        if len(seen) == 2:
            raise RuntimeError("boom")
        return torch.zeros(())

    wrapped = train_bench._through_tritons_launch(step)
    before = launch.ENABLED
    wrapped()
    with pytest.raises(RuntimeError, match="boom"):
        wrapped()
    assert seen == [False, False] and launch.ENABLED == before


def test_skipped_train_rows_carry_their_shape_and_replace_earlier_rows():
    """A variant skipped in a later run into the same folder (here on a CPU, where fastmae already serves
    attention with SDPA) has the shape of the run in its record, so it replaces the earlier run's row of that
    variant instead of standing beside it."""
    from fastmae.bench import records as rec_mod
    with ops.use_backend({"attention": "reference"}):
        first = train_bench.run_train(CPU, TINY, 2, torch.float32, variants=["fastmae+sdpa"], timing=QUICK,
                                      show_progress=False)
    second = train_bench.run_train(CPU, TINY, 2, torch.float32, variants=["fastmae", "fastmae+sdpa"], timing=QUICK,
                                   show_progress=False)
    skipped = next(r for r in second if r["backend"] == "fastmae+sdpa")
    assert first[0]["status"] == "ok" and skipped["status"] == "skipped"
    assert skipped["shape"] == first[0]["shape"] == {"batch": 2, "img": 32, "L": 64, "K": 16}
    merged = rec_mod.merge(first, second)
    assert [r["status"] for r in merged if r["backend"] == "fastmae+sdpa"] == ["skipped"]


def test_varied_variant_runs_where_it_differs():
    """fastmae+sdpa is timed where fastmae's attention is not SDPA (here: forced to the reference backend), and
    serves attention with SDPA and the other ops as fastmae does."""
    with ops.use_backend({"attention": "reference"}):
        recs = train_bench.run_train(CPU, TINY, 2, torch.float32, variants=["fastmae", "fastmae+sdpa"],
                                     timing=QUICK, show_progress=False)
    by = {r["backend"]: r for r in recs}
    assert by["fastmae"]["status"] == by["fastmae+sdpa"]["status"] == "ok"
    assert "attention=reference" in by["fastmae"]["dispatch"] and "attention=sdpa" in by["fastmae+sdpa"]["dispatch"]
    rest = lambda r: [p for p in r["dispatch"].split(", ") if not p.startswith("attention=")]  # noqa: E731
    assert rest(by["fastmae+sdpa"]) == rest(by["fastmae"])


def test_graphed_train_variant_flow(monkeypatch):
    """fastmae+cudagraph on a CPU with stand-in graph calls (tests/train/test_graphed.py): the variant builds a
    GraphedTrainStep, times its replays and records the step's loss as the eager fastmae variant does."""
    from ..train.test_graphed import StepGraphs

    fake = StepGraphs(monkeypatch)
    monkeypatch.setattr(train_bench, "graph_step_reason", lambda *a, **k: None)
    recs = train_bench.run_train(CPU, TINY, 2, torch.float32, variants=["fastmae", "fastmae+cudagraph"],
                                 timing=QUICK, show_progress=False)
    by = {r["backend"]: r for r in recs}
    assert [r["backend"] for r in recs] == ["fastmae", "fastmae+cudagraph"]
    r = by["fastmae+cudagraph"]
    assert r["status"] == "ok", r.get("reason")
    assert r["cuda_graph"] is True and "cuda_graph" not in by["fastmae"]
    assert fake.captures == 1 and fake.replays >= QUICK["min_reps"] + QUICK["warmup"] + 1
    assert "saved_mb_per_image" not in r  # the graph's forwards are not eager: nothing to count
    assert r["optimizer"] == "AdamW fused capturable (step timed outside the graph)"
    assert r["dispatch"] == by["fastmae"]["dispatch"]
    # same weights, batch, optimizer and number of steps before the recorded one (the capture's warm-up undone):
    # the same loss
    assert r["loss"] == pytest.approx(by["fastmae"]["loss"], rel=1e-5)


def test_compiled_graphed_train_variant_flow(monkeypatch):
    """fastmae+compile+cudagraph on a CPU with stand-in graph calls: the compiled model goes into the
    GraphedTrainStep (traced in its warm-up, not again while captured or replayed) and the recorded step's loss
    is eager fastmae's. torch.compile's backend is aot_eager here (Dynamo and AOTAutograd's forward and backward
    graphs, without Inductor's code generation, which takes a minute on a small CPU)."""
    import functools

    from ..train.test_graphed import StepGraphs

    fake = StepGraphs(monkeypatch)
    monkeypatch.setattr(train_bench, "graph_step_reason", lambda *a, **k: None)
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch._dynamo.reset()
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            recs = train_bench.run_train(CPU, TINY, 2, torch.float32,
                                         variants=["fastmae", "fastmae+compile+cudagraph"], timing=QUICK,
                                         compile_timing=QUICK, show_progress=False)
    finally:
        torch._dynamo.reset()  # no compiled code of this test's model for later tests to recompile
    by = {r["backend"]: r for r in recs}
    r = by["fastmae+compile+cudagraph"]
    assert r["status"] == "ok", r.get("reason")
    assert r["cuda_graph"] is True and fake.captures == 1
    assert isinstance(fake.step.model, torch._dynamo.eval_frame.OptimizedModule)  # the compiled model is captured
    assert r["loss"] == pytest.approx(by["fastmae"]["loss"], rel=1e-5)


def test_train_variants_compute_the_same_steps():
    """Same weights, images and masking in every variant: the losses of the first two steps (the second one
    after an AdamW update) agree with the official path's (fp32, rtol 1e-4)."""
    built = {v: train_bench.prepare_variant(CPU, TINY, 2, torch.float32, v)
             for v in ("official-eager", "reference+sdpa", "fastmae")}
    losses = {v: [float(b["step"]().detach()) for _ in range(2)] for v, b in built.items()}
    assert losses["official-eager"][1] != losses["official-eager"][0]  # the step changed the weights
    for v in ("reference+sdpa", "fastmae"):
        assert losses[v] == pytest.approx(losses["official-eager"], rel=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the GPU suite runs it)")
@pytest.mark.parametrize("variant", ["official-eager", "reference+sdpa", "fastmae", "fastmae+sdpa", "fastmae+lean",
                                     "fastmae+plain-casts", "fastmae+triton-launch"])
def test_train_step_never_waits_for_the_gpu(variant):
    """A bf16 training step as `bench train` times it issues its work without waiting for the GPU: no .item(), no
    copy to the host, no synchronising call. Where the host bounds a step, a wait would add the GPU's queue to the
    host's time, and the benchmark would time the wait. Checked with `torch.cuda.set_sync_debug_mode("error")`
    after two untimed steps (first launches, cuDNN's autotuning and the allocator's first blocks may wait, as the
    benchmark's warm-up does). fp16 is left out: its GradScaler reads once per step whether the gradients are
    finite, as the official code's does."""
    device = torch.device("cuda")
    built = train_bench.prepare_variant(device, TINY, 4, torch.bfloat16, variant)
    for _ in range(2):
        built["step"]()
    torch.cuda.synchronize(device)
    before = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError, match="synchronizing"):  # the check works on this torch
            torch.ones(1, device=device).item()
        try:
            built["step"]()
        except RuntimeError as exc:
            pytest.fail(f"{variant}'s step waits for the GPU: {exc}")
    finally:
        torch.cuda.set_sync_debug_mode(before)
    torch.cuda.synchronize(device)


def test_saved_bytes_frees_what_it_counted(monkeypatch):
    """Counting the saved activations must not keep them: a saved output packed as itself holds its own grad_fn,
    a cycle the collector cannot break, and each count stayed allocated (on a GPU, every later variant's peak
    included the earlier ones' activations)."""
    import gc
    import weakref

    packed = []
    hooks = torch.autograd.graph.saved_tensors_hooks

    class Spy(hooks):
        def __init__(self, pack, unpack):
            super().__init__(lambda t: (packed.append(weakref.ref(t)), pack(t))[1], unpack)

    monkeypatch.setattr(torch.autograd.graph, "saved_tensors_hooks", Spy)
    torch.manual_seed(0)
    model = create_model(TINY)
    model.backend = "reference"
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, model.num_patches)
    total = train_bench.saved_bytes(model, imgs, noise, 0.75, CPU, torch.float32)
    gc.collect()
    keep = {t.untyped_storage().data_ptr() for t in (*model.parameters(), imgs, noise)}
    alive = [r() for r in packed if r() is not None and r().untyped_storage().data_ptr() not in keep]
    assert total > 0 and len(packed) > 10
    assert alive == [], f"{len(alive)} saved activations outlived the count"


def test_own_peak_memory():
    """CUDA records store the training steps' own peak; records from before that stored the process's peak over
    the whole variant (raised by the saved-activation count's leak): they are read as having none, with the
    reason, and give no memory ratio."""
    from fastmae.bench.records import CUDA_PEAK_KIND, LEAKED_PEAK_NOTE, own_peak_mem_mb, peak_mem_kind

    old = {"peak_mem_mb": 26711.0, "mem_before_mb": 9207.0, "peak_mem_kind": "cuda max_memory_allocated"}
    new = {"peak_mem_mb": 17504.0, "mem_before_mb": 30.0, "peak_mem_kind": CUDA_PEAK_KIND}
    cpu = {"peak_mem_mb": 12.5, "peak_mem_kind": "cpu resident-memory increase (sampled)"}
    assert own_peak_mem_mb(old) is None and peak_mem_kind(old) == LEAKED_PEAK_NOTE
    assert own_peak_mem_mb(new) == 17504.0 and peak_mem_kind(new) == CUDA_PEAK_KIND
    assert own_peak_mem_mb(cpu) == 12.5 and peak_mem_kind(cpu) == cpu["peak_mem_kind"]
    recs = [{"kind": "train", "status": "ok", "backend": "official-eager", "images_per_s": 10.0, **new},
            {"kind": "train", "status": "ok", "backend": "fastmae", "images_per_s": 20.0, **new,
             "peak_mem_mb": 13002.0},
            {"kind": "train", "status": "ok", "backend": "fastmae+lean", "images_per_s": 20.0, **old,
             "mem_vs_official_eager": 1.52}]  # a ratio such a run stored: dropped
    train_bench.add_train_speedups(recs)
    assert recs[1]["mem_vs_official_eager"] == pytest.approx(13002.0 / 17504.0)
    assert "mem_vs_official_eager" not in recs[2]
    # the GPU summary quotes no memory ratio for a record without its own peak, even one that stored a ratio
    from fastmae.bench.suite import key_results

    stored = {**recs[2], "model": "m", "shape": {"batch": 2}, "dtype": "bfloat16", "device_type": "cuda",
              "mem_vs_official_eager": 1.52}
    lines = [line for line in key_results([stored]) if line.startswith("- train")]
    assert len(lines) == 1 and "vs official-eager; GPU target" not in lines[0], lines


def test_summary_states_the_kernels_a_profiled_cuda_step_launches():
    """A profiled CUDA step's summary line gives its kernel count and the step's time per kernel (the host's cost
    per launch where the host bounds the step); a CPU record's operator count is not read as kernels."""
    from fastmae.bench.suite import key_results

    rec = {"kind": "train", "status": "ok", "backend": "fastmae", "model": "m", "shape": {"batch": 64},
           "dtype": "bfloat16", "images_per_s": 2000.0, "median_ms": 32.0, "busy_share": 0.4,
           "profile": {"busy_ms": 12.8, "calls": 2000.0, "by_kind": {}, "top": []}}
    line, = [x for x in key_results([{**rec, "device_type": "cuda"}]) if x.startswith("- train")]
    assert "GPU kernels busy 40% of the step (2,000 kernels, 16 µs of step each)" in line, line
    line, = [x for x in key_results([{**rec, "device_type": "cpu"}]) if x.startswith("- train")]
    assert "CPU operators busy 40% of the step" in line and "kernels" not in line, line
    counted = {**rec, "device_type": "cuda", "profile": {**rec["profile"], "calls_by_kind": {
        "matmul": 900.0, "fastmae attention": 40.0, "fastmae tokens+loss": 25.0, "other": 1035.0}}}
    line, = [x for x in key_results([counted]) if x.startswith("- train")]
    assert "(2,000 kernels, 65 of them fastmae's Triton kernels, 16 µs of step each)" in line, line


def test_summary_states_a_train_rows_spread_and_whether_its_slow_steps_came_first():
    """A training row's summary line gives its 20th-80th percentile spread, and from the steps kept in order the
    median of the first third against the last third's: slow early steps (a warm-up too short) show as the first
    larger, after the last warm-up step's time. Without kept steps (records of older runs) only the spread."""
    from fastmae.bench.suite import key_results

    rec = {"kind": "train", "status": "ok", "backend": "fastmae", "model": "m", "shape": {"batch": 64},
           "dtype": "bfloat16", "device_type": "cuda", "images_per_s": 2000.0, "images_per_s_p20": 1500.0,
           "images_per_s_p80": 2200.0, "samples_ms": [40.0, 38.0, 36.0, 31.0, 32.0, 30.0, 31.0, 30.0, 29.0],
           "warmup_ms": [900.0, 45.0]}
    line, = [x for x in key_results([rec]) if x.startswith("- train")]
    assert ("2000 images/s (p20-p80 1,500-2,200 images/s; steps in order: last warm-up step 45 ms, first third's "
            "median 38 ms, last third's 30 ms)") in line, line
    old = {k: v for k, v in rec.items() if k != "samples_ms"}
    line, = [x for x in key_results([old]) if x.startswith("- train")]
    assert "(p20-p80 1,500-2,200 images/s)" in line and "steps in order" not in line, line


def test_summary_states_the_back_to_back_pace_and_its_ratio():
    """A training row's summary line gives the back-to-back pace, and for a variant other than official-eager its
    ratio to official-eager's; older records without the figure get neither."""
    from fastmae.bench.suite import key_results

    rec = {"kind": "train", "status": "ok", "backend": "fastmae", "model": "m", "shape": {"batch": 64},
           "dtype": "bfloat16", "device_type": "cuda", "images_per_s": 2000.0, "back_to_back_images_per_s": 2400.0,
           "back_to_back_vs_official_eager": 1.6}
    line, = [x for x in key_results([rec]) if x.startswith("- train")]
    assert "2000 images/s, back to back 2400 images/s (1.60x official-eager's)" in line, line
    line, = [x for x in key_results([{**rec, "backend": "official-eager"}]) if x.startswith("- train")]
    assert "back to back 2400 images/s" in line and "official-eager's" not in line, line
    old = {k: v for k, v in rec.items() if not k.startswith("back_to_back")}
    line, = [x for x in key_results([old]) if x.startswith("- train")]
    assert "back to back" not in line, line


def test_summary_states_an_encoder_rows_spread_at_75_percent():
    """The encoder's line at 75% (the target's figure, a quotient of medians) gives that row's spread and steps in
    order too."""
    from fastmae.bench.suite import key_results

    rec = {"kind": "encoder", "status": "ok", "backend": "auto", "model": "m", "mode": "fwd", "mask_ratio": 0.75,
           "shape": {"batch": 64}, "device_type": "cuda", "speedup": 2.0, "ideal_speedup": 3.94, "of_ideal": 0.508,
           "images_per_s": 15000.0, "images_per_s_p20": 14000.0, "images_per_s_p80": 15500.0,
           "samples_ms": [4.6, 4.5, 4.3, 4.2, 4.2, 4.3], "warmup_ms": [400.0, 4.7]}
    line, = [x for x in key_results([rec]) if x.startswith("- encoder")]
    assert ("= 51% (p20-p80 14,000-15,500 images/s; steps in order: last warm-up step 4.7 ms, first third's "
            "median 4.55 ms, last third's 4.25 ms)") in line, line
