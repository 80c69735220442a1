"""The explorer app, driven end to end through gradio_client against a real running server.

A tiny random Llama (2 blocks, hidden 64) saved to a temp folder stands in for the real model,
so the whole file runs in well under two minutes on a CPU.
"""
from __future__ import annotations

import os
import re
import threading

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

gr = pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from core.mask_file import load_masks  # noqa: E402
from core.loading import load_model  # noqa: E402
from core.methods import all_methods, get_method  # noqa: E402
from explorer import figures  # noqa: E402

CALIB = dict(method_name="wanda", windows=4, seqlen=32)
GEN = dict(prompt="The quick brown fox", max_new_tokens=12)
# every registered method is tried in the app: a new one is picked up without editing this file
UNSTRUCTURED = sorted(name for name, method in all_methods().items() if not method.structured)
STRUCTURED = sorted(name for name, method in all_methods().items() if method.structured)


def _client(url: str) -> Client:
    return Client(url, verbose=False, download_files=False)


def _calibrated(url: str, tiny_llama_dir, sparsity: float = 0.5) -> Client:
    client = _client(url)
    client.predict(str(tiny_llama_dir), "float32", "cpu", api_name="/load_model")
    client.predict(**CALIB, sparsity=sparsity, api_name="/calibrate")
    return client


def _cut(client: Client, sparsity: float, pattern: str = "unstructured") -> dict:
    status, _alloc, _heat, _hist, summary = client.predict(sparsity=sparsity, pattern=pattern, api_name="/cut")
    return summary


def _path(file_value) -> str:
    return file_value["path"] if isinstance(file_value, dict) else file_value


def _title(plot_value) -> str:
    """The title of a plot as the client receives it (gradio's plotly payload: the figure as JSON text)."""
    import json

    return figures.title_of(json.loads(plot_value["plot"]))


# ---------------------------------------------------------------- pure figure functions

def test_figures_are_pure_and_downsample():
    import torch

    scores = torch.rand(600, 300)
    mask = scores > 0.5
    import base64
    import json

    import numpy as np

    fig = figures.saliency_figure(scores, mask, "m")
    # whole 3x2 tiles (the fewest rows and columns per cell that fit 256 cells a side)
    assert "downsampled to 200x150 by pooling 3x2 tiles" in figures.title_of(fig)
    assert all(t["z"]["shape"] == "200, 150" for t in fig["data"])
    kept = np.frombuffer(base64.b64decode(fig["data"][1]["z"]["bdata"]), dtype=np.uint8)
    assert abs(kept.mean() - 50) < 2  # percent kept per tile, about half
    assert kept.reshape(200, 150)[0, 0] == round(100 * mask[:3, :2].float().mean().item())
    # each cell at its first original row / column, evenly spaced (plotly.js's fast image path)
    assert fig["data"][0]["y"] == list(range(0, 600, 3)) and fig["data"][0]["x"] == list(range(0, 300, 2))
    odd = figures.saliency_figure(torch.rand(257, 100), torch.rand(257, 100) > 0.5, "odd")
    assert odd["data"][1]["z"]["shape"] == "129, 100" and odd["data"][1]["y"][-1] == 256  # a last, partial tile
    rows = [{"block": b, "type": t, "params": 100, "pruned": 30 + b, "sparsity": (30 + b) / 100, "name": f"{b}{t}"}
            for b in range(3) for t in ("q", "down")]
    alloc = figures.allocation_figure(rows, 0.3)
    assert [tr["name"] for tr in alloc["data"]] == ["q", "down"]
    assert "total 31.0%" in figures.title_of(alloc)
    hist = figures.histogram_figure(scores, mask, "m")
    counts = [np.frombuffer(base64.b64decode(t["y"]["bdata"]), dtype=np.int32).sum() for t in hist["data"]]
    assert counts == [int((~mask).sum()), int(mask.sum())]  # 180k weights: no sampling, every one counted
    big = torch.rand(1000, 400)
    sampled = figures.histogram_figure(big, big > 0.3, "big")
    assert sum(np.frombuffer(base64.b64decode(t["y"]["bdata"]), dtype=np.int32).sum() for t in sampled["data"]) == 200_000
    runs = [{"method": "wanda", "pattern": "unstructured", "sparsity": s, "ppl": 10 + s, "protocol": "p"}
            for s in (0.5, 0.3)] + [{"method": "magnitude", "pattern": "unstructured", "sparsity": 0.5, "ppl": 99,
                                     "protocol": "p"}]
    comparison = figures.perplexity_figure(runs, {"p": 9.0})
    assert [t["x"] for t in comparison["data"]] == [[0.3, 0.5], [0.5]]
    json.loads(figures.to_plot(comparison).plot)  # what gradio sends is plain JSON


# ---------------------------------------------------------------- the running app

def test_no_model_loaded_at_import():
    from explorer.state import cached_keys

    import explorer  # noqa: F401  (builds `demo`)

    assert isinstance(explorer.demo, gr.Blocks)
    assert all(key[0] != "smollm2-135m" for key in cached_keys())


def test_full_flow(app_url, tiny_llama_dir, tmp_path):
    client = _client(app_url)
    # export before calibrating: a clear message, not a crash
    with pytest.raises(AppError, match="calibrate"):
        client.predict(api_name="/export_masks")

    facts = client.predict(str(tiny_llama_dir), "float32", "cpu", api_name="/load_model")[0]
    assert facts["layers"] == 2 and facts["family"] == "llama"
    status, *_views, summary = client.predict(**CALIB, sparsity=0.5, api_name="/calibrate")
    assert "Calibrated" in status and abs(summary["total_sparsity"] - 0.5) < 0.02

    low, high = _cut(client, 0.3), _cut(client, 0.6)
    assert abs(low["total_sparsity"] - 0.3) < 0.02 and abs(high["total_sparsity"] - 0.6) < 0.02
    assert low["per_type"] != high["per_type"]
    nm = _cut(client, 0.6, "2:4")
    assert abs(nm["total_sparsity"] - 0.5) < 1e-6 and nm["pattern"] == "2:4"
    _cut(client, 0.6)

    heat, hist = client.predict(block=1, mtype="down", api_name="/view")
    down = "model.layers.1.mlp.down_proj"  # block 1's down projection: 64 rows of 128 inputs
    assert _title(heat).startswith(f"{down}: 64x128") and _title(hist).startswith(f"Score histogram of {down}")

    dense, pruned, rates = client.predict(**GEN, api_name="/generate")
    assert dense and pruned and "tokens/s" in rates

    md, ppl, _plot, runs = client.predict(source="python-docs", seqlen=32, max_windows=2, api_name="/perplexity")
    assert ppl["dense"] > 0 and ppl["pruned"] > 0 and "Protocol" in md
    assert len(runs) == 1 and runs[0]["ppl"] == ppl["pruned"]
    md, _plot, runs = client.predict(sparsities_text="0.2, 0.8", source="python-docs", seqlen=32, max_windows=2,
                                     api_name="/sweep")
    assert [round(r["sparsity"], 1) for r in runs[1:]] == [0.2, 0.8] and runs[2]["ppl"] > runs[1]["ppl"]
    assert md.count("| 1") + md.count("| 7") + md.count("| 8") >= 2 and "Protocol" in md

    mask_path = _path(client.predict(api_name="/export_masks"))
    assert os.path.isfile(mask_path)
    lm = load_model(str(tiny_llama_dir))
    loaded = load_masks(mask_path, lm)
    assert abs(loaded.total_sparsity() - 0.6) < 0.02

    json_file, csv_file = (_path(f) for f in client.predict(api_name="/export_allocation"))
    assert json_file.endswith(".json") and csv_file.endswith(".csv") and os.path.getsize(csv_file) > 0

    archive = _path(client.predict(api_name="/export_model"))
    assert archive.endswith(".zip") and os.path.getsize(archive) > 0

    # re-import the exported masks into a fresh session
    other = _client(app_url)
    other.predict(str(tiny_llama_dir), "float32", "cpu", api_name="/load_model")
    status, *_views, summary = other.predict(file=handle_file(mask_path), api_name="/import_masks")
    assert "Imported" in status and abs(summary["total_sparsity"] - 0.6) < 0.02
    dense2, pruned2, _ = other.predict(**GEN, api_name="/generate")
    assert (dense2, pruned2) == (dense, pruned)

    # a file that is not a mask file is refused clearly
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(AppError, match="not a readable safetensors mask file"):
        other.predict(file=handle_file(str(junk)), api_name="/import_masks")


def test_sessions_do_not_see_each_others_masks(app_url, tiny_llama_dir):
    a = _calibrated(app_url, tiny_llama_dir, 0.3)
    b = _calibrated(app_url, tiny_llama_dir, 0.9)
    # what each should produce, measured alone
    solo_a = a.predict(**GEN, api_name="/generate")
    solo_b = b.predict(**GEN, api_name="/generate")
    assert solo_a[0] == solo_b[0]  # same dense model
    assert solo_a[1] != solo_b[1]  # different masks, different pruned text
    results = {}

    def run(name, client):
        results[name] = [client.predict(**GEN, api_name="/generate") for _ in range(2)]

    threads = [threading.Thread(target=run, args=("a", a)), threading.Thread(target=run, args=("b", b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert all(r[:2] == solo_a[:2] for r in results["a"])
    assert all(r[:2] == solo_b[:2] for r in results["b"])
    # and the slider of one session leaves the other's masks alone
    assert abs(_cut(a, 0.3)["total_sparsity"] - 0.3) < 0.02
    assert abs(_cut(b, 0.9)["total_sparsity"] - 0.9) < 0.02


def test_bad_model_id_is_clear_and_app_keeps_working(app_url, tiny_llama_dir, tmp_path):
    client = _client(app_url)
    with pytest.raises(AppError, match="config.json|No model folder"):
        client.predict(str(tmp_path / "nowhere" / "model"), "float32", "cpu", api_name="/load_model")
    with pytest.raises(AppError, match="config.json"):
        client.predict(str(tmp_path), "float32", "cpu", api_name="/load_model")
    facts = client.predict(str(tiny_llama_dir), "float32", "cpu", api_name="/load_model")[0]
    assert facts["layers"] == 2


def test_slider_before_calibration_is_clear(app_url, tiny_llama_dir):
    client = _client(app_url)
    client.predict(str(tiny_llama_dir), "float32", "cpu", api_name="/load_model")
    with pytest.raises(AppError, match="calibrate first"):
        _cut(client, 0.4)
    with pytest.raises(AppError, match="calibrate"):
        client.predict(**GEN, api_name="/generate")


@pytest.mark.parametrize("method", UNSTRUCTURED)
def test_every_method_calibrates_and_cuts(app_url, tiny_llama_dir, method):
    client = _client(app_url)
    client.predict(str(tiny_llama_dir), "float32", "cpu", api_name="/load_model")
    params = '{"alpha": 1.0, "scope": "matrix"}' if method == "ria" else ""
    status, *_views, summary = client.predict(**{**CALIB, "method_name": method}, sparsity=0.5,
                                              params_json=params, api_name="/calibrate")
    assert abs(summary["total_sparsity"] - 0.5) < 0.03, status
    assert abs(_cut(client, 0.7)["total_sparsity"] - 0.7) < 0.03
    if method == "ria":
        assert "alpha=1.0, scope=matrix" in status
    if "nm" in get_method(method).patterns:  # (OWL is unstructured only)
        assert abs(_cut(client, 0.7, "4:8")["total_sparsity"] - 0.5) < 1e-6


def test_cancel_mid_calibration_keeps_the_app_working(app_url, tiny_llama_dir):
    import time

    client = _client(app_url)
    client.predict(str(tiny_llama_dir), "float32", "cpu", api_name="/load_model")
    # the AdamW variant reports progress per window: hundreds of steps give time to cancel
    job = client.submit(method_name="unipruning-adamw", windows=400, seqlen=32, sparsity=0.5, api_name="/calibrate")
    deadline = time.time() + 60
    while time.time() < deadline:
        status = job.status()
        if status.progress_data:
            break
        time.sleep(0.05)
    assert status.progress_data, "no progress was reported"
    assert "Cancelling" in client.predict(api_name="/cancel")
    message, *_views, summary = job.result(timeout=60)
    assert message.startswith("Cancelled") and summary == {}
    # the app keeps working: a calibration afterwards goes through
    status, *_views, summary = client.predict(**CALIB, sparsity=0.5, api_name="/calibrate")
    assert "Calibrated" in status


def test_changing_a_cut_parameter_recuts_without_calibrating(app_url, tiny_llama_dir):
    client = _client(app_url)
    client.predict(str(tiny_llama_dir), "float32", "cpu", api_name="/load_model")
    status, *_views, summary = client.predict(**{**CALIB, "method_name": "unipruning"}, sparsity=0.5,
                                              api_name="/calibrate")
    info, pool_for, *widgets = client.predict("unipruning", api_name="/method")  # the page shows its widgets
    assert abs(summary["total_sparsity"] - 0.5) < 1e-3
    names = [p.name for p in __import__("core.methods", fromlist=["x"]).get_method("unipruning").params]
    # (number, choice, flag) per parameter slot, as the page holds them after choosing the method
    values = [w.get("value") if isinstance(w, dict) else w for w in widgets]
    values[3 * names.index("controller") + 1] = "row"
    status, *_views, summary = client.predict("unipruning", "unipruning", 0.5, "unstructured", 0, "q", *values,
                                              api_name="/params")
    assert "Masks" in status and abs(summary["total_sparsity"] - 0.5) < 0.02
    values[3 * names.index("kappa")] = 0.5
    status, *_rest = client.predict("unipruning", "unipruning", 0.5, "unstructured", 0, "q", *values,
                                    api_name="/params")
    assert "needs a new calibration" in status


def test_ui_only_events(app_url, tiny_llama_dir):
    client = _client(app_url)
    # undocumented endpoints take every input positionally: the page sends the dropdowns' values
    facts = client.predict(str(tiny_llama_dir), "float32", "cpu", "none", api_name="/page_load")[0]  # the page's load event loads the default model
    assert facts["layers"] == 2
    for name, method in all_methods().items():
        info, pool_for, *widgets = client.predict(name, api_name="/method")
        assert pool_for == name and (method.title or name) in info, name
        # a (number, choice, flag) slot per parameter, one of the three shown: one widget per parameter
        shown = [w for w in widgets if isinstance(w, dict) and w.get("visible") is True]
        assert len(shown) == len(method.params), (name, widgets)


def test_mask_file_for_another_model_is_refused_and_the_app_keeps_working(app_url, tiny_llama_dir, tmp_path):
    import torch
    from tiny import build_tiny_module, tiny_tokenizer

    other_dir = tmp_path / "other-llama"
    other = build_tiny_module("llama")
    with torch.no_grad():
        next(other.parameters()).add_(1.0)  # same shapes, other weights: another model
    other.save_pretrained(other_dir)
    tiny_tokenizer().save_pretrained(other_dir)

    client = _calibrated(app_url, tiny_llama_dir, 0.5)
    mask_path = _path(client.predict(api_name="/export_masks"))
    client.predict(str(other_dir), "float32", "cpu", api_name="/load_model")
    with pytest.raises(AppError, match="was made for model"):
        client.predict(file=handle_file(mask_path), api_name="/import_masks")
    status, *_views, summary = client.predict(**CALIB, sparsity=0.4, api_name="/calibrate")
    assert "Calibrated" in status and abs(summary["total_sparsity"] - 0.4) < 0.03


def test_plots_the_page_already_shows_are_not_sent_again(app_url, tiny_llama_dir):
    """N:M masks do not depend on the slider: moving it at the same N:M pattern sends no plots
    (gradio's 'no change' update); anything that changes the masks or the matrix does."""
    client = _calibrated(app_url, tiny_llama_dir, 0.5)
    unchanged = {"__type__": "update"}
    status, *plots, summary = client.predict(sparsity=0.5, pattern="2:4", api_name="/cut")
    assert all(p and p != unchanged for p in plots) and summary["pattern"] == "2:4"
    status2, *plots2, summary2 = client.predict(sparsity=0.8, pattern="2:4", api_name="/cut")
    assert plots2 == [unchanged] * 3 and (status2, summary2) == (status, summary)
    heat, hist = client.predict(block=1, mtype="down", api_name="/view")  # another matrix: drawn
    assert heat != unchanged and hist != unchanged
    _status, *plots3, summary3 = client.predict(sparsity=0.8, pattern="unstructured", api_name="/cut")
    assert all(p != unchanged for p in plots3) and abs(summary3["total_sparsity"] - 0.8) < 0.02
    _status, *plots4, summary4 = client.predict(sparsity=0.8, pattern="unstructured", api_name="/cut")
    assert plots4 == [unchanged] * 3 and summary4 == summary3  # nothing changed at all


@pytest.mark.parametrize("method", STRUCTURED)
def test_structured_method_prunes_reprunes_and_exports_a_smaller_model(app_url, tiny_llama_dir, method):
    """A structured method through the app: Calibrate prunes whole units at the slider's sparsity,
    the allocation is drawn per block, the slider re-prunes, generation uses the pruned model,
    and the exported model is physically smaller and loads back."""
    import zipfile

    client = _client(app_url)
    client.predict(str(tiny_llama_dir), "float32", "cpu", api_name="/load_model")
    status, alloc, _heat, _hist, summary = client.predict(**{**CALIB, "method_name": method}, sparsity=0.3,
                                                          api_name="/calibrate")
    assert "structured" in status and summary["pattern"] == "structured"
    assert "units removed per block" in _title(alloc)
    first = summary["total_sparsity"]
    status, _a, _h, _hi, summary = client.predict(sparsity=0.5, pattern="unstructured", api_name="/cut")
    assert summary["total_sparsity"] > first  # re-pruned at the new sparsity
    dense, pruned, rates = client.predict(**GEN, api_name="/generate")
    assert dense and pruned
    # the pruned side is the physically sliced model (its speed is the smaller model's)
    match = re.search(r"the sliced model, ([\d,]+) of ([\d,]+) parameters", rates)
    assert match and int(match[1].replace(",", "")) < 0.8 * int(match[2].replace(",", "")), rates

    # a sweep re-prunes at each sparsity and leaves the slider's state (50%) as it was
    md, _plot, runs = client.predict(sparsities_text="0.2, 0.5", source="python-docs", seqlen=32, max_windows=2,
                                     api_name="/sweep")
    assert "structured" in md and [r["pattern"] for r in runs] == ["structured"] * 2
    assert runs[0]["sparsity"] < runs[1]["sparsity"] == round(summary["total_sparsity"], 4)
    _status, _a, _h, _hi, again = client.predict(sparsity=0.5, pattern="unstructured", api_name="/cut")
    assert again["total_sparsity"] == summary["total_sparsity"]

    archive = _path(client.predict(api_name="/export_model"))
    out = os.path.join(os.path.dirname(archive), "unzipped")
    zipfile.ZipFile(archive).extractall(out)
    small = load_model(out)
    full = load_model(str(tiny_llama_dir))
    assert sum(p.numel() for p in small.model.parameters()) < 0.8 * sum(p.numel() for p in full.model.parameters())


def test_tyr_search_streams_its_best_allocation_then_the_result(app_url, tiny_llama_dir):
    """While Týr searches, Calibrate streams the best candidate's allocation (status says which
    generation), and ends with the pruned model as any structured method does."""
    client = _client(app_url)
    client.predict(str(tiny_llama_dir), "float32", "cpu", api_name="/load_model")
    params = '{"generations": 4, "offspring": 6, "iterations": 2, "levels": 5}'
    job = client.submit(**{**CALIB, "method_name": "tyr"}, sparsity=0.3, params_json=params, api_name="/calibrate")
    status, alloc, _heat, _hist, summary = job.result(timeout=300)
    outputs = job.outputs()
    searching = [o for o in outputs if "searching" in o[0]]
    assert searching, [o[0] for o in outputs]
    assert all(o[1] is not None and "generation" in o[0] for o in searching)
    assert outputs[-1][0] == status and status.startswith("Pruned **tyr**")
    assert summary["pattern"] == "structured" and "units removed per block" in _title(alloc)


def test_structured_allocation_figure_is_drawn_per_block(tiny_llama_dir):
    """The allocation a structured mask set carries (also after a save/load, as JSON text) is
    drawn as units removed per block."""
    import json

    import torch

    from core.structured.pipeline import prune_structured
    from core.structured.units import all_block_units
    from explorer import structured_view

    lm = load_model(str(tiny_llama_dir))
    windows = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    masks, plan = prune_structured(lm, "wanda-sp", windows, 0.4)
    for meta_value in (masks.meta["allocation_structured"], json.dumps(masks.meta["allocation_structured"])):
        masks.meta["allocation_structured"] = meta_value
        rows = structured_view.allocation_of(masks)
        spec = structured_view.allocation_figure(rows, 0.4)
        assert "units removed per block" in figures.title_of(spec)
        heads, chans, line = spec["data"]
        assert heads["x"] == [0, 1] and chans["x"] == [0, 1]
        assert line["y"] == [r["sparsity"] for r in plan.allocation(all_block_units(lm))]
        json.loads(figures.to_plot(spec).plot)


def test_a_disk_offloaded_model_cuts_as_the_in_memory_one(app_url, tiny_llama_dir):
    """The Model panel's offload: blocks read from the checkpoint when they run; the same
    calibration gives the same cut as the model held in memory."""
    client = _calibrated(app_url, tiny_llama_dir, 0.5)
    in_memory = _cut(client, 0.6)
    facts = client.predict(str(tiny_llama_dir), "float32", "cpu", "disk", api_name="/load_model")[0]
    assert facts["offload"] == "disk"
    client.predict(**CALIB, sparsity=0.5, api_name="/calibrate")
    assert _cut(client, 0.6) == in_memory
