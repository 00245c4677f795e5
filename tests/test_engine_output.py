"""Streamed text: deltas decoded incrementally must add up to the decoded output, whatever the token boundaries
(UTF-8 characters split across tokens, invalid bytes, several tokens per step), hold back what may still change,
and stop at the first stop string as soon as it is complete."""

from __future__ import annotations

import random

from kvbuffer.service.engine.api import SamplingParams
from kvbuffer.service.engine.output import text_delta
from kvbuffer.service.engine.sequence import Sequence
from kvbuffer.service.model.tokenizer import ByteTokenizer
from qwen3_next_cases import fresh_seed

STOPS = ("ab", "bé", "aé€")
PIECES = ["a", "b", "c", " ", "é", "€", "😀"]  # 1 to 4 UTF-8 bytes


def random_output(rng: random.Random, n: int) -> list[int]:
    tokens: list[int] = []
    while len(tokens) < n:
        roll = rng.random()
        if roll < 0.05:
            tokens.append(rng.choice([0xFF, 0x80, 0xE2]))  # invalid, stray continuation, truncated lead byte
        elif roll < 0.08:
            tokens.append(256)  # end-of-text: decodes to nothing
        else:
            tokens += rng.choice(PIECES).encode()
    return tokens[:n]


def stream(tokens: list[int], stops: tuple[str, ...], rng: random.Random) -> tuple[str, bool, int]:
    """Feeds tokens in random steps of 1 to 5 the way the engine does; (text streamed, stopped, tokens fed)."""
    tokenizer, prompt = ByteTokenizer(), [65, 66]
    seq = Sequence("r", list(prompt), len(prompt), SamplingParams(stop_strings=stops), None)
    out, fed = "", 0
    while fed < len(tokens):
        step = rng.randint(1, 5)
        seq.token_ids += tokens[fed:fed + step]
        fed = min(fed + step, len(tokens))
        delta, stopped = text_delta(seq, tokenizer, finished=fed == len(tokens))
        out += delta
        so_far = tokenizer.decode(tokens[:fed])
        assert so_far.startswith(out)  # nothing streamed is ever taken back
        assert stopped == any(s in so_far for s in stops)  # a stop is found the step it is complete
        if stopped:
            break
    return out, stopped, fed


def test_deltas_add_up_to_the_decoded_text_cut_at_the_first_stop():
    seed = fresh_seed()
    rng = random.Random(seed)
    tokenizer = ByteTokenizer()
    for _ in range(300):
        tokens = random_output(rng, rng.randint(1, 60))
        stops = tuple(rng.sample(STOPS, rng.randint(0, len(STOPS))))
        out, stopped, fed = stream(tokens, stops, rng)
        text = tokenizer.decode(tokens[:fed])
        if stopped:
            assert out == text[:min(text.find(s) for s in stops if s in text)], f"seed {seed}: {tokens[:fed]}"
        else:
            assert fed == len(tokens) and out == text, f"seed {seed}: {tokens}"


def test_a_character_split_across_tokens_is_streamed_whole():
    tokenizer, seq = ByteTokenizer(), Sequence("r", [], 0, SamplingParams(), None)
    deltas = []
    for byte in "a€".encode():
        seq.token_ids.append(byte)
        deltas.append(text_delta(seq, tokenizer, finished=False)[0])
    assert deltas == ["a", "", "", "€"]


def test_a_possible_stop_string_start_is_held_back_until_it_is_not_one():
    tokenizer, seq = ByteTokenizer(), Sequence("r", [], 0, SamplingParams(stop_strings=("xyz",)), None)
    deltas = []
    for piece in ("ax", "y", "q"):
        seq.token_ids += piece.encode()
        deltas.append(text_delta(seq, tokenizer, finished=False))
    assert deltas == [("a", False), ("", False), ("xyq", False)]
