"""POST /v1/completions: a raw prompt with `<image>` tags and a matching `urls` list (our extension)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from gateway.http.context import served
from gateway.http.generation import Completion, check_model, check_structured, respond
from gateway.http.render import TextRender
from gateway.protocol import CompletionRequest
from gateway.serving import new_request_id

ROUTE = "/v1/completions"
router = APIRouter()


@router.post(ROUTE)
async def completions(body: CompletionRequest, request: Request) -> Response:
    context = served(request)
    check_model(body, context.model_name)
    await check_structured(body)
    request_id = new_request_id("cmpl")
    text = context.core.prompt.normalize_raw(body.prompt)
    render = TextRender(request_id, context.model_name)
    job = Completion(ROUTE, body, text, body.urls, request_id, render, prompt_param="prompt")
    return await respond(request, context, job)
