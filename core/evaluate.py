"""Perplexity (with its protocol beside the number) and streamed generation."""
from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from .data import check_seqlen
from .errors import Cancelled
from .loaded_model import LoadedModel
from .prompts import check_prompt_chars, prompt_ids
from .families import context_length


@dataclass(frozen=True)
class Perplexity:
    value: float
    protocol: dict

    def __str__(self) -> str:
        p = self.protocol
        return (f"{self.value:.3f} (exp of mean token NLL over {p['n_windows']} x {p['seqlen']}-token "
                f"windows of {p['source']} {p['part']})")


@torch.no_grad()
def perplexity(lm: LoadedModel, windows: torch.Tensor, protocol: dict, batch_size: int = 4,
               progress: Callable[[int, int, str], None] | None = None,
               should_stop: Callable[[], bool] | None = None) -> Perplexity:
    """ppl = exp(mean over windows of the mean next-token NLL in each window), in fp32.

    Only the logits of one batch exist at a time, computed as fp32 log-softmax."""
    check_seqlen(lm, windows.shape[-1])  # before any forward pass
    nlls = []
    total = windows.shape[0]
    for start in range(0, total, batch_size):
        if should_stop is not None and should_stop():
            raise Cancelled("Perplexity evaluation cancelled.")
        batch = windows[start:start + batch_size].to(lm.device)
        logits = lm.model(batch, use_cache=False).logits[:, :-1].float()
        targets = batch[:, 1:]
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
        nlls.append(nll.view(batch.shape[0], -1).mean(dim=1))
        if progress is not None:
            progress(min(start + batch_size, total), total, "perplexity")
    mean_nll = torch.cat(nlls).mean().item()
    return Perplexity(math.exp(mean_nll), {**protocol, "model": lm.model_id, "metric": "exp(mean window NLL)",
                                           "dtype": str(next(lm.model.parameters()).dtype)})


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 48
    do_sample: bool = False
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 50
    repetition_penalty: float = 1.0
    seed: int = 0

    def kwargs(self) -> dict:
        out = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample,
               "repetition_penalty": self.repetition_penalty}
        if self.do_sample:
            out.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        return out


def generation_ids(lm: LoadedModel, prompt: str, settings: GenerationSettings, chat: bool = False) -> torch.Tensor:
    """The prompt as generation feeds it (the chat template applied when asked for and the tokenizer
    has one), tokenized, checked to fit in the model's context with settings.max_new_tokens new
    tokens (core.prompts: PromptTooLong, before any forward)."""

    tok = lm.tokenizer
    text = prompt
    if chat and getattr(tok, "chat_template", None):
        check_prompt_chars(len(prompt), context_length(lm.model.config))  # before the template copies it
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
    return prompt_ids(lm, text, settings.max_new_tokens)


def stream_generate(lm: LoadedModel, prompt: str, settings: GenerationSettings = GenerationSettings(),
                    chat: bool = False) -> Iterator[tuple[str, float]]:
    """Yield (text so far, tokens per second) as tokens arrive. Same seed -> same sample. A prompt
    that does not fit in the context with the new tokens is refused first (core.prompts)."""
    from transformers import TextIteratorStreamer

    tok = lm.tokenizer
    ids = generation_ids(lm, prompt, settings, chat)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    errors: list[BaseException] = []

    def work():
        try:
            torch.manual_seed(settings.seed)
            with torch.no_grad():
                lm.model.generate(**inputs, streamer=streamer, pad_token_id=tok.pad_token_id, **settings.kwargs())
        except BaseException as exc:  # surfaced to the caller below
            errors.append(exc)
            streamer.end()

    thread = threading.Thread(target=work, daemon=True)
    start = time.perf_counter()
    thread.start()
    text_so_far = ""
    for chunk in streamer:
        text_so_far += chunk
        n_tokens = len(tok(text_so_far, add_special_tokens=False).input_ids)
        yield text_so_far, n_tokens / max(time.perf_counter() - start, 1e-9)
    thread.join()
    if errors:
        raise errors[0]


def generate(lm: LoadedModel, prompt: str, settings: GenerationSettings = GenerationSettings()) -> str:
    text = ""
    for text, _ in stream_generate(lm, prompt, settings):
        pass
    return text
