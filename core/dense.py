"""The dense weights behind every cut: apply a mask set to the model, and put the dense weights back."""
from __future__ import annotations

import torch

from .masks import MaskSet
from .models import LoadedModel


class DenseWeights:
    """A copy of every prunable weight as loaded, so masks can be applied and undone at will."""

    def __init__(self, lm: LoadedModel):
        self.lm = lm
        self.modules = lm.prunable()
        self.dense = {name: lm.family.weight_view(m).clone() for name, m in self.modules.items()}
        # biases as loaded (None: the module had none, and a compensation bias is removed again)
        self.dense_bias = {name: None if getattr(m, "bias", None) is None else m.bias.data.clone()
                           for name, m in self.modules.items()}
        self._biased: set[str] = set()  # modules whose bias a mask set changed

    def shapes(self) -> dict[str, tuple[int, int]]:
        return {name: tuple(w.shape) for name, w in self.dense.items()}

    @torch.no_grad()
    def apply(self, mask_set: MaskSet) -> None:
        """Set each weight to (updated or dense weight) * mask; untouched layers are restored."""
        for name, module in self.modules.items():
            view = self.lm.family.weight_view(module)
            source = mask_set.weights.get(name, self.dense[name])
            mask = mask_set.masks.get(name)
            if mask is None:
                view.copy_(source)
            else:
                torch.mul(source, mask, out=view)  # one pass: no copy-then-multiply
        self._restore_biases(keep=set(mask_set.biases))
        for name, bias in mask_set.biases.items():
            self._set_bias(name, bias)

    @torch.no_grad()
    def restore(self) -> None:
        for name, module in self.modules.items():
            self.lm.family.weight_view(module).copy_(self.dense[name])
        self._restore_biases()

    def _set_bias(self, name: str, bias: torch.Tensor) -> None:
        module = self.modules[name]
        weight = module.weight
        if getattr(module, "bias", None) is None:
            module.bias = torch.nn.Parameter(torch.zeros(bias.shape, dtype=weight.dtype, device=weight.device),
                                             requires_grad=False)
        module.bias.data.copy_(bias)
        self._biased.add(name)

    def _restore_biases(self, keep: set | frozenset = frozenset()) -> None:
        for name in list(self._biased - set(keep)):
            module, original = self.modules[name], self.dense_bias[name]
            if original is None:
                module.bias = None
            else:
                module.bias.data.copy_(original)
            self._biased.discard(name)
