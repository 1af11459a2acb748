"""Quickstart: SCL FT of a timm ResNet on scikit-learn's bundled digits, offline, on CPU.

The backbone here is randomly initialised (no hub weights offline); the recipe
`recipes/finetune.py` uses a self-pretrained backbone instead.
"""

import time

import timm
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import ncfinetune

torch.manual_seed(0)
digits = load_digits()
x = torch.tensor(digits.images, dtype=torch.float32).div(16).unsqueeze(1)
x = F.interpolate(x, size=32, mode="bilinear").expand(-1, 3, -1, -1).contiguous()
y = torch.tensor(digits.target)
tr, te = train_test_split(range(len(y)), test_size=0.2, stratify=digits.target, random_state=0)

model = timm.create_model("resnet18", pretrained=False, num_classes=10)
tuned = ncfinetune.scl_wrap(model, block=4)
print(tuned.describe())
opt = ncfinetune.build_optimizer(tuned, lr=0.05)
start = time.time()
for epoch in range(3):
    tuned.train()
    perm = torch.tensor(tr)[torch.randperm(len(tr))]
    for i in range(0, len(perm), 64):
        idx = perm[i : i + 64]
        loss = F.cross_entropy(tuned(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    tuned.eval()
    with torch.no_grad():
        acc = (tuned(x[te]).argmax(1) == y[te]).float().mean().item()
    print(f"epoch {epoch + 1}: loss {loss.item():.3f}  test accuracy {acc:.3f}")
print(f"done in {time.time() - start:.1f}s")
