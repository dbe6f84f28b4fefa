"""A T5 tokenizer built offline: T5's own tokenizer class over a Unigram vocabulary made here from words.

The embedded flow-matching models (``tiny_sd3``) need the tokenizer class their published counterparts ship
(``T5TokenizerFast``, with ``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2 and ``</s>`` appended to every
sequence) without the hub. transformers builds that tokenizer from a list of (piece, log-probability)
pairs, the Unigram model a SentencePiece file holds; the pieces are the tiny models' caption words (with
T5's ``▁`` word-start marker) and single characters, so any caption tokenizes and none is all ``<unk>``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sdcluster.models.tiny import _CORPUS

T5_MAX_LENGTH = 77
"""The tiny T5 tokenizer's ``model_max_length``: the sequence length diffusers' SD3 training examples encode
captions at (their ``--max_sequence_length`` default)."""


def t5_vocab() -> list[tuple[str, float]]:
    """T5's special pieces, then every corpus word and character as a scored Unigram piece: whole words
    score higher than characters, so a known word is one token."""
    words = sorted(set(_CORPUS.split()))
    chars = sorted({c for w in words for c in w} | set("abcdefghijklmnopqrstuvwxyz0123456789"))
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(f"▁{w}", -3.0 - i * 1e-3) for i, w in enumerate(words)]
    pieces += [(c, -8.0 - i * 1e-3) for i, c in enumerate(chars)]
    return pieces


def write_t5_tokenizer(dest: Path) -> Any:
    """Save a ``T5TokenizerFast`` of :func:`t5_vocab` into ``dest`` and return it (vocabulary size:
    ``len(tokenizer)``)."""
    from transformers import T5TokenizerFast

    tokenizer = T5TokenizerFast(vocab=t5_vocab(), extra_ids=0, model_max_length=T5_MAX_LENGTH)
    dest.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(dest)
    return tokenizer
