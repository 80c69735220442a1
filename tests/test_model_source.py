"""A model source that is watched, and a fingerprint that sees every weight: a checkpoint replaced
or deleted under a loaded model stops every restore (nothing is called dense any more) and a
reload recovers; a mask file, artifact or session made on weights one value apart is refused with
a message saying the weights changed; a memory-mapped artifact rewritten on disk is refused."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from core.artifacts import load_artifact, save_artifact
from core.dense import DenseWeights
from core.errors import MaskFileError, SourceChanged
from core.mask_file import load_masks, save_masks
from core.loading import load_model
from core.pruning import calibrate, cut


def _copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _weights_file(folder: Path) -> Path:
    return next(folder.glob("*.safetensors"))


def _rewrite(folder: Path, change) -> None:
    """Write the folder's weights again with `change(tensors)` applied, as an export would: a new
    file renamed over the old one."""
    path = _weights_file(folder)
    tensors = load_file(str(path))
    change(tensors)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)


def _unsampled_change(tensors: dict) -> str:
    """Change one weight that the old 1024-sample fingerprint never read; returns its tensor's name."""
    name = next(k for k in tensors if k.endswith("mlp.down_proj.weight"))
    flat = tensors[name].view(-1)
    k = min(1024, flat.numel())
    sampled = set((torch.arange(k) * (flat.numel() - 1) // max(k - 1, 1)).tolist())
    index = next(i for i in range(flat.numel()) if i not in sampled)
    flat[index] += 0.5
    return name


def _windows(lm, n=2, seqlen=16):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, lm.config.vocab_size - 4, (n, seqlen), generator=g)


def test_a_replaced_checkpoint_stops_restores_and_says_so(tiny_llama_dir, tmp_path):
    folder = _copy_model(tiny_llama_dir, tmp_path / "model")
    lm = load_model(str(folder))
    dense = DenseWeights(lm)
    masks = cut(calibrate(lm, "magnitude", _windows(lm)), 0.5)
    dense.apply(masks)
    masked = {n: m.weight.detach().clone() for n, m in lm.prunable().items()}
    _rewrite(folder, lambda t: t.update({k: v * 2 for k, v in t.items()}))  # a later export over it
    assert "was replaced by another file" in dense.source_problem()
    with pytest.raises(SourceChanged, match="was replaced by another file.*Nothing is called dense any more"):
        dense.restore()
    with pytest.raises(SourceChanged):
        dense.apply(masks)
    # refused before anything was written: the model is as it was, not half restored from other weights
    assert all(torch.equal(m.weight, masked[n]) for n, m in lm.prunable().items())


def test_a_deleted_source_is_named_and_a_reload_reads_the_new_file(tiny_llama_dir, tmp_path):
    folder = _copy_model(tiny_llama_dir, tmp_path / "model")
    lm = load_model(str(folder))
    dense = DenseWeights(lm)
    path = _weights_file(folder)
    saved = path.read_bytes()
    path.unlink()
    with pytest.raises(SourceChanged, match="was deleted"):
        dense.restore()
    path.write_bytes(saved)  # put back: what was read meanwhile stays untrusted
    with pytest.raises(SourceChanged):
        dense.restore()
    again = DenseWeights(load_model(str(folder)))
    again.restore()  # a fresh load is watched anew


def test_one_unsampled_weight_changed_refuses_the_artifact_with_what_changed(tiny_llama_dir, tmp_path):
    folder = _copy_model(tiny_llama_dir, tmp_path / "model")
    lm = load_model(str(folder))
    artifact_path = save_artifact(tmp_path / "a.safetensors", calibrate(lm, "wanda", _windows(lm)), lm)
    masks_path = save_masks(tmp_path / "masks.safetensors", cut(load_artifact(artifact_path, lm), 0.5), lm)
    _rewrite(folder, _unsampled_change)
    changed = load_model(str(folder))
    assert changed.sampled_fingerprint() == lm.sampled_fingerprint()  # the old fingerprint was blind to it
    assert changed.fingerprint != lm.fingerprint
    for call in (lambda: load_artifact(artifact_path, changed), lambda: load_masks(masks_path, changed)):
        with pytest.raises(MaskFileError, match="with other weights .* its weights changed since") as info:
            call()
        assert str(info.value).count(str(folder)) == 1  # the model it was made for, named once


def test_cli_cut_refuses_a_stale_artifact(tiny_llama_dir, tmp_path, capsys):
    from core import cli

    folder = _copy_model(tiny_llama_dir, tmp_path / "model")
    artifact = tmp_path / "a.safetensors"
    assert cli.main(["calibrate", "--model", str(folder), "--method", "wanda", "--calib-text", "python-docs",
                     "--calib-windows", "2", "--seqlen", "16", "--out", str(artifact)]) == 0
    _rewrite(folder, _unsampled_change)
    capsys.readouterr()
    rc = cli.main(["cut", "--model", str(folder), "--artifact", str(artifact), "--sparsity", "0.5", "--no-eval",
                   "--out", str(tmp_path / "cut")])
    err = capsys.readouterr().err
    assert rc == 2 and "weights changed since" in err and "Traceback" not in err
    assert not (tmp_path / "cut").exists()


def test_files_written_before_fingerprint_version_2_still_load(tiny_llama_dir, tmp_path):
    from safetensors import safe_open

    lm = load_model(str(tiny_llama_dir))
    path = save_masks(tmp_path / "masks.safetensors", cut(calibrate(lm, "magnitude", _windows(lm)), 0.5), lm)
    with safe_open(str(path), framework="pt") as fh:
        meta, tensors = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}
    del meta["fingerprint_version"]
    meta["model_fingerprint"] = lm.sampled_fingerprint()  # as the tool wrote it before
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata=meta)
    assert load_masks(old, lm).total_sparsity() == pytest.approx(0.5, abs=0.01)
    meta["model_fingerprint"] = "0" * 16
    save_file(tensors, str(old), metadata=meta)
    with pytest.raises(MaskFileError, match="other weights"):
        load_masks(old, lm)


def test_an_artifact_rewritten_under_its_memory_map_is_refused(tiny_llama_dir, tmp_path):
    lm = load_model(str(tiny_llama_dir))
    path = save_artifact(tmp_path / "a.safetensors", calibrate(lm, "wanda", _windows(lm)), lm)
    artifact = load_artifact(path, lm)
    with open(path, "r+b") as fh:  # truncated in place: read through the map, SIGBUS would end the process
        fh.truncate(path.stat().st_size // 2)
    with pytest.raises(SourceChanged, match="modified in place"):
        cut(artifact, 0.5).masks[next(iter(artifact.block_of))]


def test_the_app_stops_calling_a_replaced_model_dense_and_load_recovers(serve_app, tiny_llama_dir, tmp_path):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    from explorer.app import build_app

    folder = _copy_model(tiny_llama_dir, tmp_path / "app-model")
    client = Client(serve_app(build_app(model=str(folder), autoload=False)), verbose=False, download_files=False)
    client.predict(str(folder), "float32", "cpu", "none", api_name="/load_model")
    client.predict(method_name="magnitude", windows=2, seqlen=16, sparsity=0.5, params_json="", api_name="/calibrate")
    gen = dict(prompt="The quick brown fox", max_new_tokens=8)
    before, _pruned, _ = client.predict(**gen, api_name="/generate")

    _rewrite(folder, lambda t: t.update({k: torch.randn_like(v) for k, v in t.items()}))
    with pytest.raises(AppError, match="was replaced by another file.*Press Load"):
        client.predict(**gen, api_name="/generate")
    with pytest.raises(AppError, match="was replaced by another file"):
        client.predict(source="python-docs", seqlen=16, max_windows=1, api_name="/perplexity")

    client.predict(str(folder), "float32", "cpu", "none", api_name="/load_model")  # reload: the new weights
    client.predict(method_name="magnitude", windows=2, seqlen=16, sparsity=0.5, params_json="", api_name="/calibrate")
    after, _pruned, _ = client.predict(**gen, api_name="/generate")
    fresh = load_model(str(folder))
    from core.evaluate import GenerationSettings, generate

    assert after == generate(fresh, gen["prompt"], GenerationSettings(max_new_tokens=8)) != before
