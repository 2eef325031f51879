"""Train a toy backbone with a class-sharded ArcFace head on CPU (gloo):

    torchrun --nproc_per_node=2 examples/train_sharded_toy.py [--steps 60] [--sample-rate 0.5]
    ... --save-at 20 --stop-at 20 --checkpoint ck    then    ... --resume ck    (continues bit for bit)

from the repository root with facekernels installed (or prefix ``PYTHONPATH=.`` to use the checkout).

The backbone is replicated with DistributedDataParallel (it averages the backbone's gradients over the
ranks); the head is NOT wrapped in DDP: each rank owns a different slice of the classes, and the gradient
the head returns for the local embeddings is already world_size x d(global mean loss)/d(local embeddings),
so DDP's average is the gradient of the global loss (README, "Class-sharded heads").

Each rank checkpoints its own shard (``ck.rank<r>.pt``): the backbone, the head's state_dict (its weight shard
and, with Partial FC, its sampling generator, so a resumed run draws the same classes), the optimizer and the
data generator; every step's batch then comes out as in an uninterrupted run.
"""

import argparse
import gc
import os

import torch
import torch.distributed as dist
from torch import nn

import facekernels as fk


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--classes", type=int, default=101)
    parser.add_argument("--batch", type=int, default=32, help="per rank")
    parser.add_argument("--sample-rate", type=float, default=1.0, help="< 1: Partial FC sampling")
    parser.add_argument("--checkpoint", default="ck", help="checkpoint prefix: <prefix>.rank<r>.pt")
    parser.add_argument("--save-at", type=int, default=-1, help="save a checkpoint after this step")
    parser.add_argument("--stop-at", type=int, default=-1, help="stop after this step (to resume later)")
    parser.add_argument("--resume", default=None, help="checkpoint prefix to resume from")
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same backbone and class centres on every rank
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    in_features, embed = 32, 16
    centres = torch.randn(args.classes, in_features) * 2

    backbone = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(in_features, 64), nn.ReLU(),
                                                                 nn.Linear(64, embed)))  # fmt: skip
    head = fk.ArcFace(embed, args.classes, s=30.0, m=0.3, backend="cpu", process_group=dist.group.WORLD,
                      sample_rate=args.sample_rate, sample_seed=rank)  # fmt: skip
    print(f"rank {rank}: classes [{head.class_start}, {head.class_start + head.num_local}), weight "
          f"{tuple(head.weight.shape)}", flush=True)  # fmt: skip
    opt = torch.optim.SGD([*backbone.parameters(), *head.parameters()], lr=0.1, momentum=0.9)

    data = torch.Generator().manual_seed(1000 + rank)  # each rank its own batches
    start = 0
    if args.resume:
        state = torch.load(f"{args.resume}.rank{rank}.pt", weights_only=False)
        backbone.load_state_dict(state["backbone"])
        head.load_state_dict(state["head"])  # the weight shard and Partial FC's generator
        opt.load_state_dict(state["optimizer"])
        data.set_state(state["data"])
        start = state["step"] + 1
        if rank == 0:
            print(f"resumed from {args.resume} after step {state['step']}", flush=True)
    for step in range(start, args.steps):
        labels = torch.randint(0, args.classes, (args.batch,), generator=data)
        inputs = centres[labels] + torch.randn(args.batch, in_features, generator=data)
        loss = head(backbone(inputs), labels)  # the loss of the global batch, the same on every rank
        opt.zero_grad()
        loss.backward()
        opt.step()
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            print(f"step {step:3d}  loss {loss.item():.4f}", flush=True)
        if step == args.save_at:
            torch.save(dict(backbone=backbone.state_dict(), head=head.state_dict(), optimizer=opt.state_dict(),
                            data=data.get_state(), step=step), f"{args.checkpoint}.rank{rank}.pt")  # fmt: skip
        if step == args.stop_at:
            if rank == 0:
                print(f"stopped after step {step}", flush=True)
            break
    if rank == 0:
        print(f"final loss {loss.item().hex()}", flush=True)  # exact, for comparing runs
    # every rank done with its collectives before any tears down: a rank leaving while the other was still in
    # gloo's shutdown aborted once under load ("terminate called without an active exception"). The objects
    # that hold the group (DDP's reducer, the head, the graph of the last loss) go first, while the interpreter is
    # whole: gloo's threads may still hold work objects whose release at interpreter exit aborts (SIGABRT, seen
    # twice more under load on 2026-12-05 with the barrier alone)
    del backbone, head, opt, loss
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
