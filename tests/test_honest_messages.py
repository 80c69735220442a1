"""Messages that must be true: whole-model sparsity with skipped misfit layers, mask files with
missing tensors, a cancelled weight-updating cut, and `cut --artifact` without `--model`.

Real tiny models, the real CLI (core.cli.main in-process: conftest's `cli`) and the explorer's own handlers."""
from __future__ import annotations

import json
import math

import pytest
import torch

from core.errors import Cancelled, MaskFileError
from core.mask_file import load_masks
from core.maskset import allocation_table
from core.patterns import Pattern
from core.dense import DenseWeights
from core.loading import load_model
from core.pruning import calibrate, cut
from tiny import random_windows

DATA = ["--calib-windows", "2", "--seqlen", "16"]
# 64:128 fits only the tiny Llama's down_proj (input width 128): the other 12 of 14 matrices
# (input width 64) do not fit and are skipped, as in the issue.
WIDE = Pattern(64, 128)


@pytest.fixture
def text(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text("The quick brown fox jumps over the lazy dog, and then it runs away again. " * 40)
    return path


def _whole_model_sparsity(lm, pattern: Pattern) -> tuple[float, list[str]]:
    shapes = DenseWeights(lm).shapes()
    fits = {n: s for n, s in shapes.items() if s[1] % pattern.m == 0}
    pruned = sum(math.prod(s) * (pattern.m - pattern.n) // pattern.m for s in fits.values())
    return pruned / sum(math.prod(s) for s in shapes.values()), [n for n in shapes if n not in fits]


# ---------------------------------------------------------------- skipped misfit layers

def test_cut_with_skipped_layers_reports_the_whole_model(tiny_model):
    lm = tiny_model("llama")
    expected, skipped = _whole_model_sparsity(lm, WIDE)
    assert len(skipped) == 12 and 0.1 < expected < 0.12
    artifact = calibrate(lm, "wanda", random_windows(4, 16))
    for masks in (cut(artifact, 0.5, WIDE, skip_misfits=True),
                  cut(calibrate(lm, "sparsegpt", random_windows(4, 16)), 0.5, WIDE, skip_misfits=True)):
        assert masks.total_sparsity() == pytest.approx(expected, abs=1e-9)  # not 0.5
        assert sorted(masks.skipped_layers) == sorted(skipped)
        rows = allocation_table(masks, lm)  # what the app draws and sums: the same numbers
        assert len(rows) == 14 and {r["name"] for r in rows if r.get("skipped")} == set(skipped)
        assert sum(r["pruned"] for r in rows) / sum(r["params"] for r in rows) == pytest.approx(expected)


def test_cli_prune_with_skipped_layers(tiny_llama_dir, tmp_path, text, cli):
    out = tmp_path / "run"
    rc, stdout, stderr = cli("prune", "--model", tiny_llama_dir, "--method", "wanda", "--pattern", "64:128",
                              "--skip-misfit-layers", "--no-eval", *DATA, "--calib-text", text, "--out", out)
    assert rc == 0, stderr
    lm = load_model(str(tiny_llama_dir))
    expected, skipped = _whole_model_sparsity(lm, WIDE)
    result = json.loads((out / "result.json").read_text())
    printed = json.loads(stdout[stdout.index("{"):])
    for summary in (result, printed):
        assert summary["achieved_sparsity"] == pytest.approx(expected, abs=1e-6)
        assert sorted(summary["skipped_layers"]) == sorted(skipped)
    note = [line for line in stderr.splitlines() if "left dense" in line]
    assert len(note) == 1 and "12 of 14" in note[0]
    # the mask file says so too, and loads with the skipped layers named as dense
    masks = load_masks(out / "masks.safetensors", lm)
    assert sorted(masks.skipped_layers) == sorted(skipped)
    assert masks.total_sparsity() == pytest.approx(expected, abs=1e-6)
    assert float(masks.meta["achieved_sparsity"]) == pytest.approx(expected, abs=1e-6)


def test_app_status_names_skipped_layers_and_whole_model_sparsity(tiny_llama_dir):
    from explorer.state import Session, get_model

    fns = _handlers(tiny_llama_dir)
    session = Session(model=get_model(str(tiny_llama_dir)))
    list(fns["calibrate"](session, "wanda", "", 2, 16, 0.5, "unstructured", 0, "q", "", "", progress=_quiet))
    out = fns["cut"](session, 0.5, "64:128", 0, "q", progress=_quiet)
    status, summary = out[0], out[4]  # (status, allocation, heatmap, histogram, summary, ...)
    expected, skipped = _whole_model_sparsity(session.model.lm, WIDE)
    assert f"{expected:.1%}" in status and "50.0%" not in status
    assert "12 of 14 matrices left dense" in status and skipped[0] in status
    assert summary["total_sparsity"] == pytest.approx(expected, abs=1e-6) and summary["matrices"] == 14
    out = fns["export_allocation"](session)  # the exported table agrees ([json, csv], maybe more outputs)
    json_path, csv_path = out[0] if isinstance(out[0], (list, tuple)) else out[:2]
    exported = json.loads(open(json_path).read())
    assert exported["total_sparsity"] == pytest.approx(expected) and len(exported["matrices"]) == 14
    assert len(open(csv_path).read().strip().splitlines()) == 1 + 14


# ---------------------------------------------------------------- mask files with tensors removed

def _without(path, dest, key: str):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
        tensors = {k: fh.get_tensor(k) for k in fh.keys() if k != key}
    save_file(tensors, str(dest), metadata=meta)
    return dest


def test_mask_file_missing_a_layer_is_refused(tiny_llama_dir, tmp_path, text, cli):
    out = tmp_path / "run"
    rc, _, stderr = cli("prune", "--model", tiny_llama_dir, "--method", "magnitude", "--no-eval", *DATA,
                         "--calib-text", text, "--out", out)
    assert rc == 0, stderr
    lm = load_model(str(tiny_llama_dir))
    name = "model.layers.1.mlp.up_proj"
    bad = _without(out / "masks.safetensors", tmp_path / "bad.safetensors", f"mask/{name}")
    with pytest.raises(MaskFileError, match=rf"no mask for 1 of the model's 14 .*{name}"):
        load_masks(bad, lm)
    rc, _, stderr = cli("eval", "--model", tiny_llama_dir, "--masks", bad, "--eval-text", text,
                         "--eval-windows", "1", "--seqlen", "16")
    assert rc == 2 and "error:" in stderr and name in stderr
    assert len(load_masks(out / "masks.safetensors", lm).masks) == 14  # a whole file still loads


def test_mask_file_with_recorded_dense_layers_loads_and_says_so(tiny_llama_dir, tmp_path, text, cli):
    out = tmp_path / "run"
    rc, _, stderr = cli("prune", "--model", tiny_llama_dir, "--method", "wanda", "--pattern", "64:128",
                         "--skip-misfit-layers", "--no-eval", *DATA, "--calib-text", text, "--out", out)
    assert rc == 0, stderr
    lm = load_model(str(tiny_llama_dir))
    rc, _, stderr = cli("eval", "--model", tiny_llama_dir, "--masks", out / "masks.safetensors",
                         "--eval-text", text, "--eval-windows", "1", "--seqlen", "16")
    assert rc == 0, stderr
    assert "12 of 14 matrices left dense" in stderr and "model.layers.0.self_attn.q_proj" in stderr
    # a pruned layer's tensor removed as well: not recorded as dense, so refused
    bad = _without(out / "masks.safetensors", tmp_path / "bad.safetensors", "mask/model.layers.0.mlp.down_proj")
    with pytest.raises(MaskFileError, match="model.layers.0.mlp.down_proj"):
        load_masks(bad, lm)


# ---------------------------------------------------------------- a cancelled weight-updating cut

def test_cancelled_solve_keeps_what_it_solved(tiny_model):
    lm = tiny_model("llama")
    artifact = calibrate(lm, "sparsegpt", random_windows(4, 16))
    asked = []

    def stop_after(n):
        def should_stop():
            asked.append(1)
            return len(asked) > n
        return should_stop

    with pytest.raises(Cancelled) as info:
        cut(artifact, 0.6, should_stop=stop_after(3))
    assert "unchanged" not in str(info.value)  # core cannot know what its caller kept
    assert (info.value.solved, info.value.total) == (3, 14) and "3 of 14" in str(info.value)
    asked.clear()
    resumed = cut(artifact, 0.6, should_stop=stop_after(100))
    assert len(asked) == 11  # only the matrices not solved before the cancel are solved now
    fresh = cut(calibrate(lm, "sparsegpt", random_windows(4, 16)), 0.6)
    for name in fresh.masks:
        assert torch.equal(resumed.masks[name], fresh.masks[name])
        assert torch.equal(resumed.weights[name], fresh.weights[name])
    asked.clear()
    cut(artifact, 0.4, should_stop=stop_after(100))
    assert len(asked) == 14  # another sparsity: nothing to reuse


def test_app_cancel_during_the_solve_keeps_the_previous_masks(tiny_llama_dir):
    from explorer.state import Session, get_model

    fns = _handlers(tiny_llama_dir)
    session = Session(model=get_model(str(tiny_llama_dir)))
    list(fns["calibrate"](session, "wanda", "", 2, 16, 0.5, "unstructured", 0, "q", "", "", progress=_quiet))
    previous, previous_artifact = session.masks, session.artifact
    assert previous is not None

    def cancel_mid_cut(value, desc=""):  # Cancel pressed while the 4th matrix is being solved
        if desc.startswith("cutting: ") and isinstance(value, tuple) and value[0] >= 3:
            session.cancel.set()

    calib = fns["calibrate"](session, "sparsegpt", "", 2, 16, 0.6, "unstructured", 0, "q", "", "",
                             progress=cancel_mid_cut)
    status = list(calib)[-1][0]
    assert "previous masks are unchanged" in status
    assert session.masks is previous and session.artifact is previous_artifact  # the promise is kept
    assert "50.0%" in status and "wanda" in status  # and the status shows those masks
    # the slider still re-cuts the previous (wanda) calibration
    status = fns["cut"](session, 0.3, "unstructured", 0, "q", progress=_quiet)[0]
    assert session.masks.meta["method"] == "wanda" and "**wanda**" in status
    assert float(session.masks.meta["target_sparsity"]) == 0.3
    # Calibrate again at the same settings resumes: no new calibration, only the rest is solved
    seen = []
    calib = fns["calibrate"](session, "sparsegpt", "", 2, 16, 0.6, "unstructured", 0, "q", "", "",
                             progress=lambda value, desc="": seen.append(desc))
    status = list(calib)[-1][0]
    assert not any(d.startswith("calibrating") for d in seen), seen
    assert session.masks.meta["method"] == "sparsegpt" and "**sparsegpt**" in status
    assert session.masks.total_sparsity() == pytest.approx(0.6, abs=0.01)
    assert session.interrupted is None


# ---------------------------------------------------------------- cut --artifact without --model

def test_cut_and_sweep_load_the_model_the_artifact_names(tiny_llama_dir, tmp_path, text, cli, hub_offline):
    artifact = tmp_path / "wanda.artifact.safetensors"
    rc, _, stderr = cli("calibrate", "--model", tiny_llama_dir, "--method", "wanda", *DATA,
                         "--calib-text", text, "--out", artifact)
    assert rc == 0, stderr
    out = tmp_path / "cut"
    rc, _, stderr = cli("cut", "--artifact", artifact, "--sparsity", "0.6", "--no-eval", "--out", out)
    assert rc == 0, stderr
    assert str(tiny_llama_dir) in stderr  # says which model it loaded, and why
    result = json.loads((out / "result.json").read_text())
    assert result["model"] == str(tiny_llama_dir) and result["achieved_sparsity"] == pytest.approx(0.6, abs=0.01)
    rc, stdout, stderr = cli("sweep", "--artifact", artifact, "--sparsities", "0.3", "--no-eval")
    assert rc == 0, stderr
    assert f"wanda on {tiny_llama_dir}" in stdout
    # an explicit --model that is another model is still refused
    from tiny import build_tiny_module, tiny_tokenizer

    other = tmp_path / "other"
    build_tiny_module("llama", seed=1).save_pretrained(other)
    tiny_tokenizer().save_pretrained(other)
    rc, _, stderr = cli("cut", "--model", other, "--artifact", artifact, "--no-eval",
                         "--out", tmp_path / "x")
    assert rc == 2 and "was calibrated on" in stderr


# ---------------------------------------------------------------- helpers

def _quiet(*_args, **_kwargs) -> None:
    return None


def _handlers(tiny_llama_dir) -> dict:
    """The explorer's own event handlers by api name (called directly: no server, no browser)."""
    from explorer.app import build_app

    demo = build_app(model=str(tiny_llama_dir), autoload=False)
    return {fn.api_name: fn.fn for fn in demo.fns.values() if fn.api_name in ("calibrate", "cut", "export_allocation")}
