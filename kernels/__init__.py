"""KVBuffer Gated DeltaNet kernels: decode from a checkpoint plus a buffer of recent tokens.

`ops` holds the public operations (validated, dispatched to Triton on CUDA, to the PyTorch reference
elsewhere); `reference` is the plain-PyTorch oracle; `pools` owns the memory layout.
"""

from .ops import Tuning, buffered_decode, fold, prefill, recurrent_decode, verify
from .pools import BufferPool, new_state_pool
from .validate import check_settings

__all__ = [
    "BufferPool",
    "Tuning",
    "buffered_decode",
    "check_settings",
    "fold",
    "new_state_pool",
    "prefill",
    "recurrent_decode",
    "verify",
]
