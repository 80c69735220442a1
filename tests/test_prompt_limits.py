"""Prompts beyond the model's context: refused with the numbers and what fits, by one rule
(core.prompts) in the CLI's generate and the explorer's Generate tab, before any token is
generated. Before, the app ran such a prompt at a fraction of a token per second and streamed
garbage, and the CLI printed transformers' "friendly reminder" and exited 0.

The tiny Llama's context is tiny.MAX_POSITIONS (256) tokens and its tokenizer takes one token per
byte, so the prompts' token counts are their lengths. Real model, real tokenizer, real handlers.
"""
from __future__ import annotations

import os

import pytest

from core.cli import main as cli_main
from core.prompts import (CHARS_PER_TOKEN_BOUND, MAX_PROMPT_CHARS, PromptTooLong, check_prompt_chars,
                          check_prompt_tokens, max_prompt_chars)
from tiny import MAX_POSITIONS

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


# ---------------------------------------------------------------- the rule

def test_prompt_and_new_tokens_fit_up_to_exactly_the_context():
    check_prompt_tokens(MAX_POSITIONS - 10, 10, MAX_POSITIONS)
    with pytest.raises(PromptTooLong, match=r"247 tokens and 10 new.*257 in all.*256-token context.*"
                                            r"at most 246 tokens, or ask for at most 9 new tokens"):
        check_prompt_tokens(MAX_POSITIONS - 9, 10, MAX_POSITIONS)


def test_new_tokens_beyond_the_context_are_refused_whatever_the_prompt():
    with pytest.raises(PromptTooLong, match=r"300 new tokens.*256 tokens, prompt included.*at most 236"):
        check_prompt_tokens(20, 300, MAX_POSITIONS)
    with pytest.raises(PromptTooLong, match="Shorten the prompt to at most 246 tokens[.]"):
        check_prompt_tokens(400, 10, MAX_POSITIONS)  # the prompt alone overflows: no "fewer new tokens"


def test_a_model_without_a_stated_context_is_only_capped_in_characters():
    check_prompt_tokens(10**6, 10**4, None)
    assert max_prompt_chars(None) == MAX_PROMPT_CHARS
    assert max_prompt_chars(MAX_POSITIONS) == CHARS_PER_TOKEN_BOUND * MAX_POSITIONS
    assert max_prompt_chars(10**7) == MAX_PROMPT_CHARS
    check_prompt_chars(CHARS_PER_TOKEN_BOUND * MAX_POSITIONS, MAX_POSITIONS)
    with pytest.raises(PromptTooLong, match="4,097 characters.*at most 4,096.*256-token context"):
        check_prompt_chars(CHARS_PER_TOKEN_BOUND * MAX_POSITIONS + 1, MAX_POSITIONS)


# ---------------------------------------------------------------- the CLI

def _generate(model_dir, prompt: str, new_tokens: int) -> list[str]:
    return ["generate", "--model", str(model_dir), "--prompt", prompt, "--new-tokens", str(new_tokens)]


def test_cli_generate_refuses_a_prompt_beyond_the_context_in_one_line(tiny_llama_dir, capsys):
    code = cli_main(_generate(tiny_llama_dir, "a" * 250, 10))
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert "250 tokens and 10 new tokens" in errors[0] and "at most 246 tokens" in errors[0], err
    assert "friendly reminder" not in err  # refused before transformers could run on past the context


def test_cli_generate_refuses_new_tokens_beyond_the_context(tiny_llama_dir, capsys):
    assert cli_main(_generate(tiny_llama_dir, "The history of the city", 300)) == 2
    err = capsys.readouterr().err
    assert "300 new tokens asked for" in err and f"{MAX_POSITIONS} tokens" in err, err


def test_cli_generate_refuses_a_huge_prompt_before_loading_the_model(tiny_llama_dir, capsys):
    code = cli_main(_generate(tiny_llama_dir, "x" * (MAX_PROMPT_CHARS + 1), 8))
    err = capsys.readouterr().err
    assert code == 2 and "characters, far more than fits" in err, err
    assert "Loading" not in err  # the cap for any model needs no model


def test_cli_generate_runs_a_prompt_that_just_fits(tiny_llama_dir, capsys):
    assert cli_main(_generate(tiny_llama_dir, "a" * (MAX_POSITIONS - 8), 8)) == 0
    out, err = capsys.readouterr()
    assert out.startswith("a" * (MAX_POSITIONS - 8)) and '"prompt_tokens": 248' in err


# ---------------------------------------------------------------- the explorer's Generate tab

@pytest.fixture
def session(tiny_llama_dir):
    pytest.importorskip("gradio")
    from explorer.state import Session, get_model
    from explorer.tabs.calibrate import on_calibrate

    session = Session(model=get_model(str(tiny_llama_dir)), default_spec=str(tiny_llama_dir))
    list(on_calibrate(session, "magnitude", "", 2, 16, 0.5, "unstructured", 0, "q", "", "",
                      progress=lambda *a, **k: None))
    return session


def _first(handler):
    """The handler's first output: a refused request raises before any side streams."""
    return next(iter(handler))


def test_generate_tab_refuses_a_prompt_beyond_the_context_before_any_side_runs(session):
    import gradio as gr

    from explorer.tabs.generate import on_generate, on_generate_runs

    calls = []
    hook = session.model.lm.model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(gr.Error, match="250 tokens and 10 new tokens.*at most 246 tokens"):
            _first(on_generate(session, "a" * 250, 10, False, 0.8, 0, False))
        run = session.active.id
        with pytest.raises(gr.Error, match="250 tokens and 10 new tokens"):  # the three-way generation
            _first(on_generate_runs(session, "a" * 250, 10, False, 0.8, 0, False, run_a=run, run_b=run))
        with pytest.raises(gr.Error, match="1000 new tokens asked for"):
            _first(on_generate_runs(session, "Hello", 1000, False, 0.8, 0, False, run_a=run))
    finally:
        hook.remove()
    assert calls == []  # no forward pass: not one token was generated


def test_generate_tab_refuses_a_multi_megabyte_prompt_by_its_length_alone(session):
    import gradio as gr

    from explorer.tabs.generate import on_generate

    with pytest.raises(gr.Error, match="3,000,000 characters, far more than fits"):
        _first(on_generate(session, "x" * 3_000_000, 10, False, 0.8, 0, False))


def test_generate_tab_still_streams_a_prompt_that_fits(session):
    from explorer.tabs.generate import on_generate

    *_, (dense, pruned, rates) = list(on_generate(session, "a" * (MAX_POSITIONS - 8), 8, False, 0.8, 0, False))
    assert dense and pruned and "tokens/s" in rates
