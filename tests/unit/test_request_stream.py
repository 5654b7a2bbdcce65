"""The bridge from the engine's worker thread to a caller's event loop (llm_service/engine/stream.py), and
the engine's NaN/Inf check of a step's logits."""

from __future__ import annotations

import asyncio
import threading

import pytest

from llm_service.engine.stream import MAX_MERGED, RequestStream, wake
from mmserve.errors import UnavailableError
from mmserve.wire import FinishReason, GenerateOutput, TokenLogprobs, Usage


def output(token: int, logprob: float | None = None, last: bool = False) -> GenerateOutput:
    logprobs = None if logprob is None else [TokenLogprobs(logprob, [(token, logprob)])]
    if not last:
        return GenerateOutput([token], logprobs=logprobs)
    return GenerateOutput([token], FinishReason.LENGTH, Usage(5, 3, 0), logprobs)


def test_outputs_queued_before_the_caller_asks_come_as_one():
    async def go():
        stream = RequestStream(asyncio.get_running_loop())
        for item in (output(7, -0.1), output(8, -0.2), output(9, -0.3, last=True)):
            stream.push(item)
        wake([stream])
        return await stream.get()

    merged = asyncio.run(go())
    assert merged.token_ids == [7, 8, 9]
    assert [lp.logprob for lp in merged.logprobs or []] == pytest.approx([-0.1, -0.2, -0.3])
    assert merged.finish_reason == FinishReason.LENGTH and merged.usage == Usage(5, 3, 0)


def test_a_caller_that_keeps_up_gets_each_output_as_it_was_queued():
    async def go():
        stream = RequestStream(asyncio.get_running_loop())
        got = []
        for token in range(3):
            asyncio.get_running_loop().call_later(0.01, stream.put, output(token))
            got.append(await stream.get())
        return got

    got = asyncio.run(go())
    assert [out.token_ids for out in got] == [[0], [1], [2]]


def test_an_error_is_raised_once_the_outputs_before_it_were_taken():
    async def go():
        stream = RequestStream(asyncio.get_running_loop())
        stream.push(output(1))
        stream.push(output(2))
        stream.put(UnavailableError("the engine stopped"))
        first = await stream.get()
        with pytest.raises(UnavailableError, match="the engine stopped"):
            await stream.get()
        return first

    assert asyncio.run(go()).token_ids == [1, 2]


def test_one_output_merges_at_most_max_merged():
    async def go():
        stream = RequestStream(asyncio.get_running_loop())
        for token in range(MAX_MERGED + 3):
            stream.push(output(token))
        wake([stream])
        return [(await stream.get()).token_ids for _ in range(2)]

    first, second = asyncio.run(go())
    assert first == list(range(MAX_MERGED)) and second == [MAX_MERGED, MAX_MERGED + 1, MAX_MERGED + 2]


def test_a_stream_whose_event_loop_closed_is_marked_closed():
    loop = asyncio.new_event_loop()
    stream = RequestStream(loop)
    loop.close()
    stream.put(output(1))
    assert stream.closed


def test_every_token_arrives_once_and_in_order_from_a_worker_thread():
    """The worker queues and wakes while the caller takes; wake-ups still pending are not repeated,
    and none is lost (the caller would hang)."""
    count = 5000

    async def go():
        stream = RequestStream(asyncio.get_running_loop())

        def worker():
            for token in range(count):
                stream.push(output(token, last=token == count - 1))
                if token % 3 == 0:
                    wake([stream])
            wake([stream])

        thread = threading.Thread(target=worker)
        thread.start()
        tokens: list[int] = []
        while not tokens or tokens[-1] != count - 1:
            tokens += (await asyncio.wait_for(stream.get(), 10)).token_ids
        thread.join()
        return tokens

    assert asyncio.run(go()) == list(range(count))
