import torch

from ..structured.reconstruct import admm_select
from ..structured.scores import keep_top, softmax_allocation, wanda_sp_columns
from ..structured.solve import reconstruction_error, refit_columns
from . import register
from .base import Param, StructuredMethod
from ..structured.units import all_block_units
from ..progress import staged
from ..structured.runner import collect_dense, run_blockwise, solve_block


@register
class StructPrune(StructuredMethod):
    name = "structprune"
    title = "StructPrune (structured, ADMM + softmax allocation)"
    description = ("Global structured pruning split into per-module problems: each output projection "
                   "chooses its kept channels (and attention units) by ADMM on the output-reconstruction "
                   "error, then refits them exactly. Layer sparsities follow a softmax (Gibbs) allocation "
                   "over layer energies (the error of pruning the layer at the uniform ratio, relative to "
                   "the residual stream it is added to): "
                   "s_l = clip(c exp(-e_l / T)), c set so the budget is exact; T -> infinity is uniform. "
                   "Costs one dense pass for the energies, then a block-by-block pass.")
    stats = frozenset({"sum_x2", "xtx"})
    params = (
        Param("allocation", "choice", "softmax", "softmax: energy-based layer sparsities; uniform: the same "
              "in every block", choices=("softmax", "uniform")),
        Param("energy", "choice", "residual", "a layer's energy: its output projections' reconstruction error "
              "at the uniform ratio relative to the residual stream entering the block (residual), or to "
              "the projections' own output (output)", choices=("residual", "output")),
        Param("temperature", "float", 1.0, "softmax temperature T over standardised energies (large: uniform)",
              0.01, 1e6),
        Param("max_layer_sparsity", "float", 0.9, "no block loses more than this fraction", 0.05, 0.99),
        Param("iterations", "int", 10, "ADMM iterations per module", 1, 200),
        Param("rho", "float", 0.01, "initial ADMM penalty, relative to mean(diag H) (grows 1.5x per step)", 1e-6, 100.0),
        Param("percdamp", "float", 0.01, "dampening of H, as a fraction of mean(diag H)", 0.0, 1.0),
    )

    def layer_energy(self, out, sparsity: float, relative_to: str = "residual") -> float:
        """Output error of pruning one block at the uniform ratio (Wanda-sp selection, exact
        refit), summed over its two output projections: the cost the allocation weighs.

        relative_to="residual": the error over the energy of the block's input residual stream.
        The error is added to that stream, so this is how much of what later blocks read it
        changes; a sublayer whose output is small next to the stream (late blocks) costs little,
        one that writes a stream still small (block 0) costs much. "output": over the projection's
        own dense output energy, which is blind to that scale (measured: it sends block 0 to the
        0.9 cap at 25%)."""
        u = out.units
        n_attn, n_ch = u.removal_counts(sparsity)
        total = 0.0
        for weight, stats, n_remove, group in ((out.o_weight, out.o_stats, n_attn, out.cols_per_attn_unit),
                                               (out.down_weight, out.down_stats, n_ch, 1)):
            if not n_remove:
                continue
            scores = wanda_sp_columns(weight, stats.mean_x2()).reshape(-1, group).sum(1)
            keep = keep_top(scores, scores.numel() - n_remove).repeat_interleave(group)
            if relative_to == "output":
                scale = reconstruction_error(weight, torch.zeros_like(weight), stats.xtx)
            else:
                scale = out.input_energy
            total += reconstruction_error(weight, refit_columns(weight, stats.xtx, keep), stats.xtx) / max(scale, 1e-30)
        return total

    def layer_sparsities(self, energies, units, sparsity, params) -> list[float]:
        if params["allocation"] == "uniform":
            return [sparsity] * len(units)
        return softmax_allocation(energies, [u.params for u in units], sparsity, params["temperature"],
                                  0.0, params["max_layer_sparsity"])

    def prune_structured(self, lm, windows, sparsity, params, progress=None, should_stop=None, on_plan=None):
        units = all_block_units(lm)
        energies = [0.0] * len(units)
        if params["allocation"] == "softmax":
            energies = collect_dense(lm, windows, self.stats, staged(progress, "energies"), should_stop,
                                     keep=lambda out: self.layer_energy(out, sparsity, params["energy"]))
        per_layer = self.layer_sparsities(energies, units, sparsity, params)

        def decide(out):
            return solve_block(lm, out, *out.units.removal_counts(per_layer[out.units.index]), admm_select,
                               iterations=params["iterations"], rho=params["rho"], percdamp=params["percdamp"])

        plan = run_blockwise(lm, windows, self.stats, decide, staged(progress, "solve"), should_stop)
        plan.meta["layer_sparsity_targets"] = [round(s, 6) for s in per_layer]
        plan.meta["layer_energies"] = [round(float(e), 6) for e in energies]
        return plan
