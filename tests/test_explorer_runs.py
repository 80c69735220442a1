"""Several runs in one session, through gradio_client against a running app on a tiny model:
overlaid allocations, masks compared, three-way generation, perplexity of every run, session
files saved and reopened, and the bad input around them."""
from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

gr = pytest.importorskip("gradio")
pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from core.mask_file import load_masks  # noqa: E402
from core.loading import load_model  # noqa: E402

CALIB = dict(windows=4, seqlen=32)
GEN = dict(prompt="The quick brown fox", max_new_tokens=10)


def _client(url, model_dir) -> Client:
    client = Client(url, verbose=False, download_files=False)
    client.predict(str(model_dir), "float32", "cpu", api_name="/load_model")
    return client


def _calibrate(client, method, sparsity=0.5, params=""):
    return client.predict(method_name=method, **CALIB, sparsity=sparsity, params_json=params, api_name="/calibrate")


def _runs(client) -> list[dict]:
    return client.predict(api_name="/runs")[-1]


def _plot(value) -> dict:
    return json.loads(value["plot"])


def _path(value) -> str:
    return value["path"] if isinstance(value, dict) else value


def _block_sparsity(rows: list[dict]) -> list[float]:
    blocks = sorted({r["block"] for r in rows})
    return [sum(r["pruned"] for r in rows if r["block"] == b) / sum(r["params"] for r in rows if r["block"] == b)
            for b in blocks]


@pytest.fixture(scope="module")
def three_runs(app_url_no_autoload, tiny_llama_dir):
    """One session with Wanda, OWL and UniPruning calibrated, all shown."""
    client = _client(app_url_no_autoload, tiny_llama_dir)
    for method in ("wanda", "owl", "unipruning"):
        status, *_rest = _calibrate(client, method)
        assert "Calibrated" in status
    return client


def test_three_runs_overlaid_each_trace_its_own_runs_allocation(three_runs):
    client = three_runs
    runs = _runs(client)
    assert [r["name"] for r in runs] == ["wanda", "owl", "unipruning"] and all(r["visible"] for r in runs)
    status, alloc, _heat, _hist, summary = client.predict(sparsity=0.7, pattern="unstructured", api_name="/cut")
    traces = _plot(alloc)["data"]
    assert [t["name"].split(":")[0] for t in traces] == ["wanda", "owl", "unipruning"]
    assert "Shown with it" in status and summary["run"] == "unipruning"  # the newest run is the active one
    for run, trace in zip(_runs(client), traces):
        assert abs(run["achieved"] - 0.7) < 0.03  # the slider re-cut every shown run
        client.predict(run["id"], api_name="/select_run")
        json_file, _csv = (_path(f) for f in client.predict(api_name="/export_allocation"))
        exported = json.loads(open(json_file).read())
        assert exported["run"] == run["name"]
        assert trace["y"] == pytest.approx(_block_sparsity(exported["matrices"]), abs=1e-9)
        assert f"total {exported['total_sparsity']:.1%}" in trace["name"]
    # per matrix type within each block: one point per (block, type) for every run
    alloc = client.predict("per matrix type", api_name="/alloc_mode")
    by_type = _plot(alloc)["data"]
    assert len(by_type) == 3 and by_type[0]["x"][:2] == ["0 q", "0 k"]
    client.predict("per block", api_name="/alloc_mode")


def test_masks_compared_counts_sum_and_jaccard(three_runs, tiny_llama_dir):
    client = three_runs
    wanda, owl, _uni = _runs(client)
    agree, heat, md, numbers = client.predict(wanda["id"], owl["id"], 1, "down", api_name="/compare")
    counts = numbers["counts"]
    lm = load_model(str(tiny_llama_dir))
    d_out, d_in = lm.family.weight_view(lm.prunable()[numbers["matrix"]]).shape
    assert numbers["matrix"].endswith("mlp.down_proj")
    assert counts["kept_both"] + counts["only_a"] + counts["only_b"] + counts["pruned_both"] == d_out * d_in
    whole = numbers["whole_model"]
    assert whole["size"] == sum(m["size"] for m in numbers["matrices"]) and len(numbers["matrices"]) == 14
    assert 0 < whole["jaccard"] < 1 and f"Jaccard {whole['jaccard']:.3f}" in md
    heat_trace = _plot(heat)["data"][0]
    assert heat_trace["y"] == ["q", "k", "v", "o", "gate", "up", "down"] and heat_trace["x"] == [0, 1]
    assert _plot(agree)["data"][0]["type"] == "heatmap"
    # a run against itself is bad input, said clearly
    with pytest.raises(AppError, match="same run"):
        client.predict(wanda["id"], wanda["id"], 0, "q", api_name="/compare")


def test_jaccard_of_identical_runs_is_one_and_of_a_complement_zero(app_url_no_autoload, tiny_llama_dir, tmp_path):
    from core.mask_file import save_masks
    from core.maskset import MaskSet

    client = _client(app_url_no_autoload, tiny_llama_dir)
    _calibrate(client, "wanda")
    _calibrate(client, "wanda")  # the same calibration twice: the same masks
    first, second = _runs(client)
    assert second["name"] == "wanda #2"
    *_plots, md, numbers = client.predict(first["id"], second["id"], 0, "q", api_name="/compare")
    assert numbers["whole_model"]["jaccard"] == 1.0 and numbers["whole_model"]["agreement"] == 1.0
    # the complement of a run's masks, imported as a fixed mask: nothing kept in common
    client.predict(first["id"], api_name="/select_run")
    path = _path(client.predict(api_name="/export_masks"))
    lm = load_model(str(tiny_llama_dir))
    masks = load_masks(path, lm)
    complement = save_masks(tmp_path / "complement.safetensors",
                            MaskSet(masks={n: ~m for n, m in masks.masks.items()}, meta=dict(masks.meta)), lm)
    status, *_views = client.predict(file=handle_file(str(complement)), api_name="/import_masks")
    assert "Imported" in status and "fixed mask" in status
    imported = _runs(client)[-1]
    assert imported["kind"] == "fixed mask" and imported["origin"] == "imported"
    *_plots, md, numbers = client.predict(first["id"], imported["id"], 0, "q", api_name="/compare")
    assert numbers["whole_model"]["jaccard"] == 0.0 and numbers["whole_model"]["kept_both"] == 0
    # the slider re-cuts the calibrated runs and leaves the fixed mask as it is
    client.predict(sparsity=0.3, pattern="unstructured", api_name="/cut")
    achieved = {r["name"]: r["achieved"] for r in _runs(client)}
    assert abs(achieved["wanda"] - 0.3) < 0.02 and abs(achieved[imported["name"]] - 0.5) < 0.02


def test_unstructured_against_structured_says_what_is_compared(app_url_no_autoload, tiny_llama_dir):
    client = _client(app_url_no_autoload, tiny_llama_dir)
    _calibrate(client, "wanda", 0.3)
    status, *_views = _calibrate(client, "wanda-sp", 0.3)
    assert "structured" in status
    wanda, sp = _runs(client)
    assert sp["kind"] == "structured"
    *_plots, md, numbers = client.predict(wanda["id"], sp["id"], 0, "o", api_name="/compare")
    assert "wanda-sp is structured" in md and "weights each run keeps" in md
    assert 0 <= numbers["whole_model"]["jaccard"] <= 1
    # a structured run saved and reopened: the same masks, and the slider prunes it again
    lm = load_model(str(tiny_llama_dir))
    before = load_masks(_path(client.predict(api_name="/export_masks")), lm)  # the active run: wanda-sp
    path = _path(client.predict(api_name="/save_session")[0])
    other = _client(app_url_no_autoload, tiny_llama_dir)
    other.predict(file=handle_file(path), api_name="/open_session")
    reopened = _runs(other)
    assert [r["kind"] for r in reopened] == ["cut from calibration", "structured"]
    after = load_masks(_path(other.predict(api_name="/export_masks")), lm)
    assert all(bool((after.masks[n] == before.masks[n]).all()) for n in before.masks)
    assert set(after.biases) == set(before.biases)
    _status, _alloc, _heat, _hist, summary = other.predict(sparsity=0.5, pattern="unstructured", api_name="/cut")
    assert summary["run"] == "wanda-sp" and summary["total_sparsity"] > 0.35  # pruned again at 50%


def test_three_way_generation(three_runs):
    client = three_runs
    wanda, owl, uni = _runs(client)
    dense, a, b, rates = client.predict(**GEN, run_a=wanda["id"], run_b=owl["id"], api_name="/generate_runs")
    assert dense and a and b and rates.count("tokens/s") == 3 and "A: wanda" in rates and "B: owl" in rates
    # the same prompt, settings and seed: dense and A are what the two-way generation gives
    client.predict(wanda["id"], api_name="/select_run")
    dense2, pruned2, _ = client.predict(**GEN, api_name="/generate")
    assert (dense2, pruned2) == (dense, a)
    dense3, a3, b3, rates3 = client.predict(**GEN, run_a=uni["id"], run_b="", api_name="/generate_runs")
    assert dense3 == dense and "choose a run B" in b3 and rates3.count("tokens/s") == 2


def test_perplexity_of_every_run_one_line_each(three_runs):
    client = three_runs
    md, plot, points = client.predict(sparsities_text="0.3, 0.6", source="python-docs", seqlen=32, max_windows=1,
                                      api_name="/sweep_runs")
    runs = [r["name"] for r in _runs(client)]
    assert [p["run"] for p in points[-6:]] == [n for n in runs for _ in range(2)]
    lines = _plot(plot)["data"]
    assert {t["name"] for t in lines} >= set(runs)
    assert all(len(t["x"]) == 2 for t in lines if t["name"] in runs) and "6 points" in md


def test_save_and_reopen_gives_identical_masks(three_runs, app_url_no_autoload, tiny_llama_dir, tmp_path):
    client = three_runs
    client.predict(sparsity=0.6, pattern="unstructured", api_name="/cut")
    path, note = client.predict(api_name="/save_session")
    path = _path(path)
    assert "Saved 3 runs" in note and os.path.getsize(path) > 0
    lm = load_model(str(tiny_llama_dir))
    original = {}
    for run in _runs(client):
        client.predict(run["id"], api_name="/select_run")
        original[run["name"]] = load_masks(_path(client.predict(api_name="/export_masks")), lm)

    other = _client(app_url_no_autoload, tiny_llama_dir)  # a new session
    status, alloc, *_rest = other.predict(file=handle_file(path), api_name="/open_session")
    assert "Opened" in status and "3 runs" in status
    reopened = _runs(other)
    assert [r["name"] for r in reopened] == list(original) and all(r["origin"] == "reopened" for r in reopened)
    assert len(_plot(alloc)["data"]) == 3
    for run in reopened:
        other.predict(run["id"], api_name="/select_run")
        masks = load_masks(_path(other.predict(api_name="/export_masks")), lm)
        before = original[run["name"]]
        assert set(masks.masks) == set(before.masks)
        assert all(bool((masks.masks[n] == before.masks[n]).all()) for n in masks.masks), run["name"]
    # and the reopened runs are cut again by the slider, without calibrating
    other.predict(sparsity=0.4, pattern="unstructured", api_name="/cut")
    assert all(abs(r["achieved"] - 0.4) < 0.03 for r in _runs(other))
    # the measured perplexities came along
    points = other.predict(api_name="/runs")  # (run list outputs)
    assert points


def test_session_files_bad_input(three_runs, app_url_no_autoload, tiny_llama_dir, tmp_path):
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file
    from tiny import build_tiny_module, tiny_tokenizer

    path = _path(three_runs.predict(api_name="/save_session")[0])
    data = open(path, "rb").read()
    client = _client(app_url_no_autoload, tiny_llama_dir)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(AppError, match="truncated"):
        client.predict(file=handle_file(str(truncated)), api_name="/open_session")
    # tampered: the run list is not JSON any more
    with safe_open(path, framework="pt") as fh:
        meta = dict(fh.metadata())
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    tampered = tmp_path / "tampered.safetensors"
    save_file(tensors, str(tampered), metadata={**meta, "runs": meta["runs"][:-5]})
    with pytest.raises(AppError, match="not valid JSON"):
        client.predict(file=handle_file(str(tampered)), api_name="/open_session")
    # tampered: a tensor of the wrong shape
    bad = dict(tensors)
    key = next(k for k in bad if "/artifact/" in k and bad[k].dim() >= 1)
    bad[key] = torch.zeros(3)
    save_file(bad, str(tampered), metadata=meta)
    with pytest.raises(AppError, match="calibration cannot be restored .*the file was altered"):
        client.predict(file=handle_file(str(tampered)), api_name="/open_session")
    # a mask file is not a session file
    mask_file = _path(three_runs.predict(api_name="/export_masks"))
    with pytest.raises(AppError, match="a mask file"):
        client.predict(file=handle_file(mask_file), api_name="/open_session")
    assert _runs(client) == []  # nothing was half-restored

    # a session file for another model is refused, naming the model it was made for
    other_dir = tmp_path / "other-llama"
    other = build_tiny_module("llama")
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    other.save_pretrained(other_dir)
    tiny_tokenizer().save_pretrained(other_dir)
    client.predict(str(other_dir), "float32", "cpu", api_name="/load_model")
    with pytest.raises(AppError, match="was saved with model"):
        client.predict(file=handle_file(path), api_name="/open_session")


def test_runs_rename_hide_and_delete(app_url_no_autoload, tiny_llama_dir):
    client = _client(app_url_no_autoload, tiny_llama_dir)
    _calibrate(client, "wanda")
    _calibrate(client, "magnitude")
    wanda, mag = _runs(client)
    status, *_rest = client.predict(wanda["id"], "my wanda", api_name="/rename_run")
    assert "my wanda" in status and _runs(client)[0]["name"] == "my wanda"
    status, alloc, _h, _hi, _s = client.predict([mag["id"]], api_name="/show_runs")  # hide wanda
    assert "Sparsity per block and matrix type" in _plot(alloc)["layout"]["title"]["text"]  # one run: its own chart
    client.predict(sparsity=0.7, pattern="unstructured", api_name="/cut")
    achieved = {r["name"]: r["achieved"] for r in _runs(client)}
    assert abs(achieved["my wanda"] - 0.5) < 0.02 and abs(achieved["magnitude"] - 0.7) < 0.02
    status, *_rest = client.predict(mag["id"], api_name="/delete_run")
    assert "Deleted run magnitude" in status and [r["name"] for r in _runs(client)] == ["my wanda"]
    with pytest.raises(AppError, match="No run"):
        client.predict("nope", api_name="/select_run")
