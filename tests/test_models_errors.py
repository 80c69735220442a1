"""load_model on bad input: every failure is a ModelLoadError whose message says what to do."""
from __future__ import annotations

import pytest
import torch

from core import fit, hub
from core.bundled import BUNDLED
from core.errors import ModelLoadError
from core.families import FAMILIES
from core.fingerprint import fingerprint
from core.loading import load_model
from tiny import build_tiny_module

FAMILY_NAMES_IN_MESSAGE = [f.name for f in FAMILIES]


def _assert_lists_families(message: str):
    assert "Supported families" in message
    for name in FAMILY_NAMES_IN_MESSAGE:
        assert name in message, name


def test_unknown_local_path_names_the_path():
    with pytest.raises(ModelLoadError) as info:
        load_model("./no/such/model")
    message = str(info.value)
    assert "./no/such/model" in message
    assert "No model folder or file" in message and "Check the path" in message


def test_missing_gguf_file(tmp_path):
    spec = str(tmp_path / "absent.gguf")
    with pytest.raises(ModelLoadError, match="No GGUF file at") as info:
        load_model(spec)
    assert spec in str(info.value)


def test_hub_id_while_hub_unreachable(hub_offline):
    with pytest.raises(ModelLoadError) as info:
        load_model("someorg/some-model-xyz")
    message = str(info.value)
    assert "Could not reach the Hugging Face Hub" in message
    assert "'someorg/some-model-xyz'" in message
    assert "local folder" in message and ".gguf" in message
    for name in BUNDLED:
        assert name in message


@pytest.mark.parametrize("exc", [
    OSError("We couldn't connect to 'https://huggingface.co' to load the files"),
    ConnectionError("[Errno -2] Name or service not known"),
])
def test_hub_error_classifies_network_failures(exc):
    # What transformers raises when the network itself is down (not offline mode).
    message = str(hub.hub_error("org/model", exc))
    assert "Could not reach the Hugging Face Hub" in message
    assert "bundled model" in message


def test_hub_error_for_a_missing_repo():
    exc = OSError("org/model is not a valid model identifier listed on 'https://huggingface.co/models'")
    message = str(hub.hub_error("org/model", exc))
    assert "is not a model on the Hugging Face Hub nor a local path" in message


def test_folder_without_config(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ModelLoadError) as info:
        load_model(str(tmp_path))
    message = str(info.value)
    assert str(tmp_path) in message
    assert "no config.json" in message
    assert "save_pretrained" in message


def test_unreadable_config(tmp_path):
    (tmp_path / "config.json").write_text("{ not json")
    with pytest.raises(ModelLoadError, match="Could not read the model config"):
        load_model(str(tmp_path))


@pytest.mark.parametrize("make_config", [
    lambda tf: tf.BertConfig(architectures=["BertForMaskedLM"]),  # what a real BERT checkpoint says
    lambda tf: tf.T5Config(),
    lambda tf: tf.DistilBertConfig(),
], ids=["bert", "t5", "distilbert"])
def test_non_causal_model(tmp_path, make_config):
    import transformers

    config = make_config(transformers)
    config.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError) as info:
        load_model(str(tmp_path))
    message = str(info.value)
    assert "not a causal (decoder-only) language model" in message
    assert repr(config.model_type) in message
    _assert_lists_families(message)


@pytest.mark.parametrize("config_class", ["BloomConfig", "FalconConfig"])
def test_causal_model_of_unsupported_family(tmp_path, config_class):
    import transformers

    config = getattr(transformers, config_class)()
    config.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError) as info:
        load_model(str(tmp_path))
    message = str(info.value)
    assert f"{config.model_type!r} causal LM" in message
    assert "no adapter" in message
    _assert_lists_families(message)


def test_unknown_dtype():
    with pytest.raises(ModelLoadError) as info:
        load_model("./no/such/model", dtype="float8")
    message = str(info.value)
    assert "'float8'" in message
    assert "float32" in message and "bfloat16" in message and "float16" in message


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_cuda_without_gpu():
    with pytest.raises(ModelLoadError, match="no GPU is visible; use --device cpu"):
        load_model("./no/such/model", device="cuda")


def test_bundled_model_not_installed(monkeypatch):
    name, bundle = next(iter(BUNDLED.items()))
    monkeypatch.setattr(type(bundle), "gguf_path", lambda self: None)
    with pytest.raises(ModelLoadError) as info:
        load_model(name)
    message = str(info.value)
    assert "is not installed" in message and bundle.install in message


def test_load_saved_tiny_llama_folder(tmp_path, tiny_tokenizer):
    module = build_tiny_module("llama")
    module.save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)

    lm = load_model(str(tmp_path))
    assert lm.family.name == "llama"
    assert lm.model_id == str(tmp_path)
    assert lm.tokenizer is not None and lm.tokenizer.pad_token is not None
    assert lm.heads.num_kv_heads == 2
    assert lm.fingerprint == fingerprint(module)  # the same weights came back
    ids = lm.tokenizer("hello world", return_tensors="pt").input_ids
    assert torch.isfinite(lm.model(ids).logits).all()
    assert not any(p.requires_grad for p in lm.model.parameters())

    half = load_model(str(tmp_path), dtype="bfloat16")
    assert half.facts()["dtype"] == "bfloat16"


def test_model_too_big_for_memory_is_refused_before_loading(tmp_path, tiny_tokenizer, monkeypatch):
    module = build_tiny_module("llama")
    module.save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    # Pretend the machine has 64 KiB free: the tiny model's weights alone need more.
    monkeypatch.setattr(fit, "available_memory_bytes", lambda: 64 * 1024)
    with pytest.raises(ModelLoadError) as info:
        load_model(str(tmp_path))
    message = str(info.value)
    assert "memory is free" in message and "smaller model" in message
    monkeypatch.setattr(fit, "available_memory_bytes", lambda: 64 * 2**30)
    assert load_model(str(tmp_path)).family.name == "llama"
