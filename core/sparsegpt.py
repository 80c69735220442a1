"""SparseGPT's OBS solve with lazy batched updates (Frantar & Alistarh, 2023), as a pure function."""
from __future__ import annotations

import torch

from .hessian import damped, dead_inputs, layer_hessian
from .patterns import Pattern


def sparsegpt_prune(weight: torch.Tensor, xtx: torch.Tensor, n_tokens: int, sparsity: float,
                    pattern: Pattern = Pattern(), blocksize: int = 128, percdamp: float = 0.01
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (updated weight, keep mask) for one (d_out, d_in) weight and its input X^T X.

    H = 2/n X^T X, dampened by percdamp * mean(diag H); inputs never active are zeroed. Columns
    are walked in blocks; the mask of each block is chosen by w^2 / [H^-1]_jj^2 (per group of M
    for N:M) and each pruned column's error is spread over the later columns.
    """
    # contiguous: GPT-2's canonical view is a transpose, and the flat index below needs a plain layout
    W = weight.detach().float().clone(memory_format=torch.contiguous_format)
    d_out, d_in = W.shape
    H = layer_hessian(xtx, n_tokens)
    W[:, dead_inputs(H)] = 0
    H = damped(H, percdamp)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()
    keep = torch.ones_like(W, dtype=torch.bool)
    prune_n = (pattern.m - pattern.n) if pattern.is_nm else 0
    for i1 in range(0, d_in, blocksize):
        i2 = min(i1 + blocksize, d_in)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        diag = torch.diag(Hinv1)
        if prune_n:
            pruned = torch.zeros_like(W1, dtype=torch.bool)
        else:
            tmp = W1 ** 2 / diag.unsqueeze(0) ** 2
            k = int(tmp.numel() * sparsity)
            pruned = torch.zeros_like(W1, dtype=torch.bool)
            if k:
                pruned.view(-1)[tmp.flatten().topk(k, largest=False).indices] = True
        for i in range(i2 - i1):
            if prune_n and i % pattern.m == 0:
                tmp = W1[:, i:i + pattern.m] ** 2 / diag[i:i + pattern.m].unsqueeze(0) ** 2
                pruned.scatter_(1, i + tmp.topk(prune_n, dim=1, largest=False).indices, True)
            w = W1[:, i]
            q = w.clone()
            q[pruned[:, i]] = 0
            Q1[:, i] = q
            err = (w - q) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        keep[:, i1:i2] = ~pruned
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W.to(weight.dtype), keep
