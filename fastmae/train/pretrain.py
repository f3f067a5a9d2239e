"""`fastmae pretrain`: the official MAE pretraining script's command line, on the fast model.

The flags of the official `main_pretrain.py` keep their names and defaults, so an official command works
after replacing `python main_pretrain.py` with `fastmae pretrain` (under torchrun the same way). Added:
`--backend`, `--precision`, `--adamw`, `--compile`, `--lean_blocks`, `--max_steps`, `--save_every`,
`--builtin_size`, `--verify_images`, `--allow-pickle`, `--no_progress`, and `--data_path builtin` (the default), the built-in labelled dataset
that needs no download.

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
from dataclasses import dataclass, field
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
    g.add_argument("--data_path", default="builtin", type=str,
                   help="image folder (class subfolders or flat; a 'train' subfolder is used if present), "
                        "or 'builtin' for the built-in procedurally drawn dataset")
    g.add_argument("--output_dir", default="./output_dir", help="where to save checkpoints and logs; '' saves nothing")
    g.add_argument("--log_dir", default="./output_dir", help="TensorBoard folder (if tensorboard is installed)")
    g.add_argument("--device", default=_default_device(), help="cuda or cpu; cuda when available")
    g.add_argument("--seed", default=0, type=int, help="random seed (rank r uses seed + r for its global RNGs)")
    g.add_argument("--resume", default="",
                   help="checkpoint to resume from, or 'auto' for the latest in --output_dir")
    g.add_argument("--start_epoch", default=0, type=int, metavar="N",
                   help="first epoch (overridden by --resume)")
    g.add_argument("--num_workers", default=10, type=int, help="DataLoader worker processes")
    g.add_argument("--pin_mem", action="store_true",
                   help="pin CPU memory in the DataLoader for faster transfer to the GPU")
    g.add_argument("--no_pin_mem", action="store_false", dest="pin_mem", help="do not pin CPU memory")
    p.set_defaults(pin_mem=True)
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
    f.add_argument("--no_progress", action="store_true", help="no progress bar")


def parse_backend(raw: str | None):
    """'sdpa' -> 'sdpa'; 'attention=triton,gather_tokens=sdpa' -> dict; None/'' -> None."""
    if not raw:
        return None
    if "=" not in raw:
        return raw.strip()
    spec = {}
    for part in raw.split(","):
        op, _, name = part.partition("=")
        spec[op.strip()] = name.strip()
    return spec


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
    from ..model import MODELS
    if args.model not in MODELS:
        raise ValueError(f"unknown --model {args.model!r}; choose one of {', '.join(MODELS)}")
    for name in ("batch_size", "epochs", "accum_iter", "input_size", "save_every"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if not 0.0 < args.mask_ratio < 1.0:
        raise ValueError(f"--mask_ratio must be in (0, 1), got {args.mask_ratio}")
    if args.max_steps < 0 or args.num_workers < 0 or args.warmup_epochs < 0:
        raise ValueError("--max_steps, --num_workers and --warmup_epochs must not be negative")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise ValueError(f"--device {args.device!r} is not a device: use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {args.device!r}: fastmae pretrain runs on cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but no CUDA device is available (use --device cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def train(args) -> PretrainResult:
    """Run pretraining as `fastmae pretrain` does (args: the parsed namespace). Raises on bad arguments,
    bad data and a non-finite loss."""
    from .. import create_model
    from . import checkpoint as ckpt_io
    from .data import PretrainDataset, open_dataset, pretrain_loader
    from .distributed import barrier, cleanup, init_distributed
    from .engine import RunState, Schedule, make_scaler, train_one_epoch
    from .logs import RunLogger, plot_loss_curve
    from .optim import absolute_lr, adamw_impl, build_optimizer

    _check_args(args)
    info = init_distributed(args.device, args.dist_url, args.dist_on_itp, args.local_rank)
    try:
        device = torch.device(args.device)
        if device.type == "cuda":
            device = torch.device("cuda", info.local_rank if info.distributed else (device.index or 0))
        args.world_size, args.rank = info.world_size, info.rank
        args.distributed = info.distributed
        precision = resolve_precision(args.precision, device)
        say = (lambda msg: print(msg, flush=True)) if info.is_main else (lambda msg: None)

        # the model is initialised from `seed` on every rank (DDP would broadcast rank 0's anyway)
        seed_everything(args.seed)
        model = create_model(args.model, norm_pix_loss=args.norm_pix_loss, img_size=args.input_size,
                             backend=parse_backend(args.backend), lean_blocks=args.lean_blocks)
        model.to(device)
        seed_everything(args.seed + info.rank)

        base = open_dataset(args.data_path, input_size=args.input_size, builtin_size=args.builtin_size,
                            seed=args.seed, verify=args.verify_images)
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
        optimizer = build_optimizer(model_without_ddp, args.lr, args.weight_decay, impl=args.adamw)
        say(f"optimizer: AdamW, {adamw_impl(optimizer)} implementation")
        scaler = make_scaler(device, precision)

        start_epoch, skip_iters, step = args.start_epoch, 0, 0
        resume_path = ckpt_io.resolve_resume(args.resume, args.output_dir)
        if args.resume == "auto" and resume_path is None:
            say(f"--resume auto: no checkpoint in {args.output_dir!r} yet, starting from scratch")
        if resume_path is not None:
            where = ckpt_io.load_for_resume(resume_path, model_without_ddp, optimizer, scaler,
                                            allow_pickle=args.allow_pickle, iters_per_epoch=iters_per_epoch,
                                            accum_iter=args.accum_iter, restore_rng=info.is_main,
                                            layout={k: getattr(args, k) for k in ("batch_size", "world_size",
                                                                                  "accum_iter")})
            if where["start_epoch"] is None:
                say(f"loaded the weights of {resume_path} (no optimizer state or epoch in it): training from "
                    f"epoch {start_epoch} with a fresh optimizer")
            else:
                start_epoch, skip_iters, step = where["start_epoch"], where["skip_iters"], where["step"]
                say(f"resumed from {resume_path}: epoch {start_epoch}, iteration {skip_iters}, step {step}")

        if info.distributed:
            ids = [info.local_rank] if device.type == "cuda" else None
            model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
        train_model = torch.compile(model) if args.compile else model

        sched = Schedule(lr=args.lr, min_lr=args.min_lr, warmup_epochs=args.warmup_epochs, epochs=args.epochs,
                         accum_iter=args.accum_iter, mask_ratio=args.mask_ratio, iters_per_epoch=iters_per_epoch,
                         max_steps=args.max_steps)
        state = RunState(step=step)
        result = PretrainResult(step=step, epoch=start_epoch - 1)
        writes = bool(args.output_dir) and info.is_main
        total_iters = (args.epochs - start_epoch) * iters_per_epoch - skip_iters
        logger = RunLogger(args.output_dir if writes else None, args.log_dir if info.is_main else None,
                           enabled=info.is_main, progress=not args.no_progress, total_iters=total_iters)
        if args.max_steps and step >= args.max_steps:
            say(f"--max_steps {args.max_steps} already reached (step {step}); nothing to do")
        say(f"start training for {args.epochs} epochs from epoch {start_epoch}")
        start = time.time()
        try:
            for epoch in range(start_epoch, args.epochs):
                if args.max_steps and state.step >= args.max_steps:
                    break
                sampler.set_epoch(epoch, skip=skip_iters * args.batch_size)
                logger.start_epoch(epoch, iters_per_epoch, skip_iters)
                stats, next_iter = train_one_epoch(train_model, loader, optimizer, scaler, device, epoch, sched,
                                                   state, precision=precision, dist_info=info, logger=logger,
                                                   skip_iters=skip_iters)
                skip_iters = 0
                complete = next_iter >= iters_per_epoch
                result.epoch = epoch
                if writes:
                    c = ckpt_io.make_checkpoint(model_without_ddp, optimizer, scaler, epoch=epoch, step=state.step,
                                                args=args, next_iter=0 if complete else next_iter)
                    numbered = complete and (epoch % args.save_every == 0 or epoch + 1 == args.epochs)
                    result.checkpoints += [str(x) for x in ckpt_io.save(c, args.output_dir, numbered=numbered)]
                    del c
                log = {**{f"train_{k}": v for k, v in stats.items()}, "epoch": epoch, "step": state.step}
                if not complete:
                    log["partial"] = True
                logger.end_epoch(log)
                barrier(info)
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


def run(args) -> int:
    from .data import DataError
    from .engine import NonFiniteLossError
    from .checkpoint import NonFiniteStateError
    from ..model.checkpoint import CheckpointError
    try:
        if args.output_dir:
            Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        train(args)
    except (NonFiniteLossError, NonFiniteStateError) as exc:
        print(f"fastmae pretrain: {exc}", file=sys.stderr)
        return 1
    except (DataError, CheckpointError, FileNotFoundError, ValueError) as exc:
        print(f"fastmae pretrain: error: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser("fastmae pretrain", description=DESCRIPTION,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
