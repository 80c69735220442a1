"""Text sources and calibration / evaluation windows."""
from __future__ import annotations

import json
import random

import pytest
import torch

from core.data import (DEFAULT_SOURCE, calibration_set, calibration_windows, evaluation_set,
                       evaluation_windows, load_text)
from core.errors import DataError


# ---------------------------------------------------------------- the offline default source

def test_python_docs_parts_are_non_empty_and_disjoint():
    from pydoc_data.topics import topics

    calib = load_text(DEFAULT_SOURCE, "calibration")
    evaluation = load_text(DEFAULT_SOURCE, "evaluation")
    assert len(calib) > 50_000 and len(evaluation) > len(calib)  # first 80% of topics: evaluation
    assert load_text("default", "calibration") == calib

    calib_topics = {t.strip() for t in topics.values() if t.strip() in calib}
    eval_topics = {t.strip() for t in topics.values() if t.strip() in evaluation}
    assert calib_topics and eval_topics
    assert not calib_topics & eval_topics  # no topic's text is in both parts
    assert calib_topics | eval_topics == {t.strip() for t in topics.values()}  # nothing dropped


def test_unknown_part_is_refused():
    with pytest.raises(ValueError, match="part must be"):
        load_text(DEFAULT_SOURCE, "training")


def test_python_docs_sets_with_a_tokenizer(tiny_tokenizer):
    calib, proto = calibration_set(tiny_tokenizer, n=4, seqlen=32, seed=3)
    assert calib.shape == (4, 32) and calib.dtype == torch.int64
    assert proto.part == "calibration" and proto.seed == 3 and proto.source == DEFAULT_SOURCE
    assert "seed 3" in proto.describe()
    evals, eproto = evaluation_set(tiny_tokenizer, seqlen=64, max_windows=5)
    assert evals.shape == (5, 64)
    assert eproto.part == "evaluation" and eproto.seed is None
    assert eproto.as_dict()["n_windows"] == 5
    # Windows hold real text: decoding gives printable prose.
    assert any(c.isalpha() for c in tiny_tokenizer.decode(evals[0]))


# ---------------------------------------------------------------- windows

def test_calibration_windows_follow_the_seeded_protocol():
    ids = torch.arange(100)
    windows, proto = calibration_windows(ids, n=5, seqlen=10, seed=7, source="arange")
    rng = random.Random(7)
    starts = [rng.randint(0, 100 - 10 - 1) for _ in range(5)]
    assert windows.shape == (5, 10)
    for row, start in zip(windows, starts):
        assert row.tolist() == list(range(start, start + 10))
    assert (proto.source, proto.part, proto.seqlen, proto.n_windows, proto.n_tokens, proto.seed) == (
        "arange", "calibration", 10, 5, 100, 7)


def test_calibration_windows_deterministic_per_seed():
    ids = torch.arange(1000)
    a, _ = calibration_windows(ids, n=8, seqlen=16, seed=0)
    b, _ = calibration_windows(ids, n=8, seqlen=16, seed=0)
    c, _ = calibration_windows(ids, n=8, seqlen=16, seed=1)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_calibration_windows_never_run_past_the_end():
    ids = torch.arange(11)  # the fewest tokens one window of 10 needs
    windows, _ = calibration_windows(ids, n=20, seqlen=10, seed=0)
    assert windows.shape == (20, 10)
    assert windows.max().item() <= 9  # randint(0, 0): the last token is never inside a window


def test_evaluation_windows_are_the_first_non_overlapping_chunks():
    ids = torch.arange(105)
    windows, proto = evaluation_windows(ids, seqlen=10)
    assert windows.shape == (10, 10)
    assert windows.flatten().tolist() == list(range(100))
    assert proto.n_windows == 10 and proto.seed is None

    first, proto = evaluation_windows(ids, seqlen=10, max_windows=3)
    assert first.tolist() == [list(range(0, 10)), list(range(10, 20)), list(range(20, 30))]
    assert proto.n_windows == 3
    exact, _ = evaluation_windows(torch.arange(10), seqlen=10)
    assert exact.shape == (1, 10)


@pytest.mark.parametrize("cut", [
    lambda ids: calibration_windows(ids, n=2, seqlen=64, source="tiny.txt"),
    lambda ids: evaluation_windows(ids, seqlen=64, source="tiny.txt"),
], ids=["calibration", "evaluation"])
def test_text_shorter_than_a_window(cut):
    with pytest.raises(DataError) as info:
        cut(torch.arange(20))
    message = str(info.value)
    assert "'tiny.txt'" in message and "20 tokens" in message and "64" in message
    assert "smaller --seqlen" in message


def test_bad_window_arguments():
    with pytest.raises(DataError, match="seqlen must be at least 2"):
        evaluation_windows(torch.arange(10), seqlen=1)
    with pytest.raises(DataError, match="at least 1"):
        calibration_windows(torch.arange(100), n=0, seqlen=10)


# ---------------------------------------------------------------- local files

RECORDS = [{"text": "first record"}, {"text": "second record", "meta": 1}, {"id": 3}]


def test_txt_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("hello wörld\nline two\n", encoding="utf-8")
    assert load_text(str(path), "calibration") == "hello wörld\nline two\n"
    assert load_text(str(path), "evaluation") == "hello wörld\nline two\n"


def test_jsonl_file(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n\n", encoding="utf-8")
    assert load_text(str(path)) == "first record\n\nsecond record"


@pytest.mark.parametrize("payload", [RECORDS, {"text": "first record\n\nsecond record"}], ids=["list", "object"])
def test_json_file(tmp_path, payload):
    path = tmp_path / "corpus.json"
    path.write_text(json.dumps(payload), encoding="utf-8")
    assert load_text(str(path)) == "first record\n\nsecond record"


def test_parquet_file(tmp_path):
    from datasets import Dataset

    path = tmp_path / "corpus.parquet"
    Dataset.from_dict({"text": ["first record", "second record"], "n": [1, 2]}).to_parquet(str(path))
    assert load_text(str(path)) == "first record\n\nsecond record"


def test_local_file_feeds_windows(tmp_path, tiny_tokenizer):
    path = tmp_path / "corpus.txt"
    path.write_text("abcdefghij" * 20, encoding="utf-8")
    windows, proto = calibration_set(tiny_tokenizer, source=str(path), n=3, seqlen=16, seed=0)
    assert windows.shape == (3, 16) and proto.n_tokens == 200 and proto.source == str(path)


def test_json_without_text_field(tmp_path):
    path = tmp_path / "corpus.json"
    path.write_text(json.dumps([{"content": "no text key"}]), encoding="utf-8")
    with pytest.raises(DataError, match="no records with a string 'text' field"):
        load_text(str(path))


def test_parquet_without_text_column(tmp_path):
    from datasets import Dataset

    path = tmp_path / "corpus.parquet"
    Dataset.from_dict({"content": ["x"]}).to_parquet(str(path))
    with pytest.raises(DataError, match="'text' field"):
        load_text(str(path))


def test_broken_json(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"text": "ok"}\n{"text": broken\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"Could not read .*corpus.jsonl.*\.jsonl file in UTF-8"):
        load_text(str(path))


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "corpus.csv"
    path.write_text("text\nhello\n")
    with pytest.raises(DataError) as info:
        load_text(str(path))
    message = str(info.value)
    assert "'.csv'" in message and ".txt" in message and ".parquet" in message


def test_missing_file(tmp_path):
    path = tmp_path / "absent.txt"
    with pytest.raises(DataError, match="No text file at") as info:
        load_text(str(path))
    assert str(path) in str(info.value)


# ---------------------------------------------------------------- hub sources

@pytest.mark.parametrize("source", ["wikitext2", "c4"])
def test_hub_source_offline_suggests_the_default(hub_offline, source):
    with pytest.raises(DataError) as info:
        load_text(source, "calibration")
    message = str(info.value)
    assert f"Could not fetch {source!r} from the Hugging Face Hub" in message
    assert f"offline default {DEFAULT_SOURCE!r}" in message
    assert ".txt" in message
