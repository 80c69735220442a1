"""Parameters and numbers are checked before any work, with one line naming what is wrong (issue 19).

- every method parameter goes through its schema (core.methods.base.Param): NaN and inf refused,
  ints whole, numbers within their declared range, the message naming the parameter, the value
  and the range (OWL's lam=NaN used to fail after the calibration with "cannot convert float NaN
  to integer");
- the CLI's numeric options (--batch-size 0 used to give "range() arg 3 must not be zero", -1
  "torch.cat(): expected a non-empty list") and --param are refused at argument-check time, exit 2,
  before any model is loaded;
- the explorer's API: a number that is not one ("abc" sent to /cut used to get gradio's generic
  "upstream app raised an exception"), NaN, or one out of range is a gr.Error naming the input,
  on every endpoint that takes numbers, and the app keeps working.

Real tiny models, the real CLI (core.cli.main in-process) and a real served app (gradio_client).
"""
from __future__ import annotations

import math
import os

import pytest

from core.cli import main
from core.methods import all_methods
from core.pruning import calibrate
from tiny import build_tiny, random_windows

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

NUMERIC = [(m.name, p) for m in all_methods().values() for p in m.params if p.kind in ("float", "int")]


# ---------------------------------------------------------------- the schema

@pytest.mark.parametrize("method, param", NUMERIC, ids=[f"{m}-{p.name}" for m, p in NUMERIC])
def test_every_numeric_parameter_refuses_nan_inf_and_out_of_range(method, param):
    schema = all_methods()[method]
    bad = [math.nan, math.inf, -math.inf, "nan", "inf", "abc", "", None, True]
    if param.low is not None:
        bad.append(param.low - 1)
    if param.high is not None:
        bad.append(param.high + 1)
    if param.kind == "int":
        bad += [param.default + 0.5, f"{param.default}.5"]
    for value in bad:
        with pytest.raises(ValueError) as err:
            schema.resolve_params({param.name: value})
        text = str(err.value)
        assert text.startswith(f"{param.name} must be") and repr(value) in text or str(value) in text, text
        assert f"[{param.low}, {param.high}]" in text, text
    # what fits still goes through, as text (the CLI) or as numbers (the app, JSON)
    for value in (param.default, str(param.default), param.low, param.high):
        if value is not None:
            resolved = schema.resolve_params({param.name: value})[param.name]
            assert resolved == float(value) and type(resolved) is (float if param.kind == "float" else int)


def test_bools_and_choices_take_only_what_they_name():
    tyr = all_methods()["tyr"]
    for value, expected in (("false", False), ("True", True), (0, False), ("on", True), (True, True)):
        assert tyr.resolve_params({"search": value})["search"] is expected
    for value in ("maybe", "", 2, None):
        with pytest.raises(ValueError, match=rf"search must be true or false; got {value!r}"):
            tyr.resolve_params({"search": value})
    with pytest.raises(ValueError, match="scope must be one of row, matrix"):
        all_methods()["ria"].resolve_params({"scope": "column"})


def test_owl_lam_nan_is_refused_before_any_work():
    lm = build_tiny("llama")
    work = []
    with pytest.raises(ValueError, match=r"lam must be a finite number in \[0\.0, 0\.5\]; got nan"):
        calibrate(lm, "owl", random_windows(4, 16), params={"lam": math.nan}, progress=lambda *a: work.append(a))
    assert work == []


# ---------------------------------------------------------------- the CLI

def _cli(capsys, *args) -> tuple[int, str]:
    rc = main([str(a) for a in args])
    return rc, capsys.readouterr().err


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.parametrize("args, expected", [
    (["prune", "--batch-size", "0"], "--batch-size must be at least 1"),
    (["prune", "--batch-size", "-1"], "--batch-size must be at least 1"),
    (["calibrate", "--out", "a.safetensors", "--batch-size", "0"], "--batch-size must be at least 1"),
    (["prune", "--calib-windows", "0"], "--calib-windows must be at least 1"),
    (["sweep", "--calib-windows", "-4"], "--calib-windows must be at least 1"),
    (["prune", "--seqlen", "1"], "--seqlen must be at least 2"),
    (["eval", "--seqlen", "0"], "--seqlen must be at least 2"),
    (["eval", "--eval-windows", "0"], "--eval-windows must be at least 1"),
    (["cut", "--artifact", "x.safetensors", "--eval-windows", "-1"], "--eval-windows must be at least 1"),
    (["generate", "--new-tokens", "0"], "--new-tokens must be at least 2"),
    (["prune", "--sparsity", "nan"], "Sparsity must be in [0, 1)"),
    (["prune", "--sparsity", "inf"], "Sparsity must be in [0, 1)"),
    (["prune", "--sparsity", "1"], "Sparsity must be in [0, 1)"),
    (["prune", "--sparsity", "abc"], "Sparsity must be a number"),
    (["sweep", "--sparsities", "0.3,nan"], "--sparsities '0.3,nan'"),
    (["prune", "--method", "owl", "--param", "lam=nan"], "--param: lam must be a finite number in [0.0, 0.5]; "
                                                         "got 'nan'"),
    (["prune", "--method", "owl", "--param", "lam=0.9"], "--param: lam must be in [0.0, 0.5]; got 0.9"),
    (["prune", "--method", "owl", "--param", "M=inf"], "--param: M must be a finite number in [1.0, 50.0]"),
    (["calibrate", "--out", "a.safetensors", "--method", "sparsegpt", "--param", "blocksize=0"],
     "--param: blocksize must be in [1, 4096]; got 0"),
    (["sweep", "--method", "tyr", "--param", "levels=2.5"], "--param: levels must be a whole number in [1, 33]"),
    (["prune", "--method", "spap", "--param", "prune_heads=perhaps"], "--param: prune_heads must be true or false"),
    (["prune", "--method", "wanda", "--param", "lam=0.1"], "--param: wanda has no parameter(s) ['lam']"),
])
def test_cli_numbers_and_parameters_are_refused_before_loading(capsys, tmp_path, args, expected):
    """No --model is given: the default model is never loaded, the refusal comes first."""
    rc, err = _cli(capsys, *[str(tmp_path / a) if a.endswith(".safetensors") else a for a in args])
    line = _one_error_line(err)
    assert rc == 2 and expected in line, err
    assert "Loading" not in err


def test_cli_cut_checks_params_against_the_artifacts_method(tiny_llama_dir, tmp_path, capsys):
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog, and then it runs away again. " * 40)
    artifact = tmp_path / "owl.safetensors"
    rc, err = _cli(capsys, "calibrate", "--model", tiny_llama_dir, "--method", "owl", "--calib-windows", "2",
                   "--seqlen", "16", "--calib-text", text, "--out", artifact)
    assert rc == 0, err
    # --method is not given (wanda by default): lam is OWL's, the artifact's method
    rc, err = _cli(capsys, "cut", "--artifact", artifact, "--param", "lam=nan", "--out", tmp_path / "run")
    line = _one_error_line(err)
    assert rc == 2 and "lam must be a finite number in [0.0, 0.5]; got 'nan'" in line and "owl" in line
    assert "Loading" not in err and not (tmp_path / "run").exists()
    rc, err = _cli(capsys, "cut", "--artifact", artifact, "--param", "lam=0.1", "--no-eval", "--out", tmp_path / "run")
    assert rc == 0, err


# ---------------------------------------------------------------- the explorer's API

@pytest.fixture(scope="module")
def client(serve_app, tiny_llama_dir):
    from gradio_client import Client

    from explorer.app import build_app

    client = Client(serve_app(build_app(model=str(tiny_llama_dir))), verbose=False, download_files=False)
    client.predict(str(tiny_llama_dir), "float32", "cpu", api_name="/load_model")
    client.predict(method_name="wanda", windows=4, seqlen=32, sparsity=0.5, api_name="/calibrate")
    return client


def _refused(client, match: str, **kwargs):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match=match) as err:
        client.predict(**kwargs)
    assert "upstream" not in str(err.value)


@pytest.mark.parametrize("value, match", [
    ("abc", r"Target sparsity must be a number from 0 to 0\.95; got 'abc'"),
    ("nan", r"Target sparsity must be a number from 0 to 0\.95; got 'nan'"),
    (2.0, r"Target sparsity must be a number from 0 to 0\.95; got 2\.0"),
    (-0.1, r"Target sparsity must be a number from 0 to 0\.95; got -0\.1"),
    (None, r"Target sparsity must be a number"),
])
def test_cut_refuses_a_sparsity_that_is_not_one(client, value, match):
    _refused(client, match, sparsity=value, pattern="unstructured", api_name="/cut")


def test_every_numeric_input_of_the_api_is_checked(client):
    _refused(client, r"Block must be a whole number", block="x", mtype="q", api_name="/view")
    _refused(client, r"Block must be a whole number from 0 to 1; got 5", block=5, mtype="q", api_name="/view")
    _refused(client, r"Block must be a whole number", block="x", api_name="/select_run", run_id="")
    _refused(client, r"Block must be a whole number from 0 to 1; got .1\.5x.", run_a="a", run_b="b",
             block="1.5x", mtype="q", api_name="/compare")
    _refused(client, r"windows must be a whole number .*got 'abc'", method_name="wanda", windows="abc",
             seqlen=32, sparsity=0.5, api_name="/calibrate")
    _refused(client, r"seqlen must be a whole number .*got -5", method_name="wanda", windows=4, seqlen=-5,
             sparsity=0.5, api_name="/calibrate")
    _refused(client, r"windows must be a whole number .*got 2\.5", method_name="wanda", windows=2.5, seqlen=32,
             sparsity=0.5, api_name="/calibrate")
    # a method parameter sent as JSON goes through the method's schema before any work
    _refused(client, r"lam must be a finite number in \[0\.0, 0\.5\]; got nan", method_name="owl", windows=4,
             seqlen=32, sparsity=0.5, params_json='{"lam": NaN}', api_name="/calibrate")
    _refused(client, r"M must be in \[1\.0, 50\.0\]; got 0\.5", method_name="owl", windows=4, seqlen=32,
             sparsity=0.5, params_json='{"M": 0.5}', api_name="/calibrate")
    gen = dict(prompt="The quick brown fox", max_new_tokens=4, do_sample=False, temperature=0.8, seed=0)
    for api in ("/generate", "/generate_runs"):
        _refused(client, r"max new tokens must be a whole number from 1 to 1024; got 'abc'",
                 **{**gen, "max_new_tokens": "abc"}, api_name=api)
        _refused(client, r"temperature must be a number from 0\.05 to 2; got 'nan'",
                 **{**gen, "temperature": "nan"}, api_name=api)
        _refused(client, r"seed must be a whole number from 0 to 4294967295; got -1", **{**gen, "seed": -1},
                 api_name=api)
    ev = dict(source="", seqlen=16, max_windows=1)
    for api, extra in (("/perplexity", {}), ("/sweep", {"sparsities_text": "0.3"}),
                       ("/sweep_runs", {"sparsities_text": "0.3"})):
        _refused(client, r"seqlen must be a whole number of at least 8; got 'abc'",
                 **{**ev, **extra, "seqlen": "abc"}, api_name=api)
        _refused(client, r"max windows must be a whole number .*got 0", **{**ev, **extra, "max_windows": 0},
                 api_name=api)
    # the app keeps working, for this client and the others
    status, *_views, summary = client.predict(sparsity=0.4, pattern="unstructured", api_name="/cut")
    assert abs(summary["total_sparsity"] - 0.4) < 0.03


def test_handlers_check_their_numbers_when_called_directly(tiny_llama_dir):
    """Not only through the served components: the handlers themselves refuse (one shared check)."""
    import gradio as gr

    from explorer.state import Session, get_model
    from explorer.tabs import generate, live, perplexity

    session = Session(model=get_model(str(tiny_llama_dir)))
    with pytest.raises(gr.Error, match=r"Sparsity must be a number from 0 to 1 \(not included\); got 'abc'"):
        live.on_cut(session, "abc", "unstructured", 0, "q")
    with pytest.raises(gr.Error, match=r"Sparsity must be .*got nan"):
        live.on_cut(session, math.nan, "unstructured", 0, "q")
    with pytest.raises(gr.Error, match=r"max new tokens must be a whole number"):
        next(generate.on_generate_runs(session, "Hi", "many", False, 0.8, 0, False))
    with pytest.raises(gr.Error, match=r"seqlen must be a whole number of at least 2; got 'x'"):
        perplexity.eval_numbers("x", 4)
