import random

import pytest

from gateway.detokenizer import HeldTokens, IncrementalDetokenizer, StopStrings
from tools.checkpoints import build_tokenizer


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


def test_stop_strings_count_released_characters():
    stops = StopStrings(["STOP"])
    assert stops.feed("abc ST") == "abc" and stops.released == 3
    assert stops.feed("OP tail") == " " and stops.stopped and stops.released == 4  # the cut
    unstopped = StopStrings(["STOP"])
    unstopped.feed("abc ST")
    unstopped.flush()
    assert unstopped.released == 6


def test_held_tokens_go_out_with_their_text():
    held: HeldTokens[str] = HeldTokens()
    held.add(0, 3, "abc")
    held.add(3, 3, "partial")  # ends mid-character: no text of its own yet
    held.add(3, 5, "de")
    assert held.release(2) == []
    assert held.release(3) == ["abc", "partial"]
    assert held.release(5) == ["de"]
    held.add(5, 9, "fghi")
    assert held.release(6, final=True) == ["fghi"]


def test_held_tokens_after_a_stop_cut_are_dropped():
    held: HeldTokens[str] = HeldTokens()
    for start, end, token in [(0, 5, "Hello"), (5, 7, " S"), (7, 9, "TO"), (9, 10, "P")]:
        held.add(start, end, token)
    # "STOP" starts at 6: " S" straddles the cut and stays, the rest goes
    assert held.release(6, stopped=True) == ["Hello", " S"]
    assert held.release(10, final=True) == []


def test_a_fast_tokenizer_is_decoded_through_its_backend_with_the_same_text(tokenizer):
    detok = IncrementalDetokenizer(tokenizer)
    assert detok._backend is tokenizer.backend_tokenizer
    ids = tokenizer("naïve café 图片 <image> ok", add_special_tokens=True)["input_ids"]
    for end in range(1, len(ids) + 1):
        window = ids[:end]
        assert detok._decode(window) == tokenizer.decode(
            window, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )


def test_a_tokenizer_that_changes_decoding_is_decoded_by_its_own_decode(tokenizer):
    class Shouting(type(tokenizer)):  # type: ignore[misc]
        def decode(self, token_ids, **kwargs):
            return super().decode(token_ids, **kwargs).upper()

    shouting = Shouting.__new__(Shouting)
    shouting.__dict__.update(tokenizer.__dict__)
    ids = tokenizer("hello world", add_special_tokens=False)["input_ids"]
    assert "".join(stream(shouting, ids)) == "HELLO WORLD"
