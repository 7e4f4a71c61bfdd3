"""A Lightning-style loop: the trainer calls ``optimizer.step(closure)`` with a plain closure.

PyTorch Lightning's automatic optimisation (and many trainers) build the closure themselves
(zero the gradients, forward, loss, backward, return the loss) and hand it to
``optimizer.step``. Every secondorder method takes such a closure when built with ``loss_fn=``,
the loss module the closure calls; K-BFGS re-evaluates the batch at the new parameters from it::

    python examples/closure_loop.py --method kbfgs --epochs 3
"""

from __future__ import annotations

import torch
from _data import batches, final_loss, mlp, parser, teacher_data

import secondorder as so


class TinyTrainer:
    """The part of a trainer that matters here: it owns the closure."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss_fn: torch.nn.Module):
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn

    def training_step(self, xb: torch.Tensor, yb: torch.Tensor) -> float:
        def closure() -> torch.Tensor:
            self.optimizer.zero_grad()
            loss = self.loss_fn(self.model(xb), yb)
            loss.backward()
            return loss

        return float(self.optimizer.step(closure))


def main(argv: list[str] | None = None) -> float:
    args = parser(__doc__, list(so.METHODS), "kbfgs").parse_args(argv)

    x, y = teacher_data(args.examples)
    model = mlp()
    loss_fn = torch.nn.CrossEntropyLoss()
    hp = {"lr": 0.05, "damping": 0.3} if args.method in ("kbfgs", "kbfgsl", "kfac", "kfac-ef") else {}
    trainer = TinyTrainer(model, so.make_optimizer(args.method, model, loss_fn=loss_fn, **hp), loss_fn)
    for epoch in range(args.epochs):
        losses = [trainer.training_step(xb, yb) for xb, yb in batches(x, y, args.batch)]
        print(f"epoch {epoch}: mean loss {sum(losses) / len(losses):.4f}")
    final = final_loss(model, loss_fn, x, y)
    print(f"final loss {final:.4f}")
    return final


if __name__ == "__main__":
    main()
