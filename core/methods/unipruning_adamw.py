from dataclasses import replace

from ..unipruning_adamw import calibrate_adamw
from . import register
from .base import Param
from .unipruning import UniPruning, normalised_scores


@register
class UniPruningAdamW(UniPruning):
    name = "unipruning-adamw"
    title = "UniPruning, released-code variant (transient AdamW)"
    description = (
        "As UniPruning, but as its released code calibrates: while Gamma is learned, AdamW steps "
        "(lr 1e-4) move the weights on the LM loss so the saliency sees moving weights; optionally a "
        "proximal N:M penalty on them. The moved weights are discarded: the masks apply to the dense "
        "model. Costs backprop through the whole model (optimiser state and activations: several GB "
        "for 135M parameters); refused with a message where memory will not suffice.")
    # the released code's saliency (stochRIA) stays this variant's default: it reproduces that code
    params = tuple(replace(p, default="stochria") if p.name == "saliency" else p for p in UniPruning.params) + (
        Param("lr", "float", 1e-4, "AdamW learning rate of the transient steps", 0.0, 1e-2, recalibrate=True),
        Param("prox_nm", "choice", "none", "proximal N:M penalty on the transient weights",
              choices=("none", "2:4", "4:8"), recalibrate=True),
        Param("prox_strength", "float", 1e-3, "strength of the N:M penalty", 0.0, 1.0, recalibrate=True),
    )
    stats = frozenset()

    def calibrate_model(self, lm, windows, params, dense, progress=None, should_stop=None):
        out = calibrate_adamw(lm, windows, params, dense, progress, should_stop)
        return {name: {"score": normalised_scores(kept["gamma"]), "first_step": kept["first_step"]}
                for name, kept in out.items()}
