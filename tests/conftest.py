"""Shared fixtures: the real packaged SmolLM2-135M, tiny models of every supported family built from a config,
and the real task data in ../shared/data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("PUDDING_DATA_DIR", REPO.parent / "shared" / "data"))

# Every family the decoder supports, as a tiny random model. Sliding windows are short (4 tokens) so that
# sequences of 16 tokens exercise them; Qwen2 and Gemma 3 mix sliding and full blocks.
TINY_CONFIGS = {
    "llama": ("LlamaConfig", dict(intermediate_size=96, num_key_value_heads=2)),
    "mistral": ("MistralConfig", dict(intermediate_size=96, num_key_value_heads=2, sliding_window=4)),
    "qwen2": ("Qwen2Config", dict(intermediate_size=96, num_key_value_heads=2, use_sliding_window=True, sliding_window=4, max_window_layers=3)),
    "phi3": ("Phi3Config", dict(intermediate_size=96, num_key_value_heads=2, pad_token_id=0)),
    "gemma3": ("Gemma3TextConfig", dict(intermediate_size=96, num_key_value_heads=2, head_dim=16, sliding_window=4, layer_types=[
        "sliding_attention", "full_attention", "sliding_attention", "sliding_attention", "full_attention", "sliding_attention"])),
    "opt": ("OPTConfig", dict(ffn_dim=96, word_embed_proj_dim=32, max_position_embeddings=64)),
}


def build_tiny(family: str, seed: int = 0, init: float = 0.02):
    """A 6-block model of the family; a larger `init` spreads the logits, so greedy decoding meets no near-ties."""
    import transformers

    class_name, extra = TINY_CONFIGS[family]
    config = getattr(transformers, class_name)(
        hidden_size=64, num_hidden_layers=6, num_attention_heads=4, vocab_size=256, initializer_range=init, **extra
    )
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return model.eval().requires_grad_(False)


@pytest.fixture(params=sorted(TINY_CONFIGS))
def tiny_model(request):
    return build_tiny(request.param)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA_DIR / "arc_easy").is_dir():
        pytest.fail(f"task data not found at {DATA_DIR}; set PUDDING_DATA_DIR")
    return DATA_DIR


@pytest.fixture(scope="session", autouse=True)
def _environment(data_dir):
    os.environ["PUDDING_DATA_DIR"] = str(data_dir)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def smollm2():
    """The real packaged model (converted once into the cache, then loaded in seconds)."""
    from pudding.models import load_decoder

    return load_decoder("smollm2-135m", device="cpu")
