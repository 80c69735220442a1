from ..saliency import ria
from . import register
from .base import Method, Param


@register
class RIA(Method):
    name = "ria"
    title = "RIA"
    description = ("Relative importance and activations (Zhang et al., 2024): |W| relative to its row and "
                   "column sums, times ||X_j||^alpha. No weight update.")
    params = (
        Param("alpha", "float", 0.5, "exponent of the activation norm", 0.0, 2.0, recalibrate=True),
        Param("scope", "choice", "row", "compare within each output row or the whole matrix",
              choices=("row", "matrix")),
    )

    def score(self, weight, stats, params):
        return ria(weight, stats.mean_x2(), params["alpha"])
