"""The bad-input corpus of tests/unit/test_bad_input.py: (id, path, body, status, param) per case, the
body a JSON value (lone surrogates, NaN and Infinity written as json.dumps writes them) or raw bytes."""

from __future__ import annotations

from tests.gateway_app import CHAT, COMPLETIONS, MAX_MODEL_LEN, chat, user

SURROGATE = "\ud800"  # json.dumps writes it as the escape "\ud800"


def completion(**fields) -> dict:
    return {"prompt": "hi", "max_tokens": 5, **fields}


def image(image_url) -> dict:
    return user([{"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": image_url}])


NAN, INF = float("nan"), float("inf")

# (id, path, body, status, param): body is a JSON value (see `send`) or raw bytes
CASES = [
    # ---- body framing -----------------------------------------------------------------------------
    ("invalid-json", CHAT, b'{"messages": [', 400, None),
    ("json-array", CHAT, [], 400, None),
    ("json-string", CHAT, "hi", 400, None),
    ("json-number", COMPLETIONS, 5, 400, None),
    ("empty-body", CHAT, b"", 400, None),
    ("invalid-utf8-bytes", CHAT, b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', 400, None),
    ("huge-integer-literal", CHAT, b'{"max_tokens": ' + b"9" * 5000 + b"}", 400, None),
    ("deeply-nested", CHAT, b'{"stop": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, None),
    # ---- sampling fields: range and type ----------------------------------------------------------
    ("temperature-negative", CHAT, chat(temperature=-1), 400, "temperature"),
    ("temperature-3", CHAT, chat(temperature=3), 400, "temperature"),
    ("temperature-string", CHAT, chat(temperature="0.5"), 400, "temperature"),
    ("temperature-bool", CHAT, chat(temperature=True), 400, "temperature"),
    ("temperature-nan", CHAT, chat(temperature=NAN), 400, "temperature"),
    ("temperature-infinity", CHAT, chat(temperature=INF), 400, "temperature"),
    ("top_p-0", CHAT, chat(top_p=0), 400, "top_p"),
    ("top_p-1.5", CHAT, chat(top_p=1.5), 400, "top_p"),
    ("top_k-minus-2", CHAT, chat(top_k=-2), 400, "top_k"),
    ("top_k-string", CHAT, chat(top_k="5"), 400, "top_k"),
    ("top_k-over-int32", CHAT, chat(top_k=2**31), 400, "top_k"),
    ("max_tokens-0", CHAT, chat(max_tokens=0), 400, "max_tokens"),
    ("max_tokens-negative", CHAT, chat(max_tokens=-1), 400, "max_tokens"),
    ("max_tokens-1.5", CHAT, chat(max_tokens=1.5), 400, "max_tokens"),
    ("max_tokens-string", COMPLETIONS, completion(max_tokens="10"), 400, "max_tokens"),
    ("max_completion_tokens-0", CHAT, chat(max_completion_tokens=0), 400, "max_completion_tokens"),
    ("min_tokens-negative", CHAT, chat(min_tokens=-1), 400, "min_tokens"),
    ("min_tokens-string", CHAT, chat(min_tokens="1"), 400, "min_tokens"),
    ("seed-2**64", CHAT, chat(seed=2**64), 400, "seed"),
    ("seed-below-int64", CHAT, chat(seed=-(2**63) - 1), 400, "seed"),
    ("stop-17-strings", CHAT, chat(stop=[str(i) for i in range(17)]), 400, "stop"),
    ("stop-non-string", CHAT, chat(stop=[1]), 400, "stop[0]"),
    ("stop-number", CHAT, chat(stop=5), 400, "stop"),
    ("stream-yes", CHAT, chat(stream="yes"), 400, "stream"),
    ("stream-1", CHAT, chat(stream=1), 400, "stream"),
    (
        "stream_options-include_usage-string",
        CHAT,
        chat(stream_options={"include_usage": "yes"}),
        400,
        "stream_options.include_usage",
    ),
    ("n-0", CHAT, chat(n=0), 400, "n"),
    ("n-17", CHAT, chat(n=17), 400, "n"),
    ("n-1.0", CHAT, chat(n=1.0), 400, "n"),
    ("n-string-completions", COMPLETIONS, completion(n="2"), 400, "n"),
    ("logprobs-string", CHAT, chat(logprobs="true"), 400, "logprobs"),
    ("top_logprobs-without-logprobs", CHAT, chat(top_logprobs=2), 400, "top_logprobs"),
    ("top_logprobs-21", CHAT, chat(logprobs=True, top_logprobs=21), 400, "top_logprobs"),
    ("completion-logprobs-21", COMPLETIONS, completion(logprobs=21), 400, "logprobs"),
    ("completion-logprobs-bool", COMPLETIONS, completion(logprobs=True), 400, "logprobs"),
    ("presence_penalty-2.5", CHAT, chat(presence_penalty=2.5), 400, "presence_penalty"),
    ("frequency_penalty-minus-3", CHAT, chat(frequency_penalty=-3), 400, "frequency_penalty"),
    ("repetition_penalty-0", CHAT, chat(repetition_penalty=0), 400, "repetition_penalty"),
    ("repetition_penalty-negative", CHAT, chat(repetition_penalty=-1), 400, "repetition_penalty"),
    ("repetition_penalty-infinity", CHAT, chat(repetition_penalty=INF), 400, "repetition_penalty"),
    ("repetition_penalty-nan", CHAT, chat(repetition_penalty=NAN), 400, "repetition_penalty"),
    ("min_p-2", CHAT, chat(min_p=2), 400, "min_p"),
    ("ignore_eos-string", CHAT, chat(ignore_eos="false"), 400, "ignore_eos"),
    ("return_token_ids-1", COMPLETIONS, completion(return_token_ids=1), 400, "return_token_ids"),
    (
        "mm_processor_kwargs-0-pixels",
        CHAT,
        chat(mm_processor_kwargs={"min_pixels": 0}),
        400,
        "mm_processor_kwargs.min_pixels",
    ),
    (
        "mm_processor_kwargs-unknown-key",
        CHAT,
        chat(mm_processor_kwargs={"foo": 1}),
        400,
        "mm_processor_kwargs.foo",
    ),
    (
        "chat_template_kwargs-reserved",
        CHAT,
        chat(chat_template_kwargs={"messages": []}),
        400,
        "chat_template_kwargs",
    ),
    ("model-number", CHAT, chat(model=5), 400, "model"),
    # ---- messages ---------------------------------------------------------------------------------
    ("messages-missing", CHAT, {"max_tokens": 5}, 400, "messages"),
    ("messages-empty", CHAT, {"messages": []}, 400, "messages"),
    ("messages-string", CHAT, {"messages": "hi"}, 400, "messages"),
    ("message-not-object", CHAT, {"messages": ["hi"]}, 400, "messages[0]"),
    ("role-missing", CHAT, {"messages": [{"content": "hi"}]}, 400, "messages[0].role"),
    ("role-unknown", CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    ("content-number", CHAT, user(5), 400, "messages[0].content"),
    ("content-object", CHAT, user({"text": "hi"}), 400, "messages[0].content"),
    ("part-without-type", CHAT, user([{"text": "hi"}]), 400, "messages[0].content[0]"),
    (
        "part-unknown-type",
        CHAT,
        user([{"type": "video_url", "video_url": "x"}]),
        400,
        "messages[0].content[0]",
    ),
    ("text-part-without-text", CHAT, user([{"type": "text"}]), 400, "messages[0].content[0].text"),
    ("text-part-number", CHAT, user([{"type": "text", "text": 5}]), 400, "messages[0].content[0].text"),
    (
        "image-part-without-image_url",
        CHAT,
        user([{"type": "image_url"}]),
        400,
        "messages[0].content[0].image_url",
    ),
    ("image_url-without-url", CHAT, image({}), 400, "messages[0].content[1].image_url.url"),
    ("image_url-number", CHAT, image(5), 400, "messages[0].content[1].image_url"),
    ("image_url-url-number", CHAT, image({"url": 5}), 400, "messages[0].content[1].image_url.url"),
    ("special-token-in-text", CHAT, user("look: <image>"), 400, "messages"),
    ("prompt-missing", COMPLETIONS, {"max_tokens": 5}, 400, "prompt"),
    ("prompt-token-list", COMPLETIONS, completion(prompt=[1, 2, 3]), 400, "prompt"),
    ("urls-not-list", COMPLETIONS, completion(urls="http://x"), 400, "urls"),
    # ---- text encodings: lone surrogates anywhere --------------------------------------------------
    ("surrogate-message", CHAT, user("hi " + SURROGATE), 400, "messages[0].content"),
    (
        "surrogate-text-part",
        CHAT,
        user([{"type": "text", "text": SURROGATE}]),
        400,
        "messages[0].content[0].text",
    ),
    ("surrogate-prompt", COMPLETIONS, completion(prompt="a\udc00b"), 400, "prompt"),
    ("surrogate-model", CHAT, chat(model="m" + SURROGATE), 400, "model"),
    (
        "surrogate-image-url",
        CHAT,
        image({"url": "http://example.com/" + SURROGATE}),
        400,
        "messages[0].content[1].image_url.url",
    ),
    (
        "surrogate-image-url-string",
        CHAT,
        image("data:image/png;base64," + SURROGATE),
        400,
        "messages[0].content[1].image_url",
    ),
    ("surrogate-urls", COMPLETIONS, completion(prompt="<image>", urls=[SURROGATE]), 400, "urls[0]"),
    ("surrogate-stop", CHAT, chat(stop=SURROGATE), 400, "stop"),
    ("surrogate-stop-list", CHAT, chat(stop=["ok", SURROGATE]), 400, "stop[1]"),
    (
        "surrogate-template-kwargs",
        CHAT,
        chat(chat_template_kwargs={"x": [SURROGATE]}),
        400,
        "chat_template_kwargs",
    ),
    ("surrogate-key-echoed", CHAT, chat(mm_processor_kwargs={SURROGATE: 1}), 400, "mm_processor_kwargs"),
    (
        "utf8-encoded-surrogate-bytes",
        CHAT,
        b'{"messages": [{"role": "user", "content": "\xed\xa0\x80"}]}',
        400,
        "messages[0].content",
    ),
    # ---- context length ---------------------------------------------------------------------------
    ("max_tokens-over-context", CHAT, chat(max_tokens=MAX_MODEL_LEN + 1), 400, "max_tokens"),
    (
        "max_completion_tokens-over-context",
        CHAT,
        chat(max_completion_tokens=10**20),
        400,
        "max_completion_tokens",
    ),
    ("prompt-over-context", COMPLETIONS, completion(prompt="hello " * MAX_MODEL_LEN), 400, "prompt"),
    ("messages-over-context", CHAT, user("hello " * MAX_MODEL_LEN), 400, "messages"),
    # ---- model and routes -------------------------------------------------------------------------
    ("unknown-model", CHAT, chat(model="gpt-4"), 404, "model"),
    ("unknown-route", "/v1/nope", chat(), 404, None),
]
