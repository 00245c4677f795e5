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
def fold_into(states, read, write, decay, keys_base, values_base, weights_base, n, d_new, k_new, k_new_scale,
              i_h, offs_v, mask_v, rows_held,
              HV: tl.constexpr, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr, KC: tl.constexpr,
              BL: tl.constexpr):
    """states[write] = decay * states[read] + sum_{j<n} weights[j] d_j k_j^T + d_new (k_new_scale k_new)^T,
    for one [BV, K] tile.

    Keys are raw keys (the weights and k_new_scale carry 1/|k|); read < 0 folds into zeros. Works a K-chunk
    at a time, so the folded tile never occupies many registers, and BL entries per matrix product, so a
    flush waits on K/KC * n/BL rounds of loads rather than one per entry and chunk (fp32 products: the fold
    writes the state, which must keep fp32 accuracy).
    """
    tl.static_assert(BL >= 16, "tl.dot contracts over at least 16 entries (Triton 3.6 refuses fewer on a GPU)")
    for kc in range(0, BK, KC):
        offs_c = kc + tl.arange(0, KC)
        mask_c = offs_c < K
        chunk = i_h * V * K + offs_v[:, None] * K + offs_c[None, :]
        S = decay * tl.load(states + tl.maximum(read, 0) * HV * V * K + chunk,
                            mask=(offs_v < rows_held)[:, None] & mask_c[None, :], other=0.0)
        S += d_new[:, None] * (tl.load(k_new + offs_c, mask=mask_c, other=0.0).to(tl.float32) * k_new_scale)[None, :]
        for start in range(0, n, BL):
            offs_l = start + tl.arange(0, BL)
            mask_l = offs_l < n
            Dt = tl.load(values_base + offs_l[None, :] * V + offs_v[:, None], mask=mask_l[None, :] & mask_v[:, None],
                         other=0.0)  # [BV, BL]
            Kw = tl.load(keys_base + offs_l[:, None] * K + offs_c[None, :], mask=mask_l[:, None] & mask_c[None, :],
                         other=0.0).to(tl.float32) * tl.load(weights_base + offs_l, mask=mask_l, other=0.0)[:, None]
            S += tl.dot(Dt, Kw, input_precision="ieee")
        tl.store(states + write * HV * V * K + chunk, S, mask=mask_v[:, None] & mask_c[None, :])
