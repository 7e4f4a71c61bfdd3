"""Two processes with ``torch.distributed`` (gloo on CPU, NCCL on GPUs), started by torchrun::

    torchrun --standalone --nproc_per_node 2 examples/ddp_torchrun.py --epochs 3

Each rank trains on its half of every batch; K-BFGS averages its statistics over the ranks and
spreads the inversions, so the run follows one process with the whole batch.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from _data import batches, final_loss, mlp, parser, teacher_data

import secondorder as so


def main(argv: list[str] | None = None) -> float:
    args = parser(__doc__, list(so.METHODS), "kbfgs").parse_args(argv)

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    torch.set_num_threads(1)

    x, y = teacher_data(args.examples)
    model = mlp().to(device)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    loss_fn = torch.nn.CrossEntropyLoss()
    opt = (
        so.make_optimizer(args.method, ddp, lr=0.05, damping=0.3)
        if "kbfgs" in args.method
        else (so.make_optimizer(args.method, ddp))
    )
    half = args.batch // world
    for epoch in range(args.epochs):
        total, count = 0.0, 0
        for xb, yb in batches(x, y, args.batch):
            mine = slice(rank * half, (rank + 1) * half)
            loss = opt.step(so.Closure(ddp, xb[mine].to(device), yb[mine].to(device), loss_fn))
            total, count = total + float(loss), count + 1
        if rank == 0:
            print(f"epoch {epoch}: mean loss on rank 0 {total / count:.4f}")
    final = final_loss(model, loss_fn, x.to(device), y.to(device))
    if rank == 0:
        print(f"final loss {final:.4f} ({world} ranks)")
    dist.destroy_process_group()
    return final


if __name__ == "__main__":
    main()
