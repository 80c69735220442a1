from ..structured.scores import group_columns, keep_top, wanda_sp_columns
from . import register
from .base import StructuredMethod
from ..structured.runner import BlockDecision, run_blockwise


@register
class WandaSP(StructuredMethod):
    name = "wanda-sp"
    title = "Wanda-sp (structured)"
    description = ("Structured Wanda (as in the FLAP paper's baseline): a channel's score is the mean over "
                   "output rows of |W_ij| * ||X_j|| on the output projection (heads: sum over their "
                   "columns); every block loses the same fraction of its parameters. No weight update.")
    stats = frozenset({"sum_x2"})

    def prune_structured(self, lm, windows, sparsity, params, progress=None, should_stop=None, on_plan=None):
        def decide(out):
            u = out.units
            n_attn, n_ch = u.removal_counts(sparsity)
            heads = group_columns(wanda_sp_columns(out.o_weight, out.o_stats.mean_x2()), out.cols_per_attn_unit)
            chans = wanda_sp_columns(out.down_weight, out.down_stats.mean_x2())
            return BlockDecision(keep_top(heads, u.attn_units - n_attn), keep_top(chans, u.channels - n_ch))

        return run_blockwise(lm, windows, self.stats, decide, progress, should_stop)
