import torch

from ..structured.scores import flap_columns, global_removal, group_columns, keep_top, standardise
from . import register
from .base import Param, StructuredMethod
from ..structured.runner import collect_dense
from ..structured.plan import StructuredPlan


@register
class FLAP(StructuredMethod):
    name = "flap"
    title = "FLAP (structured)"
    description = ("Fluctuation-based adaptive structured pruning (An et al., 2024): a channel's score is the "
                   "variance of its input times the squared norm of its output-projection column; scores "
                   "are standardised per layer and module, heads take the mean of their columns, and one "
                   "global threshold (weighted by parameters) decides everywhere. The removed channels' "
                   "mean contribution is added to the output bias (a bias is added to layers without one; "
                   "the sliced model's loader knows). One dense pass, no other weight update.")
    stats = frozenset({"sum_x2", "sum_x"})
    params = (
        Param("allocation", "choice", "global", "global: one standardised threshold over all layers and "
              "modules; uniform: every block loses the same fraction", choices=("global", "uniform")),
        Param("bias_compensation", "bool", True, "add the removed channels' mean output to the bias"),
    )

    def prune_structured(self, lm, windows, sparsity, params, progress=None, should_stop=None, on_plan=None):
        def keep(out):
            o_cols = flap_columns(out.o_weight, out.o_stats.variance())
            return {"units": out.units, "heads": group_columns(standardise(o_cols), out.cols_per_attn_unit, "mean"),
                    "chans": standardise(flap_columns(out.down_weight, out.down_stats.variance())),
                    "o_mean": out.o_stats.sum_x / max(out.o_stats.n_tokens, 1),
                    "down_mean": out.down_stats.sum_x / max(out.down_stats.n_tokens, 1),
                    "o_weight": out.o_weight, "down_weight": out.down_weight}

        blocks = collect_dense(lm, windows, self.stats, progress, should_stop, keep=keep)
        units = [b["units"] for b in blocks]
        if params["allocation"] == "global":
            scores = [s for b in blocks for s in (b["heads"], b["chans"])]
            sizes = [p for u in units for p in (u.attn_unit_params, u.channel_params)]
            budget = round(sparsity * sum(u.params for u in units))
            keeps = global_removal(scores, sizes, budget)
            keep_attn, keep_channels = keeps[0::2], keeps[1::2]
        else:
            keep_attn, keep_channels = [], []
            for b, u in zip(blocks, units):
                n_attn, n_ch = u.removal_counts(sparsity)
                keep_attn.append(keep_top(b["heads"], u.attn_units - n_attn))
                keep_channels.append(keep_top(b["chans"], u.channels - n_ch))
        plan = StructuredPlan(keep_attn, keep_channels)
        if params["bias_compensation"]:
            family = lm.family
            modules = lm.prunable()
            for b, u, ka, kc in zip(blocks, units, keep_attn, keep_channels):
                prefix = family.block_prefix(u.index)
                cols = ka.repeat_interleave(u.q_heads_per_unit * u.head_dim)
                for rel, weight, mean, kept in ((family.attention.out, b["o_weight"], b["o_mean"], cols),
                                                (family.mlp.out, b["down_weight"], b["down_mean"], kc)):
                    if bool(kept.all()):
                        continue
                    name = f"{prefix}.{rel}"
                    existing = getattr(modules[name], "bias", None)
                    base = torch.zeros(weight.shape[0]) if existing is None else existing.detach().float().clone()
                    removed = ~kept
                    plan.biases[name] = (base + weight[:, removed].float() @ mean[removed].float()).to(weight.dtype)
        return plan
