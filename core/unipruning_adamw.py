"""UniPruning's released-code calibration: mirror descent while transient AdamW steps move the
weights on the LM loss (the scores see weights that move); the moved weights are thrown away.

Unlike the frozen variant this needs backprop through the whole model: memory is checked
before anything is allocated, and the dense weights are restored however the run ends.
"""
from __future__ import annotations

from typing import Callable

import torch

from .progress import ProgressFn
from .errors import Cancelled, PruneError
from .dense import DenseWeights
from .fit import available_memory_bytes
from .loaded_model import LoadedModel
from .unipruning import FirstStep, backprop_memory_bytes, mirror_descent_step, prox_nm, raw_window_saliency, subset_size


def check_backprop_memory(lm: LoadedModel, seqlen: int) -> None:
    heads = lm.heads
    n_trainable = sum(lm.family.weight_view(m).numel() for m in lm.prunable().values())
    vocab = lm.model.get_output_embeddings().weight.shape[0]
    need = backprop_memory_bytes(n_trainable, len(lm.blocks), heads.num_heads * heads.head_dim,
                                 heads.num_heads, seqlen, vocab, n_trainable)
    available = available_memory_bytes()
    if available is not None and need > 0.9 * available:
        raise PruneError(
            f"UniPruning's AdamW variant needs about {need / 2**30:.1f} GiB more for backprop "
            f"(optimiser state, activations of {seqlen}-token windows) but {available / 2**30:.1f} GiB is "
            "available. Use the frozen variant (method 'unipruning': no backprop, one block in memory), "
            "shorter windows, or a machine with more memory.")


def calibrate_adamw(lm: LoadedModel, windows: torch.Tensor, params: dict, dense: DenseWeights,
                    progress: ProgressFn | None = None,
                    should_stop: Callable[[], bool] | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """Per prunable matrix: {"gamma": ..., "first_step": ...}. One step per calibration window."""
    check_backprop_memory(lm, windows.shape[1])
    modules = lm.prunable()
    model = lm.model
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    weights = [m.weight for m in modules.values()]
    for w in weights:
        w.requires_grad_(True)
    optimiser = torch.optim.AdamW(weights, lr=params["lr"], weight_decay=0.0)
    generator = torch.Generator().manual_seed(params["seed"])
    n_steps = windows.shape[0]
    state = {}
    for name, module in modules.items():
        shape = lm.family.weight_view(module).shape
        state[name] = (torch.zeros(shape), torch.zeros(shape), FirstStep(shape, n_steps))
    x2: dict[str, torch.Tensor] = {}

    def make_hook(name):
        def hook(module, args):
            x = args[0].detach().float()
            x2[name] = x.reshape(-1, x.shape[-1]).pow(2).mean(0)
        return hook

    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in modules.items()]
    nm = params.get("prox_nm", "none")
    was_training = model.training
    model.train(False)  # no dropout: the steps follow the loss, not noise
    try:
        for step in range(n_steps):
            if should_stop is not None and should_stop():
                raise Cancelled(f"Cancelled at step {step} of {n_steps}; the dense weights are restored.")
            window = windows[step:step + 1].to(lm.device)
            loss = model(window, labels=window, use_cache=False).loss
            loss.backward()
            with torch.no_grad():
                for name, module in modules.items():
                    view = lm.family.weight_view(module)
                    abs_w = view.detach().abs().float()
                    tau = subset_size(*abs_w.shape, params["tau_fraction"])
                    s = raw_window_saliency(abs_w, x2[name], params["saliency"], params["exponent"], tau, generator)
                    mean = float(s.mean())
                    z, gamma, first = state[name]
                    mirror_descent_step(z, gamma, s, params["kappa"], params["lam"], generator,
                                        scale=1.0 / mean if mean > 0 else 1.0, nonnegative=params["kappa"] <= 1.0)
                    first.update(gamma, step + 1)
            optimiser.step()
            optimiser.zero_grad(set_to_none=True)
            if nm != "none":
                n, m = (int(v) for v in nm.split(":"))
                with torch.no_grad():
                    for module in modules.values():
                        view = lm.family.weight_view(module)
                        view.copy_(prox_nm(view, n, m, params["lr"] * params["prox_strength"]))
            if progress:
                progress(step + 1, n_steps, f"step {step + 1}/{n_steps}, loss {loss.item():.3f}")
    finally:
        for handle in handles:
            handle.remove()
        del optimiser
        for name, p in model.named_parameters():
            p.requires_grad_(flags[name])
            p.grad = None
        model.train(was_training)
        dense.note_changed()  # the optimiser wrote every trainable weight
        dense.restore()  # the transient weights are thrown away, whatever happened
    return {name: {"gamma": gamma, "first_step": first.first} for name, (_, gamma, first) in state.items()}
