"""Incremental detokenization: the text built token by token equals decoding all ids at once."""

from __future__ import annotations

import numpy as np
import pytest

from pagedjax.engine import detokenizer
from pagedjax.engine.detokenizer import IncrementalDetokenizer


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir("llama"))


def _stream(tok, prompt, ids, fast: bool, **kw):
    d = IncrementalDetokenizer(tok, prompt, **kw)
    if not fast:
        d._fast = None  # force transformers' decode wrapper
    stops = [d.add_token(t) for t in ids]
    return d.text, stops


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_incremental_text_equals_full_decode(tokenizer, skip_special_tokens):
    """Random ids (byte-level BPE: many split multi-byte characters) and special tokens mixed in; the
    raw `tokenizers` path and transformers' wrapper give the same text as one full decode."""
    assert detokenizer._raw_tokenizer(tokenizer) is not None, "the test tokenizer is a fast one"
    rng = np.random.default_rng(0)
    text = "héllo wörld — 東京 🙂 naïve café " * 3
    base = tokenizer.encode(text, add_special_tokens=False)
    specials = list(tokenizer.all_special_ids)
    for trial in range(20):
        ids = [int(x) for x in rng.integers(0, len(tokenizer), 40)] if trial % 2 else list(base)
        if specials and trial % 3 == 0:
            ids.insert(len(ids) // 2, specials[0])
        prompt = base[:3]
        want = tokenizer.decode(prompt + ids, skip_special_tokens=skip_special_tokens)
        want = want[len(tokenizer.decode(prompt, skip_special_tokens=skip_special_tokens)) :]
        for fast in (True, False):
            got, _ = _stream(tokenizer, prompt, ids, fast, skip_special_tokens=skip_special_tokens)
            # Text is held back only while it ends in an incomplete character.
            assert want.startswith(got) and (got == want or want.endswith("\ufffd")), (fast, got, want)


def test_stop_strings_same_on_both_paths(tokenizer):
    ids = tokenizer.encode("one two three four five six", add_special_tokens=False)
    for fast in (True, False):
        d = IncrementalDetokenizer(tokenizer, [], stop=["four"])
        if not fast:
            d._fast = None
        hit = None
        for t in ids:  # the engine stops feeding a sequence once a stop string is found
            hit = d.add_token(t)
            if hit:
                break
        assert hit == "four" and d.text == "one two three ", (fast, d.text)


def test_clean_up_tokenizers_keep_the_wrapper(tokenizer):
    class WithCleanUp:
        _tokenizer = tokenizer._tokenizer
        clean_up_tokenization_spaces = True

    assert detokenizer._raw_tokenizer(WithCleanUp()) is None
    assert detokenizer._raw_tokenizer(object()) is None
