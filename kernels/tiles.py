"""Triton building blocks shared by the KVBuffer kernels: gating, key normalization, folding a buffer."""

import triton
import triton.language as tl

NORM_EPS = tl.constexpr(1e-6)  # same epsilon as the reference and fla-core


@triton.jit
def gate(a, b, A_log, dt_bias):
    """Log decay g = -exp(A_log) * softplus(a + dt_bias) and beta = sigmoid(b), in fp32."""
    x = a.to(tl.float32) + dt_bias.to(tl.float32)
    softplus = tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))
    g = -tl.exp(A_log.to(tl.float32)) * softplus
    return g, tl.sigmoid(b.to(tl.float32))


@triton.jit
def l2norm_vec(x, eps: tl.constexpr):
    return x * tl.rsqrt(tl.sum(x * x, axis=0) + eps)


def block(n: int, least: int = 16) -> int:
    """Power-of-two block covering n, at least `least` (tl.dot needs 16)."""
    return max(least, triton.next_power_of_2(n))


@triton.jit
def add_buffer(S, keys_base, values_base, weights_base, n, offs_k, mask_k, offs_v, mask_v,
               K: tl.constexpr, V: tl.constexpr, STAGES: tl.constexpr):
    """S + sum_{j<n} weights[j] d_j k_j^T for a [BV, K] state tile held in registers: one rank-1 update per
    buffered entry (raw keys: the weights carry 1/|k_j|), its small loads pipelined STAGES entries ahead, so a
    flush never reads its tile twice nor needs a wide product's registers."""
    for j in tl.range(0, n, num_stages=STAGES):
        k_j = tl.load(keys_base + j * K + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        d_j = tl.load(values_base + j * V + offs_v, mask=mask_v, other=0.0)
        S += d_j[:, None] * (k_j * tl.load(weights_base + j))[None, :]
    return S
