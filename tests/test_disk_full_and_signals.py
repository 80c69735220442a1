"""A disk that fills and a process that is told to stop: one line, an exit code, nothing left behind.

- prune / calibrate / export onto a disk too small for what they write: exit 2 and one line naming
  the place, the space needed and the space free, no partial file; a prune's masks are kept in
  the cache folder, named in that line (before: a traceback, and the prune's work lost);
- a disk that fills while an export or a disk offload is being written (another program takes
  the space after the checks passed): the same line, the partial folder gone (before: a
  traceback, and for the offload a SIGBUS from its memory-mapped writes, exit 135, no message);
- SIGTERM during an offloaded prune: "Cancelled" and exit 143, the offload folder removed
  (before: exit 143 with no message and the folder left behind).

The disks are real tmpfs mounts of a few kilobytes (root only: skipped, saying so, where mounting
is impossible). A disk that fills midway is filled for real by the child process itself, from a
Python audit hook at the moment the command first opens a file for writing in the watched folder:
a fixed point in the run, so the test does not race the command.
"""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core.cli import main as cli_main
from support import REPO, child_env

# Run `python -m core ...` (argv after the first three) in a child that fills the disk of FOLDER,
# leaving LEAVE bytes free, when the command first opens for writing a file under FOLDER whose path
# contains TRIGGER.
FILL_AND_RUN = """
import os, sys
folder, trigger, leave = sys.argv[1], sys.argv[2], int(sys.argv[3])
done = []

def fill_when_writing(event, args):
    if event != "open" or done or not isinstance(args[0], str):
        return
    if args[0].startswith(folder) and trigger in args[0] and any(c in str(args[1]) for c in "wa+"):
        done.append(args[0])
        st = os.statvfs(folder)
        with open(os.path.join(folder, "ballast"), "wb") as fh:  # another program takes the space
            fh.write(b"\\0" * max(st.f_bavail * st.f_frsize - leave, 0))

sys.addaudithook(fill_when_writing)
sys.argv = ["python -m core"] + sys.argv[4:]
from core.cli import main
sys.exit(main())
"""


def _env(cache: Path) -> dict:
    return child_env(PRUNE_EXPLORER_CACHE=str(cache))


@pytest.fixture
def tmpfs(tmp_path):
    """Factory: tmpfs('8k') mounts a tmpfs of that size and returns its folder (unmounted after)."""
    mounted = []

    def mount(size: str) -> Path:
        folder = tmp_path / f"disk{len(mounted)}"
        folder.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here to make a full disk (needs root or CAP_SYS_ADMIN): "
                        f"{(done.stderr or done.stdout).strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


@pytest.fixture(scope="module")
def wide_model_dir(tmp_path_factory):
    """A random Llama (4 blocks, hidden 256: a 7 MiB checkpoint, masks of some 200 KiB) saved with
    the byte tokenizer: big enough that its files cannot fit on a disk of a few kilobytes and that
    a prune takes long enough to be stopped."""
    import torch
    from transformers import AutoModelForCausalLM

    from tiny import tiny_config, tiny_tokenizer

    config = tiny_config("llama")
    config.hidden_size, config.intermediate_size, config.num_hidden_layers = 256, 512, 4
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("wide-llama")
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def wide_masks(wide_model_dir, tmp_path_factory):
    """A mask file of the wide model, written on an ordinary disk."""
    out = tmp_path_factory.mktemp("wide-run")
    assert cli_main(["prune", "--model", str(wide_model_dir), "--method", "magnitude", "--no-eval",
                     "--calib-windows", "2", "--seqlen", "64", "--out", str(out)]) == 0
    return out / "masks.safetensors"


def _the_error(err: str) -> str:
    """The one `error:` line of a command's stderr (progress bars end with \\r, not \\n)."""
    assert "Traceback" not in err, err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def _files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# ---------------------------------------------------------------- a disk too small

def test_prune_onto_a_full_disk_keeps_the_masks_in_the_cache_and_says_where(
        wide_model_dir, tmpfs, tmp_path, monkeypatch, capsys):
    from core.mask_file import load_masks
    from core.loading import load_model

    disk = tmpfs("8k")
    cache = tmp_path / "cache"
    monkeypatch.setenv("PRUNE_EXPLORER_CACHE", str(cache))
    out = disk / "run"
    code = cli_main(["prune", "--model", str(wide_model_dir), "--method", "magnitude", "--calib-windows", "2",
                     "--seqlen", "64", "--eval-windows", "2", "--out", str(out)])
    line = _the_error(capsys.readouterr().err)
    assert code == 2
    assert "No space left on device" in line and str(out) in line and "KiB is free there" in line, line
    assert "needs" in line, line
    assert _files_under(disk) == []  # no partial masks file, not even the --out folder it would have made
    kept = [p for p in (cache / "unsaved-runs").iterdir()]
    assert len(kept) == 1 and str(kept[0]) in line, line
    masks = load_masks(kept[0] / "masks.safetensors", load_model(str(wide_model_dir)))
    assert abs(masks.total_sparsity() - 0.5) < 0.01
    result = (kept[0] / "result.json").read_text()
    assert '"ppl"' in result  # the evaluation is kept too


def test_calibrate_onto_a_full_disk_says_so_in_one_line(wide_model_dir, tmpfs, capsys):
    disk = tmpfs("8k")
    out = disk / "wanda.artifact.safetensors"
    code = cli_main(["calibrate", "--model", str(wide_model_dir), "--method", "wanda", "--calib-windows", "2",
                     "--seqlen", "64", "--out", str(out)])
    line = _the_error(capsys.readouterr().err)
    assert code == 2
    assert "No space left on device" in line and out.name in line and str(disk) in line, line
    assert "MiB" in line and "is free there" in line, line
    assert _files_under(disk) == []  # the temporary artifact file is gone


def test_export_onto_a_full_disk_is_refused_before_writing(wide_model_dir, wide_masks, tmpfs, capsys):
    disk = tmpfs("64k")
    out = disk / "model"
    code = cli_main(["export", "--model", str(wide_model_dir), "--masks", str(wide_masks), "--out", str(out)])
    line = _the_error(capsys.readouterr().err)
    assert code == 2
    assert "No space left on device" in line and str(disk) in line and "needs" in line, line
    assert _files_under(disk) == []


# ---------------------------------------------------------------- a disk that fills on the way

def _fill_and_run(disk: Path, trigger: str, leave: int, cache: Path, *args: str) -> subprocess.CompletedProcess:
    script = cache.parent / "fill_and_run.py"
    script.write_text(FILL_AND_RUN)
    return subprocess.run([sys.executable, str(script), str(disk), trigger, str(leave), *args],
                          capture_output=True, text=True, env=_env(cache), timeout=600)


def test_export_onto_a_disk_that_fills_midway_leaves_no_partial_folder(wide_model_dir, wide_masks, tmpfs,
                                                                      tmp_path):
    disk = tmpfs("20m")  # room for the export (7 MiB): the check before writing passes
    done = _fill_and_run(disk, ".partial", 16384, tmp_path / "cache", "export", "--model", str(wide_model_dir),
                         "--masks", str(wide_masks), "--out", str(disk / "model"))
    line = _the_error(done.stderr)
    assert done.returncode == 2, done.stderr
    assert "No space left on device" in line and str(disk) in line, line
    assert _files_under(disk) == ["ballast"]  # the staging folder is gone, no model folder appeared


def test_disk_offload_onto_a_disk_that_fills_midway_ends_in_a_message_not_a_bus_error(
        wide_model_dir, tmpfs, tmp_path):
    disk = tmpfs("12m")  # room for every pruned block (7 MiB): the offload space check passes
    # filled as the first pruned weight is written, leaving a little: enough for np.memmap to make
    # the file, not to fill it (the old code then died of SIGBUS)
    done = _fill_and_run(disk, "/offload-", 8192, tmp_path / "cache", "prune", "--model", str(wide_model_dir),
                         "--method", "magnitude", "--offload", "disk", "--offload-folder", str(disk),
                         "--no-eval", "--calib-windows", "2", "--seqlen", "64", "--out", str(tmp_path / "run"))
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])  # not -7 / 135 (SIGBUS)
    line = _the_error(done.stderr)
    assert "No space left on device" in line and "--offload-folder" in line and "is free there" in line, line
    assert _files_under(disk) == ["ballast", "pruning-explorer-offload"]  # its run's folder removed


# ---------------------------------------------------------------- SIGTERM

def _offloaded_weights(root: Path) -> list[Path]:
    return list(root.glob("pruning-explorer-offload/offload-*/*.dat"))


def test_sigterm_during_an_offloaded_prune_cancels_like_ctrl_c_and_removes_the_offload_folder(
        wide_model_dir, tmp_path):
    offload = tmp_path / "offload"
    # long enough to be stopped midway: four blocks, then 2000 evaluation windows
    proc = subprocess.Popen(
        [sys.executable, "-m", "core", "prune", "--model", str(wide_model_dir), "--method", "wanda",
         "--offload", "disk", "--offload-folder", str(offload), "--calib-windows", "8", "--seqlen", "256",
         "--eval-windows", "2000", "--out", str(tmp_path / "run")],
        cwd=REPO, env=_env(tmp_path / "cache"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not _offloaded_weights(offload):  # it is pruning: pruned weights are in its folder
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the prune never wrote an offloaded weight"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "Cancelled; nothing was written." in err and "Traceback" not in err, err[-2000:]
    assert list(offload.glob("pruning-explorer-offload/offload-*")) == []
    assert not (tmp_path / "run" / "masks.safetensors").exists()
