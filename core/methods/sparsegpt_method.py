from ..sparsegpt import sparsegpt_prune
from . import register
from .base import Method, Param
from ..hessian import damped, layer_hessian


@register
class SparseGPT(Method):
    name = "sparsegpt"
    title = "SparseGPT"
    description = ("Second-order pruning with weight updates (Frantar & Alistarh, 2023): OBS on the layer's "
                   "input Hessian, columns in blocks of 128, pruned weights' error spread over the rest. "
                   "Updates the kept weights; a new sparsity re-solves from the stored Hessians.")
    params = (
        Param("blocksize", "int", 128, "columns solved together (lazy batch updates)", 1, 4096),
        Param("percdamp", "float", 0.01, "dampening, as a fraction of mean(diag H)", 0.0, 1.0),
    )
    stats = frozenset({"sum_x2", "xtx"})
    updates_weights = True

    def score(self, weight, stats, params):
        # For drawing only: the OBS saliency w^2 / [H^-1]_jj^2 is what SparseGPT cuts by.
        import torch

        h = damped(layer_hessian(stats.xtx, stats.n_tokens), params["percdamp"])  # as the solve damps
        hinv_diag = torch.diag(torch.cholesky_inverse(torch.linalg.cholesky(h))).float()
        return weight.float() ** 2 / hinv_diag.unsqueeze(0) ** 2

    def solve(self, weight, stats, sparsity, pattern, params):
        return sparsegpt_prune(weight, stats.xtx, stats.n_tokens, sparsity, pattern,
                               params["blocksize"], params["percdamp"])
