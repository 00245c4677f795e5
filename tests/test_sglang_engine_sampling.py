"""Engine sglang's sampling mapping against SGLang 0.5.17's real sampling code on the CPU (installed with --no-deps;
skipped with the reason where it is not importable): what the adapter sends must be taken by SGLang's
SamplingParams (its normalize and verify, as its TokenizerManager runs them) and by SamplingBatchInfo (as its
scheduler batches requests), and mean there what the request meant."""

from __future__ import annotations

import random
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from kvbuffer.service.engine.api import SamplingParams
from kvbuffer.service.sglang.engine import sglang_sampling
from sglang_cpu import require_sglang, server_args
from sglang_standin import make_tokenizer

require_sglang()


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return make_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@dataclass
class ScheduledBatch:
    """The ScheduleBatch fields SamplingBatchInfo reads (a stand-in: SGLang's needs a running scheduler)."""

    device: str
    reqs: list[Any]


def random_params(rng: random.Random, vocab: int) -> SamplingParams:
    """A request the service's checks accept (service/engine/validation.py), limits included."""
    ignore_eos = rng.random() < 0.3
    return SamplingParams(max_new_tokens=rng.randrange(1, 200), temperature=rng.choice([0.0, rng.uniform(0, 3)]),
                          top_p=rng.choice([1.0, rng.uniform(1e-3, 1)]), top_k=rng.choice([0, 1, rng.randrange(vocab)]),
                          seed=rng.choice([None, 0, 2**63 - 1, 2**63, 2**64 - 1, rng.randrange(2**64)]),
                          stop_token_ids=() if ignore_eos else tuple(rng.sample(range(vocab), rng.randrange(3))),
                          stop_strings=tuple(rng.sample(["end", "\n\n", "ü", "Decode"], rng.randrange(3))),
                          ignore_eos=ignore_eos)


def test_sglang_takes_every_request_we_accept_and_samples_it_as_asked(tokenizer: Any) -> None:
    """Random requests with deterministic inference on: SGLang's SamplingParams verify them and its batch holds
    each seed as the same 64 bits it hashes (a seed of 2**63 or more must not overflow its int64 tensor, which
    would fail the scheduler process); greedy, top-k off and the stops mean what they meant to us."""
    from sglang.srt.sampling.sampling_batch_info import SamplingBatchInfo
    from sglang.srt.sampling.sampling_params import TOP_K_ALL
    from sglang.srt.sampling.sampling_params import SamplingParams as SGLangSamplingParams

    rng = random.Random()
    vocab = len(tokenizer)
    server_args(enable_deterministic_inference=True)
    ours = [random_params(rng, vocab) for _ in range(64)]
    rooms = [rng.randrange(1, 300) for _ in ours]
    theirs = []
    for params, room in zip(ours, rooms, strict=True):
        sglang = SGLangSamplingParams(**sglang_sampling(params, room, deterministic=True))
        sglang.normalize(tokenizer)
        sglang.verify(vocab)
        theirs.append(sglang)
        assert sglang.max_new_tokens == min(params.max_new_tokens, room)
        assert sglang.top_k == (1 if params.temperature == 0 else params.top_k or TOP_K_ALL)
        assert sglang.top_p == params.top_p and sglang.ignore_eos == params.ignore_eos
        assert (sglang.stop_token_ids or set()) == set(params.stop_token_ids)
        assert sglang.stop_strs == list(params.stop_strings)
    reqs = [SimpleNamespace(sampling_params=p, custom_logit_processor=None, return_sampling_mask=False) for p in theirs]
    info = SamplingBatchInfo.from_schedule_batch(ScheduledBatch("cpu", reqs), vocab)
    assert info.sampling_seed.to(torch.uint64).tolist() == [42 if p.seed is None else p.seed for p in ours]
