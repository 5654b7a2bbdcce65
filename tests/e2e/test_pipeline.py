"""The in-process Python API (rtp-llm's shape) against transformers' reference."""

from __future__ import annotations

import pytest

from mmserve.errors import InvalidInputError
from pipeline import ModelFactory, Pipeline
from tests.reference import LlavaReference


@pytest.fixture(scope="module")
def pipeline(tiny_checkpoint):
    model = ModelFactory.from_huggingface(str(tiny_checkpoint))
    pipe = Pipeline(model, model.tokenizer)
    yield pipe
    pipe.stop()


def run(pipeline, prompt, urls, **config):
    responses = list(
        pipeline(prompt, urls=urls, generate_config={"top_k": 1, "max_new_tokens": 20, **config})
    )
    assert responses and all(r.finished == [True] for r in responses[-1:])
    return responses


@pytest.mark.parametrize(
    "names", [["a.png"], ["b.jpg", "c.png"], []], ids=["one-image", "two-images", "no-image"]
)
def test_pipeline_greedy_equals_reference(pipeline, tiny_checkpoint, image_dir, names):
    reference = LlavaReference(tiny_checkpoint)
    prompt = "USER: " + "<image>\n" * len(names) + "What is this? ASSISTANT:"
    responses = run(pipeline, prompt, [str(image_dir / n) for n in names])
    _, ref_new = reference.greedy(prompt, [(image_dir / n).read_bytes() for n in names], 20)
    assert responses[-1].token_ids[0] == ref_new
    assert responses[-1].batch_response[0] == reference.processor.tokenizer.decode(
        ref_new, skip_special_tokens=True
    )
    # Streaming: each response extends the previous one.
    texts = [r.batch_response[0] for r in responses]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:], strict=False))


def test_seed_prompt_form_and_batch(pipeline, image_dir):
    url = f"file://{image_dir / 'a.png'}"
    single = run(pipeline, "Picture 1:<img/>\nWhat is this?", [url])[-1].response
    assert single
    batch = list(
        pipeline(
            ["Picture 1:<img/>\nWhat is this?", "Hello"],
            urls=[[url], []],
            generate_config={"top_k": 1, "max_new_tokens": 20},
        )
    )
    assert batch[-1].finished == [True, True]
    assert batch[-1].batch_response[0] == single


def test_pipeline_errors_are_clear(pipeline, image_dir):
    with pytest.raises(InvalidInputError, match="2 image tags"):
        run(pipeline, "<image><image>", [str(image_dir / "a.png")])
    with pytest.raises(ValueError, match="unknown generate_config keys"):
        pipeline("hi", generate_config={"bogus": 1})


def test_structured_outputs_in_generate_config(pipeline, image_dir):
    import json

    schema = {
        "type": "object",
        "properties": {
            "kind": {"enum": ["photo", "drawing"]},
            "objects": {"type": "integer", "minimum": 0, "maximum": 9},
        },
        "required": ["kind", "objects"],
        "additionalProperties": False,
    }
    prompt = "USER: <image>\nDescribe it as JSON. ASSISTANT:"
    urls = [str(image_dir / "a.png")]
    for seed in (1, 2, 3):
        config = {
            "temperature": 1.0,
            "seed": seed,
            "max_new_tokens": 40,
            "structured_outputs": {"json": schema},
        }
        last = list(pipeline(prompt, urls=urls, generate_config=config))[-1]
        value = json.loads(last.response)
        assert value["kind"] in ("photo", "drawing") and 0 <= value["objects"] <= 9
    choice = {"temperature": 1.0, "seed": 4, "structured_outputs": {"choice": ["cat", "dog"]}}
    assert list(pipeline(prompt, urls=urls, generate_config=choice))[-1].response in ("cat", "dog")
    with pytest.raises(ValueError, match=r"structured_outputs.regex: the regex cannot be used"):
        pipeline("hi", generate_config={"structured_outputs": {"regex": "a(b"}})
    with pytest.raises(ValueError, match="exactly one of"):
        pipeline("hi", generate_config={"structured_outputs": {"regex": "a", "choice": ["b"]}})


def test_num_return_sequences_lists_each_prompts_choices(pipeline, image_dir):
    urls = [str(image_dir / "a.png")]
    prompt = "USER: <image>\nWhat is this? ASSISTANT:"
    config = {"temperature": 1.0, "top_k": 50, "seed": 21, "max_new_tokens": 8}
    last = list(
        pipeline([prompt, "Hello"], urls=[urls, []], generate_config={**config, "num_return_sequences": 3})
    )[-1]
    assert last.finished == [True] * 6 and len(last.batch_response) == 6
    # prompt i's choice j is entry 3 * i + j, and equals a call of its own seeded 21 + j
    for j in range(3):
        alone = list(pipeline(prompt, urls=urls, generate_config={**config, "seed": 21 + j}))[-1]
        assert last.token_ids[j] == alone.token_ids[0]
        hello = list(pipeline("Hello", generate_config={**config, "seed": 21 + j}))[-1]
        assert last.token_ids[3 + j] == hello.token_ids[0]
    assert len({tuple(ids) for ids in last.token_ids[:3]}) > 1  # the choices differ
    for bad in (0, 17, 1.5, True):
        with pytest.raises(ValueError, match="num_return_sequences must be an integer in"):
            pipeline("hi", generate_config={"num_return_sequences": bad})
