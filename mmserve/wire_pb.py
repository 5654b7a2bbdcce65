"""The only protobuf conversions of the domain types in mmserve.wire, used at the gRPC edge (the
services' servicers, the gateway's gRPC clients)."""

from __future__ import annotations

from dataclasses import asdict

import torch

from mmserve.errors import InvalidInputError
from mmserve.proto import llm_pb2, vision_pb2
from mmserve.sampling import SamplingChoices, SamplingParams, StructuredOutput, sampling_params
from mmserve.tensor_codec import tensor_from_pb, tensor_to_pb
from mmserve.wire import (
    FinishReason,
    GenerateOutput,
    GenerateRequest,
    ImageFeatures,
    ImageInput,
    ImageSpan,
    LLMInfo,
    PixelLimits,
    TokenLogprobs,
    Usage,
)

# ---- vision ------------------------------------------------------------------------------------


def image_input_to_pb(image: ImageInput) -> vision_pb2.ImageInput:
    return vision_pb2.ImageInput(data=image.data, content_hash=image.content_hash)


def image_input_from_pb(message: vision_pb2.ImageInput) -> ImageInput:
    return ImageInput(data=message.data, content_hash=message.content_hash)


def embed_request_to_pb(
    images: list[ImageInput], request_id: str, pixels: PixelLimits | None = None
) -> vision_pb2.EmbedRequest:
    message = vision_pb2.EmbedRequest(request_id=request_id, images=[image_input_to_pb(i) for i in images])
    if pixels is not None and pixels.min_pixels is not None:
        message.min_pixels = pixels.min_pixels
    if pixels is not None and pixels.max_pixels is not None:
        message.max_pixels = pixels.max_pixels
    return message


def pixel_limits_from_pb(message: vision_pb2.EmbedRequest) -> PixelLimits:
    return PixelLimits(
        min_pixels=message.min_pixels if message.HasField("min_pixels") else None,
        max_pixels=message.max_pixels if message.HasField("max_pixels") else None,
    )


def image_features_to_pb(features: ImageFeatures) -> vision_pb2.ImageEmbedding:
    return vision_pb2.ImageEmbedding(
        embedding=tensor_to_pb(features.embedding),
        content_hash=features.content_hash,
        grid_thw=list(features.grid_thw),
    )


def image_features_from_pb(message: vision_pb2.ImageEmbedding) -> ImageFeatures:
    return ImageFeatures(
        embedding=tensor_from_pb(message.embedding),
        content_hash=message.content_hash,
        grid_thw=tuple(message.grid_thw),
    )


# ---- llm ---------------------------------------------------------------------------------------

_FINISH_TO_PB = {
    None: llm_pb2.FINISH_REASON_UNSPECIFIED,
    FinishReason.STOP: llm_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: llm_pb2.FINISH_REASON_LENGTH,
    FinishReason.ABORT: llm_pb2.FINISH_REASON_ABORT,
}
_FINISH_FROM_PB = {value: key for key, value in _FINISH_TO_PB.items()}


def sampling_to_pb(params: SamplingParams) -> llm_pb2.SamplingParams:
    # The message's fields are SamplingParams' own, by name (the constructor rejects any other);
    # an unset optional (seed, logprobs) stays unset.
    fields = {
        k: v for k, v in asdict(params).items() if v is not None and k not in ("structured", "logit_bias")
    }
    message = llm_pb2.SamplingParams(**fields, logit_bias=dict(params.logit_bias))
    if params.structured is not None:
        setattr(message.structured, params.structured.kind, params.structured.spec)
    return message


def sampling_from_pb(message: llm_pb2.SamplingParams) -> SamplingParams:
    """The gRPC entry point's settings, through the same builder as REST and the Python API. proto3
    cannot tell an unset float from 0: a top_p or repetition_penalty of 0 (meaningless) means unset."""
    choices = SamplingChoices(
        temperature=message.temperature,
        top_p=message.top_p or None,
        top_k=message.top_k,
        max_new_tokens=message.max_new_tokens,
        min_new_tokens=message.min_new_tokens,
        ignore_eos=message.ignore_eos,
        stop_token_ids=tuple(message.stop_token_ids),
        seed=message.seed if message.HasField("seed") else None,
        repetition_penalty=message.repetition_penalty or None,
        min_p=message.min_p,
        presence_penalty=message.presence_penalty,
        frequency_penalty=message.frequency_penalty,
        logprobs=message.logprobs if message.HasField("logprobs") else None,
        structured=_structured_from_pb(message),
        logit_bias=tuple(message.logit_bias.items()),
    )
    return sampling_params(choices)


def _structured_from_pb(message: llm_pb2.SamplingParams) -> StructuredOutput | None:
    if not message.HasField("structured"):
        return None
    kind = message.structured.WhichOneof("kind")
    if kind is None:  # an empty StructuredOutput message: no constraint named
        raise InvalidInputError("sampling.structured: set one of json_schema, regex or grammar")
    return StructuredOutput(kind, getattr(message.structured, kind))


def generate_request_to_pb(request: GenerateRequest) -> llm_pb2.GenerateRequest:
    return llm_pb2.GenerateRequest(
        request_id=request.request_id,
        token_ids=request.token_ids,
        images=[
            llm_pb2.ImageSpan(
                offset=span.offset,
                length=span.length,
                embedding=tensor_to_pb(span.embedding),
                content_hash=span.content_hash,
                grid_thw=list(span.grid_thw),
            )
            for span in request.images
        ],
        sampling=sampling_to_pb(request.sampling),
    )


def _span_embedding_from_pb(index: int, message: llm_pb2.ImageSpan) -> torch.Tensor:
    try:
        return tensor_from_pb(message.embedding)
    except InvalidInputError as exc:  # name the span: the codec does not know where its tensor sits
        raise InvalidInputError(f"image span {index}: embedding: {exc}") from None


def generate_request_from_pb(message: llm_pb2.GenerateRequest) -> GenerateRequest:
    """The request as sent; the LLM engine range-checks every field of it at admission. Note that
    `content_hash` is carried through for logs and callers only: the engine keys its prefix cache by
    a digest of the embedding bytes received, never by this caller-supplied hash."""
    return GenerateRequest(
        request_id=message.request_id,
        token_ids=list(message.token_ids),
        images=[
            ImageSpan(
                offset=span.offset,
                length=span.length,
                embedding=_span_embedding_from_pb(i, span),
                content_hash=span.content_hash,
                grid_thw=tuple(span.grid_thw),
            )
            for i, span in enumerate(message.images)
        ],
        sampling=sampling_from_pb(message.sampling),
    )


def generate_output_to_pb(output: GenerateOutput) -> llm_pb2.GenerateResponse:
    message = llm_pb2.GenerateResponse(
        token_ids=output.token_ids,
        finish_reason=_FINISH_TO_PB[output.finish_reason],
        logprobs=[
            llm_pb2.TokenLogprobs(
                logprob=lp.logprob,
                top_token_ids=[t for t, _ in lp.top],
                top_logprobs=[v for _, v in lp.top],
            )
            for lp in output.logprobs or []
        ],
    )
    if output.usage is not None:
        message.usage.CopyFrom(llm_pb2.Usage(**asdict(output.usage)))  # Usage's fields, by name
    return message


def generate_output_from_pb(message: llm_pb2.GenerateResponse) -> GenerateOutput:
    usage = None
    if message.HasField("usage"):
        usage = Usage(
            prompt_tokens=message.usage.prompt_tokens,
            completion_tokens=message.usage.completion_tokens,
            cached_tokens=message.usage.cached_tokens,
        )
    logprobs = [
        TokenLogprobs(lp.logprob, list(zip(lp.top_token_ids, lp.top_logprobs, strict=True)))
        for lp in message.logprobs
    ]
    return GenerateOutput(
        token_ids=list(message.token_ids),
        finish_reason=_FINISH_FROM_PB[message.finish_reason],
        usage=usage,
        logprobs=logprobs or None,
    )


def llm_info_from_pb(message: llm_pb2.LLMModelInfo) -> LLMInfo:
    return LLMInfo(
        family=message.family,
        max_model_len=message.max_model_len,
        image_token_id=message.image_token_id,
        hidden_size=message.hidden_size,
        eos_token_ids=tuple(message.eos_token_ids),
        dtype=message.dtype,
    )


def llm_info_to_pb(info: LLMInfo) -> llm_pb2.LLMModelInfo:
    return llm_pb2.LLMModelInfo(**asdict(info))  # the message's fields are LLMInfo's own, by name
