"""Compiled decoding (core.fast_decode) on real tiny models, dense and sliced.

Both compiled paths must really be taken (a static cache comes back, a compiled forward is
cached on the model) and must generate exactly the ids eager decoding generates; a sliced model
with a block whose attention and MLP are all removed must decode through them too.
"""
from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, StaticCache

from core.fast_decode import (CompileUnavailable, compile_for_decode, compiled_greedy, eager_decode, greedy_ids,
                              cpu_compiler, has_compiled_step, is_compiled_for_decode)
from core.kv_cache import output_cache
from core.structured.slicing import slice_model
from test_slicing import _ids, _plan

needs_compiler = pytest.mark.skipif(cpu_compiler() is None, reason="no C++ compiler: torch.compile cannot build "
                                    "CPU kernels here (scripts/setup.sh installs g++ where it can)")


def _generate_with_cache(model, ids, new_tokens=6):
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                             return_dict_in_generate=True)
    return out.sequences, output_cache(out)


def _dense_and_sliced(lm):
    return {"dense": lm.model, "sliced": slice_model(lm, _plan(lm, seed=5, empty_block=0))}  # block 0 emptied


@needs_compiler
def test_compiled_greedy_matches_eager_generate(family_name, tiny_model):
    """The minimal compiled loop, every family, dense and sliced (an all-removed block 0
    included): the ids eager generate gives, twice (the second call reuses the compiled step
    and the reset static cache), and a second prompt of the same size."""
    lm = tiny_model(family_name)
    for label, model in _dense_and_sliced(lm).items():
        for seed in (7, 9):
            ids = _ids(seed=seed, batch=2, length=10)
            reference = greedy_ids(model, ids, 6)
            out, rate = compiled_greedy(model, ids, 6)
            assert torch.equal(out, reference), (label, seed)
            assert rate > 0
        assert torch.equal(compiled_greedy(model, ids, 6)[0], reference)
        assert has_compiled_step(model)


@needs_compiler
def test_a_copy_of_a_compiled_model_gets_its_own_step(tiny_model):
    """slice_model deep-copies the model: the copy must not run the original's compiled step."""
    lm = tiny_model("llama")
    ids = _ids(seed=3, batch=1, length=8)
    compiled_greedy(lm.model, ids, 4)
    sliced = slice_model(lm, _plan(lm, seed=2))
    assert not has_compiled_step(sliced)
    assert torch.equal(compiled_greedy(sliced, ids, 4)[0], greedy_ids(sliced, ids, 4))


@needs_compiler
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_compile_for_decode_takes_the_compiled_generate_path(family, tiny_model):
    lm = tiny_model(family)
    ids = _ids(seed=7, batch=2, length=10)
    for label, model in _dense_and_sliced(lm).items():
        reference, cache = _generate_with_cache(model, ids)
        assert isinstance(cache, DynamicCache)
        compile_for_decode(model)
        assert is_compiled_for_decode(model)
        out, cache = _generate_with_cache(model, ids)
        assert isinstance(cache, StaticCache), "the static-cache path was not taken"
        assert hasattr(model, "_compiled_call"), "no compiled forward was built"
        assert torch.equal(out, reference), label
        eager_decode(model)
        assert not is_compiled_for_decode(model)
        assert isinstance(_generate_with_cache(model, ids)[1], DynamicCache)


def test_greedy_ids_gives_exactly_the_new_tokens(tiny_model):
    lm = tiny_model("llama")
    ids = _ids(seed=8, batch=1, length=5)
    out = greedy_ids(lm.model, ids, 7)
    assert out.shape == (1, 12) and torch.equal(out[:, :5], ids)


def test_no_compiler_is_a_clear_error(tiny_model, monkeypatch, tmp_path):
    lm = tiny_model("llama")
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no g++, c++ or clang++ on it
    with pytest.raises(CompileUnavailable, match="C\\+\\+ compiler"):
        compile_for_decode(lm.model)
    assert not is_compiled_for_decode(lm.model)
    with pytest.raises(CompileUnavailable, match="C\\+\\+ compiler"):
        compiled_greedy(lm.model, _ids(batch=1, length=4), 3)


@needs_compiler
def test_speed_bench_times_every_runtime_on_a_tiny_model(tiny_model):
    """bench/structured_speed.run end to end (small sizes): rows per runtime, speedups paired
    against that runtime's dense row, the sliced model agreeing with its masked model."""
    from bench.structured_speed import l2_variants, run

    lm = tiny_model("llama", with_tokenizer=True)
    rows, _ = run(lm, l2_variants(lm, [0.5]), prompt_tokens=24, new_tokens=4, runs=1)
    assert [(r["model"], r["runtime"]) for r in rows] == [(m, rt) for rt in ("eager", "compiled", "compiled-loop")
                                                         for m in ("dense", "sliced")]
    for row in rows:
        assert row["decode_tok_s"] > 0 and row["prefill_tok_s"] > 0
        if row["model"] == "dense":
            assert row["decode_speedup"] == 1.0
        else:
            assert row["params"] < rows[0]["params"] and row["max_logit_diff_vs_masked"] < 1e-4
    assert not is_compiled_for_decode(lm.model)  # the bench leaves the model as it found it
