"""A loaded model plus what the rest of the project needs to know about it: its family, blocks,
prunable matrices, heads, fingerprint, and where it runs (`LoadedModel`); `wrap_model` describes a
built model (core.loading.load_model's last step; tests build tiny ones from a config)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import ModelLoadError
from .families import Family, HeadInfo, family_for_config, head_info, supported_summary
from .fingerprint import fingerprint, sampled_fingerprint


@dataclass
class LoadedModel:
    """A model plus what the rest of the project needs to know about it."""

    model: nn.Module
    tokenizer: object
    family: Family
    model_id: str
    fingerprint: str
    checkpoint: Path | None = None  # the safetensors folder the weights were loaded from, if any
    compute_device: torch.device | None = None  # where blocks run (offloaded weights are brought there)
    offload: str = "none"  # none | cpu | disk (core.offload)
    _sampled: str | None = field(default=None, repr=False)  # sampled_fingerprint(), once asked

    @property
    def config(self):
        return self.model.config

    @property
    def blocks(self) -> nn.ModuleList:
        return self.family.blocks(self.model)

    @property
    def heads(self) -> HeadInfo:
        return head_info(self.config)

    @property
    def device(self) -> torch.device:
        """The compute device: where inputs go and blocks run."""
        if self.compute_device is not None:
            return self.compute_device
        return next(self.model.parameters()).device

    def prunable(self) -> dict[str, nn.Module]:
        """Full parameter-free name (e.g. 'model.layers.3.mlp.up_proj') -> module, in order."""
        out = {}
        for index, block in enumerate(self.blocks):
            for rel, module in self.family.linear_modules(block).items():
                out[f"{self.family.block_prefix(index)}.{rel}"] = module
        return out

    def facts(self) -> dict:
        heads = self.heads
        n_params = sum(p.numel() for p in self.model.parameters())
        n_prunable = sum(self.family.weight_view(m).numel() for m in self.prunable().values())
        return {
            "model": self.model_id,
            "family": self.family.name,
            "model_type": self.config.model_type,
            "parameters": n_params,
            "prunable_parameters": n_prunable,
            "layers": len(self.blocks),
            "heads": heads.num_heads,
            "kv_heads": heads.num_kv_heads,
            "head_dim": heads.head_dim,
            "dtype": str(next(self.model.parameters()).dtype).replace("torch.", ""),
            "device": str(self.device),
            "offload": self.offload,
            "fingerprint": self.fingerprint,
        }

    def sampled_fingerprint(self) -> str:
        """The version-1 fingerprint older files record (computed when first asked)."""
        if self._sampled is None:
            self._sampled = sampled_fingerprint(self.model)
        return self._sampled


def wrap_model(model: nn.Module, tokenizer, model_id: str, device: str = "cpu", checkpoint: Path | None = None,
               offload: str = "none") -> LoadedModel:
    """Describe an already-built model (tests build tiny ones from a config). A model dispatched by
    accelerate (offloaded) stays where it is; any other is moved to `device`."""
    family = family_for_config(model.config)
    if family is None:
        raise ModelLoadError(
            f"No adapter for model type {model.config.model_type!r}. Supported: {supported_summary()}."
        )
    if getattr(model, "hf_device_map", None) is None:
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    if tokenizer is not None and getattr(tokenizer, "pad_token", None) is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model=model, tokenizer=tokenizer, family=family, model_id=model_id,
                       fingerprint=fingerprint(model), checkpoint=checkpoint, compute_device=torch.device(device),
                       offload=offload)
