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
from fastmae.train.optim import build_optimizer

from ..utils import assert_close

TINY = "mae_vit_tiny_patch4"


def _setup(device, backend="sdpa", capturable=False, impl="foreach"):
    torch.manual_seed(0)
    model = create_model(TINY).to(device)
    model.backend = backend
    opt = build_optimizer(model, 1e-3, 0.05, impl=impl, capturable=capturable)
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 3, 32, 32, generator=gen).to(device), torch.rand(4, 64, generator=gen).to(device))
               for _ in range(3)]
    return model, opt, batches


def _eager_steps(model, opt, batches, dtype):
    losses = []
    for imgs, noise in batches:
        opt.zero_grad(set_to_none=True)
        with contextlib.nullcontext() if dtype == torch.float32 else torch.autocast(imgs.device.type, dtype=dtype):
            loss = model(imgs, 0.75, noise=noise)[0]
        loss.backward()
        opt.step()
        losses.append(loss.detach().float().clone())
    return losses


def test_reasons():
    assert "CUDA device" in graph_step_reason(torch.device("cpu"))
    assert "GradScaler" in graph_step_reason(torch.device("cuda"), dtype=torch.float16)
    model = torch.nn.Linear(2, 2)
    assert "capturable=True" in graph_step_reason(torch.device("cuda"), build_optimizer(model, 1e-3, 0.0))
    assert graph_step_reason(torch.device("cuda"), build_optimizer(model, 1e-3, 0.0, capturable=True),
                             torch.bfloat16) is None
    with pytest.raises(RuntimeError, match="cannot capture the training step: CUDA graphs need a CUDA device"):
        GraphedTrainStep(model, build_optimizer(model, 1e-3, 0.0), torch.zeros(1, 2), torch.zeros(1, 2), 0.75)


class _FakeGraphs:
    """Stand-ins for torch.cuda's stream and graph calls: the capture runs the work once, eagerly (the step
    undoes it, as it undoes the warm-up); a replay runs the step's work again, gradients first set to None (a
    replayed backward writes them afresh), and writes the loss into the captured one."""

    def __init__(self, monkeypatch):
        self.step, self.captures, self.replays = None, 0, 0
        fake = self

        class Graph:
            def replay(self):
                fake.replays += 1
                fake.step.optimizer.zero_grad(set_to_none=True)
                fake.step.loss.copy_(fake.step._work())

        class Capture:
            def __init__(self, graph):
                pass

            def __enter__(self):
                fake.captures += 1

            def __exit__(self, *exc):
                return False

        class Stream:
            def __init__(self, device=None):
                pass

            def wait_stream(self, other):
                pass

        monkeypatch.setattr(torch.cuda, "Stream", Stream)
        monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
        monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
        monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
        monkeypatch.setattr(torch.cuda, "graph", Capture)
        monkeypatch.setattr(graphed, "graph_step_reason", lambda *a, **k: None)


def test_capture_flow_matches_eager_steps(monkeypatch):
    """The warm-up and capture leave the weights and the optimizer's state as they were: the replays are the
    model's first, second and third steps, as eager (fp32, within 1e-6), on new batches copied in."""
    model, opt, batches = _setup("cpu")
    expected = _eager_steps(model, opt, batches, torch.float32)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}

    fake = _FakeGraphs(monkeypatch)
    model, opt, batches = _setup("cpu")
    step = GraphedTrainStep(model, opt, *batches[0], mask_ratio=0.75)
    fake.step = step
    assert fake.captures == 1 and fake.replays == 0
    assert all(float(s["step"]) == 0 and not s["exp_avg"].any() for s in opt.state.values())  # a fresh state
    got = [step(imgs, noise).clone() for imgs, noise in batches]
    assert fake.replays == 3
    for i, (g, e) in enumerate(zip(got, expected)):
        assert_close(g, e, 1e-6, 1e-6, f"loss of step {i + 1}")
    for n, p in model.named_parameters():
        assert_close(p.detach(), weights[n], 1e-6, 1e-6, f"weight {n} after three steps")
    with pytest.raises(ValueError, match="captured shape"):
        step(batches[0][0][:2], None)


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
