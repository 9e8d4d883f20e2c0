"""Independent reference implementations (written from the papers' definitions, sorting in full) that the
engine's output is checked against. Deliberately naive: clarity over speed."""

from __future__ import annotations

import torch


def top_k_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    k = max(1, int(density * delta.numel())) if density > 0 else 0
    order = torch.argsort(delta.abs().reshape(-1), descending=True)
    mask = torch.zeros(delta.numel())
    mask[order[:k]] = 1
    return mask.reshape(delta.shape)


def crumbs_mask(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    n = delta.numel()
    target, top = int(density * n), int(gamma * n)
    bottom = max(0, n - target - top)
    order = torch.argsort(delta.abs().reshape(-1))
    mask = torch.zeros(n)
    mask[order[bottom:bottom + target]] = 1
    return mask.reshape(delta.shape)


def task_vectors(base, models, weights, masks=None, consensus=False, normalize=False, lam=1.0):
    deltas = [(m - base) * (masks[i] if masks else 1) * weights[i] for i, m in enumerate(models)]
    stacked = torch.stack(deltas)
    if consensus:
        sign = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)
        agree = (torch.sign(stacked) == sign).float()
        mixed = (stacked * agree).sum(0)
        divisor = (torch.tensor(weights).reshape(-1, *[1] * base.dim()) * agree).sum(0)
        divisor[divisor == 0] = 1
    else:
        mixed = stacked.sum(0)
        divisor = sum(weights)
    if normalize:
        mixed = mixed / divisor
    return base + lam * mixed


def slerp(t, a, b):
    a64, b64 = a.double().reshape(-1), b.double().reshape(-1)
    cos = torch.dot(a64 / a64.norm(), b64 / b64.norm()).clamp(-1, 1)
    if cos.abs() > 0.9995:
        return ((1 - t) * a64 + t * b64).reshape(a.shape).float()
    theta = torch.acos(cos)
    out = (torch.sin((1 - t) * theta) * a64 + torch.sin(t * theta) * b64) / torch.sin(theta)
    return out.reshape(a.shape).float()
