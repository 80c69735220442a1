"""The engine at model sizes that do not fit twice: offloaded blocks, restore without a copy,
16-bit calibration, and resident memory that follows the memory model.

Everything runs on real models: the tiny Llama saved as a safetensors folder (loaded in memory
or with its blocks offloaded to disk by accelerate), and for the memory bound a random Llama of
a few hundred MB pruned by the CLI in a child process whose own peak RSS is read from wait4.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from core.dense import DenseWeights
from core.errors import ModelLoadError
from core.evaluate import perplexity
from core.loading import load_model
from core.offload import is_offloaded
from core.pruning import calibrate, cut, prune_sequential
from support import REPO

BATCH = 2


def _masks(mask_set) -> dict[str, torch.Tensor]:
    return {name: mask_set.masks[name].clone() for name in mask_set.masks}


def _run_all(lm, windows) -> dict:
    """Wanda calibrate + cut + apply (ppl), restore (ppl), SparseGPT block by block (ppl and, for a
    model in memory, the fraction of zeros in each matrix it left), restore (ppl)."""
    dense = DenseWeights(lm)
    protocol = {"source": "random ids"}
    artifact = calibrate(lm, "wanda", windows, dense=dense, batch_size=BATCH)
    wanda = cut(artifact, 0.5)
    dense.apply(wanda)
    out = {"wanda": _masks(wanda), "wanda_ppl": perplexity(lm, windows, protocol).value}
    dense.restore()
    out["dense_ppl"] = perplexity(lm, windows, protocol).value
    sgpt, _ = prune_sequential(lm, "sparsegpt", windows, 0.5, dense=dense, batch_size=BATCH, keep_artifact=False)
    out["sparsegpt"] = _masks(sgpt)
    out["sparsegpt_ppl"] = perplexity(lm, windows, protocol).value
    out["sparsegpt_zeros"] = {name: float((lm.family.weight_view(m) == 0).float().mean())
                              for name, m in lm.prunable().items() if m.weight.device.type != "meta"}
    dense.restore()
    out["restored_ppl"] = perplexity(lm, windows, protocol).value
    return out


def test_disk_offload_gives_identical_masks_and_perplexity(tiny_llama_dir, windows_4x32):
    in_memory = load_model(str(tiny_llama_dir))
    offloaded = load_model(str(tiny_llama_dir), offload="disk")
    assert offloaded.offload == "disk" and offloaded.fingerprint == in_memory.fingerprint
    prunable = offloaded.prunable()
    assert all(is_offloaded(m) for m in prunable.values())
    assert all(m.weight.device.type == "meta" for m in prunable.values())  # blocks are not in memory
    a, b = _run_all(in_memory, windows_4x32), _run_all(offloaded, windows_4x32)
    for kind in ("wanda", "sparsegpt"):
        assert a[kind].keys() == b[kind].keys()
        for name in a[kind]:
            assert torch.equal(a[kind][name], b[kind][name]), (kind, name)
    for key in ("wanda_ppl", "dense_ppl", "sparsegpt_ppl", "restored_ppl"):
        assert a[key] == b[key], key
    assert a["restored_ppl"] == a["dense_ppl"]
    # the prune really changed the model: half of every matrix is zero while it is pruned (its
    # perplexity moves only ~0.2% on this random model, so that alone would say little)
    assert a["sparsegpt_zeros"].keys() == a["sparsegpt"].keys()
    assert all(zeros == 0.5 for zeros in a["sparsegpt_zeros"].values()), a["sparsegpt_zeros"]
    assert a["sparsegpt_ppl"] != a["dense_ppl"]


def _held_tensor_bytes(obj) -> int:
    """Bytes of the tensors an object holds in its own attributes (dicts and lists followed)."""
    seen, total = set(), 0

    def add(x):
        nonlocal total
        if isinstance(x, torch.Tensor):
            if x.data_ptr() not in seen and x.device.type != "meta":
                seen.add(x.data_ptr())
                total += x.numel() * x.element_size()
        elif isinstance(x, dict):
            for v in x.values():
                add(v)
        elif isinstance(x, (list, tuple, set)):
            for v in x:
                add(v)

    add([v for k, v in vars(obj).items() if k not in ("lm", "modules")])
    return total


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_restore_is_bit_exact_and_keeps_no_copy(tiny_llama_dir, windows_4x32, dtype):
    lm = load_model(str(tiny_llama_dir), dtype=dtype)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    dense = DenseWeights(lm)
    assert set(dense.sources().values()) == {"checkpoint"}  # read from the folder, not copied
    biases = sum(b.numel() * b.element_size() for b in dense.dense_bias.values() if b is not None)
    assert _held_tensor_bytes(dense) <= biases
    masks = cut(calibrate(lm, "wanda", windows_4x32, dense=dense, batch_size=BATCH), 0.6)
    dense.apply(masks)
    assert any(not torch.equal(lm.model.state_dict()[k], v) for k, v in before.items())
    dense.restore()
    for key, value in lm.model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_a_model_built_in_memory_restores_from_its_spill_file(tiny_model, windows_4x32):
    lm = tiny_model("gpt2")  # Conv1D weights: stored transposed
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    dense = DenseWeights(lm)
    assert set(dense.sources().values()) == {"spill"}
    spill = dense.spill_folder
    assert spill.is_dir()
    prune_sequential(lm, "sparsegpt", windows_4x32, 0.5, dense=dense, batch_size=BATCH)
    dense.restore()
    for key, value in lm.model.state_dict().items():
        assert torch.equal(value, before[key]), key
    del dense
    import gc
    gc.collect()
    assert not spill.exists()


def test_bfloat16_calibration_matches_float32(tiny_llama_dir, windows_4x32):
    """A bf16 model is calibrated in bf16 with float32 statistics. Stated tolerance: Wanda masks at
    50% agree on at least 97% of weights, and perplexity differs by at most 2%."""
    full = load_model(str(tiny_llama_dir), dtype="float32")
    half = load_model(str(tiny_llama_dir), dtype="bfloat16")
    assert next(half.model.parameters()).dtype == torch.bfloat16
    results = []
    for lm in (full, half):
        dense = DenseWeights(lm)
        artifact = calibrate(lm, "wanda", windows_4x32, dense=dense, batch_size=BATCH)
        assert all(s.sum_x2.dtype == torch.float32 for s in artifact.stats.values())
        masks = cut(artifact, 0.5)
        dense.apply(masks)
        results.append((_masks(masks), perplexity(lm, windows_4x32, {}).value))
    (m32, p32), (m16, p16) = results
    agree = sum(int((m32[n] == m16[n]).sum()) for n in m32) / sum(m.numel() for m in m32.values())
    assert agree >= 0.97, agree
    assert abs(p16 - p32) / p32 <= 0.02, (p16, p32)


def test_auto_dtype_follows_a_16_bit_checkpoint(tmp_path, tiny_llama_dir):
    half = load_model(str(tiny_llama_dir), dtype="bfloat16")
    half.model.save_pretrained(tmp_path)
    half.tokenizer.save_pretrained(tmp_path)
    assert next(load_model(str(tmp_path), dtype="auto").model.parameters()).dtype == torch.bfloat16
    assert next(load_model(str(tiny_llama_dir), dtype="auto").model.parameters()).dtype == torch.float32


def test_a_model_too_big_for_memory_is_refused_with_advice(tmp_path):
    """A 70B-shaped config (no weights needed: the check runs before any is read)."""
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=128256).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match=r"70\.\d+B parameters.*--offload disk"):
        load_model(str(tmp_path), dtype="bfloat16")


def test_an_unwritable_offload_folder_is_refused(tiny_llama_dir):
    with pytest.raises(ModelLoadError, match="Cannot write the offload folder"):
        load_model(str(tiny_llama_dir), offload="disk", offload_folder="/proc/no-such-place")


def test_cli_prune_with_disk_offload_writes_the_same_masks(cli, tiny_llama_dir, tmp_path):
    from core.mask_file import load_masks

    outs = []
    for offload in ("none", "disk"):
        out = tmp_path / offload
        done = cli("prune", "--model", tiny_llama_dir, "--method", "wanda", "--sparsity", "0.5", "--calib-windows", "4",
                   "--seqlen", "32", "--no-eval", "--out", out, "--offload", offload)
        assert done.code == 0, done.err[-2000:]
        outs.append(out / "masks.safetensors")
    lm = load_model(str(tiny_llama_dir))
    a, b = load_masks(outs[0], lm), load_masks(outs[1], lm)
    for name in a.masks:
        assert torch.equal(a.masks[name], b.masks[name]), name


# ---------------------------------------------------------------- resident memory

_LOAD_ONLY = "import sys; from core.loading import load_model; load_model(sys.argv[1], dtype=\"auto\")"


def _peak_rss(cmd: list[str]) -> tuple[int, str]:
    """(peak resident bytes of the child itself, its stderr) via wait4's rusage."""
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.returncode == 0, err[-2000:]
    return usage.ru_maxrss * 1024, err


@pytest.fixture(scope="module")
def medium_llama_dir(tmp_path_factory, tiny_tokenizer):
    """A random Llama of ~320M parameters, ~0.65 GB in bf16, saved as a safetensors folder: big enough
    that one matrix's scoring temporaries stay well below half of it (a second copy would be all of it)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    folder = tmp_path_factory.mktemp("medium-llama")
    config = LlamaConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=16, num_attention_heads=16,
                         num_key_value_heads=4, vocab_size=32000, max_position_embeddings=512)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


def test_pruning_memory_stays_within_the_memory_model(medium_llama_dir, tmp_path):
    """Peak RSS of `prune` minus that of loading the model is bounded by what the memory model
    says the calibration adds (activations, one block's statistics, packed masks, temporaries),
    and is far below a second copy of the weights."""
    from core.memory import ModelShapes, estimate_calibration

    windows, seqlen = 4, 128
    loaded, _ = _peak_rss([sys.executable, "-c", _LOAD_ONLY, str(medium_llama_dir)])
    pruned, err = _peak_rss([sys.executable, "-m", "core", "prune", "--model", str(medium_llama_dir),
                             "--method", "wanda", "--calib-windows", str(windows), "--seqlen", str(seqlen),
                             "--no-eval", "--out", str(tmp_path / "run")])
    lm = load_model(str(medium_llama_dir))
    model_bytes = sum(p.numel() * p.element_size() for p in lm.model.parameters())
    estimate = estimate_calibration(ModelShapes.from_model(lm), "wanda", windows, seqlen, 8, "prune").total
    growth = pruned - loaded
    assert growth <= 1.5 * estimate + 96 * 2**20, (growth, estimate, err[-500:])
    assert growth < 0.5 * model_bytes, (growth, model_bytes)  # no second copy of the weights


def test_a_given_offload_folder_keeps_what_was_there(tiny_llama_dir, tmp_path):
    """Offload folders of killed runs are cleaned up only inside the tool's own subfolder: a user's
    folder named like one (under --offload-folder) stays."""
    theirs = tmp_path / "offload-4206557-user-data"  # a pid above Linux's default pid_max: not running
    theirs.mkdir()
    (theirs / "keep.txt").write_text("mine")
    lm = load_model(str(tiny_llama_dir), offload="disk", offload_folder=str(tmp_path))
    assert lm.offload == "disk"
    assert (theirs / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["offload-4206557-user-data", "pruning-explorer-offload"]
