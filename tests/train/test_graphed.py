"""`fastmae.train.graphed`: a whole training step captured in a CUDA graph computes what the eager step computes.

On a CPU the capture-and-replay flow runs with stand-ins for torch.cuda's stream and graph calls (a 'capture'
runs the work eagerly, a 'replay' runs it again with fresh gradients, as a replayed backward writes them); on
CUDA the real graph is compared with eager steps."""
from __future__ import annotations

import contextlib

import pytest
import torch

from fastmae import create_model
from fastmae.train import graphed
from fastmae.train.graphed import GraphedTrainStep, graph_step_reason
from fastmae.train.optim import build_optimizer, use_tensor_lr

from ..utils import FakeGraphs, assert_close

TINY = "mae_vit_tiny_patch4"


def _setup(device, backend="sdpa", capturable=False, impl="fused"):
    torch.manual_seed(0)
    model = create_model(TINY).to(device)
    model.backend = backend
    opt = build_optimizer(model, 1e-3, 0.05, impl=impl, capturable=capturable)
    use_tensor_lr(opt)  # as a graphed step makes them: eager and graphed steps then round the rate alike
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 3, 32, 32, generator=gen).to(device), torch.rand(4, 64, generator=gen).to(device))
               for _ in range(3)]
    return model, opt, batches


def _eager_steps(model, opt, batches, dtype, scaler=None):
    scaler = scaler or torch.amp.GradScaler(enabled=False)  # a disabled scaler passes everything through
    losses = []
    for imgs, noise in batches:
        opt.zero_grad(set_to_none=True)
        with contextlib.nullcontext() if dtype == torch.float32 else torch.autocast(imgs.device.type, dtype=dtype):
            loss = model(imgs, 0.75, noise=noise)[0]
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        losses.append(loss.detach().float().clone())
    return losses


def test_reasons():
    cuda = torch.device("cuda")
    assert "CUDA device" in graph_step_reason(torch.device("cpu"))
    model = torch.nn.Linear(2, 2)
    assert "capturable=True" in graph_step_reason(cuda, build_optimizer(model, 1e-3, 0.0))
    assert graph_step_reason(cuda, build_optimizer(model, 1e-3, 0.0, capturable=True), torch.bfloat16) is None
    # float16: GradScaler's step stays on the GPU only with an optimizer that takes the scale and inf check
    assert graph_step_reason(cuda, None, torch.float16) is None
    assert "fused AdamW" in graph_step_reason(
        cuda, build_optimizer(model, 1e-3, 0.0, impl="foreach", capturable=True), torch.float16)
    assert graph_step_reason(cuda, build_optimizer(model, 1e-3, 0.0, impl="fused", capturable=True),
                             torch.float16) is None
    with pytest.raises(RuntimeError, match="cannot capture the training step: CUDA graphs need a CUDA device"):
        GraphedTrainStep(model, build_optimizer(model, 1e-3, 0.0), torch.zeros(1, 2), torch.zeros(1, 2), 0.75)


class StepGraphs(FakeGraphs):
    """`FakeGraphs` for a GraphedTrainStep (the capture runs the work once, eagerly, and the step undoes it, as it
    undoes the warm-up): a replay runs the step's work again, gradients first set to None (a replayed backward
    writes them afresh), and writes the loss into the captured one; in the two-graph form (accumulation, several
    processes), a replay of the micro-step runs it again (adding to the gradients) and one of the update graph
    runs the update. The step's own device
    check passes."""

    def __init__(self, monkeypatch):
        super().__init__(monkeypatch, on_replay=self._replay)
        self.step = None
        monkeypatch.setattr(graphed, "graph_step_reason", lambda *a, **k: None)
        init = graphed.GraphedTrainStep.__init__
        fake = self

        def init_and_register(step, *a, **k):
            init(step, *a, **k)
            fake.step = step

        monkeypatch.setattr(graphed.GraphedTrainStep, "__init__", init_and_register)

    def _replay(self, graph):
        step = self.step
        if step.update_graph is None:  # the single graph
            step.optimizer.zero_grad(set_to_none=True)
            step.loss.copy_(step._work())
        elif graph is step.update_graph:
            step._update()
        else:
            assert graph is step.graph
            step.loss.copy_(step._micro_step())


def test_capture_flow_matches_eager_steps(monkeypatch):
    """The warm-up and capture leave the weights and the optimizer's state as they were: the replays are the
    model's first, second and third steps, as eager (fp32, within 1e-6), on new batches copied in."""
    model, opt, batches = _setup("cpu")
    expected = _eager_steps(model, opt, batches, torch.float32)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}

    fake = StepGraphs(monkeypatch)
    model, opt, batches = _setup("cpu")
    step = GraphedTrainStep(model, opt, *batches[0], mask_ratio=0.75)
    assert fake.step is step
    assert fake.captures == 1 and fake.replays == 0
    assert all(float(s["step"]) == 0 and not s["exp_avg"].any() for s in opt.state.values())  # a fresh state
    got = [step(imgs, noise).clone() for imgs, noise in batches]
    assert fake.replays == 3
    for i, (g, e) in enumerate(zip(got, expected)):
        assert_close(g, e, 1e-6, 1e-6, f"loss of step {i + 1}")
    for n, p in model.named_parameters():
        assert_close(p.detach(), weights[n], 1e-6, 1e-6, f"weight {n} after three steps")
    imgs, noise = batches[0]
    with pytest.raises(ValueError, match="captured shape"):
        step(imgs[:2], noise[:2])
    # new images without their noise would be masked as the captured batch was, step after step
    with pytest.raises(ValueError, match="new imgs need their noise too"):
        step(imgs)
    with pytest.raises(TypeError, match="imgs must be floating point .* got torch.uint8"):  # model(...) refuses too
        step((imgs * 255).to(torch.uint8), noise)
    # parameters added after the capture would never be updated by the graph
    opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3))]})
    with pytest.raises(ValueError, match="parameter groups changed after the capture"):
        step(imgs, noise)
    assert fake.replays == 3  # nothing replayed for the refused calls


def test_capture_keeps_an_existing_optimizer_state(monkeypatch):
    """A step captured after training has begun (a resumed run): the warm-up is undone back to that state, moments
    and step counts included, so the replays continue the eager run (fp32, within 1e-6)."""
    model, opt, batches = _setup("cpu")
    _eager_steps(model, opt, batches[:2], torch.float32)
    expected = _eager_steps(model, opt, batches, torch.float32)
    model, opt, batches = _setup("cpu")
    _eager_steps(model, opt, batches[:2], torch.float32)
    StepGraphs(monkeypatch)
    step = GraphedTrainStep(model, opt, *batches[0], mask_ratio=0.75)
    assert all(float(s["step"]) == 2 for s in opt.state.values())
    got = [step(imgs, noise).clone() for imgs, noise in batches]
    for i, (g, e) in enumerate(zip(got, expected)):
        assert_close(g, e, 1e-6, 1e-6, f"loss of step {i + 3}")


def test_float16_step_scales_as_eager(monkeypatch):
    """A float16 step (stand-in graphs, GradScaler and fused AdamW on the CPU): the scaled backward, the fused step
    given the scale and the inf check, and the scaler's update are in the step, and the warm-up's updates of the
    scale and growth count are undone with the weights: three replays give eager's losses, weights and scaler
    state (growth every 2 steps, so the third step's scale has grown)."""
    model, opt, batches = _setup("cpu", impl="fused")
    scaler = torch.amp.GradScaler("cpu", growth_interval=2)
    expected = _eager_steps(model, opt, batches, torch.float16, scaler)
    expected_scaler = scaler.state_dict()
    assert expected_scaler["scale"] == 2 * 65536.0
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}

    StepGraphs(monkeypatch)
    model, opt, batches = _setup("cpu", impl="fused")
    scaler = torch.amp.GradScaler("cpu", growth_interval=2)
    step = GraphedTrainStep(model, opt, *batches[0], mask_ratio=0.75, dtype=torch.float16, scaler=scaler)
    assert step.scaler is scaler
    assert scaler.state_dict()["scale"] == 65536.0 and scaler.state_dict()["_growth_tracker"] == 0
    got = [step(imgs, noise).float().clone() for imgs, noise in batches]
    for i, (g, e) in enumerate(zip(got, expected)):
        assert_close(g, e, 1e-6, 1e-6, f"loss of step {i + 1}")
    for n, p in model.named_parameters():
        assert_close(p.detach(), weights[n], 1e-6, 1e-6, f"weight {n} after three steps")
    assert scaler.state_dict() == expected_scaler


def _eager_accumulated(model, opt, batches, accum, updates):
    """Eager micro-steps as the pretraining loop runs them: the backward of loss / accum into the gradients, and
    where `updates` says so the optimizer's step, then the gradients set to None. Returns the losses."""
    losses = []
    for (imgs, noise), update in zip(batches, updates):
        loss = model(imgs, 0.75, noise=noise)[0]
        (loss / accum).backward()
        if update:
            opt.step()
            opt.zero_grad(set_to_none=True)
        losses.append(loss.detach().clone())
    return losses


def test_accumulating_capture_matches_eager_accumulation(monkeypatch):
    """`accum_iter=2`: a micro-step replayed per batch, the update after every second, over four batches: the
    losses and weights of eager accumulation (fp32, within 1e-6); the first replay is the model's first
    micro-step (the warm-up and the captures undone, the gradients zero)."""
    model, opt, batches = _setup("cpu")
    batches = batches + batches[:1]
    updates = [False, True, False, True]
    expected = _eager_accumulated(model, opt, batches, 2, updates)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}

    fake = StepGraphs(monkeypatch)
    model, opt, batches = _setup("cpu")
    batches = batches + batches[:1]
    step = GraphedTrainStep(model, opt, *batches[0], mask_ratio=0.75, accum_iter=2)
    assert fake.captures == 2 and step.update_graph is not None
    assert fake.pools == [None, step.graph.pool()]  # the update's temporaries reuse the micro-step's memory
    assert all(float(s["step"]) == 0 for s in opt.state.values())
    assert all(not p.grad.any() for p in model.parameters() if p.requires_grad)
    got = [step(imgs, noise, update).clone() for (imgs, noise), update in zip(batches, updates)]
    assert fake.replays == 6  # four micro-steps, two updates
    assert all(float(s["step"]) == 2 for s in opt.state.values())
    for i, (g, e) in enumerate(zip(got, expected)):
        assert_close(g, e, 1e-6, 1e-6, f"loss of micro-step {i + 1}")
    for n, p in model.named_parameters():
        assert_close(p.detach(), weights[n], 1e-6, 1e-6, f"weight {n} after two updates")
        assert not p.requires_grad or not p.grad.any(), n  # zeroed in place by the update


def test_accumulating_capture_leaves_parameters_without_gradients_alone(monkeypatch):
    """A parameter the loss does not reach (a 2-D one, which AdamW decays) has no gradient in the two-graph form,
    as in the eager loop: the optimizer skips it instead of decaying it by a zero gradient's step; the others
    train as eager accumulation does (fp32, within 1e-6)."""
    def setup():
        model, opt, batches = _setup("cpu")
        model.unused = torch.nn.Parameter(torch.ones(2, 3))
        opt.add_param_group({"params": [model.unused], "weight_decay": 0.05, "lr": 1e-3})
        use_tensor_lr(opt)
        return model, opt, batches

    model, opt, batches = setup()
    expected = _eager_accumulated(model, opt, batches[:2], 2, [False, True])
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert torch.equal(weights["unused"], torch.ones(2, 3))

    StepGraphs(monkeypatch)
    model, opt, batches = setup()
    step = GraphedTrainStep(model, opt, *batches[0], mask_ratio=0.75, accum_iter=2)
    assert model.unused.grad is None
    assert sum(f.numel() for f in step.flat_grads) == sum(p.numel() for n, p in model.named_parameters()
                                                          if p.requires_grad and n != "unused")
    got = [step(*batches[0], update=False).clone(), step(*batches[1], update=True).clone()]
    for i, (g, e) in enumerate(zip(got, expected)):
        assert_close(g, e, 1e-6, 1e-6, f"loss of micro-step {i + 1}")
    for n, p in model.named_parameters():
        assert_close(p.detach(), weights[n], 1e-6, 1e-6, f"weight {n}")


def test_capture_refuses_gradients_replaced_out_of_place(monkeypatch):
    """A backward that replaces a gradient instead of adding to it (the update graph would then read a tensor
    the micro-step's graph no longer writes) fails the capture, with the model restored."""
    model, opt, batches = _setup("cpu")
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    StepGraphs(monkeypatch)
    micro = GraphedTrainStep._micro_step

    def replacing(step):
        loss = micro(step)
        p = step.model.mask_token
        p.grad = p.grad.clone()
        return loss

    monkeypatch.setattr(GraphedTrainStep, "_micro_step", replacing)
    with pytest.raises(graphed.GraphCaptureError,
                       match=r"replaced 1 gradient\(s\) instead of adding .* as they were"):
        GraphedTrainStep(model, opt, *batches[0], mask_ratio=0.75, accum_iter=2)
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), weights[n]), n
        assert p.grad is None, n


def test_reset_accumulation_drops_an_unfinished_accumulation(monkeypatch):
    """A micro-step whose accumulation is cut short (an epoch's last iterations) is dropped by
    `reset_accumulation`, as the eager loop's zero_grad at the next epoch drops it; a step captured without
    accumulation refuses calls that do not update."""
    model, opt, batches = _setup("cpu")
    _eager_accumulated(model, opt, batches[:1], 2, [False])
    opt.zero_grad(set_to_none=True)
    expected = _eager_accumulated(model, opt, batches[1:], 2, [False, True])
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}

    StepGraphs(monkeypatch)
    model, opt, batches = _setup("cpu")
    step = GraphedTrainStep(model, opt, *batches[0], mask_ratio=0.75, accum_iter=2)
    step(*batches[0], update=False)
    assert any(p.grad.any() for p in model.parameters() if p.requires_grad)
    step.reset_accumulation()
    got = [step(*batches[1], update=False).clone(), step(*batches[2], update=True).clone()]
    for i, (g, e) in enumerate(zip(got, expected)):
        assert_close(g, e, 1e-6, 1e-6, f"loss of micro-step {i + 1}")
    for n, p in model.named_parameters():
        assert_close(p.detach(), weights[n], 1e-6, 1e-6, f"weight {n}")

    model, opt, batches = _setup("cpu")
    single = GraphedTrainStep(model, opt, *batches[0], mask_ratio=0.75)
    with pytest.raises(ValueError, match="updates the weights on every call"):
        single(*batches[0], update=False)
    with pytest.raises(ValueError, match="accum_iter must be a positive integer"):
        GraphedTrainStep(model, opt, *batches[0], mask_ratio=0.75, accum_iter=0)
    with pytest.raises(ValueError, match="needs an initialised torch.distributed process group"):
        GraphedTrainStep(model, opt, *batches[0], mask_ratio=0.75, distributed=True)


def test_replays_follow_assigned_rates(monkeypatch):
    """Rates assigned as numbers between calls (user code), or filled in place into the captured tensors
    (`adjust_learning_rate`, torch's LR schedulers), both reach the replayed step: the same losses and weights as
    eager steps with those rates (fp32, within 1e-6)."""
    rates = [1e-3, 5e-4, 2e-3]
    model, opt, batches = _setup("cpu")
    expected = []
    for lr, batch in zip(rates, batches):
        for g in opt.param_groups:
            g["lr"].fill_(lr)
        expected += _eager_steps(model, opt, [batch], torch.float32)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}

    StepGraphs(monkeypatch)
    model, opt, batches = _setup("cpu")
    step = GraphedTrainStep(model, opt, *batches[0], mask_ratio=0.75)
    captured = [g["lr"] for g in opt.param_groups]
    assert all(isinstance(t, torch.Tensor) for t in captured)
    got = []
    for i, (lr, (imgs, noise)) in enumerate(zip(rates, batches)):
        for g in opt.param_groups:
            if i == 1:
                g["lr"].fill_(lr)  # in place, as the pretraining schedule does
            else:
                g["lr"] = lr  # a number, as user code may
        got.append(step(imgs, noise).clone())
        assert all(g["lr"] is t for g, t in zip(opt.param_groups, captured))
    for i, (g, e) in enumerate(zip(got, expected)):
        assert_close(g, e, 1e-6, 1e-6, f"loss of step {i + 1}")
    for n, p in model.named_parameters():
        assert_close(p.detach(), weights[n], 1e-6, 1e-6, f"weight {n} after three steps")


class FailingCapture:
    """A stand-in capture that fails as torch's does on an op it cannot capture."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        raise RuntimeError("operation not permitted when stream is capturing\nCUDA kernel errors might be ...")

    def __exit__(self, *exc):
        return False


def test_failed_capture_restores_the_model(monkeypatch):
    """A capture that fails leaves the weights and the optimizer's state as they were before the warm-up steps,
    and says why in one line."""
    model, opt, batches = _setup("cpu")
    _eager_steps(model, opt, batches[:1], torch.float32)
    for g in opt.param_groups:
        g["lr"] = 1e-3  # a number: it stays one
    rates = [g["lr"] for g in opt.param_groups]
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    StepGraphs(monkeypatch)
    monkeypatch.setattr(torch.cuda, "graph", FailingCapture)
    with pytest.raises(graphed.GraphCaptureError) as err:
        GraphedTrainStep(model, opt, *batches[1], mask_ratio=0.75)
    assert "\n" not in str(err.value) and "RuntimeError: operation not permitted when stream is capturing" in \
        str(err.value) and "as they were" in str(err.value)
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), weights[n]), n
        assert p.grad is None
    for p, s in opt.state.items():
        for k, v in s.items():
            assert torch.equal(v, state[id(p)][k]), k
    assert all(g["lr"] is lr for g, lr in zip(opt.param_groups, rates))


def test_failed_warmup_raises_its_own_error_and_restores_the_model(monkeypatch):
    """An error in an ordinary warm-up step (a model bug, say) is raised as it is, not as a capture failure, with
    the model, the optimizer and its rates as they were before the warm-up."""
    model, opt, batches = _setup("cpu")
    _eager_steps(model, opt, batches[:1], torch.float32)
    for g in opt.param_groups:
        g["lr"] = 1e-3
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    StepGraphs(monkeypatch)
    work = GraphedTrainStep._work
    calls = []

    def failing_second(step):
        calls.append(1)
        if len(calls) == 2:
            raise KeyError("a bug in the model")
        return work(step)

    monkeypatch.setattr(GraphedTrainStep, "_work", failing_second)
    with pytest.raises(KeyError, match="a bug in the model"):
        GraphedTrainStep(model, opt, *batches[1], mask_ratio=0.75)
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), weights[n]), n
    assert all(g["lr"] == 1e-3 and type(g["lr"]) is float for g in opt.param_groups)


def test_tensor_rates_of_another_kind_are_replaced():
    """`use_tensor_lr` keeps a 0-dim fp32 rate on the parameters' device (a graph may hold it) and replaces any
    other: a float64 or 1-element rate would not be the tensor the optimizer's kernels read."""
    from fastmae.train.optim import use_tensor_lr as make

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    make(opt)
    kept = opt.param_groups[0]["lr"]
    make(opt)
    assert opt.param_groups[0]["lr"] is kept
    for other in (torch.tensor(2e-3, dtype=torch.float64), torch.tensor([2e-3])):
        opt.param_groups[0]["lr"] = other
        make(opt)
        lr = opt.param_groups[0]["lr"]
        assert lr is not other and lr.dim() == 0 and lr.dtype == torch.float32 and float(lr) == pytest.approx(2e-3)


def test_pretrain_reports_a_failed_capture(monkeypatch, tmp_path, capsys):
    """`fastmae pretrain --cuda_graph` whose capture fails: exit status 1, one line on stderr, no traceback."""
    from fastmae.train.pretrain import main

    from .common import pretrain_argv

    StepGraphs(monkeypatch)
    monkeypatch.setattr(torch.cuda, "graph", FailingCapture)
    assert main(pretrain_argv(tmp_path / "run", "--adamw", "fused", "--cuda_graph")[1:]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("fastmae pretrain: the training step could not be captured in a CUDA graph"), err
    assert not any("Traceback" in line for line in err)
    assert not (tmp_path / "run").exists()  # nothing left behind


@pytest.mark.parametrize("accum, captures, replays, steps, precision", [
    ("1", 1, 8, 8, "fp32"), ("3", 2, 8 + 2, 2, "fp32"), ("3", 2, 8 + 2, 2, "fp16")])
def test_pretrain_cuda_graph_trains_as_eager(monkeypatch, tmp_path, accum, captures, replays, steps, precision):
    """`fastmae pretrain --cuda_graph` (stand-in graphs on the CPU; fused AdamW takes capturable=True and a tensor
    lr here): over two epochs of the lr schedule, the same losses and final weights as the eager run (within
    1e-5); its checkpoints store the rates as numbers, as every other run. With --accum_iter 3 (4 iterations per
    epoch): two graphs, 8 micro-steps and 2 updates, each epoch's last micro-step dropped as the eager loop drops
    it; in fp16 the run's GradScaler scales the micro-steps and steps through the update, and is saved as the
    eager run saves its own."""
    from fastmae.train.pretrain import train

    from .common import pretrain_args

    flags = ("--adamw", "fused", "--accum_iter", accum, "--precision", precision)
    eager = train(pretrain_args(tmp_path / "eager", *flags))
    fake = StepGraphs(monkeypatch)
    graph = train(pretrain_args(tmp_path / "graph", *flags, "--cuda_graph"))
    assert fake.captures == captures and fake.replays == replays
    assert len(graph.losses) == len(eager.losses) == 8
    assert graph.step == eager.step == steps
    assert graph.losses == pytest.approx(eager.losses, rel=1e-5)
    a = torch.load(tmp_path / "eager" / "checkpoint-last.pth", weights_only=False)
    b = torch.load(tmp_path / "graph" / "checkpoint-last.pth", weights_only=False)
    for name, w in a["model"].items():
        assert_close(b["model"][name], w, 1e-5, 1e-5, name)
    lrs = [g["lr"] for g in b["optimizer"]["param_groups"]]
    assert all(type(lr) is float for lr in lrs)
    assert lrs == pytest.approx([g["lr"] for g in a["optimizer"]["param_groups"]])
    assert not any(g["capturable"] for g in b["optimizer"]["param_groups"])
    assert a.get("scaler") == b.get("scaler")


def test_pretrain_compiled_cuda_graph_trains_as_eager(monkeypatch, tmp_path):
    """`fastmae pretrain --compile --cuda_graph` (stand-in graphs; torch.compile's backend aot_eager, which keeps
    Dynamo's and AOTAutograd's graphs and skips Inductor's code generation): the compiled model is what the graph
    captures, traced once, and the run gives the eager run's losses (fp32, within 1e-5)."""
    import functools

    from fastmae.train.pretrain import train

    from .common import pretrain_args

    eager = train(pretrain_args(tmp_path / "eager", "--adamw", "fused"))
    fake = StepGraphs(monkeypatch)
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch._dynamo.reset()
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            graph = train(pretrain_args(tmp_path / "graph", "--adamw", "fused", "--cuda_graph", "--compile"))
    finally:
        torch._dynamo.reset()  # no compiled code of this test's model for later tests to recompile
    assert isinstance(fake.step.model, torch._dynamo.eval_frame.OptimizedModule)
    assert fake.captures == 1 and graph.step == eager.step == 8
    assert graph.losses == pytest.approx(eager.losses, rel=1e-5)


@pytest.mark.parametrize("extra, message", [
    ((), "--cuda_graph: CUDA graphs need a CUDA device, not cpu"),
])
def test_pretrain_cuda_graph_refusals(tmp_path, extra, message):
    from fastmae.train.pretrain import train

    from .common import pretrain_args

    with pytest.raises(ValueError, match=message):
        train(pretrain_args(tmp_path, "--cuda_graph", *extra))


def test_tensor_lr_follows_the_schedule():
    """`use_tensor_lr`: the schedule fills the same tensors in place (a graph holds their addresses)."""
    from fastmae.train.optim import adjust_learning_rate, plain_lr_state, use_tensor_lr

    model = torch.nn.Linear(3, 3)
    opt = build_optimizer(model, 0.5, 0.05, impl="fused", capturable=True)
    use_tensor_lr(opt)
    tensors = [g["lr"] for g in opt.param_groups]
    assert all(isinstance(t, torch.Tensor) and t.dtype == torch.float32 for t in tensors)
    value = adjust_learning_rate(opt, 0.5, 1.0, 0.0, 1.0, 10.0)
    assert value == pytest.approx(0.5)
    assert [g["lr"] for g in opt.param_groups] == tensors and all(float(t) == pytest.approx(0.5) for t in tensors)
    saved = plain_lr_state(opt.state_dict())
    assert [g["lr"] for g in saved["param_groups"]] == [pytest.approx(0.5)] * 2
    assert [g["capturable"] for g in saved["param_groups"]] == [False, False]
    assert all(g["capturable"] for g in opt.param_groups)
    assert all(isinstance(g["lr"], torch.Tensor) for g in opt.param_groups)  # the optimizer keeps its tensors


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the GPU suite runs it)")
@pytest.mark.parametrize("backend, impl", [("sdpa", "foreach"), ("triton", "fused")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_step_matches_eager_on_cuda(backend, impl, dtype):
    """The replayed graph trains as the eager step does (fastmae's kernels with the fused AdamW the benchmark's
    graphed variant uses; SDPA with foreach): three steps' losses and the final weights within 1e-4 (fp32) or
    2e-2 (bf16 autocast, where the graph runs without autocast's cast cache)."""
    device = torch.device("cuda")
    model, opt, batches = _setup(device, backend, capturable=True, impl=impl)
    expected = _eager_steps(model, opt, batches, dtype)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    model, opt, batches = _setup(device, backend, capturable=True, impl=impl)
    step = GraphedTrainStep(model, opt, *batches[0], mask_ratio=0.75, dtype=dtype)
    got = [step(imgs, noise).float().clone() for imgs, noise in batches]
    torch.cuda.synchronize()
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for i, (g, e) in enumerate(zip(got, expected)):
        assert_close(g, e, tol, tol, f"loss of step {i + 1}")
    for n, p in model.named_parameters():
        assert_close(p.detach(), weights[n], tol, tol, f"weight {n} after three steps")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the GPU suite runs it)")
@pytest.mark.parametrize("accum", [1, 2])
def test_float16_graph_step_matches_eager_on_cuda(accum):
    """float16 with a GradScaler on a GPU (fastmae's kernels, fused AdamW): the scaler's inf check, the fused
    step given the scale and the scaler's update replay inside the graph; losses, weights and the scaler's
    state after four micro-steps (two updates with accum_iter 2) as eager steps give them, within 2e-2."""
    device = torch.device("cuda")
    model, opt, batches = _setup(device, "triton", capturable=True, impl="fused")
    batches = batches + batches[:1]
    updates = [True] * 4 if accum == 1 else [False, True, False, True]
    scaler = torch.amp.GradScaler("cuda", growth_interval=2)
    expected = []
    for (imgs, noise), update in zip(batches, updates):
        with torch.autocast("cuda", dtype=torch.float16):
            loss = model(imgs, 0.75, noise=noise)[0]
        scaler.scale(loss / accum).backward()
        if update:
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
        expected.append(loss.detach().float().clone())
    expected_scaler = scaler.state_dict()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    model, opt, batches = _setup(device, "triton", capturable=True, impl="fused")
    batches = batches + batches[:1]
    scaler = torch.amp.GradScaler("cuda", growth_interval=2)
    step = GraphedTrainStep(model, opt, *batches[0], mask_ratio=0.75, dtype=torch.float16, accum_iter=accum,
                            scaler=scaler)
    got = [step(imgs, noise, update).float().clone() for (imgs, noise), update in zip(batches, updates)]
    torch.cuda.synchronize()
    for i, (g, e) in enumerate(zip(got, expected)):
        assert_close(g, e, 2e-2, 2e-2, f"loss of micro-step {i + 1}")
    for n, p in model.named_parameters():
        assert_close(p.detach(), weights[n], 2e-2, 2e-2, f"weight {n}")
    assert scaler.state_dict() == expected_scaler


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the GPU suite runs it)")
@pytest.mark.parametrize("backend, impl", [("sdpa", "foreach"), ("triton", "fused")])
def test_accumulating_graph_step_matches_eager_on_cuda(backend, impl):
    """`accum_iter=2` on a GPU (fp32): the micro-step's captured backward adds to the gradients in place and the
    update graph steps and zeroes them: four micro-steps' losses and the weights after two updates within 1e-4."""
    device = torch.device("cuda")
    model, opt, batches = _setup(device, backend, capturable=True, impl=impl)
    batches = batches + batches[:1]
    updates = [False, True, False, True]
    expected = _eager_accumulated(model, opt, batches, 2, updates)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    model, opt, batches = _setup(device, backend, capturable=True, impl=impl)
    batches = batches + batches[:1]
    step = GraphedTrainStep(model, opt, *batches[0], mask_ratio=0.75, accum_iter=2)
    assert step.update_graph.pool() == step.graph.pool()  # the update's temporaries in the micro-step's memory
    got = [step(imgs, noise, update).clone() for (imgs, noise), update in zip(batches, updates)]
    torch.cuda.synchronize()
    for i, (g, e) in enumerate(zip(got, expected)):
        assert_close(g, e, 1e-4, 1e-4, f"loss of micro-step {i + 1}")
    for n, p in model.named_parameters():
        assert_close(p.detach(), weights[n], 1e-4, 1e-4, f"weight {n} after two updates")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the GPU suite runs it)")
@pytest.mark.parametrize("precision, tol, accum", [("fp32", 1e-4, 1), ("bf16", 2e-2, 1), ("fp32", 1e-4, 3)])
def test_pretrain_cuda_graph_on_cuda(tmp_path, precision, tol, accum):
    """`fastmae pretrain --cuda_graph` on a GPU, loader workers and pinned memory as in real runs: two epochs of
    the schedule give the eager run's losses (with --accum_iter 3: one update per epoch of 4 iterations, the
    remainder dropped)."""
    from fastmae.train.pretrain import train

    from .common import pretrain_args

    # two loader workers with pinned memory: the pin-memory thread calls CUDA while the capture runs
    flags = ("--device", "cuda", "--precision", precision, "--backend", "auto", "--adamw", "fused",
             "--num_workers", "2", "--pin_mem", "--accum_iter", str(accum))
    eager = train(pretrain_args(tmp_path / "eager", *flags))
    graph = train(pretrain_args(tmp_path / "graph", *flags, "--cuda_graph"))
    assert graph.step == eager.step == (8 if accum == 1 else 2)
    assert graph.losses == pytest.approx(eager.losses, rel=tol, abs=tol)
