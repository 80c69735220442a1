"""The memory estimates the explorer checks its requests against (core.memory): a perplexity's
logits, a cut mask set, a generation's KV cache, and the refusal with its numbers."""
from __future__ import annotations

import pytest
import transformers as tf

from core.memory import (GIB, ModelShapes, RequestMemoryError, check_request_memory, estimate_cut,
                         estimate_evaluation, estimate_generation)


@pytest.fixture(scope="module")
def smollm2_shapes():
    config = tf.LlamaConfig(hidden_size=576, num_hidden_layers=30, intermediate_size=1536, num_attention_heads=9,
                            num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192)
    return ModelShapes.from_config(config)


def test_a_full_context_perplexity_is_gigabytes_of_logits(smollm2_shapes):
    # batch 4 x 8192 x 49152 logits, in fp32 three times over: the request a probe could send
    full = estimate_evaluation(smollm2_shapes, 8192)
    assert full > 4 * 8192 * 49152 * 12 > 10 * GIB
    assert estimate_evaluation(smollm2_shapes, 256) < full / 20
    with pytest.raises(RequestMemoryError, match=r"needs about .*GiB.*only 8.00 GiB is available.*seqlen"):
        check_request_memory(full, "a perplexity at seqlen 8192", 8 * GIB, "Use a shorter seqlen.")
    check_request_memory(estimate_evaluation(smollm2_shapes, 256), "a perplexity", 8 * GIB, "")
    check_request_memory(full, "anything", None, "")  # a system that does not say: not refused


def test_a_cut_holds_one_byte_a_weight_and_new_weights_for_weight_updating_methods(smollm2_shapes):
    n = smollm2_shapes.n_prunable
    wanda, sparsegpt = estimate_cut(smollm2_shapes, "wanda"), estimate_cut(smollm2_shapes, "sparsegpt")
    assert n <= wanda < 2 * n
    assert sparsegpt - wanda == n * smollm2_shapes.elem


def test_a_generation_grows_with_its_tokens(smollm2_shapes):
    short, long = (estimate_generation(smollm2_shapes, t, kv_heads=3) for t in (100, 8100))
    kv_per_token = 2 * 30 * 3 * 64 * 4
    assert long - short >= 8000 * kv_per_token
