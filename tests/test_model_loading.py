"""Loading Qwen3-Next: refusals name the architecture or tensor at fault; both expert layouts load; the
embedded model is deterministic; tokenizers round-trip."""

from __future__ import annotations

import json

import pytest
import torch
from kvbuffer.service.model import ModelConfig, load_model, tiny
from kvbuffer.service.model.tokenizer import ByteTokenizer
from qwen3_next_cases import fresh_seed, write_checkpoint
from safetensors.torch import load_file, save_file

CPU, F32 = torch.device("cpu"), torch.float32


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt")
    write_checkpoint(path, fresh_seed())
    return path


def copy_checkpoint(src, dst, edit_config=None, edit_tensors=None):
    config = json.loads((src / "config.json").read_text())
    if edit_config:
        edit_config(config)
    (dst / "config.json").write_text(json.dumps(config))
    (dst / "tokenizer.json").write_text((src / "tokenizer.json").read_text())
    tensors = load_file(src / "model.safetensors")
    if edit_tensors:
        edit_tensors(tensors)
    save_file(tensors, dst / "model.safetensors")


def test_wrong_architecture_is_refused_by_name(checkpoint, tmp_path):
    def llama(c):
        c["architectures"], c["model_type"] = ["LlamaForCausalLM"], "llama"

    copy_checkpoint(checkpoint, tmp_path, edit_config=llama)
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        load_model(str(tmp_path), CPU, F32)


def test_missing_tensor_is_named(checkpoint, tmp_path):
    name = "model.layers.1.self_attn.q_norm.weight"
    copy_checkpoint(checkpoint, tmp_path, edit_tensors=lambda t: t.pop(name))
    with pytest.raises(ValueError, match=rf"missing tensor {name}"):
        load_model(str(tmp_path), CPU, F32)


def test_missing_expert_is_named(checkpoint, tmp_path):
    copy_checkpoint(checkpoint, tmp_path, edit_tensors=lambda t: t.pop("model.layers.2.mlp.experts.3.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensor model.layers.2.mlp.experts.gate_up_proj"):
        load_model(str(tmp_path), CPU, F32)


def test_misshapen_tensor_is_named(checkpoint, tmp_path):
    name = "model.layers.0.linear_attn.A_log"
    copy_checkpoint(checkpoint, tmp_path, edit_tensors=lambda t: t.update({name: torch.zeros(3)}))
    with pytest.raises(ValueError, match=rf"{name} has shape \[3\]"):
        load_model(str(tmp_path), CPU, F32)


def test_fused_and_per_expert_layouts_load_the_same_weights(checkpoint, tmp_path):
    per_expert = load_model(str(checkpoint), CPU, F32).model
    (tmp_path / "fused").mkdir()
    save_file({k: v.contiguous() for k, v in per_expert.state_dict().items()}, tmp_path / "fused" / "model.safetensors")
    for f in ("config.json", "tokenizer.json"):
        (tmp_path / "fused" / f).write_text((checkpoint / f).read_text())
    fused = load_model(str(tmp_path / "fused"), CPU, F32).model
    for (name, a), b in zip(per_expert.state_dict().items(), fused.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    experts = per_expert.model.layers[1].mlp.experts
    ref = load_file(checkpoint / "model.safetensors")
    assert torch.equal(experts.gate_up_proj[2, experts.gate_up_proj.shape[1] // 2:],
                       ref["model.layers.1.mlp.experts.2.up_proj.weight"])


def test_config_refuses_what_we_do_not_implement():
    raw = dict(tiny.CONFIG)
    assert ModelConfig.from_dict(raw).head_dim == raw["head_dim"]
    with pytest.raises(ValueError, match="quantization_config"):
        ModelConfig.from_dict({**raw, "quantization_config": {"quant_method": "fp8"}})
    with pytest.raises(ValueError, match="yarn"):
        ModelConfig.from_dict({**raw, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="missing field hidden_size"):
        ModelConfig.from_dict({k: v for k, v in raw.items() if k != "hidden_size"})


def test_embedded_model_is_deterministic_and_seeded():
    a, b = (load_model("embedded:tiny-qwen3-next", CPU, F32).model for _ in range(2))
    c = load_model("embedded:tiny-qwen3-next", CPU, F32, seed=1).model
    for (name, x), y, z in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values(),
                               strict=True):
        assert torch.equal(x, y) and not torch.equal(x, z), name
    kinds = set(a.config.layer_types)
    assert kinds == {"linear_attention", "full_attention"}
    with pytest.raises(ValueError, match="unknown embedded model"):
        load_model("embedded:huge", CPU, F32)


def test_tokenizers_round_trip(checkpoint):
    text = "KVBuffer — états ✓"
    byte = ByteTokenizer()
    assert byte.decode(byte.encode(text)) == text and byte.eos_token_ids == (256,)
    hf = load_model(str(checkpoint), CPU, F32).tokenizer
    assert hf.decode(hf.encode(text)) == text
    assert hf.eos_token_ids == (256,)
