import torch

from ..structured.reconstruct import spap_select
from ..structured.scores import block_unit_counts
from . import register
from .base import Param, StructuredMethod


@register
class SPAP(StructuredMethod):
    name = "spap"
    title = "SPAP (structured, penalty + alternating minimisation)"
    description = ("Structured pruning as a mixed-integer problem (SPAP): for each output projection, minimise "
                   "the output error over the weights and a k-of-m channel selection with a penalty method "
                   "(ridge W step, closed-form top-k s step, growing mu), then refit the kept channels exactly. "
                   "Block by block, every block loses the same fraction; heads optional. Updates the kept "
                   "output-projection weights (no fine-tuning).")
    stats = frozenset({"xtx"})
    params = (
        Param("iterations", "int", 10, "penalty rounds (mu doubles each round)", 1, 100),
        Param("mu0", "float", 0.01, "initial penalty, relative to mean(diag H)", 1e-6, 100.0),
        Param("prune_heads", "bool", True, "also remove attention units (off: the whole budget goes to MLP channels)"),
        Param("percdamp", "float", 0.01, "dampening of H, as a fraction of mean(diag H)", 0.0, 1.0),
    )

    def prune_structured(self, lm, windows, sparsity, params, progress=None, should_stop=None, on_plan=None):
        from ..structured.runner import BlockDecision, run_blockwise

        def decide(out):
            u = out.units
            if params["prune_heads"]:
                n_attn, n_ch = block_unit_counts(u.attn_units, u.attn_unit_params, u.channels, u.channel_params, sparsity)
            else:
                n_attn, n_ch = 0, min(round(sparsity * u.params / u.channel_params), u.channels - 1)
            family = lm.family
            kwargs = dict(iterations=params["iterations"], mu0=params["mu0"], percdamp=params["percdamp"])
            weights = {}
            keep_attn = torch.ones(u.attn_units, dtype=torch.bool)
            if n_attn:
                keep_attn, weights[family.attention.out] = spap_select(
                    out.o_weight, out.o_stats.xtx, u.attn_units - n_attn, out.cols_per_attn_unit, **kwargs)
            keep_ch = torch.ones(u.channels, dtype=torch.bool)
            if n_ch:
                keep_ch, weights[family.mlp.out] = spap_select(out.down_weight, out.down_stats.xtx, u.channels - n_ch, 1, **kwargs)
            return BlockDecision(keep_attn, keep_ch, weights)

        return run_blockwise(lm, windows, self.stats, decide, progress, should_stop)

