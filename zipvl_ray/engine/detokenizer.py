"""Output text of sequences: incremental while they run, ``tokenizer.decode`` exactly when they finish.

Re-decoding a sequence's whole output after every token costs ``O(n)`` per token (62-78 us at 256
tokens on the built-in tokenizers, against about 2 us for one incremental step), so a decode step over
many long outputs spends milliseconds in detokenization alone. Where the tokenizer is a plain
``tokenizers.Tokenizer`` behind transformers' ``TokenizersBackend`` (every fast tokenizer whose class
keeps transformers' ``decode`` and ``_decode``, with no clean-up of tokenization spaces), a running
sequence's text grows through ``tokenizers.decoders.DecodeStream``, which holds back a partial UTF-8
character until it completes. Any other tokenizer re-decodes the output with ``decode`` as before.

A finished sequence's text is always ``decode(output_token_ids, skip_special_tokens=True)``, cut before
the first stop string, exactly as if it had been decoded once at the end.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from zipvl_ray.engine.sequence import Sequence

logger = logging.getLogger(__name__)


def fast_decode(tokenizer):
    """``tokenizer.decode`` for a flat list of ints, without its per-element argument conversion.

    transformers' ``decode`` converts its argument element by element (``to_py_obj``), then calls
    ``_decode``; for a list of ints that conversion changes nothing and cost more than the decoding at a
    large decode batch. ``_decode`` is called directly only when the class keeps transformers' own
    ``decode`` (so ``decode`` is exactly that conversion plus ``_decode``) and implements ``_decode``;
    any other tokenizer's ``decode`` is used as it is.
    """
    if _keeps_stock_decode(tokenizer):
        return tokenizer._decode
    return tokenizer.decode


def _keeps_stock_decode(tokenizer) -> bool:
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    cls = type(tokenizer)
    return (
        isinstance(tokenizer, PreTrainedTokenizerBase)
        and "decode" not in vars(tokenizer)  # not replaced on the instance either
        and "_decode" not in vars(tokenizer)
        and cls.decode is PreTrainedTokenizerBase.decode
        and cls._decode is not PreTrainedTokenizerBase._decode
    )


def stream_backend(tokenizer) -> Any | None:
    """The ``tokenizers.Tokenizer`` whose incremental decoding gives ``tokenizer.decode``'s text, or None.

    That is the case when ``decode`` is transformers' own down to ``TokenizersBackend._decode``, which
    returns the backend's ``decode`` unchanged unless ``clean_up_tokenization_spaces`` is set.
    """
    try:
        from tokenizers import Tokenizer
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:  # pragma: no cover - both ship with transformers 5
        return None
    if not (isinstance(tokenizer, TokenizersBackend) and _keeps_stock_decode(tokenizer)):
        return None
    if type(tokenizer)._decode is not TokenizersBackend._decode or tokenizer.clean_up_tokenization_spaces:
        return None
    backend = getattr(tokenizer, "_tokenizer", None)
    return backend if isinstance(backend, Tokenizer) else None


def first_stop(text: str, stops: list[str]) -> int:
    """Index of the first occurrence of any of ``stops`` in ``text``, or -1."""
    return min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)


def partial_stop_length(text: str, stops: list[str]) -> int:
    """Length of the longest ending of ``text`` that begins one of ``stops`` (without being all of it).

    A streamed delta must not show it yet: if the next tokens complete the stop string, the text is cut
    before it (as vLLM and OpenAI do).
    """
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:k]):
                longest = k
                break
    return longest


class Detokenizer:
    """Keeps ``Sequence.text`` up to date with its output tokens.

    Parameters
    ----------
    tokenizer : transformers tokenizer
        Incremental when :func:`stream_backend` finds a backend, whole-output ``decode`` otherwise.
    incremental : bool
        False forces whole-output decoding (the reference the tests compare with).
    """

    def __init__(self, tokenizer, *, incremental: bool = True):
        self.decode = fast_decode(tokenizer)
        self.backend = stream_backend(tokenizer) if incremental else None

    @property
    def incremental(self) -> bool:
        return self.backend is not None

    def text(self, seq: Sequence) -> str:
        """``seq.text`` after its latest token: the streamed text while it runs, the exact one once finished.

        The streamed text never shows a partial UTF-8 character. A finished sequence is decoded whole
        once, and a stop string that ended it is looked for again in that text.
        """
        n = len(seq.output_token_ids)
        finished = seq.is_finished
        if seq.text_tokens == n and (seq.text_exact or not finished):
            return seq.text
        text = None
        if self.backend is not None and not finished and seq.text_stream is not False:
            text, exact = self._stream(seq), False
        if text is None:
            text, exact = self.decode(seq.output_token_ids, skip_special_tokens=True), True
            if finished and seq.sampling.stop:
                cut = first_stop(text, seq.sampling.stop)
                if cut >= 0 and (seq.text_limit is None or cut < seq.text_limit):
                    seq.text_limit = cut
        seq.text = text if seq.text_limit is None else text[: seq.text_limit]
        seq.text_tokens, seq.text_exact = n, exact
        return seq.text

    def _stream(self, seq: Sequence) -> str | None:
        """The streamed text after feeding the new tokens; None (and whole decoding from now on) when the
        stream gives up: tokenizers raises when its decoder rewrote text it already returned, which byte
        fallback does to a run of byte tokens that turns out to hold an invalid byte."""
        if seq.text_stream is None:
            if any("\ufffd" in stop for stop in seq.sampling.stop):
                # The whole decode shows an incomplete character as U+FFFD, the stream never does: such a
                # stop string would match at other tokens (or never), so this request decodes whole.
                seq.text_stream = False
                return None
            from tokenizers.decoders import DecodeStream

            seq.text_stream = DecodeStream(skip_special_tokens=True)
            seq.text_tokens, seq.streamed_text = 0, ""
        try:
            for token in seq.output_token_ids[seq.text_tokens :]:
                chunk = seq.text_stream.step(self.backend, token)
                if chunk:
                    seq.streamed_text += chunk
        except Exception as exc:  # tokenizers raises on a prefix its decoder rewrote
            logger.debug(
                "request %s: text decoded whole from now on (%s: %s)", seq.request_id, type(exc).__name__, exc
            )
            seq.text_stream = False
            return None
        return seq.streamed_text
