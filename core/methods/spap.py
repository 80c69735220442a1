from ..structured.reconstruct import spap_select
from . import register
from .base import Param, StructuredMethod
from ..structured.runner import run_blockwise, solve_block


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
        def decide(out):
            u = out.units
            if params["prune_heads"]:
                n_attn, n_ch = u.removal_counts(sparsity)
            else:
                n_attn, n_ch = 0, min(round(sparsity * u.params / u.channel_params), u.channels - 1)
            return solve_block(lm, out, n_attn, n_ch, spap_select, iterations=params["iterations"],
                               mu0=params["mu0"], percdamp=params["percdamp"])

        return run_blockwise(lm, windows, self.stats, decide, progress, should_stop)

