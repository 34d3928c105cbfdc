#!/usr/bin/env python3
"""A script of the shape of timm's train.py (pytorch-image-models, timm 1.0), cut down to what a
DC decomposition meets there: its flags, ``timm.create_model(args.model, ...)``,
``create_optimizer_v2(model, **optimizer_kwargs(cfg=args), **args.opt_kwargs)``,
``LabelSmoothingCrossEntropy``, ``NativeScaler`` and the ``train_one_epoch`` update (no closure,
no dcanets call anywhere), on generated CIFAR-shaped data. It never imports dcanets:
``dcanets timm-train`` is what makes the dcanets names known to it.
"""
import argparse
import json
import sys

import torch
from timm.loss import LabelSmoothingCrossEntropy
from timm.models import create_model
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.utils import NativeScaler, ParseKwargs

parser = argparse.ArgumentParser(description="PyTorch ImageNet Training (train.py's shape)")
parser.add_argument("--model", default="resnet50", type=str)
parser.add_argument("--num-classes", type=int, default=10)
parser.add_argument("--model-kwargs", nargs="*", default={}, action=ParseKwargs)
parser.add_argument("-b", "--batch-size", type=int, default=8)
parser.add_argument("--opt", default="sgd", type=str)
parser.add_argument("--momentum", type=float, default=0.9)
parser.add_argument("--weight-decay", type=float, default=2e-5)
parser.add_argument("--opt-kwargs", nargs="*", default={}, action=ParseKwargs)
parser.add_argument("--lr", type=float, default=0.05)
parser.add_argument("--epochs", type=int, default=2)
parser.add_argument("--smoothing", type=float, default=0.1)
parser.add_argument("--drop", type=float, default=0.0)
parser.add_argument("--seed", type=int, default=42)
parser.add_argument("--summary", default="", type=str, help="write the last epoch's metrics here (JSON)")


def train_one_epoch(model, loader, optimizer, loss_fn, loss_scaler):
    model.train()
    losses = []
    for input, target in loader:
        output = model(input)
        loss = loss_fn(output, target)
        loss_scaler(loss, optimizer, clip_grad=None, parameters=model.parameters())
        optimizer.zero_grad()
        losses.append(loss.item())
    return sum(losses) / len(losses)


def main():
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    model = create_model(args.model, pretrained=False, num_classes=args.num_classes, drop_rate=args.drop,
                         drop_path_rate=None, global_pool=None, checkpoint_path=None, **args.model_kwargs)
    optimizer = create_optimizer_v2(model, **optimizer_kwargs(cfg=args), **args.opt_kwargs)
    loss_fn = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    loss_scaler = NativeScaler(device="cpu")
    g = torch.Generator().manual_seed(args.seed)
    loader = [(torch.randn(args.batch_size, 3, 16, 16, generator=g),
               torch.randint(0, args.num_classes, (args.batch_size,), generator=g)) for _ in range(3)]
    weights = [p.detach().clone() for p in model.parameters()]
    for epoch in range(args.epochs):
        loss = train_one_epoch(model, loader, optimizer, loss_fn, loss_scaler)
        print(f"Train: {epoch} loss {loss:.4f}")
    moved = max(float((p.detach() - w).abs().max()) for p, w in zip(model.parameters(), weights))
    if args.summary:
        with open(args.summary, "w") as f:
            json.dump({"loss": loss, "optimizer": type(optimizer).__name__, "moved": moved,
                       "argv0": sys.argv[0]}, f)


if __name__ == "__main__":
    main()
