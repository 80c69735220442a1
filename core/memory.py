"""How much memory a calibration will take, worked out from shapes before anything is allocated.

`estimate_calibration` is a pure function of the model's shapes (`ModelShapes`: hidden size,
blocks, heads, every prunable matrix's (d_out, d_in), the widths fed to the linears), the
number of windows, their length, the batch size, the activation dtype and the method (the
statistics it declares, what its artifact keeps). It returns the peak memory calibration adds
to the loaded model (restore reads the dense originals from disk: there is no dense copy), as a
breakdown:

- windows: the calibration token ids (int64);
- activations: the engine's block inputs and outputs for every window (2 x windows x seqlen x
  hidden), plus any full attention masks the model materialises per batch (eager attention,
  sliding windows: batch x seqlen^2 each);
- statistics: per distinct linear input d_in floats for sum_x2 / sum_x, d_in^2 for X^T X,
  windows x d_in for per-window statistics; for every block where the artifact keeps them
  (one-shot calibration keeps them all), else one block's;
- artifact: what the method keeps per prunable weight (ranks: 2 bytes where the comparison
  group is below 2^15 entries, else 4; stored scores 4; sorted scores 4; UniPruning's first
  step 2: 12 bytes per weight in all; nothing in memory where the artifact is spilled to disk
  as it is made (core.artifacts.artifact_spills); masks 1 bit per weight where a prune keeps
  them; a weight-updating prune's new weights stay in the model);
- temporaries: the larger of one batch's intermediate tensors inside a block (the MLP's
  intermediate activations, q/k/v, attention scores batch x heads x seqlen^2 where attention
  materialises them, the statistics hooks' fp32 copies) and one matrix's scoring and ranking
  buffers (argsort indices, sorted copies; Hessians for X^T X methods);
- overhead: what the allocator and the first forward pass add beyond those tensors (32 MiB
  where a forward pass runs, plus 15% of activations and temporaries).

`memory_model` adds the weights to that: the whole model, or with --offload disk only what is
not in a decoder block plus the one block being worked on; the README prints its table.

`check_calibration_memory` compares the estimate, with a safety margin, to the memory
available (MemAvailable on Linux; free device memory on CUDA) and raises a PruneError that
says how much is needed, how much there is, and which smaller request would fit.

Measured against real calibrations (peak resident growth, tests/test_memory_guard.py and
scripts in the README): see README's memory notes.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import PruneError
from .fit import available_memory_bytes, count_parameters
from .unipruning import backprop_memory_bytes
from .methods import get_method, Method
from .families import family_for_config, context_length, head_info
from .artifacts import artifact_bytes, artifact_spills

GIB = 2**30
# need = estimate * SAFETY_FACTOR + SAFETY_BYTES must fit in what is available: room for the
# allocator's fragmentation, Python objects, and whatever else the process does meanwhile.
SAFETY_FACTOR = 1.2
SAFETY_BYTES = 256 * 2**20
# part of the estimate itself: measured growth beyond the tensors counted (see "overhead" below)
FORWARD_BYTES = 32 * 2**20
ALLOCATOR_SLACK = 0.15
BATCH_SLACK = 1.5

CLI_HINTS = {"windows": "--calib-windows", "seqlen": "--seqlen", "batch": "--batch-size"}
APP_HINTS = {"windows": "windows", "seqlen": "seqlen", "batch": "batch size"}


class CalibrationMemoryError(PruneError):
    """A calibration that would not fit in the memory available; the message has the numbers."""

    def __init__(self, message: str, estimate: "MemoryEstimate", available: int):
        super().__init__(message)
        self.estimate = estimate
        self.available = available


@dataclass(frozen=True)
class ModelShapes:
    """What the estimate needs to know about a model (no weights)."""

    hidden: int
    n_blocks: int
    num_heads: int
    head_dim: int
    matrices: tuple[tuple[int, int], ...]  # (d_out, d_in) of every prunable matrix
    block_inputs: tuple[int, ...]  # widths of the distinct linear inputs of one block
    widest: int  # the widest activation inside a block (the MLP's intermediate size)
    vocab: int = 0
    context: int | None = None
    elem: int = 4  # bytes per activation element (the model's dtype)
    attention: str = "sdpa"  # the attention implementation
    mask_kinds: int = 0  # full (batch, 1, seqlen, seqlen) masks one forward materialises

    @property
    def n_prunable(self) -> int:
        return sum(o * i for o, i in self.matrices)

    @classmethod
    def from_model(cls, lm) -> "ModelShapes":
        """Shapes of a LoadedModel (or any wrapper with .model, .family, .config)."""
        return _shapes(lm.model, lm.family, lm.config)

    @classmethod
    def from_config(cls, config, dtype: torch.dtype = torch.float32) -> "ModelShapes":
        """Shapes from a transformers config alone: the model is built on the meta device."""
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM

        family = family_for_config(config)
        if family is None:
            raise PruneError(f"No adapter for model type {config.model_type!r}.")
        with init_empty_weights():
            skeleton = AutoModelForCausalLM.from_config(config, dtype=dtype)
        return _shapes(skeleton, family, skeleton.config)


def _shapes(model, family, config) -> ModelShapes:
    blocks = family.blocks(model)
    matrices = []
    for block in blocks:
        for module in family.linear_modules(block).values():
            matrices.append(tuple(family.weight_view(module).shape))
    block0 = family.linear_modules(blocks[0])
    d_in = {rel: family.weight_view(m).shape[1] for rel, m in block0.items()}
    d_out = {rel: family.weight_view(m).shape[0] for rel, m in block0.items()}
    att, mlp = family.attention, family.mlp
    groups = [att.qkv or att.q, att.out, mlp.inputs[0], mlp.out]  # one entry per distinct input
    inputs = tuple(d_in[g] for g in groups if g in d_in) or tuple(d_in.values())
    param = next(model.parameters())
    heads = head_info(config)
    attention = getattr(config, "_attn_implementation", None) or "sdpa"
    layer_types = set(getattr(config, "layer_types", None) or [])
    sliding = bool(getattr(config, "sliding_window", None)) and (not layer_types or any(
        "sliding" in t for t in layer_types))
    if attention.startswith("flash"):
        mask_kinds = 0
    elif attention == "eager" or sliding:
        mask_kinds = max(len(layer_types), 1)
    else:  # sdpa without padding: causal by is_causal, no mask tensor
        mask_kinds = 0
    out_emb = model.get_output_embeddings()
    return ModelShapes(
        hidden=int(getattr(config, "hidden_size", None) or d_in[groups[0]]),
        n_blocks=len(blocks),
        num_heads=heads.num_heads,
        head_dim=heads.head_dim,
        matrices=tuple((int(o), int(i)) for o, i in matrices),
        block_inputs=tuple(int(x) for x in inputs),
        widest=int(max(max(d_in.values()), max(d_out.values()))),
        vocab=int(out_emb.weight.shape[0]) if out_emb is not None else 0,
        context=context_length(config),
        elem=param.element_size(),
        attention=attention,
        mask_kinds=mask_kinds,
    )


@dataclass
class MemoryEstimate:
    """Peak bytes calibration adds, by part. `total` is what the check compares."""

    method: str
    n_windows: int
    seqlen: int
    batch_size: int
    mode: str
    parts: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def describe(self) -> str:
        shown = ", ".join(f"{k} {_gib(v)}" for k, v in self.parts.items() if v >= 2**20)
        return f"{_gib(self.total)} ({shown or 'all parts under 1 MiB'})"


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= 0.1 * GIB else f"{n / 2**20:.0f} MiB"


def estimate_calibration(shapes: ModelShapes, method, n_windows: int, seqlen: int, batch_size: int = 8,
                         mode: str = "calibrate", params: dict | None = None) -> MemoryEstimate:
    """Peak extra bytes of calibrating `method` on n_windows x seqlen tokens (see the module
    docstring for the parts). `mode`: "calibrate" (the one-shot artifact: explorer, `calibrate`,
    `sweep`, `cut`), "prune" (the CLI's prune: the artifact plus the masks and, for
    weight-updating methods, the new weights) or "structured" (a structured method's prune)."""

    method = get_method(method) if isinstance(method, str) else method
    try:
        resolved = method.resolve_params(params)
    except ValueError:
        resolved = {}
    n, s = max(int(n_windows), 0), max(int(seqlen), 0)
    b = max(min(int(batch_size), n), 1) if n else 0
    e = shapes.elem
    stats = frozenset(method.stats)
    own = type(method).calibrate_model is not Method.calibrate_model
    N = shapes.n_prunable
    biggest = max((o * i for o, i in shapes.matrices), default=0)
    widest_in = max(shapes.block_inputs, default=shapes.hidden)
    parts = {"windows": n * s * 8}

    # activations: the engine's inputs and outputs for all windows, masks kept per batch
    if own:  # a whole-model calibration with backprop (UniPruning's AdamW variant)

        hidden_attn = shapes.num_heads * shapes.head_dim
        parts["activations"] = backprop_memory_bytes(N, shapes.n_blocks, hidden_attn, shapes.num_heads, s,
                                                     shapes.vocab, 0)
    elif stats or method.structured:
        mask_elem = e if shapes.attention == "eager" else 1
        parts["activations"] = 2 * n * s * shapes.hidden * e + shapes.mask_kinds * n * s * s * mask_elem
    else:  # data-free (magnitude): no forward pass
        parts["activations"] = 0

    # statistics, per distinct linear input of a block
    per_block = 0
    if stats:
        for d in shapes.block_inputs:
            per_block += 4 * d
            per_block += 4 * d if "sum_x" in stats else 0
            per_block += 4 * d * d if "xtx" in stats else 0
            per_block += 4 * n * d if "window_x2" in stats else 0
    # the CLI's prune (sequential) keeps no artifact: one block's statistics at a time
    keeps_all = (mode == "calibrate" and not method.structured) or (method.updates_weights and mode != "prune")
    parts["statistics"] = per_block * (shapes.n_blocks if keeps_all else 1)

    # the artifact (and what a prune keeps besides)
    artifact = 0
    if method.structured:
        artifact = N  # the masks (1 byte per weight); the plan itself is small
    elif not (mode == "prune" and method.sequential):
        artifact = sum(artifact_bytes(method, resolved, d_out, d_in) for d_out, d_in in shapes.matrices)

    if artifact_spills(artifact):  # written to disk as it is made (core.artifacts.new_store)
        artifact = 0
    if mode == "prune" and not method.structured:
        artifact += N // 8  # the masks, one bit per weight (the re-solved weights stay in the model)
    parts["artifact"] = artifact

    # temporaries: one batch inside a block, or one matrix's scoring, whichever is larger
    batch = 0
    if (stats or method.structured) and not own and n:
        bt = b * s
        attn = 6 * bt * shapes.hidden * e
        if shapes.attention == "eager" or shapes.mask_kinds:  # scores materialised
            attn += 2 * b * shapes.num_heads * s * s * max(e, 4)
        mlp = 2 * bt * shapes.hidden * e + 4 * bt * shapes.widest * e
        hooks = bt * widest_in * 4 * (1 + (e != 4) + ("window_x2" in stats))
        held = bt * sum(shapes.block_inputs) * e  # the engine keeps each linear's input until the batch ends
        # x1.5: within a block the heap is not trimmed, and its holes count (measured on smollm2-135m)
        batch = int(BATCH_SLACK * (max(attn, mlp) + hooks + held))
    matrix = 32 * biggest  # scores, argsort indices, sorted copies, the ranks being built
    if "xtx" in stats:
        matrix += 3 * 8 * widest_in * widest_in  # the Hessian in float64 and its factors
    if "window_x2" in stats:
        matrix += 2 * 4 * n * widest_in + 16 * biggest  # the windows' statistics, mirror-descent state
    parts["temporaries"] = max(batch, matrix)
    # the allocator's share: heap left in holes between blocks' tensors (trimmed after every block),
    # and what a process's first forward pass sets up (kernels' workspaces, thread pools)
    forward = bool(parts["activations"])
    parts["overhead"] = int((FORWARD_BYTES if forward else 0)
                            + ALLOCATOR_SLACK * (parts["activations"] + parts["temporaries"]))
    return MemoryEstimate(method.name, n, s, b, mode, parts)


def memory_model(config, dtype: torch.dtype, method, n_windows: int, seqlen: int, batch_size: int = 8,
                 offload: str = "none", mode: str = "prune", runtime: int = 0) -> dict[str, int]:
    """Peak host memory of pruning a model, by part: `runtime` (the process before the model: python,
    torch, transformers; measured by bench/scale.py), `weights` (the model once; with --offload disk
    only the parameters outside the decoder blocks plus one block), then estimate_calibration's
    parts. On a GPU with --offload cpu|disk the device holds one block plus the same activations,
    statistics and temporaries."""
    shapes = ModelShapes.from_config(config, dtype)
    total, in_blocks = count_parameters(config)
    size = torch.finfo(dtype).bits // 8
    weights = total * size if offload == "none" else (total - in_blocks + in_blocks // shapes.n_blocks) * size
    estimate = estimate_calibration(shapes, method, n_windows, seqlen, batch_size, mode)
    return {"runtime": int(runtime), "weights": int(weights), **estimate.parts}


def available_bytes(device: str | torch.device = "cpu") -> int | None:
    """Memory a calibration can still take: free device memory on CUDA, else MemAvailable
    (Linux; None where the system does not say)."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    return available_memory_bytes()


def fits(estimate: MemoryEstimate, available: int) -> bool:
    return estimate.total * SAFETY_FACTOR + SAFETY_BYTES <= available


def largest_fitting(shapes: ModelShapes, method, available: int, *, seqlen: int | None = None,
                    n_windows: int | None = None, batch_size: int = 8, mode: str = "calibrate",
                    params: dict | None = None, upper: int = 1 << 20) -> int:
    """The largest number of windows (give seqlen) or seqlen (give n_windows) whose estimate fits
    `available`; 0 when not even the smallest does. Monotone in both, so a bisection."""
    if (seqlen is None) == (n_windows is None):
        raise ValueError("give exactly one of seqlen and n_windows")
    lowest = 1 if seqlen is not None else 2

    def ok(x: int) -> bool:
        n, s = (x, seqlen) if seqlen is not None else (n_windows, x)
        return fits(estimate_calibration(shapes, method, n, s, batch_size, mode, params), available)

    if not ok(lowest):
        return 0
    lo, hi = lowest, upper
    if ok(hi):
        return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def check_calibration_memory(model, method, n_windows: int, seqlen: int, batch_size: int = 8,
                             mode: str = "calibrate", params: dict | None = None, device=None,
                             available: int | None = None, hints: dict | None = None) -> MemoryEstimate:
    """Refuse (CalibrationMemoryError) a calibration whose estimate, with the safety margin,
    exceeds the memory available; return the estimate otherwise. `model`: a LoadedModel or
    ModelShapes. `hints` names the knobs in the message (CLI flags or the app's widgets)."""
    shapes = model if isinstance(model, ModelShapes) else ModelShapes.from_model(model)
    if device is None:
        device = "cpu" if isinstance(model, ModelShapes) else str(model.device)
    estimate = estimate_calibration(shapes, method, n_windows, seqlen, batch_size, mode, params)
    have = available_bytes(device) if available is None else available
    if have is None or fits(estimate, have):
        return estimate
    hints = hints or CLI_HINTS
    need = int(estimate.total * SAFETY_FACTOR + SAFETY_BYTES)
    where = "free on the GPU" if torch.device(device).type == "cuda" else "available (MemAvailable)"
    ways = []
    n_fit = largest_fitting(shapes, method, have, seqlen=estimate.seqlen, batch_size=batch_size, mode=mode,
                            params=params, upper=max(estimate.n_windows, 1))
    if n_fit:
        ways.append(f"{hints['windows']} {n_fit} or fewer (at {hints['seqlen']} {estimate.seqlen})")
    s_fit = largest_fitting(shapes, method, have, n_windows=estimate.n_windows, batch_size=batch_size, mode=mode,
                            params=params, upper=max(estimate.seqlen, 2))
    if s_fit:
        ways.append(f"{hints['seqlen']} {s_fit} or shorter (with {estimate.n_windows} windows)")
    if batch_size > 1:
        small = estimate_calibration(shapes, method, estimate.n_windows, estimate.seqlen, 1, mode, params)
        if fits(small, have):
            ways.append(f"{hints['batch']} 1")
    ways.append("a machine (or device) with more free memory")
    raise CalibrationMemoryError(
        f"Not enough memory to calibrate {estimate.method} on {estimate.n_windows} windows x {estimate.seqlen} "
        f"tokens (batch {estimate.batch_size}): it needs about {estimate.describe()} on top of the loaded "
        f"model, {_gib(need)} with a safety margin, but only {_gib(have)} is {where}. Nothing was "
        f"allocated. Try: {'; '.join(ways)}.", estimate, have)


# ---------------------------------------------------------------- requests beside a calibration
# What the explorer's other requests hold while they run, from the same shapes, so that each is
# checked against the memory available before it starts (a sweep, a perplexity, a generation).

def estimate_cut(shapes: ModelShapes, method) -> int:
    """Peak extra bytes of one mask set cut from an artifact and applied: its masks made (one
    byte a weight once read as bool), a weight-updating method's re-solved weights, and one
    matrix's ranking temporaries."""

    method = get_method(method) if isinstance(method, str) else method
    n = shapes.n_prunable
    biggest = max((o * i for o, i in shapes.matrices), default=0)
    weights = n * shapes.elem if method.updates_weights else 0
    return n + weights + 32 * biggest


def estimate_evaluation(shapes: ModelShapes, seqlen: int, batch_size: int = 4) -> int:
    """Peak extra bytes of a perplexity pass (core.evaluate.perplexity): one batch's logits in the
    model's dtype, their fp32 copy and cross-entropy's log-softmax, plus one block's temporaries."""
    b, s = max(int(batch_size), 1), max(int(seqlen), 1)
    bt = b * s
    logits = bt * shapes.vocab * (shapes.elem + 4 + 4)
    attn = 6 * bt * shapes.hidden * shapes.elem
    if shapes.attention == "eager" or shapes.mask_kinds:
        attn += 2 * b * shapes.num_heads * s * s * max(shapes.elem, 4)
    mlp = 2 * bt * shapes.hidden * shapes.elem + 4 * bt * shapes.widest * shapes.elem
    return int(logits + BATCH_SLACK * max(attn, mlp) + FORWARD_BYTES)


def estimate_generation(shapes: ModelShapes, tokens: int, streams: int = 1, kv_heads: int | None = None) -> int:
    """Peak extra bytes of `streams` generations of up to `tokens` tokens each: the KV cache
    (keys and values of every block), the prompt's forward pass and one step's logits."""
    t = max(int(tokens), 1)
    kv = kv_heads or shapes.num_heads
    cache = 2 * shapes.n_blocks * kv * shapes.head_dim * t * shapes.elem
    prompt = estimate_evaluation(shapes, t, 1) - t * shapes.vocab * (shapes.elem + 4 + 4)
    return int(streams * (cache + shapes.vocab * 4) + prompt)


class RequestMemoryError(PruneError):
    """A request that would not fit in the memory available; the message has the numbers."""


def check_request_memory(need: int, what: str, available: int | None, advice: str) -> None:
    """Refuse (RequestMemoryError) a request needing `need` bytes beyond what is held now, with
    the same safety margin as a calibration; nothing where the system does not say (None)."""
    if available is None:
        return
    total = int(need * SAFETY_FACTOR + SAFETY_BYTES)
    if total <= available:
        return
    raise RequestMemoryError(
        f"Not enough memory for {what}: it needs about {_gib(need)} ({_gib(total)} with a safety margin) "
        f"but only {_gib(available)} is available. Nothing was started. {advice}")
