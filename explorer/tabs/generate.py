"""The Generate tab: one prompt, the same settings and seed, on the dense model and on pruned
runs (the active run, or two chosen runs), streamed side by side with tokens/s for each."""
from __future__ import annotations

import dataclasses

import gradio as gr

from core.errors import PruneError
from core.evaluate import GenerationSettings, generation_ids, stream_generate
from core.run_source import is_structured
from core.structured.plan import plan_from_maskset
from core.structured.slicing import slice_model

from .. import limits
from ..common import checked_number, ensure_model, fail
from ..state import ModelEntry, Run, Session, model_as
from ..streaming import Streamed

MAX_SLICED = 2  # physically sliced models a session keeps (a three-way generation needs two)
MAX_NEW_TOKENS = 1024  # the most tokens one generation asks for (the widget's maximum)
TEMPERATURES = (0.05, 2.0)  # the sampling temperatures the widget offers


def locked_stream(entry: ModelEntry, masks, prompt: str, settings: GenerationSettings, chat: bool):
    """Stream a generation with `masks` applied (None: dense) under MODEL_LOCK.

    A worker thread (explorer.streaming) owns the lock from apply to restore, so the weights are
    always put back and the lock released even if the browser goes away mid-stream; a reader
    that stops reading ends the generation at its next token."""
    def work(emit, stop):
        with model_as(entry, masks) as lm:
            for item in stream_generate(lm, prompt, settings, chat=chat):
                if stop.is_set():
                    break
                emit(item)

    return Streamed(work, name="explorer-generate")


def sliced_model(session: Session, entry: ModelEntry, masks):
    """For structured masks, the physically smaller model they stand for (built once per mask
    set, kept on the session), so the pruned side's tokens/s is the smaller model's; None for
    other masks (those run as the dense model with zeroed weights: same size, same speed)."""
    if not is_structured(masks):
        return None
    for kept_masks, model in session.sliced:
        if kept_masks is masks:
            return model
    session.sliced = session.sliced[-(MAX_SLICED - 1):] if MAX_SLICED > 1 else []  # drop before making
    with model_as(entry) as lm:  # the copy must be taken from the dense weights, not another tab's masked ones
        model = slice_model(lm, plan_from_maskset(lm, masks))
    sliced = dataclasses.replace(entry.lm, model=model)
    session.sliced.append((masks, sliced))
    return sliced


def sliced_note(entry: ModelEntry, sliced, label: str = "pruned side") -> str:
    """What the rates line adds when a pruned side is the sliced model (counted once per generation)."""
    if sliced is None:
        return ""
    n_pruned = sum(p.numel() for p in sliced.model.parameters())
    n_dense = sum(p.numel() for p in entry.lm.model.parameters())
    return f" | {label}: the sliced model, {n_pruned:,} of {n_dense:,} parameters"


def rates_md(rates: dict, masks) -> str:
    parts = [f"{k}: {v:.1f} tokens/s" for k, v in rates.items()]
    return " | ".join(parts) + f" | pruned at {masks.total_sparsity():.1%} sparsity, same settings and seed"


def _settings(prompt, max_new_tokens, do_sample, temperature, seed) -> GenerationSettings:
    if not (prompt or "").strip():
        raise gr.Error("Type a prompt first.")
    return GenerationSettings(max_new_tokens=checked_number(max_new_tokens, "max new tokens", 1, MAX_NEW_TOKENS,
                                                            integer=True),
                              do_sample=bool(do_sample),
                              temperature=checked_number(temperature, "temperature", *TEMPERATURES),
                              seed=checked_number(seed, "seed", 0, 2**32 - 1, integer=True))


def _check_fits(entry: ModelEntry, prompt, settings: GenerationSettings, chat) -> None:
    """Refuse, before any side streams, a prompt that with the new tokens does not fit in the
    model's context, or that is far too long to tokenize (core.prompts, the CLI's rule too; the
    pruned and sliced models share the dense model's context), or whose KV cache would not fit in
    the memory free now."""
    try:
        ids = generation_ids(entry.lm, prompt, settings, bool(chat))
        limits.check_generation(entry, int(ids.shape[-1]) + settings.max_new_tokens)
    except PruneError as exc:
        raise fail(exc) from exc


def _streams(session: Session, entry: ModelEntry, sides: list[tuple[str, Run | None]], prompt, settings, chat):
    """(label, stream) per side, in order; each side's text and tokens/s as it comes."""
    for label, run in sides:
        if run is None:
            yield label, locked_stream(entry, None, prompt, settings, chat), None
            continue
        sliced = sliced_model(session, entry, run.masks)
        stream = (stream_generate(sliced, prompt, settings, chat=chat) if sliced is not None
                  else locked_stream(entry, run.masks, prompt, settings, chat))
        yield label, stream, sliced


def on_generate(session: Session, prompt, max_new_tokens, do_sample, temperature, seed, chat):
    """Dense and the active run, streamed one after the other: (dense, pruned, rates)."""
    entry = ensure_model(session)
    run = session.active
    if run is None or run.masks is None:
        raise gr.Error("No pruned model yet: calibrate (or import a mask file) before comparing.")
    settings = _settings(prompt, max_new_tokens, do_sample, temperature, seed)
    _check_fits(entry, prompt, settings, chat)
    masks = run.masks
    texts, rates, note = {"dense": "", "pruned": ""}, {}, ""
    try:
        for which, stream, sliced in _streams(session, entry, [("dense", None), ("pruned", run)], prompt,
                                              settings, bool(chat)):
            note = sliced_note(entry, sliced) or note
            for text, tps in stream:
                texts[which], rates[which] = text, tps
                yield texts["dense"], texts["pruned"], rates_md(rates, masks) + note
    except Exception as exc:
        raise fail(exc) from exc
    yield texts["dense"], texts["pruned"], rates_md(rates, masks) + note


def on_generate_runs(session: Session, prompt, max_new_tokens, do_sample, temperature, seed, chat,
                     run_a=None, run_b=None):
    """Dense, run A and run B (optional), streamed one after the other with the same prompt,
    settings and seed: (dense, A, B, rates)."""
    entry = ensure_model(session)
    settings = _settings(prompt, max_new_tokens, do_sample, temperature, seed)
    try:
        a = session.runs.require(run_a) if run_a else session.active
        b = session.runs.require(run_b) if run_b else None
    except ValueError as exc:
        raise fail(exc) from exc
    if a is None or a.masks is None:
        raise gr.Error("No pruned run yet: calibrate (or import a mask file) before comparing.")
    _check_fits(entry, prompt, settings, chat)
    sides = [("dense", None), (f"A: {a.name}", a)] + ([(f"B: {b.name}", b)] if b is not None else [])
    texts = {label: "" for label, _ in sides}
    rates, notes = {}, []
    info = {label: run for label, run in sides}

    def line() -> str:
        parts = [f"{k}: {v:.1f} tokens/s" for k, v in rates.items()]
        sparsity = ", ".join(f"{label} {run.masks.total_sparsity():.1%} sparse"
                             for label, run in info.items() if run is not None)
        return " | ".join(parts) + f" | {sparsity}; same settings and seed" + "".join(notes)

    def out():
        labels = [label for label, _ in sides]
        b_text = texts[labels[2]] if len(labels) > 2 else "(choose a run B to compare two pruned runs)"
        return texts["dense"], texts[labels[1]], b_text, line()

    try:
        for label, stream, sliced in _streams(session, entry, sides, prompt, settings, bool(chat)):
            note = sliced_note(entry, sliced, label)
            if note:
                notes.append(note)
            for text, tps in stream:
                texts[label], rates[label] = text, tps
                yield out()
    except Exception as exc:
        raise fail(exc) from exc
    yield out()
