"""`fastmae pretrain`: the official MAE pretraining script's command line, on the fast model.

The flags of the official `main_pretrain.py` keep their names and defaults, so an official command works
after replacing `python main_pretrain.py` with `fastmae pretrain` (under torchrun the same way). Added:
`--backend`, `--precision`, `--adamw`, `--compile`, `--lean_blocks`, `--cuda_graph`, `--max_steps`, `--save_every`,
`--builtin_size`, `--verify_images`, `--allow-pickle`, `--no_progress`, and `--data_path builtin` (the default),
the built-in labelled dataset that needs no download.

Differences from the official script, on purpose:
  * the crop, flip and masking noise of sample i in epoch e are drawn from a generator seeded by
    (seed, e, i) in the data pipeline, not from the global RNG: runs are reproducible across worker and
    process counts and resume exactly;
  * `--device` defaults to cuda when available, else cpu; `--precision` defaults to bf16 on GPUs that
    support it (fp16 with a gradient scaler on older GPUs) and fp32 on CPUs;
  * the model is built for `--input_size` (official factories always build 224);
  * `checkpoint-last.pth` is written every epoch (atomically) besides `checkpoint-{epoch}.pth` every
    `--save_every` epochs and at the end; `--resume auto` picks it up;
  * AdamW runs torch's fused kernel where it has one (`--adamw auto`; `--adamw default` constructs it as the
    official script does): the same update up to rounding, one pass over the parameters instead of several.
"""
from __future__ import annotations

import argparse
import datetime
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .optim import ADAMW_IMPLS

HELP = "pretrain an MAE (the official main_pretrain.py flags; built-in dataset by default)"
DESCRIPTION = (HELP + ". Under torchrun it trains data-parallel (NCCL on GPUs, gloo on CPUs). "
               "Writes checkpoint-{epoch}.pth, checkpoint-last.pth, log.txt (JSON lines), train_steps.jsonl "
               "and loss_curve.png to --output_dir.")


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..cli import seed, user_path
    from ..model import MODELS
    g = p.add_argument_group("official flags (main_pretrain.py)")
    g.add_argument("--batch_size", default=64, type=int,
                   help="batch size per process (effective batch = batch_size * accum_iter * world size)")
    g.add_argument("--epochs", default=400, type=int, help="epochs to train")
    g.add_argument("--accum_iter", default=1, type=int,
                   help="gradient accumulation iterations (larger effective batch in the same memory)")
    g.add_argument("--model", default="mae_vit_large_patch16", type=str, metavar="MODEL",
                   help=f"model name: {', '.join(MODELS)}")
    g.add_argument("--input_size", default=224, type=int, help="image side in pixels")
    g.add_argument("--mask_ratio", default=0.75, type=float, help="fraction of patches removed")
    g.add_argument("--norm_pix_loss", action="store_true",
                   help="use per-patch normalised pixels as the reconstruction target")
    g.add_argument("--weight_decay", type=float, default=0.05, help="AdamW weight decay")
    g.add_argument("--lr", type=float, default=None, metavar="LR",
                   help="absolute learning rate; None means blr * effective batch / 256")
    g.add_argument("--blr", type=float, default=1e-3, metavar="LR",
                   help="base learning rate: lr = blr * effective batch / 256")
    g.add_argument("--min_lr", type=float, default=0.0, metavar="LR", help="final lr of the cosine schedule")
    g.add_argument("--warmup_epochs", type=int, default=40, metavar="N", help="epochs of linear lr warmup")
    g.add_argument("--data_path", default="builtin", type=user_path,
                   help="image folder (class subfolders or flat; a 'train' subfolder is used if present), "
                        "or 'builtin' for the built-in procedurally drawn dataset")
    g.add_argument("--output_dir", default="./output_dir", type=user_path,
                   help="where to save checkpoints and logs; '' saves nothing")
    g.add_argument("--log_dir", default="./output_dir", type=user_path,
                   help="TensorBoard folder (if tensorboard is installed)")
    g.add_argument("--device", default=_default_device(), help="cuda or cpu; cuda when available")
    g.add_argument("--seed", default=0, type=seed, help="random seed (rank r uses seed + r for its global RNGs)")
    g.add_argument("--resume", default="", type=user_path,
                   help="checkpoint to resume from, a folder (its latest checkpoint), or 'auto' for the latest in "
                        "--output_dir")
    g.add_argument("--start_epoch", default=0, type=int, metavar="N",
                   help="first epoch, less than --epochs (overridden by --resume)")
    g.add_argument("--num_workers", default=10, type=int, help="DataLoader worker processes")
    g.add_argument("--pin_mem", action="store_true", default=True,
                   help="pin CPU memory in the DataLoader for faster transfer to the GPU")
    # the default is --pin_mem's alone: the help shows it there only
    g.add_argument("--no_pin_mem", action="store_false", dest="pin_mem", default=argparse.SUPPRESS,
                   help="do not pin CPU memory")
    g.add_argument("--world_size", default=1, type=int,
                   help="number of processes; kept for the official command lines, the launcher's environment "
                        "(torchrun's WORLD_SIZE) decides")
    g.add_argument("--local_rank", "--local-rank", default=-1, type=int,
                   help="set by torch.distributed.launch; torchrun sets LOCAL_RANK instead")
    g.add_argument("--dist_on_itp", action="store_true", help="read ranks from OpenMPI variables (ITP clusters)")
    g.add_argument("--dist_url", default="env://", help="url used to set up distributed training")

    f = p.add_argument_group("fastmae flags")
    f.add_argument("--backend", default=None,
                   help="op backend: auto, reference, sdpa, xformers, triton, or op=name,op=name; "
                        "None: automatic, or FASTMAE_BACKEND")
    f.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="auto: bf16 on GPUs that support it, else fp16 (with a gradient scaler) on GPUs, "
                        "fp32 on CPUs")
    f.add_argument("--compile", action="store_true", help="torch.compile the model")
    f.add_argument("--adamw", default="auto", choices=ADAMW_IMPLS,
                   help="AdamW implementation: auto = fused where torch has the kernel for the device (CUDA, CPU), "
                        "else foreach; default = torch's own choice, as the official script (foreach on CUDA). "
                        "Same update up to rounding; a resumed run keeps this choice")
    f.add_argument("--lean_blocks", action="store_true",
                   help="recompute every block's LayerNorms and GELU in the backward: about a third less "
                        "activation memory (a larger --batch_size fits) for a few extra elementwise passes")
    f.add_argument("--cuda_graph", action="store_true",
                   help="capture the whole training step (forward, loss, backward, AdamW) in a CUDA graph once and "
                        "replay it every iteration: the host issues one launch instead of thousands, for steps "
                        "the host bounds (with --accum_iter K: the micro-step replayed on every batch, the "
                        "optimizer's step after every K-th; across processes, the gradients averaged by one "
                        "all-reduce before it; with --compile, the compiled model's step). CUDA; fp16 with "
                        "--adamw auto or fused; the lr schedule is read from the GPU at every replay")
    f.add_argument("--max_steps", default=0, type=int,
                   help="stop after this many optimizer steps in total (0: no limit); saves checkpoint-last.pth")
    f.add_argument("--save_every", default=20, type=int,
                   help="write checkpoint-{epoch}.pth every N epochs (and after the last one)")
    f.add_argument("--builtin_size", default=5000, type=int, help="images in the built-in dataset")
    f.add_argument("--verify_images", action="store_true",
                   help="open every image header before training and drop unreadable files "
                        "(unreadable files are skipped with a warning either way)")
    f.add_argument("--allow-pickle", dest="allow_pickle", action="store_true",
                   help="allow resuming from trusted checkpoints that hold Python objects "
                        "(official checkpoints store argparse.Namespace)")
    f.add_argument("--overwrite", action="store_true",
                   help="start afresh in an --output_dir that holds an earlier run's checkpoints, deleting them and "
                        "its logs (without it, such a folder is refused unless --resume is given)")
    f.add_argument("--no_progress", action="store_true", help="no progress bars")


def parse_backend(raw: str | None):
    """'sdpa' -> 'sdpa'; 'attention=triton,gather_tokens=sdpa' -> a mapping; None/'' -> None. Checked, with
    FASTMAE_BACKEND: a ValueError naming --backend (or the variable) and what is wrong."""
    from ..cli import check_backend
    return check_backend(raw)


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> bf16 on GPUs that support it, fp16 on other GPUs, fp32 on CPUs; other values unchanged."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        # bf16 in hardware from sm_80 (Ampere) on; `torch.cuda.is_bf16_supported()` also counts the emulated
        # bf16 of older GPUs, which is slower than fp16 there, and asks about the current device, not `device`
        return "bf16" if torch.cuda.get_device_capability(device)[0] >= 8 else "fp16"
    return "fp32"


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2 ** 32)
    random.seed(seed)


@dataclass
class PretrainResult:
    """What `train(args)` did: losses of this run's iterations (mean over ranks), optimizer steps in
    total, the epoch it ended in, whether max_steps stopped it, and the files it wrote."""

    losses: list = field(default_factory=list)
    step: int = 0
    epoch: int = -1
    stopped_early: bool = False
    checkpoints: list = field(default_factory=list)
    seconds: float = 0.0


def _check_args(args) -> None:
    """The checks that need no data, model or output: every flag's value on its own."""
    from ..cli import check_device
    from ..model import MODELS
    if args.model not in MODELS:
        raise ValueError(f"unknown --model {args.model!r}; choose one of {', '.join(MODELS)}")
    for name in ("batch_size", "epochs", "accum_iter", "input_size", "save_every"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if not 0.0 < args.mask_ratio < 1.0:
        raise ValueError(f"--mask_ratio must be in (0, 1), got {args.mask_ratio}")
    for name in ("max_steps", "num_workers", "warmup_epochs", "start_epoch"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name} must not be negative, got {getattr(args, name)}")
    if args.start_epoch >= args.epochs:
        raise ValueError(f"--start_epoch {args.start_epoch} is not before --epochs {args.epochs}: there would be "
                         "nothing to train")
    if args.builtin_size < 1:
        raise ValueError(f"--builtin_size must be at least 1, got {args.builtin_size}")
    for name in ("lr", "blr"):
        if getattr(args, name) is not None and not getattr(args, name) > 0:
            raise ValueError(f"--{name} must be positive, got {getattr(args, name)}")
    for name in ("min_lr", "weight_decay"):
        if not getattr(args, name) >= 0:
            raise ValueError(f"--{name} must not be negative, got {getattr(args, name)}")
    check_device(args.device)
    parse_backend(args.backend)


def train(args) -> PretrainResult:
    """Run pretraining as `fastmae pretrain` does (args: the parsed namespace). Raises on bad arguments,
    bad data and a non-finite loss."""
    from .. import create_model
    from ..cli import check_mask_ratio
    from . import checkpoint as ckpt_io
    from .data import PretrainDataset, open_dataset, pretrain_loader
    from .distributed import broadcast_state, cleanup, end_of_epoch, init_distributed
    from .engine import PRECISIONS, EpochSums, RunState, Schedule, make_scaler, train_one_epoch
    from .graphed import GraphOnFirstBatch
    from .logs import RunLogger, plot_loss_curve
    from .optim import absolute_lr, adamw_impl, build_optimizer

    _check_args(args)
    resume_path = _resume_path(args.resume, args.output_dir)
    info = init_distributed(args.device, args.dist_url, args.dist_on_itp, args.local_rank)
    try:
        device = torch.device(args.device)
        if device.type == "cuda":
            device = torch.device("cuda", info.local_rank if info.distributed else (device.index or 0))
            torch.cuda.set_device(device)  # --device cuda:1: streams, events and launches default to that GPU
        args.world_size, args.rank = info.world_size, info.rank
        args.distributed = info.distributed
        precision = resolve_precision(args.precision, device)
        if args.cuda_graph:
            _check_cuda_graph(device, precision)
        say = (lambda msg: print(msg, flush=True)) if info.is_main else (lambda msg: None)
        if args.output_dir and info.is_main:
            for stale in ckpt_io.remove_stale_temp_files(args.output_dir):
                say(f"removed {stale}, left by a run stopped while it wrote a checkpoint")

        # the model is initialised from `seed` on every rank (DDP would broadcast rank 0's anyway)
        seed_everything(args.seed)
        model = create_model(args.model, norm_pix_loss=args.norm_pix_loss, img_size=args.input_size,
                             backend=parse_backend(args.backend), lean_blocks=args.lean_blocks)
        check_mask_ratio(args.mask_ratio, model.num_patches)
        model.to(device)
        _check_backends_serve(model, device, precision, args.mask_ratio, args.batch_size)
        seed_everything(args.seed + info.rank)

        base = open_dataset(args.data_path, input_size=args.input_size, builtin_size=args.builtin_size,
                            seed=args.seed, verify=args.verify_images,
                            progress=info.is_main and not args.no_progress)
        dataset = PretrainDataset(base, args.input_size, model.num_patches, seed=args.seed)
        num_workers = min(args.num_workers, os.cpu_count() or 1)
        loader, sampler = pretrain_loader(dataset, args.batch_size, world_size=info.world_size, rank=info.rank,
                                          seed=args.seed, num_workers=num_workers,
                                          pin_memory=args.pin_mem and device.type == "cuda")
        iters_per_epoch = len(sampler.sampler) // args.batch_size
        if iters_per_epoch < args.accum_iter:
            raise ValueError(f"--accum_iter {args.accum_iter} is more than the {iters_per_epoch} iterations of an "
                             f"epoch ({len(sampler.sampler)} images per process, batch {args.batch_size}): no "
                             "optimizer step would ever be taken; lower --accum_iter or --batch_size")
        if iters_per_epoch % args.accum_iter:
            say(f"warning: {iters_per_epoch} iterations per epoch are not a multiple of --accum_iter "
                f"{args.accum_iter}: the last {iters_per_epoch % args.accum_iter} of each epoch are computed and "
                "their gradients dropped, as in the official script")

        eff_batch = args.batch_size * args.accum_iter * info.world_size
        args.lr = absolute_lr(args.lr, args.blr, args.batch_size, args.accum_iter, info.world_size)
        say(f"data: {base}")
        say(f"model: {args.model} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters), "
            f"input {args.input_size}, mask ratio {args.mask_ratio}, norm_pix_loss {args.norm_pix_loss}")
        say(f"device {device}, precision {precision}, processes {info.world_size}, backend "
            f"{args.backend or 'auto'}")
        say(f"base lr: {args.lr * 256 / eff_batch:.2e}  actual lr: {args.lr:.2e}  accumulate grad iterations: "
            f"{args.accum_iter}  effective batch size: {eff_batch}  iterations per epoch: {iters_per_epoch}")

        model_without_ddp = model
        optimizer = build_optimizer(model_without_ddp, args.lr, args.weight_decay, impl=args.adamw,
                                    capturable=args.cuda_graph)
        say(f"optimizer: AdamW, {adamw_impl(optimizer)} implementation"
            + (" (capturable: its step is replayed from a CUDA graph)" if args.cuda_graph else ""))
        if args.cuda_graph:  # what needs the optimizer (fp16: a fused one), before any work
            _check_cuda_graph(device, precision, optimizer)
        scaler = make_scaler(device, precision)

        start_epoch, skip_iters, step = args.start_epoch, 0, 0
        sums = None  # the resumed epoch's log sums so far (a checkpoint written in its middle keeps them)
        if args.resume == "auto" and resume_path is None:
            say(f"--resume auto: no checkpoint in {args.output_dir!r} yet, starting from scratch")
        if resume_path is not None:
            where = ckpt_io.load_for_resume(resume_path, model_without_ddp, optimizer, scaler,
                                            allow_pickle=args.allow_pickle, iters_per_epoch=iters_per_epoch,
                                            accum_iter=args.accum_iter, restore_rng=info.is_main,
                                            layout={k: getattr(args, k) for k in ("batch_size", "world_size",
                                                                                  "accum_iter")},
                                            model_name=args.model)
            if where["start_epoch"] is None:
                say(f"loaded the weights of {resume_path} (no {where['missing']} in it): training from "
                    f"epoch {start_epoch} with a fresh optimizer")
            else:
                start_epoch, skip_iters, step = where["start_epoch"], where["skip_iters"], where["step"]
                sums = EpochSums.from_checkpoint(where["epoch_sums"]) if skip_iters else None
                say(f"resumed from {resume_path}: epoch {start_epoch}, iteration {skip_iters}, step {step}")

        if args.max_steps and step >= args.max_steps:
            say(f"--max_steps {args.max_steps} already reached (step {step}); nothing to train")
            return PretrainResult(step=step, epoch=start_epoch - 1, stopped_early=True)

        graph = None
        if args.cuda_graph:  # of the model itself, compiled with --compile (it compiles in the graph's warm-up)
            graph = GraphOnFirstBatch(torch.compile(model) if args.compile else model, optimizer, args.mask_ratio,
                                      PRECISIONS[precision] or torch.float32, device, accum_iter=args.accum_iter,
                                      scaler=scaler)
            if args.accum_iter == 1 and not info.distributed:
                say("CUDA graph: the whole step captured at the first batch, replayed every iteration")
            else:
                every = "every iteration" if args.accum_iter == 1 else f"every {args.accum_iter} iterations"
                say(f"CUDA graphs: the micro-step replayed every iteration, the update {every}"
                    + (f", the gradients averaged over the {info.world_size} processes by one all-reduce before it"
                       if info.distributed else ""))
        if info.distributed and graph is None:
            ids = [info.local_rank] if device.type == "cuda" else None
            model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
        elif info.distributed:  # the graph replays the model itself and averages its gradients over the ranks
            broadcast_state(model)
        train_model = torch.compile(model) if args.compile and graph is None else model

        sched = Schedule(lr=args.lr, min_lr=args.min_lr, warmup_epochs=args.warmup_epochs, epochs=args.epochs,
                         accum_iter=args.accum_iter, mask_ratio=args.mask_ratio, iters_per_epoch=iters_per_epoch,
                         max_steps=args.max_steps)
        state = RunState(step=step)
        result = PretrainResult(step=step, epoch=start_epoch - 1)
        writes = bool(args.output_dir) and info.is_main
        # the newest good state on disk, named if the loss turns non-finite: the resumed one, then this run's
        last_good = str(resume_path) if resume_path is not None else None
        total_iters = (args.epochs - start_epoch) * iters_per_epoch - skip_iters
        if args.max_steps:  # the iterations left until the step limit (the progress bar's time estimate)
            total_iters = min(total_iters, (args.max_steps - step) * args.accum_iter)
        if writes and resume_path is None and getattr(args, "overwrite", False):
            for old in ckpt_io.remove_checkpoints(args.output_dir):
                say(f"--overwrite: removed {old}")
        # a run that continues no checkpoint starts its logs afresh (a resumed one appends to them)
        logger = RunLogger(args.output_dir if writes else None, args.log_dir if info.is_main else None,
                           enabled=info.is_main, progress=not args.no_progress, total_iters=total_iters,
                           fresh=resume_path is None)
        say(f"start training for {args.epochs} epochs from epoch {start_epoch}")
        start = time.time()
        try:
            for epoch in range(start_epoch, args.epochs):
                if args.max_steps and state.step >= args.max_steps:
                    break
                sampler.set_epoch(epoch, skip=skip_iters * args.batch_size)
                logger.start_epoch(epoch, iters_per_epoch, skip_iters)
                # a resumed epoch's log line averages the whole epoch: over the sums its checkpoint carried, or
                # (a checkpoint without them) over this run's iterations, from `from_iter`
                from_iter = skip_iters if skip_iters and sums is None else 0
                sums = sums or EpochSums()
                stats, next_iter = train_one_epoch(train_model, loader, optimizer, scaler, device, epoch, sched,
                                                   state, precision=precision, dist_info=info, logger=logger,
                                                   skip_iters=skip_iters, last_checkpoint=last_good, graph=graph,
                                                   sums=sums)
                skip_iters = 0
                complete = next_iter >= iters_per_epoch
                result.epoch = epoch
                write_error = None
                if writes:
                    try:
                        c = ckpt_io.make_checkpoint(model_without_ddp, optimizer, scaler, epoch=epoch,
                                                    step=state.step, args=args, next_iter=0 if complete else next_iter,
                                                    epoch_sums=None if from_iter else asdict(sums))
                        numbered = complete and (epoch % args.save_every == 0 or epoch + 1 == args.epochs)
                        result.checkpoints += [str(x) for x in ckpt_io.save(c, args.output_dir, numbered=numbered)]
                        del c
                    except Exception as exc:  # non-finite weights, a full disk: raised below, on every rank
                        write_error = exc
                # every rank meets here; a failed write stops them all (not rank 0 alone, the others left waiting)
                end_of_epoch(info, device, write_error, "to write the checkpoint")
                if args.output_dir:  # every rank names it: rank 0 wrote it (each rank reports a non-finite loss)
                    last_good = str(Path(args.output_dir) / ckpt_io.LAST)
                log = {**{f"train_{k}": v for k, v in stats.items()}, "epoch": epoch, "step": state.step}
                if not complete:
                    log["partial"] = True
                if from_iter:
                    log["from_iter"] = from_iter
                sums = None
                logger.end_epoch(log)
                if not complete:
                    result.stopped_early = True
                    say(f"stopped at --max_steps {args.max_steps} (epoch {epoch}, iteration {next_iter})")
                    break
        finally:
            logger.close()
            result.losses, result.step = state.losses, state.step
            result.seconds = time.time() - start
        if args.max_steps and state.step >= args.max_steps:
            result.stopped_early = True
        say(f"training time {datetime.timedelta(seconds=int(result.seconds))}, {state.step} optimizer steps")
        if writes:
            curve = plot_loss_curve(args.output_dir)
            if curve is not None:
                say(f"loss curve: {curve}")
        return result
    finally:
        cleanup(info)


def _check_backends_serve(model, device: torch.device, precision: str, mask_ratio: float, batch_size: int) -> None:
    """One forward of blank images with gradients on, as training runs it (autocast at `precision`), so that a
    backend asked for (`--backend`, FASTMAE_BACKEND) that cannot serve this device, dtype or model raises its
    BackendUnavailable now, before the dataset is opened, not at the first training step. Batch on CUDA: 16 when
    the training batch is a multiple of 16, else the training batch, so that the Triton kernels it compiles are
    the ones training launches (Triton specialises integer arguments by their divisibility by 16); elsewhere 1
    (nothing is compiled, and a CPU pays for every image: ViT-L at 16 took 8 s on 2 cores)."""
    from .engine import PRECISIONS, autocast
    side = model.patch_embed.img_size[0]
    n = 1 if device.type != "cuda" else batch_size if batch_size % 16 else 16
    imgs = torch.zeros(n, model.in_chans, side, side, device=device)
    noise = torch.arange(model.num_patches, device=device, dtype=torch.float32).expand(n, -1)  # nothing drawn
    with autocast(device, PRECISIONS[precision]):
        model(imgs, mask_ratio, noise=noise)


def _check_cuda_graph(device: torch.device, precision: str, optimizer: torch.optim.Optimizer | None = None) -> None:
    """--cuda_graph's needs that depend on the device, the resolved precision and (once built) the optimizer."""
    from .engine import PRECISIONS
    from .graphed import graph_step_reason
    why = graph_step_reason(device, optimizer, PRECISIONS[precision] or torch.float32)
    if why:
        raise ValueError(f"--cuda_graph: {why}")


def _resume_path(resume: str, output_dir: str) -> Path | None:
    """`--resume`: '' (none), 'auto' (the latest in output_dir, or none yet), a checkpoint file, or a folder
    (its latest checkpoint, as 'auto' finds it)."""
    from . import checkpoint as ckpt_io
    if resume and resume != "auto" and Path(resume).expanduser().is_dir():
        latest = ckpt_io.find_latest(Path(resume).expanduser())
        if latest is None:
            raise FileNotFoundError(f"--resume {resume}: that folder holds no checkpoint (checkpoint-last.pth or "
                                    "checkpoint-N.pth)")
        return latest
    return ckpt_io.resolve_resume(resume, output_dir)


def _check_outputs(args) -> None:
    """--output_dir (and --log_dir, where TensorBoard would write) must be folders this process can write to:
    refused before any work, not at the first write after training has started."""
    from importlib.util import find_spec

    from ..cli import check_output_dir
    from .checkpoint import find_latest
    if args.output_dir:
        check_output_dir(args.output_dir, "--output_dir")
        latest = find_latest(args.output_dir)
        if latest is not None and not args.resume and not getattr(args, "overwrite", False):
            raise ValueError(f"--output_dir {args.output_dir} holds an earlier run's checkpoints ({latest.name}): "
                             "continue it with --resume auto, start afresh there with --overwrite (deletes its "
                             "checkpoints and logs), or choose another --output_dir")
    if args.log_dir and find_spec("tensorboard") is not None:
        check_output_dir(args.log_dir, "--log_dir")


def run(args) -> int:
    from ..cli import discarding_new_dirs, error_message, sigterm_as_exit
    from .data import DataError
    from .engine import NonFiniteLossError
    from .graphed import GraphCaptureError
    from .checkpoint import NonFiniteStateError
    from .distributed import PeerFailedError
    from ..model.checkpoint import CheckpointError

    # under torchrun (or mpirun with --dist_on_itp) only rank 0 writes to --output_dir: the others neither probe
    # it nor remove it
    rank = os.environ.get("RANK") or (os.environ.get("OMPI_COMM_WORLD_RANK") if args.dist_on_itp else None)
    main_rank = int(rank or 0) == 0

    def body() -> int:
        try:
            _check_args(args)
            if main_rank:
                _check_outputs(args)
            train(args)
        except (NonFiniteLossError, NonFiniteStateError, GraphCaptureError, PeerFailedError) as exc:
            print(f"fastmae pretrain: {exc}", file=sys.stderr)
            return 1
        except (DataError, CheckpointError, FileNotFoundError, ValueError) as exc:
            print(f"fastmae pretrain: error: {error_message(exc)}", file=sys.stderr)
            return 2
        return 0

    # an error leaves no empty --output_dir (or --log_dir) behind
    with sigterm_as_exit("fastmae pretrain: terminated (SIGTERM); the checkpoints written so far are whole "
                         "(--resume auto continues from the latest)"):
        if not main_rank:
            return body()
        return discarding_new_dirs(args.log_dir, lambda: discarding_new_dirs(args.output_dir, body))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser("fastmae pretrain", description=DESCRIPTION,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
