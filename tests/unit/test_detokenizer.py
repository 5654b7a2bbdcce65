import random

import pytest

from gateway.detokenizer import IncrementalDetokenizer, StopStrings
from mmserve.demo import build_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def stream(tokenizer, ids, chunk=1):
    detok = IncrementalDetokenizer(tokenizer)
    deltas = [detok.push(ids[i : i + chunk]) for i in range(0, len(ids), chunk)]
    deltas.append(detok.finish())
    return deltas


def test_multibyte_characters_are_never_split(tokenizer):
    text = "你好世界 😀 🐱 naïve café 图片里有一只猫"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    # Byte-level BPE splits some of these characters over several tokens; the test needs that case.
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)
    deltas = stream(tokenizer, ids)
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)


@pytest.mark.parametrize("seed", range(20))
def test_concatenated_deltas_equal_full_decode_for_any_ids(tokenizer, seed):
    rng = random.Random(seed)
    ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 60))]
    deltas = stream(tokenizer, ids, chunk=rng.choice([1, 1, 2, 3]))
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True)


def test_stop_strings_across_chunks():
    stops = StopStrings(["STOP", "\n\n"])
    out = stops.feed("hello ST") + stops.feed("O") + stops.feed("P and more")
    assert out == "hello " and stops.stopped
    assert stops.feed("ignored") == "" and stops.flush() == ""


def test_stop_strings_release_held_text_at_the_end():
    stops = StopStrings(["STOP"])
    out = stops.feed("abc ST")
    assert out == "abc"  # "ST" might begin a stop string
    assert out + stops.flush() == "abc ST" and not stops.stopped
    assert StopStrings([]).feed("x") == "x"
