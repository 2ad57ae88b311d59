"""An offline byte-level tokenizer for the built-in models.

Hub tokenizers are unreachable in CI, so the built-in models use a BPE tokenizer with the 256 byte
symbols and no merges: every text round-trips up to Unicode NFC normalisation (which the Qwen2
tokenizer class applies, as on the hub: ``"e\u0301"`` comes back as ``"\u00e9"``), and
architecture-specific special tokens are added on top. Real models load their own tokenizer from the hub or a local path.
"""

from __future__ import annotations

from transformers import Qwen2Tokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

#: Special tokens shared by every built-in model, in id order after the 256 bytes.
COMMON_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def byte_tokenizer(extra_special_tokens: list[str], *, eos_token: str = "<|im_end|>") -> Qwen2Tokenizer:
    """A byte-level tokenizer: ids 0-255 are bytes, then ``COMMON_SPECIALS``, then ``extra_special_tokens``.

    Parameters
    ----------
    extra_special_tokens : list[str]
        Architecture tokens such as ``"<image>"`` or ``"<|image_pad|>"``.
    eos_token : str
        End-of-sequence token.
    """
    table = bytes_to_unicode()
    vocab = {table[b]: b for b in range(256)}
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        unk_token=None,
        bos_token=None,
        eos_token=eos_token,
        pad_token="<|endoftext|>",
        padding_side="left",  # passed here, not set after, so that save_pretrained writes it
    )
    specials = [t for t in COMMON_SPECIALS + extra_special_tokens if t not in (eos_token, "<|endoftext|>")]
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    return tokenizer
