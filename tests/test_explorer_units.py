"""The explorer's parts without a running app: the streaming helper, the session's runs, the
tabs' handlers called as plain functions of (session, inputs), and `import explorer` building
nothing."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
pytest.importorskip("gradio")

from explorer.state import Run, Runs, Session, get_model  # noqa: E402
from explorer.streaming import Streamed  # noqa: E402
from support import REPO  # noqa: E402


def _quiet(*_args, **_kwargs) -> None:
    return None


# ---------------------------------------------------------------- the streaming helper

def test_streamed_yields_in_order_and_keeps_the_result():
    stream = Streamed(lambda emit, stop: [emit(i) for i in range(5)] and "done")
    assert list(stream) == [0, 1, 2, 3, 4] and stream.result == "done"


def test_streamed_raises_the_workers_error_in_the_reader():
    def work(emit, stop):
        emit(1)
        raise KeyError("boom")

    seen = []
    with pytest.raises(KeyError, match="boom"):
        for item in Streamed(work):
            seen.append(item)
    assert seen == [1]


def test_streamed_coalesces_only_while_the_reader_is_busy():
    go = threading.Event()

    def work(emit, stop):
        emit(("plan", 0))
        go.wait(5)  # the reader is busy with the first item meanwhile
        for i in range(1, 6):
            emit(("plan", i))
        emit(("other", 99))
        emit(("plan", 7))
        return "end"

    stream = Streamed(work, coalesce=lambda item: item[0] == "plan")
    out = []
    for item in stream:
        out.append(item)
        if item == ("plan", 0):
            go.set()
            time.sleep(0.3)  # every later plan is queued by now
    # plans 1..4 were skipped for the newest (5); the non-plan item and the plan after it are kept in order
    assert out == [("plan", 0), ("plan", 5), ("other", 99), ("plan", 7)] and stream.result == "end"


def test_streamed_tells_the_worker_when_the_reader_stops():
    finished = threading.Event()
    lock = threading.Lock()

    def work(emit, stop):
        with lock:  # what a generation holds: released however the reader leaves
            for i in range(10_000):
                if stop.is_set():
                    break
                emit(i)
                time.sleep(0.001)
        finished.set()

    stream = iter(Streamed(work))
    assert next(stream) == 0
    stream.close()  # the browser went away
    assert finished.wait(5), "the worker did not stop"
    assert lock.acquire(timeout=1)
    lock.release()


def test_one_streaming_helper_serves_every_streamed_handler():
    """No second thread + queue copy: the generation and the structured prune use Streamed."""
    sources = {p.name: p.read_text() for p in (REPO / "explorer").rglob("*.py")}
    users = sorted(name for name, text in sources.items() if "queue.Queue" in text)
    assert users == ["streaming.py"], users
    assert "Streamed(" in sources["generate.py"] and "Streamed(" in sources["structured_view.py"]


# ---------------------------------------------------------------- import, runs

def test_import_explorer_builds_nothing():
    code = ("import sys, explorer, explorer.figures, explorer.compare; "
            "assert 'explorer.app' not in sys.modules and explorer._DEMO is None; "
            "assert 'gradio' not in sys.modules, 'gradio imported'")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_runs_names_order_active_and_removal():
    runs = Runs()
    a = runs.add(Run(id="", name="wanda", method="wanda"))
    b = runs.add(Run(id="", name="wanda", method="wanda"))
    c = runs.add(Run(id="", name="owl", method="owl"), activate=False)
    assert [r.name for r in runs] == ["wanda", "wanda #2", "owl"] and runs.active is b
    assert runs.choices() == [("wanda", a.id), ("wanda #2", b.id), ("owl", c.id)]
    runs.rename(b.id, "owl")
    assert b.name == "owl #2" and runs.require("owl #2") is b  # by id or by name
    with pytest.raises(ValueError, match="Type a new name"):
        runs.rename(a.id, "  ")
    runs.remove(b.id)
    assert runs.active is c and len(runs) == 2  # the newest run left becomes active
    with pytest.raises(ValueError, match="No run"):
        runs.require("nope")
    restored = runs.add(Run(id="r9", name="wanda", method="wanda"))
    assert restored.id == "r9" and runs.new_id() == "r10"  # ids from a session file never collide


# ---------------------------------------------------------------- handlers as functions

@pytest.fixture
def session(tiny_llama_dir):
    return Session(model=get_model(str(tiny_llama_dir)), default_spec=str(tiny_llama_dir))


def _calibrate(session, method="wanda", sparsity=0.5, params=""):
    from explorer.tabs.calibrate import on_calibrate

    out = list(on_calibrate(session, method, "", 2, 16, sparsity, "unstructured", 0, "q", params, "",
                            progress=_quiet))
    return out[-1]


def test_handlers_run_without_a_blocks_app(session):
    import json

    from explorer.tabs import live, perplexity

    status, alloc, heat, hist, summary = _calibrate(session)
    assert "Calibrated **wanda**" in status and summary["run"] == "wanda"
    _calibrate(session, "magnitude")
    assert [r.name for r in session.runs] == ["wanda", "magnitude"] and session.active.name == "magnitude"
    status, alloc, *_rest, summary = live.on_cut(session, 0.3, "unstructured", 0, "q", progress=_quiet)
    assert all(abs(r.masks.total_sparsity() - 0.3) < 0.02 for r in session.runs)  # every shown run re-cut
    traces = json.loads(alloc.plot)["data"]
    assert [t["name"].split(":")[0] for t in traces] == ["wanda", "magnitude"]
    assert "Shown with it: wanda 29.7%" in status  # row-wise: 19 of 64 per row
    # hide one: the chart is that run's own again, and the slider leaves the hidden run alone
    wanda = session.runs.by_name("wanda")
    live.on_show_runs(session, [session.active.id], 0, "q", progress=_quiet)
    live.on_cut(session, 0.6, "unstructured", 0, "q", progress=_quiet)
    assert abs(wanda.masks.total_sparsity() - 0.3) < 0.02 and abs(session.masks.total_sparsity() - 0.6) < 0.02
    # shown again: cut at the slider's value at once
    live.on_show_runs(session, [r.id for r in session.runs], 0, "q", progress=_quiet)
    assert abs(wanda.masks.total_sparsity() - 0.6) < 0.02
    table, active, shown, *_dropdowns, as_json = live.on_refresh_runs(session)
    assert [row[0] for row in table] == ["wanda", "magnitude (active)"] and len(shown["value"]) == 2
    assert [r["achieved"] for r in as_json] == [pytest.approx(0.6, abs=0.02)] * 2
    md, _ppl, _plot, points = perplexity.on_perplexity(session, "python-docs", 16, 1, progress=_quiet)
    assert points[-1]["run"] == "magnitude"


def test_more_runs_than_memory_allows_is_refused_before_calibrating(session, monkeypatch):
    from core.memory import ModelShapes, estimate_calibration
    from core.methods import get_method
    from explorer.tabs import calibrate

    _calibrate(session)
    need = estimate_calibration(ModelShapes.from_model(session.model.lm), get_method("wanda"), 2, 16).total
    monkeypatch.setattr(calibrate, "memory_available", lambda device: need // 2)  # a machine nearly full
    started = []
    monkeypatch.setattr(calibrate, "calibration_set", lambda *a, **k: started.append(1))
    with pytest.raises(Exception) as err:
        _calibrate(session)
    text = str(err.value)
    assert "Not enough memory" in text and "This session holds 1 run (wanda" in text and "delete a run" in text
    assert not started and len(session.runs) == 1  # refused before any work, nothing added


def test_sweep_of_every_run_streams_points_and_cancel_keeps_them(session):
    from explorer.tabs import perplexity

    _calibrate(session)
    _calibrate(session, "magnitude")
    steps = perplexity.on_sweep_runs(session, "0.3, 0.5, 0.7", "python-docs", 16, 1, progress=_quiet)
    md, plot, points = next(steps)
    assert "Measured 1 of 6 points" in md and len(points) == 1 and points[0]["run"] == "wanda"
    md, plot, points = next(steps)
    assert len(points) == 2
    session.cancel.set()  # Cancel pressed while the third point is measured
    md, plot, points = next(steps)
    assert md.startswith("Cancelled after 2 of 6 points; those are kept") and len(points) == 2
    assert [p["sparsity"] for p in points] == [pytest.approx(0.3, abs=0.01), pytest.approx(0.5, abs=0.01)]
    with pytest.raises(StopIteration):
        next(steps)
    # run again: every point, one line per run
    *_, (md, plot, points) = perplexity.on_sweep_runs(session, "0.3, 0.5", "python-docs", 16, 1, progress=_quiet)
    import json

    lines = json.loads(plot.plot)["data"]
    assert [t["name"] for t in lines] == ["wanda", "magnitude"] and [len(t["x"]) for t in lines] == [2, 2]


def test_reopened_session_reads_its_artifacts_from_the_session_file(session, tmp_path, monkeypatch):
    """Reopening copies nothing: no file is written, each run's artifact is memory-mapped from the
    session file (kept open: the runs are still cut again once the file is deleted)."""
    import tempfile

    from explorer import session_file
    from explorer.state import tmp_root
    from explorer.tabs import live

    _calibrate(session, "wanda")
    _calibrate(session, "unipruning")
    path = session_file.save_session(tmp_path / "saved.safetensors", session)
    saved = {r.name: r for r in session.runs}
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))

    def files() -> set:
        return {p for root in (tmp_root(), Path(tempfile.gettempdir())) for p in root.rglob("*") if p.is_file()}

    other = Session(model=session.model, default_spec=session.default_spec)
    other.tmpdir()  # the folder the app hands read_session
    before = files()
    session_file.restore(other, session_file.read_session(path, other.model, other.tmpdir()))
    assert files() == before  # no temporary copy of any artifact
    assert [r.name for r in other.runs] == ["wanda", "unipruning"]
    for run in other.runs:
        assert os.path.samefile(run.artifact._base._store.path, path)  # the session file itself
        assert run.artifact.nbytes() < saved[run.name].artifact.nbytes() and run.artifact.nbytes() < 2**16
        masks = saved[run.name].masks
        assert all(bool((run.masks.masks[n] == masks.masks[n]).all()) for n in masks.masks), run.name
    os.remove(path)  # e.g. gradio's cache cleaning an uploaded file: the open file is still read
    live.on_cut(other, 0.3, "unstructured", 0, "q", progress=_quiet)
    assert all(abs(r.masks.total_sparsity() - 0.3) < 0.02 for r in other.runs)
    assert files() == before
    # a reopened session saved again (its artifacts read from the first file) reopens as well
    again = session_file.save_session(tmp_path / "again.safetensors", other)
    third = Session(model=session.model, default_spec=session.default_spec)
    session_file.restore(third, session_file.read_session(again, third.model))
    for run, reopened in zip(other.runs, third.runs):
        assert all(bool((reopened.masks.masks[n] == run.masks.masks[n]).all()) for n in run.masks.masks), run.name


def _session_with_stored_masks(session):
    """A session whose runs' masks go into its file: SparseGPT (it re-solves weights) and a fixed
    mask (an imported one, no calibration)."""
    from core.maskset import MaskSet

    _calibrate(session, "sparsegpt")
    generator = torch.Generator().manual_seed(0)
    fixed = {name: torch.rand(shape, generator=generator) < 0.7 for name, shape in session.model.dense.shapes().items()}
    session.runs.add(Run(id="", name="fixed", method="imported", origin="imported",
                         masks=MaskSet(masks=fixed, meta={"method": "imported"})))
    return session


def _same_masks(a, b) -> bool:
    return set(a.masks) == set(b.masks) and all(torch.equal(a.masks[n], b.masks[n]) for n in a.masks)


def test_a_reopened_sessions_masks_are_packed_one_bit_a_weight(session, tmp_path):
    from safetensors import safe_open

    from core.packing import PackedMasks, packed_shape
    from explorer import session_file

    _session_with_stored_masks(session)
    path = session_file.save_session(tmp_path / "saved.safetensors", session)
    with safe_open(str(path), framework="pt") as fh:
        assert fh.metadata()["format_version"] == session_file.VERSION == "2"
        stored = {k: fh.get_tensor(k) for k in fh.keys() if "/mask/" in k}
    shapes = session.model.dense.shapes()
    assert len(stored) == 2 * len(shapes)  # both runs' masks, in core.packing.pack_mask's per-row layout
    assert all(t.dtype == torch.uint8 and tuple(t.shape) == packed_shape(shapes[k.split("/mask/")[1]])
               for k, t in stored.items())
    other = Session(model=session.model, default_spec=session.default_spec)
    session_file.restore(other, session_file.read_session(path, other.model))
    for run, saved in zip(other.runs, session.runs):
        assert isinstance(run.masks.masks, PackedMasks), run.name
        assert run.masks.masks.nbytes() == sum(-(-d_in // 8) * d_out for d_out, d_in in shapes.values())
        assert _same_masks(run.masks, saved.masks), run.name
        assert run.masks.pruned_counts() == saved.masks.pruned_counts()
        assert all(torch.equal(run.masks.weights[n], saved.masks.weights[n]) for n in saved.masks.weights)
    # saved again from packed masks (written as held), it reopens the same
    again = session_file.save_session(tmp_path / "again.safetensors", other)
    third = Session(model=session.model, default_spec=session.default_spec)
    session_file.restore(third, session_file.read_session(again, third.model))
    assert all(_same_masks(a.masks, b.masks) for a, b in zip(third.runs, session.runs))


def test_a_session_file_of_the_old_layout_still_opens(session, tmp_path):
    """Format version 1 stored each mask as one flat np.packbits row of the whole matrix."""
    import numpy as np
    from safetensors import safe_open
    from safetensors.torch import save_file

    from core.packing import PackedMasks, unpack_mask
    from explorer import session_file

    _session_with_stored_masks(session)
    path = session_file.save_session(tmp_path / "saved.safetensors", session)
    with safe_open(str(path), framework="pt") as fh:
        meta = dict(fh.metadata())
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    shapes = session.model.dense.shapes()
    for key, tensor in tensors.items():
        if "/mask/" in key:  # as version 1 wrote it
            mask = unpack_mask(tensor, shapes[key.split("/mask/")[1]][1])
            tensors[key] = torch.from_numpy(np.packbits(mask.reshape(-1).numpy()))
    old = tmp_path / "old.safetensors"
    save_file(tensors, str(old), metadata={**meta, "format_version": "1"})
    other = Session(model=session.model, default_spec=session.default_spec)
    session_file.restore(other, session_file.read_session(old, other.model))
    assert [r.name for r in other.runs] == [r.name for r in session.runs]
    for run, saved in zip(other.runs, session.runs):
        assert isinstance(run.masks.masks, PackedMasks) and _same_masks(run.masks, saved.masks), run.name
    # a version-1 mask a byte short is refused as damaged, not misread
    save_file(dict(tensors, **{k: v[:-1] for k, v in tensors.items() if "/mask/" in k}), str(old),
              metadata={**meta, "format_version": "1"})
    with pytest.raises(session_file.SessionFileError, match="is damaged"):
        session_file.read_session(old, other.model)
    save_file(tensors, str(old), metadata={**meta, "format_version": "3"})
    with pytest.raises(session_file.SessionFileError, match="session format 3; this explorer reads 1 and 2"):
        session_file.read_session(old, other.model)


def test_parameter_widgets_always_hold_values_within_their_bounds():
    """gradio checks a Number against its bounds even when hidden: a slot keeps no bound of the
    method shown before (OWL's M >= 1 made the hidden 0 of the next method refuse Calibrate)."""
    from core.methods import all_methods
    from explorer.tabs.calibrate import param_updates

    for name in all_methods():
        updates = param_updates(name)
        for num in updates[0::3]:
            assert num["minimum"] is not None and num["maximum"] is not None, name
            assert num["minimum"] <= num["value"] <= num["maximum"], (name, num)
