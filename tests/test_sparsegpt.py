"""SparseGPT's solve: exact sparsity, valid N:M, zeros where pruned, and a better reconstruction
than keeping the same weights without the update or than Wanda."""
from __future__ import annotations

import pytest
import torch

from core.cutting import cut_nm, cut_unstructured
from core.patterns import Pattern
from core.saliency import wanda
from core.sparsegpt import sparsegpt_prune

D_OUT = 64


def correlated_inputs(n_tokens: int, d_in: int, seed: int = 0) -> torch.Tensor:
    """Tokens whose features are strongly correlated and of very different scales."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n_tokens, d_in, generator=g)
    mix = torch.eye(d_in) + torch.randn(d_in, d_in, generator=g) / d_in ** 0.5
    scales = torch.exp(torch.randn(d_in, generator=g))
    return (z @ mix) * scales


def problem(d_in: int = 256, seed: int = 0):
    x = correlated_inputs(2048, d_in, seed)
    w = torch.randn(D_OUT, d_in, generator=torch.Generator().manual_seed(seed + 100))
    return w, x, x.t() @ x


def recon_error(x: torch.Tensor, w: torch.Tensor, w_new: torch.Tensor) -> float:
    return (x.double() @ (w.double() - w_new.double()).t()).norm().item()


@pytest.mark.parametrize("d_in, sparsity, pruned_per_block", [
    (256, 0.5, [4096, 4096]),          # 64 x 128 = 8192 per block
    (256, 0.3, [2457, 2457]),          # floor(0.3 * 8192)
    (200, 0.5, [4096, 2304]),          # second block is 72 columns wide: 64 x 72 = 4608
    (200, 0.7, [5734, 3225]),          # floor(0.7 * 8192), floor(0.7 * 4608)
])
def test_unstructured_exact_sparsity_per_block(d_in, sparsity, pruned_per_block):
    w, x, xtx = problem(d_in)
    w_new, keep = sparsegpt_prune(w, xtx, x.shape[0], sparsity)
    assert keep.shape == w.shape and keep.dtype == torch.bool
    blocks = [keep[:, i:i + 128] for i in range(0, d_in, 128)]
    assert [int((~b).sum()) for b in blocks] == pruned_per_block
    assert bool((w_new[~keep] == 0).all())
    assert bool((w_new[keep] != 0).all())


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8)])
def test_nm_valid_groups(n, m):
    w, x, xtx = problem()
    w_new, keep = sparsegpt_prune(w, xtx, x.shape[0], 0.0, Pattern(n, m))
    assert (keep.view(D_OUT, -1, m).sum(dim=2) == n).all()
    assert bool((w_new[~keep] == 0).all())
    assert 1 - keep.float().mean().item() == pytest.approx(1 - n / m)


@pytest.mark.parametrize("pattern, sparsity", [(Pattern(), 0.5), (Pattern(), 0.7), (Pattern(2, 4), 0.5)])
def test_reconstruction_beats_no_update_and_wanda(pattern, sparsity):
    w, x, xtx = problem()
    w_new, keep = sparsegpt_prune(w, xtx, x.shape[0], sparsity, pattern)
    err_sparsegpt = recon_error(x, w, w_new)
    err_same_mask = recon_error(x, w, w * keep)  # the same mask, without the OBS update
    scores = wanda(w, (x * x).mean(0))
    wanda_keep = cut_nm(scores, 2, 4) if pattern.is_nm else cut_unstructured(scores, sparsity, "row")
    assert 1 - wanda_keep.float().mean().item() == pytest.approx(1 - keep.float().mean().item(), abs=1e-3)
    err_wanda = recon_error(x, w, w * wanda_keep)
    assert err_sparsegpt < 0.95 * err_same_mask, (err_sparsegpt, err_same_mask)
    assert err_sparsegpt < 0.95 * err_wanda, (err_sparsegpt, err_wanda)


def test_dead_inputs_and_dtype():
    w, x, _ = problem(128)
    x[:, 5] = 0  # an input that is never active
    w_new, keep = sparsegpt_prune(w.to(torch.bfloat16), x.t() @ x, x.shape[0], 0.5)
    assert w_new.dtype == torch.bfloat16
    assert torch.isfinite(w_new.float()).all()
    assert bool((w_new[:, 5] == 0).all())
    assert int((~keep).sum()) == 64 * 128 // 2


def test_input_weight_untouched():
    w, x, xtx = problem(128)
    w0, xtx0 = w.clone(), xtx.clone()
    sparsegpt_prune(w, xtx, x.shape[0], 0.5)
    assert torch.equal(w, w0) and torch.equal(xtx, xtx0)


def test_zero_sparsity_changes_nothing():
    w, x, xtx = problem(128)
    w_new, keep = sparsegpt_prune(w, xtx, x.shape[0], 0.0)
    assert keep.all()
    assert torch.allclose(w_new, w, atol=1e-4)


def test_transposed_weight_view():
    """GPT-2's canonical weight is a transposed (non-contiguous) view; the result must not depend on it."""
    w, x, xtx = problem(128)
    stored = w.t().contiguous()  # how Conv1D stores it: (d_in, d_out)
    view = stored.t()
    assert not view.is_contiguous()
    w_view, keep_view = sparsegpt_prune(view, xtx, x.shape[0], 0.5)
    w_plain, keep_plain = sparsegpt_prune(w, xtx, x.shape[0], 0.5)
    assert torch.equal(keep_view, keep_plain)
    torch.testing.assert_close(w_view, w_plain)
    w_nm, keep_nm = sparsegpt_prune(view, xtx, x.shape[0], 0.0, Pattern(2, 4))
    assert (keep_nm.view(D_OUT, -1, 4).sum(dim=2) == 2).all()


def test_sparsegpt_scores_are_made_on_the_statistics_device():
    """The heatmap's SparseGPT scores stay on the device of their statistics: tensors on 'meta'
    stand in for a GPU here, where an identity made on the CPU fails as it would on CUDA."""
    from types import SimpleNamespace

    from core.methods import get_method

    method = get_method("sparsegpt")
    stats = SimpleNamespace(xtx=torch.empty(16, 16, device="meta"), n_tokens=10)
    scores = method.score(torch.empty(8, 16, device="meta"), stats, method.resolve_params({}))
    assert scores.device.type == "meta" and scores.shape == (8, 16)
