from ..saliency import wanda
from . import register
from .base import Method


@register
class Wanda(Method):
    name = "wanda"
    title = "Wanda"
    description = ("Weights and activations (Sun et al., 2023): score |W_ij| * ||X_j||, prune the lowest "
                   "fraction of every output row. No weight update.")

    def score(self, weight, stats, params):
        return wanda(weight, stats.mean_x2())
