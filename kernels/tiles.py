"""Triton building blocks shared by the KVBuffer kernels: gating, key normalization, buffer reads."""

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
def l2norm_rows(x, eps: tl.constexpr):
    """Each row of a 2-D fp32 block scaled to unit length (rsqrt(sum x^2 + eps))."""
    return x * tl.rsqrt(tl.sum(x * x, axis=1) + eps)[:, None]


@triton.jit
def l2norm_vec(x, eps: tl.constexpr):
    return x * tl.rsqrt(tl.sum(x * x, axis=0) + eps)


def block(n: int, least: int = 16) -> int:
    """Power-of-two block covering n, at least `least` (tl.dot needs 16)."""
    return max(least, triton.next_power_of_2(n))


@triton.jit
def load_entries(keys_base, values_base, decay_base, start, n, offs_k, offs_v, mask_k, mask_v,
                 K: tl.constexpr, V: tl.constexpr, BL: tl.constexpr):
    """Buffer entries start..start+BL (those below n): normalized keys [BL, BK], values [BL, BV], decays [BL]."""
    offs_l = start + tl.arange(0, BL)
    mask_l = offs_l < n
    keys = tl.load(keys_base + offs_l[:, None] * K + offs_k[None, :], mask=mask_l[:, None] & mask_k[None, :],
                   other=0.0).to(tl.float32)
    values = tl.load(values_base + offs_l[:, None] * V + offs_v[None, :], mask=mask_l[:, None] & mask_v[None, :],
                     other=0.0)
    decays = tl.load(decay_base + offs_l, mask=mask_l, other=0.0)
    return l2norm_rows(keys, NORM_EPS), values, decays, mask_l
