"""Exports never delete: what `--out` may replace, checked before any work, written with the
umask's ordinary permissions. The real CLI (core.cli.main) on the tiny Llama folder."""
from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from core.cli import main

TEXT = ("The quick brown fox jumps over the lazy dog. Pruning removes weights that matter least; "
        "calibration text tells which ones those are. ") * 30
FAST = ["--no-eval", "--calib-windows", "2", "--seqlen", "16"]


def _calib(folder: Path) -> Path:
    path = folder / "calib.txt"
    if not path.exists():
        path.write_text(TEXT)
    return path


def _prune(model: Path, out: Path, *extra: str) -> int:
    return main(["prune", "--model", str(model), "--method", "wanda", "--sparsity", "0.5",
                 "--calib-text", str(_calib(out.parent)), *FAST, "--out", str(out), *extra])


def _export(model: Path, masks: Path, out: Path, *extra: str) -> int:
    return main(["export", "--model", str(model), "--masks", str(masks), "--out", str(out), *extra])


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def run_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    """One real prune run (masks.safetensors + result.json), copied by the tests that need it."""
    out = tmp_path_factory.mktemp("prune") / "R"
    assert _prune(tiny_llama_dir, out) == 0
    return out


@pytest.fixture
def run(run_dir, tmp_path) -> Path:
    out = tmp_path / "R"
    shutil.copytree(run_dir, out)
    return out


def test_export_into_the_folder_holding_its_masks_is_refused(tiny_llama_dir, run, capsys):
    before = _snapshot(run)
    assert set(before) == {"masks.safetensors", "result.json"}
    assert _export(tiny_llama_dir, run / "masks.safetensors", run) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "masks.safetensors" in err and "Loading" not in err  # refused before loading
    # not even with --force, nor an ancestor of the masks' folder
    assert _export(tiny_llama_dir, run / "masks.safetensors", run, "--force") == 2
    assert _export(tiny_llama_dir, run / "masks.safetensors", run.parent, "--force") == 2
    assert _snapshot(run) == before
    # nor the model's own folder
    model_before = _snapshot(tiny_llama_dir)
    assert _export(tiny_llama_dir, run / "masks.safetensors", tiny_llama_dir, "--force") == 2
    assert _snapshot(tiny_llama_dir) == model_before
    assert "--force does not allow" in capsys.readouterr().err


def test_export_into_an_unmarked_folder_needs_force(tiny_llama_dir, run, tmp_path, capsys):
    out = tmp_path / "project"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    (out / "sub").mkdir()
    (out / "sub" / "data.csv").write_text("1,2,3")
    before, siblings = _snapshot(out), sorted(os.listdir(tmp_path))
    assert _export(tiny_llama_dir, run / "masks.safetensors", out) == 2
    err = capsys.readouterr().err
    assert "--force" in err and str(out) in err and "Loading" not in err
    assert _snapshot(out) == before and sorted(os.listdir(tmp_path)) == siblings  # nothing touched or left

    assert _export(tiny_llama_dir, run / "masks.safetensors", out, "--force") == 0
    assert not (out / "notes.txt").exists() and (out / "PRUNING.json").is_file() and (out / "config.json").is_file()
    assert sorted(os.listdir(tmp_path)) == siblings  # no backup, no staging folder left behind


def test_re_export_over_an_earlier_export_needs_no_force(tiny_llama_dir, run, tmp_path):
    from core.outputs import is_export_folder

    out = tmp_path / "model"
    assert _export(tiny_llama_dir, run / "masks.safetensors", out) == 0
    assert is_export_folder(out)
    (out / "stale.txt").write_text("from the first export")
    siblings = sorted(os.listdir(tmp_path))
    assert _export(tiny_llama_dir, run / "masks.safetensors", out) == 0
    assert is_export_folder(out) and not (out / "stale.txt").exists()
    assert sorted(os.listdir(tmp_path)) == siblings
    # an empty folder is fine too
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _export(tiny_llama_dir, run / "masks.safetensors", empty) == 0 and is_export_folder(empty)


def test_sliced_folders_carry_the_marker(tiny_model, tmp_path):
    """save_sliced without meta still marks its folder, so it can be re-saved without force."""
    from core.outputs import is_export_folder
    from core.structured.plan import StructuredPlan
    from core.structured.slicing import save_sliced, slice_model
    from core.structured.units import all_block_units

    lm = tiny_model("llama")
    plan = StructuredPlan.dense(all_block_units(lm))
    plan.keep_channels[0][: plan.keep_channels[0].numel() // 2] = False
    folder = save_sliced(slice_model(lm, plan), tmp_path / "sliced")
    assert is_export_folder(folder)
    assert save_sliced(slice_model(lm, plan), folder) == folder


def test_a_leftover_backup_name_does_not_crash(tiny_llama_dir, run, tmp_path):
    out = tmp_path / "model"
    assert _export(tiny_llama_dir, run / "masks.safetensors", out) == 0
    old = tmp_path / "model.old"
    old.mkdir()
    (old / "keep.txt").write_text("someone's backup")
    assert _export(tiny_llama_dir, run / "masks.safetensors", out) == 0
    assert (old / "keep.txt").read_text() == "someone's backup"
    assert sorted(os.listdir(tmp_path)) == sorted(["R", "model", "model.old"])


def test_an_unwritable_out_is_refused_before_any_work(tiny_llama_dir, run, tmp_path, capsys):
    """A path under a regular file can never be created (as root too): refused at once, the model
    never loaded, nothing created."""
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    artifact = tmp_path / "a.safetensors"
    commands = [
        ["prune", "--model", str(tiny_llama_dir), "--calib-text", str(_calib(tmp_path)), *FAST,
         "--out", str(blocker / "sub")],
        ["cut", "--model", str(tiny_llama_dir), "--artifact", str(artifact), *FAST, "--out", str(blocker / "sub")],
        ["calibrate", "--model", str(tiny_llama_dir), *FAST, "--out", str(blocker / "sub" / "a.safetensors")],
        ["calibrate", "--model", str(tiny_llama_dir), *FAST, "--out", str(tmp_path)],  # a folder, not a file
        ["sweep", "--model", str(tiny_llama_dir), *FAST, "--out", str(blocker / "table.json")],
        ["export", "--model", str(tiny_llama_dir), "--masks", str(run / "masks.safetensors"),
         "--out", str(blocker / "sub")],
        ["export", "--model", str(tiny_llama_dir), "--masks", str(run / "masks.safetensors"), "--out", str(blocker)],
    ]
    entries = sorted(os.listdir(tmp_path))
    for argv in commands:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "Loading" not in err, (argv, err)
        assert "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == entries and blocker.read_text() == "a file, not a folder"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders; the file/sub case covers it")
def test_a_read_only_folder_is_refused_before_any_work(tiny_llama_dir, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert _prune(tiny_llama_dir, locked / "run") == 2
        err = capsys.readouterr().err
        assert "not writable" in err and "Loading" not in err
    finally:
        locked.chmod(0o755)


def test_prune_overwrites_only_its_own_files(tiny_llama_dir, run, tmp_path, capsys):
    # its own earlier run: re-run in place (the documented behaviour)
    assert _prune(tiny_llama_dir, run) == 0
    # a folder whose result.json is someone else's: refused before loading, untouched
    other = tmp_path / "other"
    other.mkdir()
    (other / "result.json").write_text(json.dumps({"score": 1}))
    (other / "README").write_text("hello")
    before = _snapshot(other)
    capsys.readouterr()
    assert _prune(tiny_llama_dir, other) == 2
    err = capsys.readouterr().err
    assert "--force" in err and "result.json" in err and "Loading" not in err
    assert _snapshot(other) == before
    assert _prune(tiny_llama_dir, other, "--force") == 0
    assert (other / "README").read_text() == "hello" and (other / "masks.safetensors").is_file()


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_get_the_umask_modes(tiny_llama_dir, run_dir, tmp_path, umask):
    old = os.umask(umask)
    try:
        run = tmp_path / "R"
        assert _prune(tiny_llama_dir, run) == 0
        out = tmp_path / "model"
        assert _export(tiny_llama_dir, run / "masks.safetensors", out) == 0
        artifact = tmp_path / "art" / "a.safetensors"
        assert main(["calibrate", "--model", str(tiny_llama_dir), "--method", "wanda",
                     "--calib-text", str(_calib(tmp_path)), *FAST, "--out", str(artifact)]) == 0
    finally:
        os.umask(old)
    fmode, dmode = 0o666 & ~umask, 0o777 & ~umask
    files = [run / "masks.safetensors", run / "result.json", artifact,
             *[p for p in out.rglob("*") if p.is_file()]]
    folders = [run, out, artifact.parent, *[p for p in out.rglob("*") if p.is_dir()]]
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == fmode, (path, oct(path.stat().st_mode))
    for path in folders:
        assert stat.S_IMODE(path.stat().st_mode) == dmode, (path, oct(path.stat().st_mode))
