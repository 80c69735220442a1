from ..saliency import magnitude
from . import register
from .base import Method


@register
class Magnitude(Method):
    name = "magnitude"
    title = "Magnitude"
    description = "Prune the smallest |W| of each matrix. Needs no calibration data."
    stats = frozenset()
    scope = "matrix"

    def score(self, weight, stats, params):
        return magnitude(weight)
