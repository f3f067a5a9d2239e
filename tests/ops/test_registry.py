"""The backend registry: reasons, explicit requests, automatic choice, context, environment, priority file."""
import json

import pytest
import torch

from fastmae import ops
from fastmae.ops import registry
from fastmae.ops.registry import Inputs


def cpu_inputs(dtype=torch.float32, head_dim=64):
    return Inputs(torch.device("cpu"), dtype, head_dim=head_dim, options={"op": "attention"})


def test_every_backend_gives_reasons_or_serves():
    for op in ops.OPS:
        for b in ops.BACKENDS:
            reasons = ops.not_supported_reasons(op, b, cpu_inputs())
            assert isinstance(reasons, list) and all(isinstance(r, str) and len(r) > 10 for r in reasons)
    assert ops.not_supported_reasons("attention", "reference", cpu_inputs()) == []
    assert ops.not_supported_reasons("attention", "sdpa", cpu_inputs()) == []
    xf = ops.not_supported_reasons("attention", "xformers", cpu_inputs())
    assert any("cuda" in r for r in xf)


def test_dtype_and_head_dim_reasons():
    impl = registry.OpImpl(op="attention", backend="triton", fn=None, devices=("cpu",), dtypes=(torch.float16,),
                           head_dims=(16, 128))
    reasons = impl.reasons(cpu_inputs(torch.float32, head_dim=200))
    assert any("float32" in r for r in reasons) and any("head dims 16 to 128" in r for r in reasons)


def test_explicit_request_never_falls_back():
    q = torch.randn(1, 1, 4, 16)
    with pytest.raises(ops.BackendUnavailable, match="backend 'xformers' cannot run attention"):
        ops.attention(q, q, q, backend="xformers")


def test_automatic_choice_on_cpu_and_error_lists_all(monkeypatch):
    assert ops.resolve("attention", cpu_inputs()).backend == "sdpa"
    monkeypatch.setitem(registry._PRIORITY, ("attention", "cpu"), ["xformers"])
    with pytest.raises(ops.BackendUnavailable, match="no backend can run attention.*xformers:"):
        ops.resolve("attention", cpu_inputs())


def test_precedence_call_context_env(monkeypatch):
    monkeypatch.setenv(ops.ENV_VAR, "reference")
    assert ops.requested("attention") == "reference"
    with ops.use_backend("sdpa"):
        assert ops.requested("attention") == "sdpa"
        with ops.use_backend({"attention": "reference"}):
            assert ops.requested("attention") == "reference"
            assert ops.requested("gather_tokens") == "sdpa"
        assert ops.requested("attention", backend="auto") == "auto"
    # a single name covers only the ops that backend implements
    with ops.use_backend("xformers"):
        assert ops.requested("attention") == "xformers"
        assert ops.requested("gather_tokens") == "reference"  # from the environment


def test_bad_names_are_errors(monkeypatch):
    with pytest.raises(ValueError, match="unknown backend"):
        with ops.use_backend("cuda"):
            pass
    with pytest.raises(ValueError, match="unknown op"):
        with ops.use_backend({"attn": "sdpa"}):
            pass
    monkeypatch.setenv(ops.ENV_VAR, "attention=nope")
    with pytest.raises(ValueError, match="^FASTMAE_BACKEND=attention=nope: unknown backend 'nope'"):
        ops.requested("attention")
    # read only where nothing before it decides: a call or block naming its backend does not need it
    assert ops.requested("attention", "reference") == "reference"
    assert ops.requested("attention", " Attention = SDPA ") == "sdpa"  # the text form ignores case and spaces
    with ops.use_backend("sdpa"):
        assert ops.requested("attention") == "sdpa"
    monkeypatch.delenv(ops.ENV_VAR)
    # a misspelt op in a call's (or a model's) mapping is an error, not a mapping that silently names nothing
    q = torch.randn(1, 1, 4, 16)
    with pytest.raises(ValueError, match="unknown op.*'atention'"):
        ops.attention(q, q, q, backend={"atention": "reference"})


def test_use_backend_and_record_choices_hold_in_their_own_thread_task_and_block():
    """A `use_backend` block's choice leaves with that block, not with whichever was opened last (a generator that
    leaves its block while its caller's is open); asyncio tasks and threads each see their own blocks; nested
    `record_choices` blocks each record what runs inside them, in their own thread only."""
    import asyncio
    import threading

    def gen():
        with ops.use_backend("reference"):
            yield ops.requested("attention")
        yield ops.requested("attention")

    g = gen()
    assert next(g) == "reference"
    with ops.use_backend("sdpa"):
        assert next(g) == "sdpa"  # the generator left its block; the caller's is still open
        assert ops.requested("attention") == "sdpa"
    assert ops.requested("attention") == "auto"

    async def task(name):
        with ops.use_backend(name):
            await asyncio.sleep(0)  # the other task enters its block meanwhile
            return ops.requested("attention")

    async def both():
        return await asyncio.gather(task("reference"), task("sdpa"))

    assert asyncio.run(both()) == ["reference", "sdpa"]

    q = torch.randn(1, 1, 4, 16)
    with ops.record_choices() as outer:
        with ops.record_choices() as inner:
            ops.attention(q, q, q, backend="reference")
        ops.attention(q, q, q, backend="sdpa")
        other = threading.Thread(target=lambda: ops.gather_patches(torch.randn(1, 3, 8, 8),
                                                                   torch.zeros(1, 1, dtype=torch.long), 4))
        other.start()
        other.join()
    assert inner == {"attention": "reference"} and outer == {"attention": "sdpa"}


def test_a_thread_waits_for_the_registry_to_load_and_a_failed_load_is_retried(monkeypatch):
    """While one thread loads the registry, another must not see it half-filled (it would take a backend missing
    from it for one not asked for); a load that fails is not marked done."""
    import threading
    import time
    real = registry.load_priority_file
    entered, order = threading.Event(), []

    def slow(path):
        entered.set()
        time.sleep(0.3)
        order.append("loaded")
        return real(path)

    monkeypatch.setattr(registry, "load_priority_file", slow)
    monkeypatch.setattr(registry, "_loaded", False)
    loader = threading.Thread(target=registry._ensure_loaded)
    loader.start()
    assert entered.wait(5)
    registry._ensure_loaded()  # this thread waits for the loader
    order.append("returned")
    loader.join()
    assert order == ["loaded", "returned"] and registry._loaded

    def fails(path):
        raise OSError("unreadable priority file (simulated)")

    monkeypatch.setattr(registry, "load_priority_file", fails)
    monkeypatch.setattr(registry, "_loaded", False)
    for _ in range(2):  # the second call tries again instead of running on a half-loaded registry
        with pytest.raises(OSError, match="simulated"):
            registry._ensure_loaded()
    assert not registry._loaded


def test_priority_file(tmp_path, monkeypatch):
    path = tmp_path / "priority.json"
    path.write_text(json.dumps({"cpu": {"attention": ["reference", "triton"]}, "source": {"device": "test"}}))
    monkeypatch.setattr(registry, "_PRIORITY", {})
    assert registry.load_priority_file(str(path))
    assert ops.priority("attention", "cpu") == ["reference", "sdpa"]  # triton is never automatic on CPU
    assert ops.priority("gather_tokens", "cpu") == ["sdpa", "reference"]
    assert not registry.load_priority_file(str(tmp_path / "none.json"))


def test_op_input_validation():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="one shape"):
        ops.attention(q, q[:, :, :3], q)
    with pytest.raises(TypeError, match="floating-point"):
        ops.attention(q.long(), q.long(), q.long())
    with pytest.raises(TypeError, match="int64"):
        ops.gather_tokens(torch.randn(1, 4, 8), torch.zeros(1, 2, dtype=torch.int32), torch.randn(1, 5, 8))
    with pytest.raises(ValueError, match="pred must be"):
        ops.masked_mse_loss(torch.randn(1, 4, 10), torch.randn(1, 3, 8, 8), torch.ones(1, 4), 4)
    with pytest.raises(ValueError, match="not divisible"):
        ops.gather_patches(torch.randn(1, 3, 10, 10), torch.zeros(1, 1, dtype=torch.long), 4)
    for p in (0, -4, 2.0):
        with pytest.raises(ValueError, match="patch_size must be a positive int"):
            ops.gather_patches(torch.randn(1, 3, 8, 8), torch.zeros(1, 1, dtype=torch.long), p)
    with pytest.raises(ValueError, match=r"pred_ids must be \[N, ...\] with N = 1 and 2 dims"):
        ops.masked_mse_loss(torch.randn(1, 2, 48), torch.randn(1, 3, 8, 8), torch.ones(1, 4), 4,
                            pred_ids=torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"x must be \[N, K\+1, Dd\], got \(3, 8\)"):
        ops.unshuffle_tokens(torch.randn(3, 8), torch.zeros(3, 4, dtype=torch.long), torch.zeros(1, 1, 8),
                             torch.zeros(1, 5, 8))


def test_constant_marking_matches_torch_compiler():
    """The registry marks its trace-time resolver as torch.compiler.assume_constant_result does, without
    importing torch._dynamo at import time; if a torch release marks functions differently, this fails."""
    import torch._dynamo  # noqa: F401  (the real decorator needs it)

    marked = torch.compiler.assume_constant_result(lambda: 0)
    assert getattr(marked, "_dynamo_marked_constant", False) is True
    assert registry._resolve_constant._dynamo_marked_constant is True


def test_import_does_not_load_dynamo_or_triton():
    import subprocess
    import sys

    code = "import sys, fastmae; print(sorted(m for m in ('torch._dynamo', 'triton') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_interpreter_problem_names_the_known_incompatibility(monkeypatch):
    """Triton 3.6's interpreter fails with NumPy >= 2.4: the triton backend then declines CPU tensors with that
    reason instead of failing inside a kernel; other pairs of versions are fine."""
    from fastmae.kernels import utils

    versions = {}
    monkeypatch.setattr(utils.metadata, "version", lambda name: versions[name])
    cases = [("3.6.0", "2.4.1", True), ("3.6.0", "2.3.5", False), ("3.7.1", "2.5.0", False),
             ("3.5.1", "2.10.0", True), ("3.9.0", "2.4.6", False), ("3.6.0+git1234", "2.4.0rc1", True)]
    for triton_v, numpy_v, broken in cases:
        versions.update(triton=triton_v, numpy=numpy_v)
        utils.interpreter_problem.cache_clear()
        problem = utils.interpreter_problem()
        assert bool(problem) == broken, (triton_v, numpy_v, problem)
        if broken:
            assert triton_v in problem and "numpy<2.4" in problem
            monkeypatch.setenv("TRITON_INTERPRET", "1")
            inputs = Inputs(torch.device("cpu"), torch.float32, tensors={}, options={"op": "attention"})
            assert problem in ops.not_supported_reasons("attention", "triton", inputs)
    utils.interpreter_problem.cache_clear()


XFORMERS_NO_OPERATOR = (  # the shape of xformers 0.0.35's message (its C++ extensions built for another torch)
    "No operator found for `memory_efficient_attention_forward` with inputs:\n"
    "     query       : shape=(1, 1, 1, 64) (torch.bfloat16)\n"
    "     attn_bias   : <class 'NoneType'>\n"
    "`fa3F@0.0.0` is not supported because:\n"
    "    operator wasn't built - see `python -m xformers.info` for more info\n"
    "`fa2F@2.5.7-pt` is not supported because:\n"
    "    bf16 is only supported on A100+ GPUs\n")


@pytest.mark.parametrize("serves", [False, True])
def test_xformers_check_asks_xformers_dispatcher(monkeypatch, serves):
    """The xformers backend asks xformers' own dispatcher whether an operator serves the input (forward, and
    backward when gradients are needed), once per kind of input, and passes its reasons on in one line.
    xformers itself is stubbed: the CPU suite does not install it."""
    import sys
    import types

    from fastmae.ops import xformers_ops

    calls = []

    class FakeInputs:
        def __init__(self, query, key, value):
            self.query = query

    def dispatch_fw(inp, needs_gradient):
        calls.append(("fw", tuple(inp.query.shape), needs_gradient))
        if not serves:
            raise NotImplementedError(XFORMERS_NO_OPERATOR)

    def dispatch_bw(inp, varlen_lse_packed):
        calls.append(("bw", tuple(inp.query.shape), varlen_lse_packed))

    fmha = types.ModuleType("xformers.ops.fmha")
    fmha.common = types.SimpleNamespace(Inputs=FakeInputs)
    fmha.dispatch = types.SimpleNamespace(_dispatch_fw=dispatch_fw, _dispatch_bw=dispatch_bw)
    for name, mod in {"xformers": types.ModuleType("xformers"), "xformers.ops": types.ModuleType("xformers.ops"),
                      "xformers.ops.fmha": fmha}.items():
        monkeypatch.setitem(sys.modules, name, mod)
    xformers_ops.dispatch_reasons.cache_clear()
    q = torch.zeros(2, 3, 50, 80, requires_grad=True)
    inputs = Inputs(torch.device("cpu"), torch.float32, head_dim=80, tensors={"q": q, "k": q, "v": q},
                    options={"op": "attention"})
    for _ in range(2):  # the second time from the cache
        reasons = xformers_ops._check(inputs)
    xformers_ops.dispatch_reasons.cache_clear()
    if serves:
        assert reasons == [] and calls == [("fw", (1, 1, 1, 80), True), ("bw", (1, 1, 1, 80), None)]
    else:
        assert calls == [("fw", (1, 1, 1, 80), True)]
        assert reasons == ["xformers has no forward operator for this input (fa3F@0.0.0: operator wasn't built - "
                           "see `python -m xformers.info` for more info; fa2F@2.5.7-pt: bf16 is only supported "
                           "on A100+ GPUs)"]


def test_triton_token_ops_refuse_a_gradient_they_do_not_give_only_when_one_is_asked_for():
    """The triton token and loss ops give no gradient to pos_embed / imgs: a tensor that requires one is refused
    with grad mode on, and served under no_grad and inference_mode, where no gradient is asked for."""
    from tests.utils import skip_unless_serves
    skip_unless_serves("gather_tokens", "triton", torch.device("cpu"), torch.float32)
    x, ids = torch.randn(2, 4, 8), torch.tensor([[0, 2], [3, 1]])
    pos = torch.randn(1, 5, 8, requires_grad=True)
    with pytest.raises(ops.BackendUnavailable, match=r"no gradient to pos_embed.*sine-cosine"):
        ops.gather_tokens(x, ids, pos, backend="triton")
    imgs, pred, mask = torch.randn(2, 3, 8, 8, requires_grad=True), torch.randn(2, 4, 48), torch.ones(2, 4)
    with pytest.raises(ops.BackendUnavailable, match="no gradient to imgs") as err:
        ops.masked_mse_loss(pred, imgs, mask, 4, backend="triton")
    assert "position" not in str(err.value)
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            assert torch.equal(ops.gather_tokens(x, ids, pos, backend="triton"),
                               ops.gather_tokens(x, ids, pos, backend="reference"))
            ref = ops.masked_mse_loss(pred, imgs, mask, 4, backend="reference")
            torch.testing.assert_close(ops.masked_mse_loss(pred, imgs, mask, 4, backend="triton"), ref)
