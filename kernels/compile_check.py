"""Ahead-of-time compile check: every launchable kernel configuration, compiled for real NVIDIA GPUs.

Triton's CPU interpreter runs code that the GPU compiler rejects (a `tl.dot` on 16-bit inputs with K
below 16, a tile needing more shared memory than a block may have) and says nothing about register
pressure. Triton can
compile for a GPU target on a machine without one, so this module does exactly that for each
`CompileSpec` the kernel modules export (`compile_specs() -> list[CompileSpec]`, see `kernels/utils.py`)
and each target architecture:

1. `triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32), options={num_warps, num_stages,
   enable_fp_fusion})`
   builds TTIR -> TTGIR -> LLVM IR -> PTX -> cubin, exactly as a launch on that GPU would (sm_90 emits wgmma).
2. The PTX goes through the `ptxas` that Triton itself uses for that architecture, with `-v` and the same
   flags Triton passes, which reports registers per thread, spill stores/loads and static shared memory.
   (A compiled kernel's `n_regs`/`n_spills` are only filled in when a driver loads it, so they are empty
   here. The register counts and stack sizes found this way equal those `cuobjdump -res-usage` reads from
   the cubin Triton built, checked on triton 3.6 and 3.9.)
3. Triton's dynamic shared memory comes from the compiled kernel's metadata (`shared`).

A configuration has a problem when it fails to compile (the message is kept), spills (any spill bytes),
uses more than 255 registers per thread or more registers than a block holds, or needs more shared memory
per block than the target allows (limits in `LIMITS`, with their sources). Note that ptxas sometimes
chooses a few bytes of spills to reach 32 or 64 registers (higher occupancy); those count as spills too.

Specialisation: a launch specialises every pointer and integer argument that is a multiple of 16 (and
turns integers equal to 1 into constants), which enables vector loads and can change register counts a
lot. Here pointer arguments are compiled as 16-byte aligned (what PyTorch's allocator gives); integer
arguments are not assumed divisible by 16 unless the spec lists them in an optional `divisible_by_16`
attribute (a tuple of argument names), or `aligned_ints=True` (`--aligned-ints`) assumes it for all of them.
Constexpr parameters with a default value in the kernel need not be listed in `constexprs`. The exact
specialisations of a real run come from `--traced` (`check_traced`): the launches of a training step,
recorded at MAE's shapes without running anything, each specialised by Triton's own launcher code (see the
section "Launches recorded at MAE's shapes" below).

Interpreter: with `TRITON_INTERPRET=1` (the CPU test suite sets it before importing triton), `@triton.jit`
returns an `InterpretedFunction`, which `triton.compile` cannot take (it has no `cache_key`), and the
kernels' helper functions are interpreter wrappers too; running interpreted kernels also patches
`triton.language` while they run. Unwrapping (`InterpretedFunction.fn` is the plain Python function) is
therefore not enough. Whenever the interpreter is on in this process, the check runs in a fresh Python
process with `TRITON_INTERPRET` removed from its environment: the worker imports the kernel modules there
(so every `@triton.jit` is a real `JITFunction`), compiles, and writes its reports back as JSON. Loose specs
(`check_specs`) travel by module and qualified name of their kernel, so their kernel must be
defined at module level in an importable module. Without the interpreter everything runs in this process.

Triton versions (checked on 3.6 and 3.9): `ASTSource(fn, signature, constexprs, attrs)` takes a signature
holding *every* parameter, constexpr ones with the type string "constexpr"; `constexprs` is keyed by a
path tuple `(index,)` (names are accepted and converted to that); `attrs` is keyed the same way with lists
of `[attribute, value]` pairs such as `["tt.divisibility", 16]`. The CompileSpec keeps the friendlier form
(signature of the runtime arguments only, constexprs by name); `_make_source` converts. Triton before 3.2
had a different `ASTSource` (a `constants=` argument and an `AttrsDescriptor`) and is refused clearly.

Command line: `python -m fastmae.kernels.compile_check [--arch 80 90] [--module NAME ...] [--json FILE]
[--sample] [--aligned-ints] [--traced [--batch N]] [-v]` prints one row per (configuration, architecture)
and exits with status 1 when any problem is found. Compiling takes 0.1 to 5 s per configuration and
architecture on one CPU core (a few pathological ones far longer), so checking every configuration of all
modules takes tens of minutes; `--sample` (what the CPU tests use) compiles `representative(...)`
configurations only. Triton caches compiled kernels (~/.triton/cache), so repeated runs on unchanged kernels
are fast. With `--traced` the table also gives each launch's grid and its waves: programs over the SMs of the
GPU named in `LIMITS` times the blocks one SM holds (`blocks_per_sm`).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import importlib.util
import inspect
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Sequence

KERNEL_MODULES = ("fastmae.kernels.attention", "fastmae.kernels.tokens", "fastmae.kernels.loss")
ARCHS = (80, 90)  # the default targets; LIMITS also knows sm_100 (B200), checked on request (--arch 100)
WORKER_TIMEOUT_S = 1800


@dataclass(frozen=True)
class ArchLimits:
    gpu: str
    gpu_name: str  # ptxas --gpu-name, as Triton spells it (sm_90a enables wgmma)
    max_registers_per_thread: int
    registers_per_block: int  # also the register file of one SM
    max_shared_per_block: int  # bytes a block may opt in to (static + dynamic)
    sms: int  # streaming multiprocessors of the GPU named (for the waves of a traced launch)
    shared_per_sm: int  # bytes of shared memory an SM gives its blocks
    max_warps_per_sm: int = 64
    max_blocks_per_sm: int = 32
    reserved_shared_per_block: int = 1024  # the system's share of each block (cc 8.0 and newer)


# Sources: CUDA C++ Programming Guide, "Technical Specifications per Compute Capability", and the
# A100 / H100 tuning guides. Compute capability 8.0 (A100): 164 KB shared memory per SM, at most 163 KB
# (166912 bytes) per block with the opt-in attribute. 9.0 (H100): 228 KB per SM, at most 227 KB
# (232448 bytes) per block. Both: 255 registers per thread, 64 K 32-bit registers per block and per SM.
# (8.6 / 8.9 consumer GPUs allow only 99 KB per block; they are not targets of this check.)
LIMITS = {
    80: ArchLimits("A100 (sm_80)", "sm_80", 255, 65536, 163 * 1024, sms=108, shared_per_sm=164 * 1024),
    90: ArchLimits("H100 (sm_90)", "sm_90a", 255, 65536, 227 * 1024, sms=132, shared_per_sm=228 * 1024),
    # 10.0 (B200): as Hopper, 228 KB per SM and 227 KB per block; compiled on request (--arch 100) and by one
    # sampled test, not by default
    100: ArchLimits("B200 (sm_100)", "sm_100a", 255, 65536, 227 * 1024, sms=148, shared_per_sm=228 * 1024),
}
# SM counts: A100 108; H100 SXM 132 (the H200 has the same 132; the H100 PCIe has 114). 64 resident warps and
# 32 resident blocks per SM on both.


def registers_per_warp(registers: int) -> int:
    """Registers a warp is allocated: 32 threads' worth, rounded up to a unit of 256 (cc 8.0 and 9.0)."""
    return -(-registers * 32 // 256) * 256


def blocks_per_sm(arch: int, registers: int, num_warps: int, shared_bytes: int) -> int:
    """How many blocks of a kernel one SM holds at once: the least of what its warps, registers (allocated per
    warp, `registers_per_warp`) and shared memory (plus the system's 1 KB per block) allow, at most 32."""
    lim = LIMITS[arch]
    by_regs = lim.registers_per_block // max(1, registers_per_warp(registers) * num_warps)
    by_smem = (lim.shared_per_sm // (shared_bytes + lim.reserved_shared_per_block) if shared_bytes
               else lim.max_blocks_per_sm)
    return max(0, min(lim.max_warps_per_sm // num_warps, by_regs, by_smem, lim.max_blocks_per_sm))



@dataclass
class Report:
    """What compiling one configuration for one architecture gave. Sizes in bytes; registers per thread."""

    name: str
    arch: int
    module: str = ""
    num_warps: int = 4
    num_stages: int = 2
    registers: int | None = None
    spill_stores: int = 0
    spill_loads: int = 0
    stack_frame: int = 0
    static_shared: int = 0
    dynamic_shared: int = 0
    mma: str = ""  # tensor-core instructions in the PTX: "wgmma", "mma" or ""
    # the sizes of the global loads / stores in the PTX, bytes per thread per instruction (16: 128-bit vectors,
    # what a memory-bound kernel needs for full bandwidth; 2: one 16-bit element at a time)
    load_bytes: list[int] = field(default_factory=list)
    store_bytes: list[int] = field(default_factory=list)
    compile_seconds: float = 0.0
    problems: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)  # traced launches: the workloads that make this launch
    programs: int = 0  # traced launches: the grid's size (the first workload's)
    blocks_per_sm: int = 0  # traced launches: resident blocks per SM (`blocks_per_sm`)
    waves: float = 0.0  # traced launches: programs / (SMs x blocks per SM) on the GPU named in LIMITS
    specialized: str = ""  # traced launches: how Triton specialised the integer and pointer arguments
    config: str = ""  # traced launches: `config_key` of the launch

    @property
    def spill_bytes(self) -> int:
        return self.spill_stores + self.spill_loads

    @property
    def shared_bytes(self) -> int:
        return self.static_shared + self.dynamic_shared

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(spill_bytes=self.spill_bytes, shared_bytes=self.shared_bytes, ok=self.ok)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Report":
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class ModuleResult:
    """The check of one kernel module: status 'checked', 'missing', 'no compile_specs' or 'error'."""

    module: str
    status: str
    message: str = ""
    reports: list[Report] = field(default_factory=list)

    @property
    def problems(self) -> list[str]:
        out = [] if self.status == "checked" else [f"{self.module}: {self.status}: {self.message}".rstrip(": ")]
        return out + [f"{r.name} [sm_{r.arch}]: {p}" for r in self.reports for p in r.problems]

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return dict(module=self.module, status=self.status, message=self.message,
                    reports=[r.to_dict() for r in self.reports])

    @classmethod
    def from_dict(cls, d: dict) -> "ModuleResult":
        return cls(d["module"], d["status"], d.get("message", ""), [Report.from_dict(r) for r in d["reports"]])


# --------------------------------------------------------------------------------------------------
# Triton adapters
# --------------------------------------------------------------------------------------------------

def interpreter_active() -> bool:
    """True when `@triton.jit` in this process gives interpreter wrappers instead of compilable kernels."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return True
    try:
        from triton import knobs
        return bool(knobs.runtime.interpret)
    except Exception:  # knobs appeared in triton 3.4; the environment variable is the older switch
        return False


def _python_function(fn):
    """The plain Python function under a jit / interpreter / autotune / heuristics wrapper."""
    seen = 0
    while hasattr(fn, "fn") and seen < 8:
        fn = fn.fn
        seen += 1
    return fn


def _jit_function(fn):
    """The `JITFunction` under autotune / heuristics wrappers; a clear error for anything else."""
    from triton.runtime.jit import JITFunction
    obj = fn
    for _ in range(8):
        if isinstance(obj, JITFunction):
            return obj
        if not hasattr(obj, "fn"):
            break
        obj = obj.fn
    raise TypeError(f"{getattr(fn, '__name__', fn)!r} is a {type(fn).__name__}, not a triton.jit kernel"
                    + (" (the Triton interpreter is on in this process)" if interpreter_active() else ""))


def _constexpr_defaults(fn) -> dict[str, Any]:
    try:
        params = inspect.signature(_python_function(fn)).parameters.values()
    except (TypeError, ValueError):
        return {}
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}


def _make_source(fn, signature: dict[str, str], constexprs: dict[str, Any], divisible_by_16: Iterable[str] = (),
                 unaligned: Iterable[str] = ()):
    """Build a `triton.compiler.ASTSource` from the CompileSpec form (see the module docstring)."""
    import triton
    from triton.compiler import ASTSource

    if "constexprs" not in inspect.signature(ASTSource.__init__).parameters:
        raise RuntimeError(f"triton {triton.__version__} has the old ASTSource(constants=...) interface; "
                           "this check needs triton >= 3.2 (fastmae supports 3.6 and newer)")
    names = list(fn.arg_names)
    unknown = [k for k in (*signature, *constexprs) if k not in names]
    if unknown:
        raise ValueError(f"spec names {unknown} that are not parameters of {fn.__name__}{tuple(names)}")
    clash = [k for k in constexprs if k in signature and signature[k] != "constexpr"]
    if clash:
        raise ValueError(f"{clash} given both a runtime type and a constexpr value")
    defaults = _constexpr_defaults(fn)
    constexpr_params = {p.name for p in getattr(fn, "params", []) if getattr(p, "is_constexpr", False)}
    values, full, missing = {}, {}, []
    for name in names:
        if name in constexprs:
            values[name] = constexprs[name]
            full[name] = "constexpr"
        elif name in signature and signature[name] != "constexpr":
            full[name] = signature[name]
        elif name in constexpr_params and name in defaults:
            values[name] = defaults[name]
            full[name] = "constexpr"
        else:
            missing.append(name)
    if missing:
        raise ValueError(f"parameters of {fn.__name__} with neither a type in `signature` nor a value in "
                         f"`constexprs`: {missing}")
    divisible = set(divisible_by_16)
    bad = [k for k in divisible if k not in full or full[k] == "constexpr"]
    if bad:
        raise ValueError(f"divisible_by_16 names {bad}, which are not runtime arguments")
    unaligned = set(unaligned)
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(names)
             if full[name] != "constexpr" and ((full[name].startswith("*") and name not in unaligned)
                                               or name in divisible)}
    constants = {(names.index(k),): v for k, v in values.items()}
    return ASTSource(fn=fn, signature=full, constexprs=constants, attrs=attrs)


@functools.lru_cache(maxsize=None)
def _ptxas_path(arch: int) -> str:
    """The ptxas binary Triton uses for `arch` (`get_ptxas(arch)`, triton 3.6 to 3.9; else the wheel's bin/)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        return get_ptxas(arch).path
    except Exception:  # noqa: BLE001 - no usable helper: the binary the wheel ships
        pass
    import triton
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.isfile(path):
        raise FileNotFoundError("no ptxas found in the triton installation (set TRITON_PTXAS_PATH)")
    return path


@functools.lru_cache(maxsize=None)
def _triton_ptxas_flags() -> tuple[str, ...]:
    """Flags Triton's own ptx -> cubin step passes besides -v / -lineinfo / --gpu-name, mirrored here so the
    numbers describe the cubin Triton builds (triton 3.9 adds --regAllocOptLevel=2, 3.6 does not)."""
    try:
        from triton.backends.nvidia.compiler import CUDABackend
        src = inspect.getsource(CUDABackend.make_cubin)
    except Exception:
        return ()
    return tuple(flag for flag in ("--regAllocOptLevel=2",) if flag in src)


_PTXAS_PATTERNS = {
    "registers": re.compile(r"Used (\d+) registers"),
    "stack_frame": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "static_shared": re.compile(r"(\d+) bytes smem"),
}


def parse_ptxas_log(log: str) -> dict[str, int]:
    """Numbers from `ptxas -v`: the largest register count / stack frame / static shared memory of any
    function in the module, and the spill bytes summed over its functions."""
    out = {}
    for key, pattern in _PTXAS_PATTERNS.items():
        values = [int(v) for v in pattern.findall(log)]
        if key == "registers" and not values:
            raise ValueError(f"ptxas -v printed no register count:\n{log}")
        out[key] = (sum(values) if key.startswith("spill") else max(values)) if values else 0
    return out


_GLOBAL_ACCESS = re.compile(r"\b(ld|st)\.global((?:\.[A-Za-z0-9_:]+)+)")


def global_access_bytes(ptx: str) -> tuple[list[int], list[int]]:
    """The distinct sizes of the global loads and of the global stores in the PTX, in bytes per thread and
    instruction: `ld.global.v4.b32` is 16 (a 128-bit vector), `ld.global.b16` is 2."""
    sizes: dict[str, set[int]] = {"ld": set(), "st": set()}
    for op, suffix in _GLOBAL_ACCESS.findall(ptx):
        vec, bits = 1, 0
        for part in suffix.split(".")[1:]:
            if re.fullmatch(r"v\d+", part):
                vec = int(part[1:])
            elif re.fullmatch(r"[bfus]\d+", part):
                bits = int(part[1:])
        sizes[op].add(vec * bits // 8)
    return sorted(sizes["ld"]), sorted(sizes["st"])


@functools.lru_cache(maxsize=256)
def ptxas_usage(ptx: str, arch: int, fp_fusion: bool = True, extra: tuple[str, ...] = ()) -> dict[str, int]:
    """Run ptxas -v on PTX for `arch` (80 or 90) and parse its resource report."""
    cmd = [_ptxas_path(arch), "-lineinfo", "-v", *(() if fp_fusion else ("--fmad=false",)), *_triton_ptxas_flags(),
           *extra, f"--gpu-name={LIMITS[arch].gpu_name}"]
    with tempfile.TemporaryDirectory(prefix="fastmae-ptxas-") as tmp:
        src, obj = os.path.join(tmp, "kernel.ptx"), os.path.join(tmp, "kernel.cubin")
        with open(src, "w") as f:
            f.write(ptx)
        proc = subprocess.run([*cmd, src, "-o", obj], capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas exited with status {proc.returncode}: {log.strip()}")
    return parse_ptxas_log(log)


def _short(exc: BaseException, limit: int = 1500) -> str:
    """The exception as one message; long ones keep their head and their tail (where Triton's
    CompilationError states the reason, after the source excerpt)."""
    text = f"{type(exc).__name__}: {exc}".strip()
    return text if len(text) <= limit else text[:limit // 4] + "\n[...]\n" + text[-(limit - limit // 4):]


def _check_limits(report: Report) -> None:
    lim = LIMITS[report.arch]
    if report.spill_bytes:
        report.problems.append(f"register spills: {report.spill_stores} bytes stored, {report.spill_loads} bytes "
                               f"loaded per thread ({report.registers} registers)")
    if report.registers is not None:
        if report.registers > lim.max_registers_per_thread:
            report.problems.append(f"{report.registers} registers per thread exceed {lim.max_registers_per_thread}")
        per_warp = registers_per_warp(report.registers)  # (the CUDA occupancy calculator's allocation rule)
        if per_warp * report.num_warps > lim.registers_per_block:
            report.problems.append(f"{report.registers} registers x {32 * report.num_warps} threads "
                                   f"({per_warp * report.num_warps} allocated) exceed the {lim.registers_per_block} "
                                   "registers of a block: the launch would fail")
    if report.shared_bytes > lim.max_shared_per_block:
        report.problems.append(f"shared memory {report.shared_bytes} bytes exceeds the {lim.max_shared_per_block} "
                               f"bytes a block may use on {lim.gpu}")


def _divisible_names(spec, aligned_ints: bool) -> tuple[str, ...]:
    if aligned_ints:
        return tuple(k for k, t in spec.signature.items() if t in ("i32", "i64", "u32", "u64"))
    return tuple(getattr(spec, "divisible_by_16", ()) or ())


def compile_options(num_warps: int, num_stages: int) -> dict[str, Any]:
    """The options of every compile here: the spec's warps and stages, and the fp fusion every launch states
    (`kernels.utils.FP_FUSION`), so that a compile here is the launch's compile whatever Triton's default."""
    from fastmae.kernels.utils import FP_FUSION
    return {"num_warps": int(num_warps), "num_stages": int(num_stages), "enable_fp_fusion": FP_FUSION}


def _compile_here(spec, arch: int, module: str = "", aligned_ints: bool = False) -> Report:
    """Compile one spec for one architecture in this process (the interpreter must be off)."""
    report = Report(name=spec.name, arch=arch, module=module, num_warps=int(spec.num_warps),
                    num_stages=int(spec.num_stages))
    if arch not in LIMITS:
        report.problems.append(f"unknown architecture {arch}; known: {sorted(LIMITS)}")
        return report
    try:
        import triton
        from triton.backends.compiler import GPUTarget

        fn = _jit_function(spec.fn)
        src = _make_source(fn, dict(spec.signature), dict(spec.constexprs), _divisible_names(spec, aligned_ints),
                           spec.unaligned)
        options = compile_options(report.num_warps, report.num_stages)
        start = time.perf_counter()
        # Triton prints the whole PTX to stdout when ptxas fails; the exception keeps what matters.
        with contextlib.redirect_stdout(io.StringIO()):
            kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
        report.compile_seconds = round(time.perf_counter() - start, 3)
    except Exception as exc:  # a compile error is a finding, not a crash of the checker
        report.problems.append(f"compile error: {_short(exc)}")
        return report
    ptx = kernel.asm["ptx"]
    meta = kernel.metadata
    report.dynamic_shared = int(getattr(meta, "shared", 0) or 0)
    report.mma = "wgmma" if "wgmma." in ptx else ("mma" if re.search(r"\bmma\.sync", ptx) else "")
    report.load_bytes, report.store_bytes = global_access_bytes(ptx)
    try:
        usage = ptxas_usage(ptx, arch, bool(getattr(meta, "enable_fp_fusion", True)),
                            tuple((getattr(meta, "ptx_options", None) or "").split()))
    except Exception as exc:
        report.problems.append(f"ptxas -v failed: {_short(exc)}")
        return report
    for key, value in usage.items():
        setattr(report, key, value)
    _check_limits(report)
    report.programs = int(getattr(spec, "programs", 0) or 0)
    if report.programs and report.registers:
        report.blocks_per_sm = blocks_per_sm(arch, report.registers, report.num_warps, report.shared_bytes)
        if report.blocks_per_sm:
            report.waves = round(report.programs / (LIMITS[arch].sms * report.blocks_per_sm), 2)
    return report


# --------------------------------------------------------------------------------------------------
# Running in a fresh process when the interpreter is on
# --------------------------------------------------------------------------------------------------

def _encode_value(value):
    import triton.language as tl
    if isinstance(value, tl.constexpr):
        value = value.value
    if isinstance(value, tl.dtype):
        return {"tl.dtype": value.name}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"constexpr value {value!r} of type {type(value).__name__} cannot be sent to the compile "
                    "worker (use bool/int/float/str or a triton dtype)")


def _decode_value(value):
    if isinstance(value, dict) and "tl.dtype" in value:
        import triton.language as tl
        return tl.dtype(value["tl.dtype"])
    return value


def _spec_to_job(spec) -> dict:
    fn = _python_function(spec.fn)
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if not module or module == "__main__" or "<locals>" in qualname:
        raise ValueError(f"kernel {qualname or fn!r} of spec {spec.name!r} is not defined at module level of an "
                         "importable module, so a fresh process cannot find it (needed while the Triton "
                         "interpreter is on)")
    return dict(name=spec.name, module=module, qualname=qualname, signature=dict(spec.signature),
                constexprs={k: _encode_value(v) for k, v in spec.constexprs.items()},
                num_warps=int(spec.num_warps), num_stages=int(spec.num_stages),
                divisible_by_16=list(getattr(spec, "divisible_by_16", ()) or ()),
                unaligned=list(spec.unaligned or ()))


def _spec_from_job(job: dict):
    from fastmae.kernels.utils import CompileSpec
    obj = importlib.import_module(job["module"])
    for part in job["qualname"].split("."):
        obj = getattr(obj, part)
    spec = CompileSpec(name=job["name"], fn=obj, signature=job["signature"],
                       constexprs={k: _decode_value(v) for k, v in job["constexprs"].items()},
                       num_warps=job["num_warps"], num_stages=job["num_stages"])
    if job["divisible_by_16"]:
        spec.divisible_by_16 = tuple(job["divisible_by_16"])
    spec.unaligned = tuple(job.get("unaligned", ()))
    return spec


def worker_env() -> dict[str, str]:
    """The environment of a compile worker process: Triton's interpreter off, and this process's import path
    (so the worker imports the same fastmae, installed or not)."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join([p for p in sys.path if p] + [os.getcwd()] +
                                        ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def _run_worker(job: dict, timeout: float = WORKER_TIMEOUT_S) -> dict:
    env = worker_env()
    with tempfile.TemporaryDirectory(prefix="fastmae-compile-") as tmp:
        job_path, out_path = os.path.join(tmp, "job.json"), os.path.join(tmp, "result.json")
        with open(job_path, "w") as f:
            json.dump(job, f)
        code = "import sys; from fastmae.kernels.compile_check import _worker_main; _worker_main(*sys.argv[1:])"
        proc = subprocess.run([sys.executable, "-c", code, job_path, out_path], env=env, capture_output=True,
                              text=True, timeout=timeout)
        if proc.returncode != 0 or not os.path.exists(out_path):
            tail = (proc.stderr or proc.stdout).strip()[-3000:]
            raise RuntimeError(f"the compile worker process failed with status {proc.returncode}:\n{tail}")
        with open(out_path) as f:
            return json.load(f)


def _worker_main(job_path: str, out_path: str) -> None:
    """Entry point of the fresh process (interpreter off): run the job, write the result as JSON."""
    with open(job_path) as f:
        job = json.load(f)
    archs = job["archs"]
    if "traced" in job:
        workloads = [Workload(**w) if isinstance(w, dict) else w for w in job["traced"]]
        result = {"reports": [r.to_dict() for r in check_traced(workloads, archs)]}
    elif "modules" in job:
        result = {"modules": [check_module(m, archs, job["sample"], aligned_ints=job["aligned_ints"]).to_dict()
                              for m in job["modules"]]}
    else:
        reports = []
        for item in job["specs"]:
            try:
                spec = _spec_from_job(item)
            except Exception as exc:
                reports += [Report(name=item["name"], arch=a, problems=[f"cannot load the kernel: {_short(exc)}"])
                            for a in archs]
                continue
            reports += [_compile_here(spec, a, job["module"], job["aligned_ints"]) for a in archs]
        result = {"reports": [r.to_dict() for r in reports]}
    with open(out_path, "w") as f:
        json.dump(result, f)


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------

_FLOAT_BYTES = {"fp64": 8, "fp32": 4, "tf32": 4, "fp16": 2, "bf16": 2}


def tile_pressure(spec) -> float:
    """A rough measure of the data each thread holds: the product of the integer constexprs above 1 (the
    block sizes), times the widest floating-point element among the pointer arguments, per warp."""
    size = 1
    for value in spec.constexprs.values():
        if isinstance(value, int) and not isinstance(value, bool) and value > 1:
            size *= value
    width = max([_FLOAT_BYTES.get(t.lstrip("*"), 0) for t in spec.signature.values() if t.startswith("*")] or [4])
    return size * (width or 4) / max(1, int(spec.num_warps))


def _is_16bit(spec) -> bool:
    return any(t in ("*fp16", "*bf16") for t in spec.signature.values())


def representative(specs: Sequence) -> list:
    """A few configurations standing for all of them, for quick runs (the CPU test suite): per kernel
    function and set of architectures it is launched on (`archs`: a tile only sm_90 launches is not what
    sm_80's largest is), the one with the largest `tile_pressure` among those with fp16/bf16 data (the
    training dtypes; among all when there are none), where registers and shared memory run out first, and
    the one with the smallest `tile_pressure` (where tl.dot's minimum sizes bite); plus every spec marked
    `always_check` (settings measured on a GPU and recorded, which few tests launch, and variants no MAE
    shape launches). The order of `specs` is kept; the command line checks every configuration unless told
    `--sample`."""
    groups: dict[tuple, list] = {}
    for spec in specs:
        fn = _python_function(spec.fn)
        key = (getattr(fn, "__module__", ""), getattr(fn, "__qualname__", repr(fn)),
               tuple(sorted(int(a) for a in (getattr(spec, "archs", None) or ()))))
        groups.setdefault(key, []).append(spec)
    chosen = {id(s) for s in specs if getattr(s, "always_check", False)}
    for members in groups.values():
        half = [s for s in members if _is_16bit(s)] or members
        chosen.add(id(max(half, key=tile_pressure)))
        chosen.add(id(min(members, key=tile_pressure)))
    return [s for s in specs if id(s) in chosen]


def spec_archs(spec, archs: Iterable[int]) -> list[int]:
    """The architectures among `archs` that a spec is launched on (its `archs`; all when it names none)."""
    own = getattr(spec, "archs", None)
    return [int(a) for a in archs if not own or int(a) in {int(x) for x in own}]


def check_specs(specs: Sequence, archs: Iterable[int] = ARCHS, module: str = "",
                progress: Callable[[Report], None] | None = None, aligned_ints: bool = False) -> list[Report]:
    """Compile each spec for each architecture it is launched on (`spec_archs`): a configuration that a
    launcher picks only on sm_90 is not compiled for sm_80. Specs are grouped by their architectures."""
    archs = [int(a) for a in archs]
    groups: dict[tuple[int, ...], list] = {}
    for spec in specs:
        groups.setdefault(tuple(spec_archs(spec, archs)), []).append(spec)
    out: list[Report] = []
    for group_archs, group in groups.items():
        if group_archs:
            out += _check_specs_on(group, group_archs, module, progress, aligned_ints)
    return out


def _check_specs_on(specs: Sequence, archs: Iterable[int] = ARCHS, module: str = "",
                    progress: Callable[[Report], None] | None = None, aligned_ints: bool = False) -> list[Report]:
    """Compile each spec for each architecture (spec-major order). Runs in a fresh process, all specs at
    once, when the interpreter is on here (`progress`, called with each report as it is done, is then
    called only at the end). `aligned_ints` compiles every integer argument as divisible by 16 (the
    specialisation a launch gets when all sizes and strides are multiples of 16) instead of only those in
    the spec's `divisible_by_16`."""
    archs = [int(a) for a in archs]
    if not interpreter_active():
        out = []
        for s in specs:
            for a in archs:
                out.append(_compile_here(s, a, module, aligned_ints))
                if progress:
                    progress(out[-1])
        return out
    jobs, reports = [], {}
    for i, spec in enumerate(specs):
        try:
            jobs.append((i, _spec_to_job(spec)))
        except Exception as exc:
            reports[i] = [Report(name=spec.name, arch=a, module=module, problems=[f"cannot check: {_short(exc)}"])
                          for a in archs]
    if jobs:
        job = {"archs": archs, "module": module, "aligned_ints": aligned_ints, "specs": [j for _, j in jobs]}
        try:
            out = [Report.from_dict(d) for d in _run_worker(job)["reports"]]
        except Exception as exc:  # the worker died (a crash inside the compiler, a timeout): say so per spec
            out = [Report(name=j["name"], arch=a, module=module, problems=[f"compile worker failed: {_short(exc)}"])
                   for _, j in jobs for a in archs]
        for k, (i, _) in enumerate(jobs):
            reports[i] = out[k * len(archs):(k + 1) * len(archs)]
    result = [r for i in range(len(specs)) for r in reports[i]]
    for r in result if progress else ():
        progress(r)
    return result


def _module_missing(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is None
    except ModuleNotFoundError:  # a parent package is missing
        return True


def check_module(name: str, archs: Iterable[int] = ARCHS, sample: bool = False,
                 progress: Callable[[Report], None] | None = None, aligned_ints: bool = False) -> ModuleResult:
    """Import a kernel module, take its `compile_specs()` (only `representative(...)` of them with
    `sample`), compile each for each architecture."""
    archs = [int(a) for a in archs]
    if _module_missing(name):
        return ModuleResult(name, "missing", f"no module named {name}")
    if interpreter_active():
        return check_modules([name], archs, sample, progress, aligned_ints)[0]
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name and name.startswith(exc.name):
            return ModuleResult(name, "missing", f"no module named {name}")
        return ModuleResult(name, "error", f"import failed: {_short(exc)}")
    except Exception as exc:
        return ModuleResult(name, "error", f"import failed: {_short(exc)}")
    if not callable(getattr(module, "compile_specs", None)):
        return ModuleResult(name, "no compile_specs", "the module defines no compile_specs() function")
    try:
        specs = list(module.compile_specs())
    except Exception as exc:
        return ModuleResult(name, "error", f"compile_specs() raised {_short(exc)}")
    if not specs:
        return ModuleResult(name, "error", "compile_specs() returned no configurations")
    names = [s.name for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if sample:
        specs = representative(specs)
    result = ModuleResult(name, "checked", reports=check_specs(specs, archs, name, progress, aligned_ints))
    if dupes:
        result.status, result.message = "error", f"duplicate spec names {dupes}"
    return result


def check_modules(names: Iterable[str] = KERNEL_MODULES, archs: Iterable[int] = ARCHS, sample: bool = False,
                  progress: Callable[[Report], None] | None = None, aligned_ints: bool = False) -> list[ModuleResult]:
    """`check_module` for several modules (one worker process for all of them when the interpreter is on)."""
    names, archs = list(names), [int(a) for a in archs]
    if interpreter_active():
        job = {"archs": archs, "modules": names, "sample": sample, "aligned_ints": aligned_ints}
        try:
            results = [ModuleResult.from_dict(d) for d in _run_worker(job)["modules"]]
        except Exception as exc:  # the worker died (a crash inside the compiler, a timeout): say so per module
            return [ModuleResult(n, "error", f"compile worker failed: {_short(exc)}") for n in names]
        for r in [r for res in results for r in res.reports] if progress else ():
            progress(r)
        return results
    return [check_module(n, archs, sample, progress, aligned_ints) for n in names]


# --------------------------------------------------------------------------------------------------
# Launches recorded at MAE's shapes: the exact specialisations a GPU run compiles
# --------------------------------------------------------------------------------------------------
#
# `compile_specs()` lists block settings by rule and compiles them with the worst-case integer
# specialisation (no argument known to be a multiple of 16 or equal to 1). A real launch is specialised on
# its arguments: integers divisible by 16 get `tt.divisibility` (vector loads), integers equal to 1 (a unit
# stride) become constants, misaligned pointers lose their alignment, and options not passed take Triton's
# defaults (num_stages=3). Those binaries are what a GPU run compiles, so this part records the launches a
# training step makes, at MAE's shapes and without running anything, and compiles each as Triton would:
#
# - `record_launches(capability)`: while active, `JITFunction.run` appends (kernel, args, kwargs) to a list
#   instead of launching; the launchers and the registry's triton backend accept CPU tensors and choose their
#   settings for that GPU capability (tuned tables included). The interpreter must be off.
# - `launch_spec(launch, arch)`: the CompileSpec of one recorded launch, each runtime argument specialised by
#   Triton's own `native_specialize_impl` with the target's backend (what `JITFunction.run` calls).
# - `Workload`: one training step (forward, loss, backward) of an MAE preset on the triton backend, built on
#   the meta device and materialised on the CPU with one encoder and one decoder block (depth changes no
#   launch), its dtype as autocast; the outputs of recorded launches are left uninitialised, which no later
#   launch's specialisation depends on.
# - `trace(workloads, arch)` / `check_traced(workloads, archs)`: the distinct launches and their reports.


@dataclass
class Launch:
    fn: Any  # the JITFunction
    args: tuple
    kwargs: dict
    grid: Any = None


@contextlib.contextmanager
def record_launches(capability: tuple[int, int] = (9, 0)):
    """Record every `@triton.jit` launch made inside (as `Launch` items of the yielded list) instead of running
    it; CPU tensors are accepted and settings are chosen for GPU compute capability `capability`."""
    if interpreter_active():
        raise RuntimeError("record_launches needs the Triton interpreter off in this process "
                           "(check_traced runs it in a fresh process when the interpreter is on)")
    from triton.runtime.jit import JITFunction
    from fastmae.kernels import utils

    calls: list[Launch] = []
    original = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        calls.append(Launch(self, args, dict(kwargs), grid))

    JITFunction.run = run
    utils._RECORDING["capability"] = tuple(capability)
    try:
        yield calls
    finally:
        JITFunction.run = original
        utils._RECORDING.clear()


class TargetDriver:
    """A stand-in for Triton's active driver that names a target GPU and nothing else: enough for
    `JITFunction.warmup` and `JITFunction.run(..., warmup=True)` to specialise and compile for that GPU without
    one (nothing is loaded or launched in warm-up): `fastmae.bench.warm` compiles the benchmarks' kernels so."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def is_active(self):
        return True


@functools.lru_cache(maxsize=None)
def _target_backend(arch: int):
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    return make_backend(GPUTarget("cuda", arch, 32))


def _option_defaults() -> dict[str, int]:
    from triton.backends.nvidia.compiler import CUDAOptions
    fields = CUDAOptions.__dataclass_fields__
    return {"num_warps": fields["num_warps"].default, "num_stages": fields["num_stages"].default}


def _short_value(value) -> str:
    return str(int(value)) if isinstance(value, bool) else str(value)


def launch_spec(launch: Launch, arch: int = 90):
    """The CompileSpec of a recorded launch, specialised as Triton's launcher specialises it for `arch`."""
    from triton._C.libtriton import native_specialize_impl
    from fastmae.kernels.utils import FP_FUSION, CompileSpec

    fn = launch.fn
    names = list(fn.arg_names)
    options = {k: v for k, v in launch.kwargs.items() if k not in names}
    unknown = sorted(set(options) - {"num_warps", "num_stages", "enable_fp_fusion"})
    if unknown:
        raise ValueError(f"launch of {fn.__name__} passes options {unknown} that the compile check does not model")
    if options.get("enable_fp_fusion", FP_FUSION) != FP_FUSION:
        raise ValueError(f"launch of {fn.__name__} passes enable_fp_fusion={options['enable_fp_fusion']}; the compile "
                         f"check compiles with {FP_FUSION} (kernels.utils.FP_FUSION)")
    options = {**_option_defaults(), **options}
    bound = inspect.signature(_python_function(fn)).bind(
        *launch.args, **{k: v for k, v in launch.kwargs.items() if k in names})
    bound.apply_defaults()
    signature, constexprs, divisible, unaligned = {}, {}, [], []
    for p in fn.params:
        value = bound.arguments[p.name]
        if p.is_constexpr:
            constexprs[p.name] = getattr(value, "value", value)
            continue
        kind, attr = native_specialize_impl(_target_backend(arch), value, bool(getattr(p, "is_const", False)),
                                            not getattr(p, "do_not_specialize", False),
                                            not getattr(p, "do_not_specialize_on_alignment", False))[:2]
        if kind == "constexpr":  # an integer equal to 1, or None
            constexprs[p.name] = attr
        else:
            signature[p.name] = kind
            if kind.startswith("*") and attr != "D":
                unaligned.append(p.name)
            elif not kind.startswith("*") and attr == "D":
                divisible.append(p.name)
    spec = CompileSpec(name="", fn=fn, signature=signature, constexprs=constexprs,
                       num_warps=int(options["num_warps"]), num_stages=int(options["num_stages"]),
                       divisible_by_16=tuple(divisible), unaligned=tuple(unaligned), archs=(int(arch),))
    ones = ",".join(_unit_arguments(spec))
    spec.name = config_key(spec)[:-1] + (f"|{ones}=1" if ones else "") + "]"
    grid = launch.grid(dict(bound.arguments)) if callable(launch.grid) else launch.grid
    if grid is not None:
        grid = tuple(grid) if isinstance(grid, (tuple, list)) else (grid,)
        spec.programs = 1
        for g in grid:
            spec.programs *= int(g)
    return spec


def spec_key(spec) -> tuple:
    """What makes two specs one compiled kernel: the function, its argument types and constants, the integer
    and pointer specialisations, warps and stages."""
    fn = _python_function(spec.fn)
    return (fn.__module__, fn.__qualname__, tuple(spec.signature.items()),
            tuple((k, repr(v)) for k, v in spec.constexprs.items()), spec.divisible_by_16, spec.unaligned,
            spec.num_warps, spec.num_stages)


def python_function(fn):
    """The plain Python function of a `@triton.jit` kernel (or of any wrapper around one)."""
    return _python_function(fn)


def config_key(spec) -> str:
    """A spec's kernel configuration in one string, whatever its integer specialisation: the kernel's name, its
    pointer types in argument order, its block constants (upper-case constexprs), warps and pipeline stages,
    e.g. 'colsum_kernel[fp32,fp32|BLOCK_R=32,BLOCK_D=64|w4s3]'. Traced launches and the modules'
    `compile_specs()` are compared by it."""
    fn = _python_function(spec.fn)
    names = list(getattr(_jit_or_none(spec.fn), "arg_names", None) or inspect.signature(fn).parameters)
    pointers = ",".join(spec.signature[n][1:] for n in names
                        if n in spec.signature and spec.signature[n].startswith("*"))
    consts = ",".join(f"{n}={_short_value(spec.constexprs[n])}" for n in names
                      if n in spec.constexprs and n.isupper())
    return f"{fn.__name__.lstrip('_')}[{pointers}|{consts}|w{spec.num_warps}s{spec.num_stages}]"


def _jit_or_none(fn):
    try:
        return _jit_function(fn)
    except TypeError:
        return None


def _unit_arguments(spec) -> list[str]:
    """The runtime arguments a launch turned into the constant 1 (lower-case names among the constexprs)."""
    return [k for k, v in spec.constexprs.items() if not k.isupper() and v == 1]


def specialization(spec) -> str:
    """The integer and pointer specialisations of a spec in words (integers equal to 1 are constants)."""
    ones = _unit_arguments(spec)
    parts = [f"multiples of 16: {', '.join(spec.divisible_by_16) or 'none'}"]
    if ones:
        parts.append(f"equal to 1: {', '.join(ones)}")
    parts.append(f"unaligned pointers: {', '.join(spec.unaligned) or 'none'}")
    return "; ".join(parts)


_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


@dataclass(frozen=True)
class Workload:
    """One training step of `model` on the triton backend: batch, autocast dtype ('fp32': none), mask ratio and
    the loss options. A string 'module:function' instead names a function (no arguments) to run as is."""

    model: str = "mae_vit_base_patch16"
    dtype: str = "bf16"
    batch: int = 16
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True
    pred_masked_only: bool = False
    grad: bool = True  # False: the forward alone, under torch.no_grad (as an inference or encoder benchmark)

    @property
    def label(self) -> str:
        name = self.model.replace("mae_vit_", "").replace("_patch", "/")
        return (f"{name} {self.dtype} b{self.batch} r{self.mask_ratio:g}" + (" norm_pix" if self.norm_pix_loss else "")
                + (" masked_only" if self.pred_masked_only else "") + ("" if self.grad else " no_grad"))

    def run(self) -> None:
        import torch
        from fastmae.model import create_model

        if self.dtype not in _DTYPES:
            raise ValueError(f"workload dtype must be one of {', '.join(_DTYPES)}, got {self.dtype!r}")
        with torch.device("meta"):
            model = create_model(self.model, norm_pix_loss=self.norm_pix_loss, pred_masked_only=self.pred_masked_only,
                                 backend="triton")
        del model.blocks[1:]
        del model.decoder_blocks[1:]
        model = model.to_empty(device="cpu")
        model.initialize_weights()
        side = model.patch_embed.img_size[0]
        gen = torch.Generator().manual_seed(0)
        imgs = torch.randn(self.batch, model.in_chans, side, side, generator=gen)
        noise = torch.rand(self.batch, model.num_patches, generator=gen)
        dtype = getattr(torch, _DTYPES[self.dtype])
        with _uncomputed_matmuls():
            with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32), \
                    torch.set_grad_enabled(self.grad):
                loss = model(imgs, self.mask_ratio, noise=noise)[0]
            if self.grad:
                loss.backward()


def _uncomputed_matmuls():
    """A dispatch mode under which matrix products return uninitialised results of their shape and dtype: a
    workload's launches are recorded, not run, so no value it computes means anything, and a CPU without bf16
    arithmetic took about 90 s per ViT-B step on the products alone (every argument Triton sees is the same)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten
    shapes = {aten.mm.default: lambda a, b: (a.shape[0], b.shape[1]),
              aten.addmm.default: lambda c, a, b, **_: (a.shape[0], b.shape[1]),
              aten.bmm.default: lambda a, b: (a.shape[0], a.shape[1], b.shape[2]),
              aten.baddbmm.default: lambda c, a, b, **_: (a.shape[0], a.shape[1], b.shape[2])}

    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            shape = shapes.get(func)
            if shape is None:
                return func(*args, **kwargs)
            a = args[-2]
            return torch.empty(shape(*args, **kwargs), dtype=a.dtype, device=a.device)

    return Mode()



def _run_workload(workload) -> None:
    if isinstance(workload, Workload):
        workload.run()
        return
    module, _, qualname = str(workload).partition(":")
    obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    obj()


def _workload_label(workload) -> str:
    return workload.label if isinstance(workload, Workload) else str(workload)


def recorded_specs(run: Callable[[], Any], arch: int = 90) -> list[tuple[tuple, Any, Launch]]:
    """(spec_key, CompileSpec, Launch) of each launch `run()` makes, in order, recorded (not run) and specialised
    for a GPU of compute capability arch/10; [] when it launches no Triton kernel."""
    with record_launches((arch // 10, arch % 10)) as calls:
        run()
    out = []
    for call in calls:
        spec = launch_spec(call, arch)
        out.append((spec_key(spec), spec, call))
    return out


def trace(workloads: Sequence, arch: int = 90) -> list:
    """The distinct launches the workloads make on a GPU of compute capability arch/10, as CompileSpecs (first
    seen first), each with `sources`: the labels of the workloads that launch it."""
    specs: dict[tuple, Any] = {}
    for workload in workloads:
        launches = recorded_specs(lambda: _run_workload(workload), arch)
        if not launches:
            raise RuntimeError(f"workload {_workload_label(workload)!r} launched no Triton kernel")
        for key, spec, _ in launches:
            if key not in specs:
                spec.sources = []
                specs[key] = spec
            label = _workload_label(workload)
            if label not in specs[key].sources:
                specs[key].sources.append(label)
    out = list(specs.values())
    seen: dict[str, int] = {}
    for spec in out:  # launches that differ only in their specialisation get numbered names
        seen[spec.name] = seen.get(spec.name, 0) + 1
        if seen[spec.name] > 1:
            spec.name += f" #{seen[spec.name]}"
    return out


def check_traced(workloads: Sequence = (), archs: Iterable[int] = ARCHS,
                 progress: Callable[[Report], None] | None = None) -> list[Report]:
    """Record the workloads' launches for each architecture (`trace`) and compile each distinct one for it; a
    workload that fails gives a report with the error. Runs in a fresh process when the interpreter is on."""
    workloads = list(workloads) or list(DEFAULT_WORKLOADS)
    archs = [int(a) for a in archs]
    if interpreter_active():
        job = {"archs": archs, "traced": [asdict(w) if isinstance(w, Workload) else str(w) for w in workloads]}
        try:
            reports = [Report.from_dict(d) for d in _run_worker(job)["reports"]]
        except Exception as exc:
            return [Report(name="traced launches", arch=a, module="traced",
                           problems=[f"compile worker failed: {_short(exc)}"]) for a in archs]
        for r in reports if progress else ():
            progress(r)
        return reports
    out: list[Report] = []
    for arch in archs:
        try:
            specs = trace(workloads, arch)
        except Exception as exc:
            out.append(Report(name="traced launches", arch=arch, module="traced",
                              problems=[f"recording the launches failed: {_short(exc)}"]))
            continue
        for spec in specs:
            report = _compile_here(spec, arch, "traced")
            report.sources = list(spec.sources)
            report.config = config_key(spec)
            report.specialized = specialization(spec)
            out.append(report)
            if progress:
                progress(report)
    return out


# Every preset at bf16 (the training dtype), fp16 and fp32, with norm_pix_loss; the base model also without
# it and with the masked-only decoder head. Batch 16: every batch-derived size is then a multiple of 16, as at
# the benchmark batches (64 to 512), so the specialisations are theirs.
DEFAULT_WORKLOADS = tuple(
    [Workload(m, dt) for m in ("mae_vit_base_patch16", "mae_vit_large_patch16", "mae_vit_huge_patch14")
     for dt in ("bf16", "fp16", "fp32")]
    + [Workload("mae_vit_base_patch16", "bf16", norm_pix_loss=False),
       Workload("mae_vit_base_patch16", "bf16", pred_masked_only=True)])


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------

def _kib(n: int) -> str:
    return f"{n / 1024:.1f}K" if n >= 1024 else str(n)


def _grid(r: Report) -> str:
    if not r.programs:
        return "-"
    return f"{r.programs} ({r.waves:g})" if r.blocks_per_sm else f"{r.programs} (-)"


def _access(r: Report) -> str:
    if not (r.load_bytes or r.store_bytes):
        return "-"
    return f"{','.join(map(str, r.load_bytes)) or '-'}/{','.join(map(str, r.store_bytes)) or '-'}"


def format_table(results: Sequence[ModuleResult]) -> str:
    header = ("kernel config", "arch", "warps", "stages", "regs", "spill B", "smem", "mma", "ld/st B",
              "grid (waves)", "compile s", "status")
    rows = []
    for res in results:
        if res.status != "checked" and not res.reports:
            rows.append((res.module, "-", "-", "-", "-", "-", "-", "-", "-", "-", "-", res.status.upper()))
        for r in res.reports:
            rows.append((r.name, f"sm_{r.arch}", str(r.num_warps), str(r.num_stages),
                         "-" if r.registers is None else str(r.registers), str(r.spill_bytes), _kib(r.shared_bytes),
                         r.mma or "-", _access(r), _grid(r), f"{r.compile_seconds:.2f}", "ok" if r.ok else "FAIL"))
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    problems = [p for res in results for p in res.problems]
    if problems:
        lines += ["", f"{len(problems)} problem(s):"] + ["  - " + p.replace("\n", "\n    ") for p in problems]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastmae.kernels.compile_check",
                                     description="Compile every kernel configuration for NVIDIA GPUs (no GPU "
                                                 "needed) and check registers, spills and shared memory.")
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), choices=sorted(LIMITS),
                        help="compute capabilities to compile for")
    parser.add_argument("--module", action="append", default=None, metavar="NAME",
                        help="kernel module, e.g. attention or fastmae.kernels.attention (repeatable; default all)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    parser.add_argument("--sample", action="store_true",
                        help="only the representative configurations of each kernel (what the CPU tests compile)")
    parser.add_argument("--aligned-ints", action="store_true",
                        help="compile every integer argument as divisible by 16 (all sizes and strides multiples "
                             "of 16) instead of only the spec's divisible_by_16")
    parser.add_argument("--traced", action="store_true",
                        help="instead of the modules' configurations, compile the launches a training step makes "
                             "(every MAE preset in bf16, fp16 and fp32, recorded at their shapes without running "
                             "anything) exactly as Triton specialises them on a GPU")
    parser.add_argument("--batch", type=int, default=16, help="batch of the traced training steps (default 16)")
    parser.add_argument("-v", "--verbose", action="store_true", help="print each configuration as it is done")
    args = parser.parse_args(argv)
    if args.batch < 1:
        parser.error("--batch must be at least 1")
    if args.traced and (args.module or args.sample or args.aligned_ints):
        parser.error("--traced compiles the recorded launches; it takes no --module, --sample or --aligned-ints")
    modules = [m if "." in m else f"fastmae.kernels.{m}" for m in (args.module or KERNEL_MODULES)]
    start = time.perf_counter()

    def progress(r: Report) -> None:
        print(f"[{time.perf_counter() - start:7.1f}s] {r.name} sm_{r.arch}: {r.registers} registers, "
              f"{r.spill_bytes} spill bytes, {r.shared_bytes} shared bytes, {r.compile_seconds:.2f} s"
              + ("" if r.ok else " FAIL"), flush=True)

    if args.traced:
        workloads = [Workload(**{**asdict(w), "batch": args.batch}) for w in DEFAULT_WORKLOADS]
        reports = check_traced(workloads, args.arch, progress=progress if args.verbose else None)
        results = [ModuleResult("traced launches", "checked", reports=reports)]
    else:
        results = check_modules(modules, args.arch, sample=args.sample,
                                progress=progress if args.verbose else None, aligned_ints=args.aligned_ints)
    import triton
    print(f"triton {triton.__version__}; targets {', '.join(LIMITS[a].gpu for a in args.arch)}; "
          f"{time.perf_counter() - start:.1f} s")
    print(format_table(results))
    if args.json:  # whole or not at all: made in full, written aside, then renamed
        text = json.dumps({"triton": triton.__version__, "archs": args.arch,
                           "modules": [r.to_dict() for r in results]}, indent=1)
        try:
            with open(args.json + ".part", "w") as f:
                f.write(text)
            os.replace(args.json + ".part", args.json)
        finally:
            if os.path.exists(args.json + ".part"):
                os.remove(args.json + ".part")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
