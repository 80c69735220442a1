"""Physically smaller models from a StructuredPlan: slice, save, load.

`slice_model(lm, plan)` returns a deep copy of the model in which every removed attention unit
(its q/k/v rows, fused qkv rows, o columns) and every removed MLP channel (up/gate/fc1 rows and
their bias entries, down/fc2 columns) is cut out of the weights. The plan's refitted weights
and compensation biases are used where it has them, so the sliced model computes what the
masked model (`DenseWeights(lm).apply(plan.to_maskset(lm))`) computes, on smaller matrices.

Layers keep transformers' own attention/MLP code; per layer only the attributes their forward
reads are changed (transformers 5.23):

- llama / gemma3 (Qwen2, Mistral, SmolLM2...): `view(..., -1, head_dim)` infers the head count
  from the weights, and `num_key_value_groups` (query heads per KV head) is unchanged because
  whole KV groups are removed; nothing else to set (`intermediate_size` is updated for the record).
- opt: `OPTAttention.num_heads` is used in its `view`, so it is set per layer.
- gpt2: `GPT2Attention.split_size` (the width of each of q, k, v in the fused output) and
  `num_heads` are set; transformers' Conv1D reads its output width from `nf` (and `nx`), so
  those are updated with the weights.
- gpt_neox: the fused per-head [q|k|v] rows keep their per-head layout; the view infers heads.

A sublayer whose units are *all* removed cannot run the stock code (a view of zero elements
with a -1 dimension fails), so:

- attention is replaced by `EmptyAttention`, which returns `(zeros + output bias, None)`, the
  shape and tuple every family's decoder layer unpacks, and still appends a one-value-wide
  placeholder to the KV cache so the cache's sequence length (read by the models for positions
  and by the mask builders, from layer 0) stays right;
- an MLP held in its own module (llama, gemma3, gpt2, gpt_neox) is replaced by `EmptyMLP`
  (zeros + output bias). OPT's fc1/fc2 sit on the decoder layer itself; zero-width nn.Linear
  layers compute exactly zeros + bias, so they simply stay, with no channels.

Both keep the output projection (with zero input columns) under its own name, so checkpoint
keys are unchanged and a compensation bias survives.

A sliced model's config carries `pruning_explorer_structure` (per-layer head counts and
intermediate sizes, modules that gained a bias, all-removed sublayers); `save_sliced` writes
it to config.json and `load_sliced` (used by `core.loading.load_model` when `is_sliced_config`)
rebuilds the model from the config, reshapes each layer accordingly and loads the
safetensors weights strictly. `AutoModelForCausalLM.from_pretrained` alone cannot read such a
folder (its layers are not all the same size).
"""
from __future__ import annotations

import copy
import inspect
import json
from pathlib import Path

import torch
from torch import nn

from ..families import Family, family_for_config, head_info
from ..kv_cache import find_cache
from ..loaded_model import LoadedModel
from ..outputs import write_folder_atomically
from .plan import StructuredPlan
from .units import all_block_units, unit_out_columns, unit_rows

STRUCTURE_KEY = "pruning_explorer_structure"
STRUCTURE_VERSION = 1


class EmptyAttention(nn.Module):
    """Stands in for an attention sublayer whose every unit was pruned.

    Returns `(zeros + output bias, None)` for any call signature the families use (hidden
    states first; the cache under whatever name the release passes it: core.kv_cache). The output
    projection is kept, with zero input columns, under its original attribute name, so its
    bias keeps its checkpoint key. With a cache it appends a (batch, 1, tokens, 1) zero
    placeholder, so the cache's length for this layer grows like any other layer's.
    """

    # Plain attributes some decoder layers read from their attention module (Gemma 3 before
    # transformers 5 picks its mask by `self_attn.is_sliding`); copied from the replaced module.
    LAYER_READS = ("is_sliding", "sliding_window", "attention_type")

    def __init__(self, out_name: str, out: nn.Module, layer_idx: int, replaced: nn.Module | None = None):
        super().__init__()
        self.out_name = out_name
        self.add_module(out_name, out)
        self.layer_idx = layer_idx
        for name in self.LAYER_READS:
            value = getattr(replaced, name, None) if replaced is not None else None
            if isinstance(value, (bool, int, str)):
                setattr(self, name, value)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        cache = find_cache(kwargs)
        if cache is not None:
            cache = getattr(cache, "self_attention_cache", cache)  # an EncoderDecoderCache's own
            # One head of width 1: transformers reads a layer's length as 0 when its keys are empty
            # (numel() == 0), and the models take the number of past tokens (positions, mask
            # sizes) from layer 0's length, so an all-removed layer must still record its tokens.
            placeholder = hidden_states.new_zeros(hidden_states.shape[0], 1, hidden_states.shape[1], 1)
            cache.update(placeholder, placeholder, self.layer_idx)
        return _zeros_plus_bias(hidden_states, getattr(self, self.out_name)), None

    def extra_repr(self) -> str:
        return f"all units removed: output = {self.out_name}.bias (or zeros)"


class EmptyMLP(nn.Module):
    """Stands in for an MLP module whose every channel was pruned: returns zeros + output bias.

    The output projection is kept (zero input columns) under its original name for its bias."""

    def __init__(self, out_name: str, out: nn.Module):
        super().__init__()
        self.out_name = out_name
        self.add_module(out_name, out)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        return _zeros_plus_bias(hidden_states, getattr(self, self.out_name))

    def extra_repr(self) -> str:
        return f"all channels removed: output = {self.out_name}.bias (or zeros)"


def _zeros_plus_bias(hidden_states: torch.Tensor, out: nn.Module) -> torch.Tensor:
    out_features = out.nf if hasattr(out, "nf") else out.out_features
    y = hidden_states.new_zeros(*hidden_states.shape[:-1], out_features)
    bias = getattr(out, "bias", None)
    return y if bias is None else y + bias.to(y.dtype)


# ---------------------------------------------------------------- per-layer reshaping

def _set_weight(family: Family, module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Give a Linear/Conv1D a new canonical (d_out, d_in) weight and output bias (None: no bias)."""
    old = module.weight
    grad = old.requires_grad
    weight = weight.to(dtype=old.dtype, device=old.device)
    d_out, d_in = weight.shape
    if family.conv1d:  # transformers' Conv1D: weight (d_in, d_out), forward reads nf
        module.weight = nn.Parameter(weight.t().contiguous(), requires_grad=grad)
        module.nf, module.nx = d_out, d_in
    else:
        module.weight = nn.Parameter(weight.contiguous(), requires_grad=grad)
        module.out_features, module.in_features = d_out, d_in
    if bias is None:
        module.bias = None
    else:
        module.bias = nn.Parameter(bias.to(dtype=old.dtype, device=old.device).contiguous(), requires_grad=grad)


def _split(path: str) -> tuple[str, str]:
    """'self_attn.o_proj' -> ('self_attn', 'o_proj'); 'fc2' -> ('', 'fc2')."""
    parent, _, name = path.rpartition(".")
    return parent, name


def _shape_block(family: Family, block: nn.Module, layer_idx: int, head_dim: int,
                 tensors: dict[str, tuple[torch.Tensor, torch.Tensor | None]], q_heads: int, kv_heads: int,
                 intermediate: int) -> None:
    """Put the new (already sliced) weights into one decoder block and set the attributes its
    forward reads; replace an all-removed attention / MLP module by its stand-in."""
    linears = family.linear_modules(block)
    for rel, (weight, bias) in tensors.items():
        _set_weight(family, linears[rel], weight, bias)
    att_parent, att_out = _split(family.attention.out)
    attn = block.get_submodule(att_parent)
    if q_heads == 0:
        block.set_submodule(att_parent, EmptyAttention(att_out, linears[family.attention.out],
                                                       getattr(attn, "layer_idx", layer_idx), attn))
    else:
        if hasattr(attn, "num_heads"):  # OPT (used in its view), GPT-2
            attn.num_heads = q_heads
        if hasattr(attn, "split_size"):  # GPT-2: width of each of q, k, v in c_attn's output
            attn.split_size = q_heads * head_dim
        if hasattr(attn, "num_key_value_groups"):  # llama/gemma3: whole KV groups go, the ratio stays
            assert attn.num_key_value_groups == q_heads // kv_heads, "KV group size changed"
    mlp_parent, mlp_out = _split(family.mlp.out)
    if intermediate == 0 and mlp_parent:
        block.set_submodule(mlp_parent, EmptyMLP(mlp_out, linears[family.mlp.out]))
    elif mlp_parent and hasattr(block.get_submodule(mlp_parent), "intermediate_size"):
        block.get_submodule(mlp_parent).intermediate_size = intermediate


# ---------------------------------------------------------------- slicing

@torch.no_grad()
def slice_model(lm: LoadedModel, plan: StructuredPlan) -> nn.Module:
    """A new, physically smaller model: removed attention units and MLP channels cut out.

    `lm.model` is never changed; it may be dense or have this plan applied as masks (the kept
    rows/columns are the same). Per prunable matrix the source is the plan's refitted weight
    where given, else the model's; the output bias is the plan's where given (a module without
    a bias gains one), else the module's own. The returned model's config carries the
    structure under `pruning_explorer_structure`.
    """
    family = lm.family
    units = all_block_units(lm)
    if len(plan.keep_attn) != len(units) or len(plan.keep_channels) != len(units):
        raise ValueError(f"The plan has {len(plan.keep_attn)} blocks; the model has {len(units)}.")
    model = copy.deepcopy(lm.model)
    blocks = family.blocks(model)
    # judged on a model built from the config, not on lm.model: applying the plan as masks
    # gives a module its compensation bias, which a fresh model (load_sliced) would lack
    built_with_bias = _built_with_bias(model.config, family)
    hd = units[0].head_dim if units else head_info(model.config).head_dim
    structure = {"format_version": STRUCTURE_VERSION, "family": family.name, "head_dim": hd,
                 "q_heads": [], "kv_heads": [], "intermediate_sizes": [], "added_biases": [],
                 "removed_attention": [], "removed_mlp": []}
    for u, keep_a, keep_c in zip(units, plan.keep_attn, plan.keep_channels):
        keep_a, keep_c = keep_a.bool().cpu(), keep_c.bool().cpu()
        if keep_a.numel() != u.attn_units or keep_c.numel() != u.channels:
            raise ValueError(f"Block {u.index}: the plan has {keep_a.numel()} attention units and "
                             f"{keep_c.numel()} channels; the model has {u.attn_units} and {u.channels}.")
        prefix = family.block_prefix(u.index)
        rows = unit_rows(lm, u, keep_a)
        for rel in family.mlp.inputs:
            rows[rel] = keep_c
        cols = {family.attention.out: unit_out_columns(u, keep_a), family.mlp.out: keep_c}
        tensors = {}
        for rel, module in family.linear_modules(blocks[u.index]).items():
            name = f"{prefix}.{rel}"
            weight = plan.weights.get(name)
            weight = family.weight_view(module) if weight is None else weight.to(module.weight.device)
            bias = plan.biases.get(name)
            if bias is not None and name not in built_with_bias:
                structure["added_biases"].append(name)
            bias = getattr(module, "bias", None) if bias is None else bias.to(module.weight.device)
            if rel in rows:
                weight = weight[rows[rel].to(weight.device)]
                bias = None if bias is None else bias[rows[rel].to(bias.device)]
            if rel in cols:
                weight = weight[:, cols[rel].to(weight.device)]
            tensors[rel] = (weight.clone(), None if bias is None else bias.detach().clone())
        kept = int(keep_a.sum())
        q_heads, kv_heads, inter = kept * u.q_heads_per_unit, kept * u.kv_heads_per_unit, int(keep_c.sum())
        _shape_block(family, blocks[u.index], u.index, hd, tensors, q_heads, kv_heads, inter)
        structure["q_heads"].append(q_heads)
        structure["kv_heads"].append(kv_heads)
        structure["intermediate_sizes"].append(inter)
        if q_heads == 0:
            structure["removed_attention"].append(u.index)
        if inter == 0:
            structure["removed_mlp"].append(u.index)
    setattr(model.config, STRUCTURE_KEY, structure)
    model.eval()
    return model


def _built_with_bias(config, family: Family) -> set[str]:
    """Full names of the prunable modules that have a bias in a model built from `config`."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    return {f"{family.block_prefix(i)}.{rel}" for i, block in enumerate(family.blocks(skeleton))
            for rel, module in family.linear_modules(block).items() if getattr(module, "bias", None) is not None}


def structure_of(model: nn.Module) -> dict | None:
    """The sliced structure a model's config carries (None: not a sliced model)."""
    return getattr(model.config, STRUCTURE_KEY, None)


def is_sliced_config(config) -> bool:
    """Whether a model config (read from a folder) is a sliced model's: load it with load_sliced."""
    return bool(getattr(config, STRUCTURE_KEY, None))


# ---------------------------------------------------------------- save / load

def save_sliced(model: nn.Module, out_dir: str | Path, tokenizer=None, meta: dict | None = None, *,
                force: bool = False, inputs=()) -> Path:
    """save_pretrained a sliced model (config.json keeps its structure key), plus the tokenizer
    and a PRUNING.json (`meta`, or a bare marker); the folder appears only once complete. An
    existing `out_dir` is replaced only as core.outputs.write_folder_atomically allows (`force`,
    `inputs`)."""
    structure = structure_of(model)
    if structure is None:
        raise ValueError("This model has no sliced structure in its config; slice it with slice_model first.")

    def write(staging: Path) -> None:
        # The model's own parameter names (no renaming to a legacy checkpoint layout, e.g.
        # GPT-NeoX's lm_head -> embed_out): load_sliced loads them strictly as they are.
        if "save_original_format" in inspect.signature(model.save_pretrained).parameters:
            model.save_pretrained(staging, save_original_format=False)
        else:  # transformers 4.x saves the parameter names as they are
            model.save_pretrained(staging)
        config_path = staging / "config.json"
        config = json.loads(config_path.read_text())
        if config.get(STRUCTURE_KEY) != structure:  # save_pretrained keeps extra config keys; be sure
            config[STRUCTURE_KEY] = structure
            config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if meta is not None:
            (staging / "PRUNING.json").write_text(json.dumps(meta, indent=2, default=str))

    return write_folder_atomically(out_dir, write, force=force, inputs=inputs)


def is_sliced_folder(path: str | Path) -> bool:
    config = Path(path) / "config.json"
    return config.is_file() and STRUCTURE_KEY in json.loads(config.read_text())


def reshape_to_structure(model: nn.Module, structure: dict) -> None:
    """Resize a freshly built full-size model's layers to a sliced structure (weights left
    uninitialised: load them next)."""
    family = family_for_config(model.config)
    if family is None or family.name != structure.get("family"):
        raise ValueError(f"The sliced structure is for family {structure.get('family')!r}, the config's model "
                         f"type is {model.config.model_type!r}.")
    if structure.get("format_version") != STRUCTURE_VERSION:
        raise ValueError(f"Sliced structure version {structure.get('format_version')}; this code reads "
                         f"version {STRUCTURE_VERSION}.")
    blocks = family.blocks(model)
    if len(structure["q_heads"]) != len(blocks):
        raise ValueError(f"The structure describes {len(structure['q_heads'])} layers; the config builds {len(blocks)}.")
    hd = structure["head_dim"]
    added = set(structure["added_biases"])
    att = family.attention
    for index, block in enumerate(blocks):
        q, kv, inter = structure["q_heads"][index], structure["kv_heads"][index], structure["intermediate_sizes"][index]
        prefix = family.block_prefix(index)
        tensors = {}
        for rel, module in family.linear_modules(block).items():
            hidden = family.weight_view(module).shape[1] if rel != att.out and rel != family.mlp.out \
                else family.weight_view(module).shape[0]
            if rel == att.qkv:
                shape = ((q + 2 * kv) * hd, hidden)
            elif rel == att.q:
                shape = (q * hd, hidden)
            elif rel in (att.k, att.v):
                shape = (kv * hd, hidden)
            elif rel == att.out:
                shape = (hidden, q * hd)
            elif rel in family.mlp.inputs:
                shape = (inter, hidden)
            else:  # mlp out
                shape = (hidden, inter)
            w = module.weight
            biased = getattr(module, "bias", None) is not None or f"{prefix}.{rel}" in added
            bias = torch.empty(shape[0], dtype=w.dtype, device=w.device) if biased else None
            tensors[rel] = (torch.empty(shape, dtype=w.dtype, device=w.device), bias)
        _shape_block(family, block, index, hd, tensors, q, kv, inter)
    setattr(model.config, STRUCTURE_KEY, structure)


def load_sliced(path: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Load a folder written by save_sliced: build the model from its config, reshape each
    layer as its structure key says, load the safetensors weights strictly (every key, every
    shape; only weights tied to a loaded one, such as a tied lm_head, may be absent)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights

    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    structure = getattr(config, STRUCTURE_KEY, None)
    if structure is None:
        raise ValueError(f"{path} is not a sliced model folder (no {STRUCTURE_KEY!r} in config.json).")
    with no_init_weights():  # every weight is read from the file below
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # init_weights, skipped above, is what ties them (e.g. lm_head to the embeddings)
    reshape_to_structure(model, structure)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{path} has no .safetensors weights.")
    state = {}
    for file in files:
        state.update(load_file(str(file)))
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)  # shapes are checked regardless
    except RuntimeError as exc:
        raise ValueError(f"{path}: the weights do not fit the sliced structure in config.json: {exc}") from exc
    loaded = {id(p) for name, p in model.named_parameters(remove_duplicate=False) if name in state}
    params = dict(model.named_parameters(remove_duplicate=False))
    untied = [k for k in missing if k not in params or id(params[k]) not in loaded]
    if untied or unexpected:
        raise ValueError(f"{path}: the weights do not fit the sliced structure in config.json (missing {untied[:5]}, "
                         f"unexpected {list(unexpected)[:5]}).")
    try:
        model.generation_config = GenerationConfig.from_pretrained(path)
    except OSError:
        pass
    return model.eval()
