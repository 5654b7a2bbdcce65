"""POST /v1/chat/completions: OpenAI chat messages through the checkpoint's chat template."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import Response

from gateway.http.context import served
from gateway.http.generation import Completion, check_model, check_structured, respond
from gateway.http.render import ChatRender
from gateway.protocol import ChatCompletionRequest, ChatMessage
from gateway.serving import new_request_id
from mmserve.errors import InvalidInputError

ROUTE = "/v1/chat/completions"
router = APIRouter()


def typed_parts(message: ChatMessage) -> dict:
    """A message with its content as typed parts: text, or an image by url. The prompt adapter turns
    them into a string for a chat template that reads string content (gateway/chat_template.py)."""
    if not isinstance(message.content, list):
        return {"role": message.role, "content": [{"type": "text", "text": message.content or ""}]}
    parts = [
        {"type": "text", "text": p.text} if p.type == "text" else {"type": "image", "url": p.url}
        for p in message.content
    ]
    return {"role": message.role, "content": parts}


@router.post(ROUTE)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    context = served(request)
    check_model(body, context.model_name)
    await check_structured(body)
    messages = [typed_parts(m) for m in body.messages]
    try:
        text, urls = await asyncio.to_thread(context.core.chat_prompt, messages, body.chat_template_kwargs)
    except InvalidInputError as exc:  # the messages' text or the template refused them
        if exc.param is not None:
            raise
        raise InvalidInputError(f"messages: {exc}", param="messages", code=exc.code) from None
    request_id = new_request_id("chatcmpl")
    render = ChatRender(request_id, context.model_name)
    job = Completion(ROUTE, body, text, urls, request_id, render, prompt_param="messages")
    return await respond(request, context, job)
