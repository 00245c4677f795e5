"""Output processing: stop conditions on new tokens, and the text delta to stream (cut before a stop string)."""

from __future__ import annotations

from ..model import Tokenizer
from .api import FinishReason
from .sequence import Sequence


def append_tokens(seq: Sequence, tokens: list[int], eos_ids: tuple[int, ...], max_context_length: int
                  ) -> tuple[list[int], FinishReason | None]:
    """Appends emitted tokens up to the first stop; returns those appended and the finish reason, if any."""
    p = seq.sampling
    stops = set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos_ids))
    for i, t in enumerate(tokens):
        seq.token_ids.append(t)
        if t in stops:
            return tokens[:i + 1], "stop"
        if seq.num_output_tokens >= p.max_new_tokens or len(seq.token_ids) >= max_context_length:
            return tokens[:i + 1], "length"
    return tokens, None


def text_delta(seq: Sequence, tokenizer: Tokenizer, finished: bool) -> tuple[str, bool]:
    """New text since the last call, and whether a stop string ended it (text is cut before the stop string).

    Until the request finishes, text that may still change is held back: an incomplete UTF-8 sequence (U+FFFD
    at the end) and a tail that could be the start of a stop string. Incremental: only the tokens since the
    last point where the text was settled (whole characters) are decoded, with the span before them as
    context, so a step costs the new tokens, not the whole output.
    """
    ids, base = seq.token_ids, seq.prompt_len
    prefix = tokenizer.decode(ids[base + seq.prefix_offset:base + seq.read_offset])
    unsettled = tokenizer.decode(ids[base + seq.prefix_offset:])[len(prefix):]
    text = seq.held_text + unsettled[seq.sent_ahead:]  # everything not streamed yet
    stops = seq.sampling.stop_strings
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]  # a stop string never starts in streamed text
    if hits:
        end, stopped = min(hits), True
    elif finished:
        end, stopped = len(text), False
    else:
        end, stopped = len(text.rstrip("\ufffd")), False
        for s in stops:
            end = min(end, next((end - k for k in range(min(len(s) - 1, end), 0, -1)
                                 if text.endswith(s[:k], 0, end)), end))
    if not unsettled.endswith("\ufffd"):  # the output so far decodes to whole characters: settle it
        seq.prefix_offset, seq.read_offset = seq.read_offset, len(ids) - base
        seq.held_text, seq.sent_ahead = text[end:], 0
    elif end <= len(seq.held_text):
        seq.held_text = seq.held_text[end:]
    else:
        seq.sent_ahead += end - len(seq.held_text)
        seq.held_text = ""
    return text[:end], stopped


def append_output(seq: Sequence, tokens: list[int], tokenizer: Tokenizer, max_context_length: int
                  ) -> tuple[list[int], str, FinishReason | None]:
    """Appends a step's tokens up to the first stop (token, length or stop string); returns the tokens kept, their
    text delta and the finish reason, if any. With stop strings and several tokens (accepted drafts) they are
    appended one by one, so that none is kept after the token that completes a stop string."""
    pieces = [[t] for t in tokens] if seq.sampling.stop_strings and len(tokens) > 1 else [tokens]
    kept: list[int] = []
    text = ""
    for piece in pieces:
        new, reason = append_tokens(seq, piece, tokenizer.eos_token_ids, max_context_length)
        delta, stopped = text_delta(seq, tokenizer, reason is not None)
        kept += new
        text += delta
        if stopped or reason is not None:
            return kept, text, "stop" if stopped else reason
    return kept, text, None
