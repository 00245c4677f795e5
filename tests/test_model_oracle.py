"""Our Qwen3-Next against transformers' Qwen3NextForCausalLM on the same random weights, fp32 on CPU.

Prefill and every decode step, in both decode modes. Settings make every KVBuffer path run: short prompts
start stateless and cross buffer_size while decoding (slot taken, fused flush), long prompts are chunked and
go through verify, fold and prefill, and buffered decode flushes every chunk_size tokens.
"""

from __future__ import annotations

import pytest
import torch
from kvbuffer.service.engine.config import EngineConfig
from kvbuffer.service.engine.core import EngineCore
from qwen3_next_cases import fresh_seed, teacher_forced_logits, use_torch_reference, write_checkpoint

DECODE_STEPS = 24


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    seed = fresh_seed()
    path = tmp_path_factory.mktemp("qwen3_next")
    return path, write_checkpoint(path, seed), seed


def hf_logits(model, prompt: list[int], forced: list[int]) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model(input_ids=torch.tensor([prompt]), use_cache=True)
        logits, cache = [out.logits[0, -1]], out.past_key_values
        for token in forced:
            out = model(input_ids=torch.tensor([[token]]), past_key_values=cache, use_cache=True)
            logits.append(out.logits[0, -1])
            cache = out.past_key_values
    return logits


@pytest.mark.parametrize("decode_mode", ["kvbuffer", "recurrent"])
@pytest.mark.parametrize("prompt_len", [5, 21])
def test_logits_match_transformers(checkpoint, monkeypatch, decode_mode, prompt_len):
    path, hf_model, seed = checkpoint
    use_torch_reference(monkeypatch)
    gen = torch.Generator().manual_seed(seed + prompt_len)
    tokens = torch.randint(0, 256, (prompt_len + DECODE_STEPS,), generator=gen).tolist()
    prompt, forced = tokens[:prompt_len], tokens[prompt_len:]
    core = EngineCore(EngineConfig(model=str(path), device="cpu", dtype="float32", decode_mode=decode_mode,
                                   buffer_size=8, chunk_size=4, max_num_batched_tokens=6,
                                   max_context_length=64, memory_budget_bytes=2**22))
    ours = teacher_forced_logits(core, prompt, forced)
    ref = hf_logits(hf_model, prompt, forced)
    for step, (a, b) in enumerate(zip(ours, ref, strict=True)):
        err = (a - b).abs().max().item()
        assert err < 1e-4, f"step {step} ({'prefill' if step == 0 else 'decode'}): max abs diff {err} (seed {seed})"
    if decode_mode == "kvbuffer":
        assert core.memory.state_slots_used == 1  # the context outgrew buffer_size: the request holds a state
