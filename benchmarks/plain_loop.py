"""The reference zar is measured against: a plain PyTorch training loop with nothing around it.

torchvision's resnet34, AdamW with PyTorch's defaults, fp32, batch 32, the embedded digits at
32 px held in memory (prepared as zar prepares them), an evaluation pass per epoch, no tracking,
no checkpoint. This is what a researcher writes first; zar must beat it end to end.

    python benchmarks/plain_loop.py --epochs 3
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
import torchvision
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def digits(image_size: int) -> tuple[TensorDataset, TensorDataset]:
    d = load_digits()
    x = torch.from_numpy(d.images).float().unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)
    y = torch.as_tensor(d.target)
    train_idx, val_idx = train_test_split(range(len(y)), test_size=0.2, stratify=d.target, random_state=42)
    x = (x - x[train_idx].mean()) / x[train_idx].std()
    return TensorDataset(x[train_idx], y[train_idx]), TensorDataset(x[val_idx], y[val_idx])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--depth", type=int, choices=(18, 34), default=34)
    args = parser.parse_args()

    torch.manual_seed(42)
    train_set, val_set = digits(args.image_size)
    model = getattr(torchvision.models, f"resnet{args.depth}")(num_classes=10)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    criterion = nn.CrossEntropyLoss()
    train_loader = DataLoader(train_set, batch_size=32, shuffle=True)
    val_loader = DataLoader(val_set, batch_size=32)
    for epoch in range(1, args.epochs + 1):
        start = time.perf_counter()
        model.train()
        for x, y in train_loader:
            loss = criterion(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        correct = 0
        with torch.no_grad():
            for x, y in val_loader:
                correct += (model(x).argmax(1) == y).sum().item()
        print(f"epoch {epoch} val_acc {correct / len(val_set):.4f} ({time.perf_counter() - start:.1f}s)", flush=True)


if __name__ == "__main__":
    main()
