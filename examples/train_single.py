"""A single-process training loop in the style of insightface's arcface_torch, with a facekernels head:

    python examples/train_single.py [--steps 60] [--head curricularface|arcface] [--accum 2] [--amp]

from the repository root with facekernels installed (or prefix ``PYTHONPATH=.`` to use the checkout). Tiny
random data (identity centres plus noise), a tiny backbone, SGD over backbone and head, gradient clipping,
linear warm-up then polynomial decay of the learning rate, bfloat16 autocast on CPU (``--amp``), gradient
accumulation over ``--accum`` micro-batches (CurricularFace's t updated once per optimizer step, on the first
micro-batch: ``head.frozen_t``), and a checkpoint saved at ``--save-at`` (to ``--checkpoint PATH``; by default
a file under the temporary folder, never the working directory) that ``--resume`` (or ``--resume PATH``)
continues from: the resumed run ends with the same loss, bit for bit, as the uninterrupted one (every batch is
drawn from a generator seeded by its step, and the head's state, t and the optimizer's, scheduler's state are
saved).

The last line printed is ``final loss <float.hex()>``.
"""

import argparse
import contextlib
import os
import tempfile

import torch
from torch import nn

import facekernels as fk

# --save-at writes here unless --checkpoint names a path: the temporary folder, not the working directory
DEFAULT_CHECKPOINT = os.path.join(tempfile.gettempdir(), "facekernels", "train_single_checkpoint.pt")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=60, help="optimizer steps in all")
    p.add_argument("--batch", type=int, default=64, help="rows per micro-batch")
    p.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--in-features", type=int, default=48, help="size of an input 'image'")
    p.add_argument("--embedding", type=int, default=32)
    p.add_argument("--head", choices=["curricularface", "arcface"], default="curricularface",
                   help="CurricularFace.like('curricularface') or ArcFace.like('insightface')")  # fmt: skip
    p.add_argument("--backend", default="auto", help="the head's backend")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=5, help="warm-up steps")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast (CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT,
                   help=f"where --save-at writes and a bare --resume reads (default: {DEFAULT_CHECKPOINT}, under the "
                        "temporary folder, never the working directory)")  # fmt: skip
    p.add_argument("--save-at", type=int, default=0, help="save a checkpoint after this step (0: never)")
    p.add_argument("--stop-at", type=int, default=0, help="stop after this step, as if interrupted (0: never)")
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="PATH",
                   help="continue from the checkpoint at PATH; without PATH, from --checkpoint")  # fmt: skip
    p.add_argument("--print-every", type=int, default=10)
    return p.parse_args(argv)


def batch(step, micro, args, centres):
    """The micro-batch `micro` of `step`: a function of (seed, step, micro) only, so a resumed run sees the same
    data without saving a data loader's state."""
    g = torch.Generator().manual_seed(args.seed * 1_000_003 + step * 1009 + micro)
    labels = torch.randint(0, args.classes, (args.batch,), generator=g)
    images = centres[labels] + 0.8 * torch.randn(args.batch, args.in_features, generator=g)
    return images, labels


def lr_factor(step, args):
    """Linear warm-up to the base rate, then polynomial decay (power 2) to 0 at the last step."""
    if step < args.warmup:
        return (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return (1.0 - progress) ** 2


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    centres = torch.randn(args.classes, args.in_features, generator=torch.Generator().manual_seed(args.seed)) * 2
    backbone = nn.Sequential(nn.Linear(args.in_features, 64), nn.BatchNorm1d(64), nn.PReLU(64),
                             nn.Linear(64, args.embedding), nn.BatchNorm1d(args.embedding))  # fmt: skip
    if args.head == "curricularface":
        head = fk.CurricularFace.like("curricularface", args.embedding, args.classes, backend=args.backend)
    else:  # arcface_torch's CombinedMarginLoss(64, 1.0, 0.5, 0.0): no fallback, straight-through margin gradient
        head = fk.ArcFace.like("insightface", args.embedding, args.classes, backend=args.backend)
    # one optimizer over backbone and head, backbone first (as arcface_torch and CurricularFace order them)
    opt = torch.optim.SGD([{"params": backbone.parameters()}, {"params": head.parameters()}], lr=args.lr,
                          momentum=0.9, weight_decay=5e-4)  # fmt: skip
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, args))

    start = 0
    if args.resume is not None:
        args.resume = args.resume or args.checkpoint
        # the keys of arcface_torch's checkpoint_gpu_{rank}.pt
        ckpt = torch.load(args.resume)
        backbone.load_state_dict(ckpt["state_dict_backbone"])
        head.load_state_dict(ckpt["state_dict_softmax_fc"])  # weight, t and the sampling generator's state
        opt.load_state_dict(ckpt["state_optimizer"])
        sched.load_state_dict(ckpt["state_lr_scheduler"])
        start = ckpt["global_step"]
        print(f"resumed from {args.resume} after step {start}", flush=True)

    backbone.train()
    head.train()
    loss_value = float("nan")
    for step in range(start, args.steps):
        loss_value = 0.0
        for micro in range(args.accum):
            images, labels = batch(step, micro, args, centres)
            # CurricularFace: t moves on the first micro-batch only, so the whole step uses one t
            with head.frozen_t(micro > 0) if isinstance(head, fk.CurricularFace) else contextlib.nullcontext():
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.amp):
                    loss = head(backbone(images), labels) / args.accum
            loss.backward()  # bfloat16 needs no GradScaler (float16 on CUDA would: torch.amp.GradScaler)
            loss_value += loss.item()
        nn.utils.clip_grad_norm_(backbone.parameters(), max_norm=5.0)  # arcface_torch clips the backbone only
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        done = step + 1
        if done == 1 or done % args.print_every == 0 or done == args.steps:
            t = f"  t {head.t.item():.4f}" if isinstance(head, fk.CurricularFace) else ""
            print(f"step {done:4d}  loss {loss_value:.4f}  lr {sched.get_last_lr()[0]:.4f}{t}", flush=True)
        if done == args.save_at:
            os.makedirs(os.path.dirname(os.path.abspath(args.checkpoint)), exist_ok=True)
            tmp = args.checkpoint + ".tmp"
            torch.save({"global_step": done, "state_dict_backbone": backbone.state_dict(),
                        "state_dict_softmax_fc": head.state_dict(), "state_optimizer": opt.state_dict(),
                        "state_lr_scheduler": sched.state_dict()}, tmp)  # fmt: skip
            os.replace(tmp, args.checkpoint)  # a crash while saving leaves the previous checkpoint intact
            print(f"saved {args.checkpoint} after step {done}", flush=True)
        if done == args.stop_at:
            print(f"stopped after step {done}", flush=True)
            break
    print(f"final loss {float(loss_value).hex()}  ({loss_value:.6f})", flush=True)
    return loss_value


if __name__ == "__main__":
    main()
