from ..saliency import outlier_ratio, owl_sparsities, wanda
from . import register
from .base import Method, Param


@register
class OWL(Method):
    name = "owl"
    title = "OWL (over Wanda)"
    description = ("Outlier-weighted layerwise sparsity (Yin et al., 2024): blocks with more Wanda outliers "
                   "(scores above M x mean) keep more weights; sparsities spread over +-lambda around the "
                   "target, mean unchanged. Then Wanda per row. Unstructured only.")
    patterns = ("unstructured",)
    params = (
        Param("M", "float", 5.0, "outlier threshold, in multiples of the block's mean score", 1.0, 50.0),
        Param("lam", "float", 0.08, "half-width of the per-block sparsity spread", 0.0, 0.5),
    )
    needs_dense_prepass = True
    allocates = True

    def score(self, weight, stats, params):
        return wanda(weight, stats.mean_x2())

    def block_profile(self, block_scores, params):
        return [outlier_ratio(scores, params["M"]) for scores in block_scores]

    def block_sparsities(self, profile, target, params):
        return owl_sparsities(profile, target, params["lam"])
