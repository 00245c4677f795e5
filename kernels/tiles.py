"""Triton building blocks shared by the KVBuffer kernels: gating, key normalization, block sizes."""

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
