"""The PyTorch reference: its recurrence against transformers' Qwen3-Next, its KVBuffer ops against its
recurrence in fp64 (the algebra of DESIGN.md section 2 holds to rounding)."""

from __future__ import annotations

import pytest
import torch
from gdn_cases import Shapes, fresh_generator, layer_params, relative_error, tokens
from kvbuffer.kernels import BufferPool, new_state_pool, reference
from transformers.models.qwen3_next import modeling_qwen3_next as hf

# transformers swaps in fla-core's GPU kernels when fla is installed; the pure-PyTorch originals stay wrapped.
HF_RECURRENT = getattr(hf.torch_recurrent_gated_delta_rule, "__wrapped__", hf.torch_recurrent_gated_delta_rule)
HF_CHUNK = getattr(hf.torch_chunk_gated_delta_rule, "__wrapped__", hf.torch_chunk_gated_delta_rule)


@pytest.mark.parametrize("hf_fn", [HF_RECURRENT, HF_CHUNK], ids=["recurrent", "chunk"])
def test_recurrence_matches_transformers(hf_fn) -> None:
    gen, seed = fresh_generator()
    shapes = Shapes(H=2, HV=4, K=16, V=32)
    layer = layer_params(gen, shapes)
    q, k, v, a, b = tokens(gen, 70, shapes, dtype=torch.float64)
    start = torch.randn(shapes.HV, shapes.V, shapes.K, generator=gen, dtype=torch.float64) * 0.3
    out, final = reference.recurrence(q, k, v, a, b, layer.A_log.double(), layer.dt_bias.double(), start)
    g, beta = reference.gate(a, b, layer.A_log.double(), layer.dt_bias.double())
    hf_out, hf_final = hf_fn(q[None], k[None], v[None], g=g[None], beta=beta[None],
                             initial_state=start.transpose(-1, -2)[None], output_final_state=True,
                             use_qk_l2norm_in_kernel=True)
    # transformers computes in fp32
    assert relative_error(hf_out[0], out) < 1e-5, f"seed {seed}"
    assert relative_error(hf_final[0].transpose(-1, -2), final) < 1e-5, f"seed {seed}"


def test_kvbuffer_ops_equal_the_recurrence_in_fp64() -> None:
    """Prompt into the buffer (verify, no state), decode with flushes, a draft block, fold: every output and
    the final state equal the recurrence over the same tokens to ~1e-13."""
    gen, seed = fresh_generator()
    shapes = Shapes(H=2, HV=4, K=8, V=16)
    layer = layer_params(gen, shapes)
    A_log, dt_bias = layer.A_log.double(), layer.dt_bias.double()
    n_prompt, n_decode, n_draft, chunk = 9, 20, 5, 6
    xs = tokens(gen, n_prompt + n_decode + n_draft, shapes, dtype=torch.float64)
    expected, final = reference.recurrence(*xs, A_log, dt_bias)
    states = new_state_pool(1, shapes.HV, shapes.K, shapes.V, dtype=torch.float64)
    buffer = BufferPool.allocate(1, 16, shapes.H, shapes.HV, shapes.K, shapes.V, key_dtype=torch.float64,
                                 value_dtype=torch.float64)
    one = torch.tensor([0])
    outs = [reference.verify(*(x[:n_prompt] for x in xs), A_log, dt_bias, states, buffer,
                             torch.tensor([0, n_prompt]), one, torch.tensor([0]), torch.tensor([-1]))]
    length, has_state = n_prompt, False
    for t in range(n_prompt, n_prompt + n_decode):
        flush = length + 1 == (chunk if has_state else buffer.capacity)
        outs.append(reference.buffered_decode(*(x[t:t + 1] for x in xs), A_log, dt_bias, states, buffer, one,
                                              torch.tensor([length]), torch.tensor([0 if has_state else -1]),
                                              torch.tensor([0 if flush else -1])))
        length, has_state = (0 if flush else length + 1), has_state or flush
    assert has_state, "the decode steps must cross the stateless -> stateful boundary"
    drafts = [x[n_prompt + n_decode:] for x in xs]
    outs.append(reference.verify(*drafts, A_log, dt_bias, states, buffer, torch.tensor([0, n_draft]), one,
                                 torch.tensor([length]), torch.tensor([0])))
    reference.fold(states, buffer, one, torch.tensor([length + n_draft]), torch.tensor([0]), torch.tensor([0]))
    assert relative_error(torch.cat(outs), expected) < 1e-12, f"seed {seed}"
    assert relative_error(states[0], final) < 1e-12, f"seed {seed}"


def test_prefill_into_checkpoint_continues_from_a_state() -> None:
    gen, seed = fresh_generator()
    shapes = Shapes()
    layer = layer_params(gen, shapes)
    xs = tokens(gen, 30, shapes, dtype=torch.float64)
    A_log, dt_bias = layer.A_log.double(), layer.dt_bias.double()
    expected, final = reference.recurrence(*xs, A_log, dt_bias)
    states = new_state_pool(3, shapes.HV, shapes.K, shapes.V, dtype=torch.float64)
    first = reference.prefill(*(x[:12] for x in xs), A_log, dt_bias, states, torch.tensor([0, 12]),
                              torch.tensor([-1]), torch.tensor([2]))
    second = reference.prefill(*(x[12:] for x in xs), A_log, dt_bias, states, torch.tensor([0, 18]),
                               torch.tensor([2]), torch.tensor([1]))
    assert relative_error(torch.cat([first, second]), expected) < 1e-12, f"seed {seed}"
    assert relative_error(states[1], final) < 1e-12, f"seed {seed}"
