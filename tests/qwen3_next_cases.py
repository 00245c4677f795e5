"""Shared pieces of the model and engine tests: random tiny Qwen3-Next checkpoints written the way
transformers writes them, transformers forced onto its pure-PyTorch path, and a teacher-forced driver."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest
import torch
from kvbuffer.service.engine.api import GenerateRequest
from kvbuffer.service.engine.core import EngineCore
from kvbuffer.service.model import tiny

HF_KERNELIZED = ("torch_recurrent_gated_delta_rule", "torch_chunk_gated_delta_rule", "causal_conv1d_fn",
                 "causal_conv1d_update")


def fresh_seed() -> int:
    return secrets.randbits(31)


def use_torch_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """With fla-core installed, transformers' qwen3_next binds fla/hub kernels (GPU only) in place of its
    pure-torch functions; put the originals (`__wrapped__`) back, on the module and on the GDN class if the
    `use_kernelized_func` decorator attached them there."""
    import transformers.models.qwen3_next.modeling_qwen3_next as hf

    for name in HF_KERNELIZED:
        fn = getattr(hf, name)
        original = getattr(fn, "__wrapped__", fn)
        monkeypatch.setattr(hf, name, original)
        if name in vars(hf.Qwen3NextGatedDeltaNet):
            monkeypatch.setattr(hf.Qwen3NextGatedDeltaNet, name, staticmethod(original))


def write_tokenizer(path: Path) -> None:
    """A byte-level tokenizer.json (256 byte tokens + <|endoftext|> = 256), like the embedded ByteTokenizer."""
    from tokenizers import Tokenizer, decoders, models
    from tokenizers.pre_tokenizers import ByteLevel

    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    vocab["<|endoftext|>"] = 256
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(str(path / "tokenizer.json"))


def write_checkpoint(path: Path, seed: int, **overrides):
    """A random tiny Qwen3NextForCausalLM saved with save_pretrained (per-expert tensors); returns it (fp32)."""
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

    raw = {k: v for k, v in tiny.CONFIG.items() if k not in ("architectures", "model_type")}
    raw["layer_types"] = ["linear_attention", "full_attention", "linear_attention", "linear_attention"]
    raw.update(overrides)
    model = Qwen3NextForCausalLM(Qwen3NextConfig(**raw)).eval()
    tiny.init_seeded(model, seed)
    model.save_pretrained(path)
    write_tokenizer(path)
    return model


def teacher_forced_logits(core: EngineCore, prompt: list[int], forced: list[int]) -> list[torch.Tensor]:
    """Logits `[V]` after the prompt and after each forced token, run through the engine's scheduler, state
    manager and model runner (chunked prefill included), one request at a time."""
    seq = core.add(GenerateRequest("oracle", prompt_token_ids=tuple(prompt)), prompt)
    out = []
    for token in [None, *forced]:
        if token is not None:
            seq.token_ids.append(token)
        logits = None
        while logits is None:
            batch = core.runner.order(core.scheduler.schedule())
            logits, _ = core.runner.run(batch)
            core.memory.commit(seq, batch[0].step, batch[0].n)
        out.append(logits[-1])
    return out


def make_core(**settings) -> EngineCore:
    """The engine core on the embedded tiny model, with small pools unless told otherwise."""
    from kvbuffer.service.engine.config import EngineConfig

    defaults = {"device": "cpu", "buffer_size": 16, "chunk_size": 8, "memory_budget_bytes": 2**22,
                "max_context_length": 256}
    return EngineCore(EngineConfig(**{**defaults, **settings}))


def request(rid: str, prompt: list[int], **sampling) -> GenerateRequest:
    from kvbuffer.service.engine.api import SamplingParams

    return GenerateRequest(rid, prompt_token_ids=tuple(prompt), sampling=SamplingParams(**sampling))


def run_to_end(core: EngineCore, arrivals: dict[int, list[GenerateRequest]], on_step=None) -> dict:
    """Adds arrivals[i] before step i, steps until idle; the final chunk of each request (token_ids = all
    its tokens, text = all its text). `on_step(core)` runs after every step."""
    tokens: dict[str, list[int]] = {}
    text: dict[str, str] = {}
    final = {}
    step = 0
    while core.has_work() or any(k >= step for k in arrivals):
        for req in arrivals.get(step, []):
            core.add(req, core.validate(req))
        for rid, chunk in core.step():
            tokens.setdefault(rid, []).extend(chunk.token_ids)
            text[rid] = text.get(rid, "") + chunk.text
            if chunk.finish_reason is not None:
                chunk.token_ids, chunk.text = tokens[rid], text[rid]
                final[rid] = chunk
        if on_step is not None:
            on_step(core)
        step += 1
    return final
