"""The test matrix of real Hub checkpoint shapes: every reference config (tests/checkpoints/hub.py builds
a tiny checkpoint from the real files, only sizes shrunk) is served by the three-process stack and
answers token-identically (greedy, float32) to its reference: transformers' own model where one
exists, the independent reference paths of the other tests for original LLaVA and Qwen-VL-Chat.

Each stack runs with no dtype setting other than float32 (parity) and with the checkpoint's own
generation_config.json, chat template and tokenizer files, as a user's would."""

from __future__ import annotations

import json

import pytest
import torch

from tests.checkpoints.hub import HUB_CONFIGS, build_from_hub
from tests.helpers import greedy_chat, make_image, openai_client, serving

MAX_TOKENS = 12
TEXT = "What is in the image?"


@pytest.fixture(scope="module")
def hub_images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hub-images")
    (folder / "square.png").write_bytes(make_image(96, 96, seed=41))
    (folder / "wide.png").write_bytes(make_image(120, 64, seed=42))
    return folder


@pytest.fixture(scope="module", params=sorted(HUB_CONFIGS))
def hub(request, tmp_path_factory, hub_images):
    name = request.param
    spec = HUB_CONFIGS[name]
    home = tmp_path_factory.mktemp(f"home-{name}")
    with pytest.MonkeyPatch.context() as mp:  # Qwen-VL's converted-tokenizer cache, inherited by the stack
        mp.setenv("MMSERVE_HOME", str(home))
        checkpoint = build_from_hub(name, tmp_path_factory.mktemp("hub") / name)
        with serving(checkpoint, hub_images, tmp_path_factory.mktemp(f"logs-{name}")) as (stack, _):
            yield name, spec, checkpoint, stack


def reference_for(spec, checkpoint):
    """(prompt ids, new ids) of the family's reference for one user turn: images first, then text."""
    if spec.family == "llava":
        from tests.reference import LlavaReference

        return _Templated(LlavaReference(checkpoint))
    if spec.family == "llava_next":
        from tests.e2e.test_llava_next import NextReference

        return _Templated(NextReference(checkpoint))
    if spec.family in ("qwen2_vl", "qwen2_5_vl"):
        from tests.e2e.test_qwen2_vl import QwenReference

        return _Templated(QwenReference(checkpoint, spec.family))
    if spec.family == "qwen_vl":
        return _QwenVLDirect(checkpoint)
    if spec.family == "llava_original":
        return _OriginalAsLlavaHF(checkpoint)
    raise AssertionError(f"no reference for {spec.family}")


class _Templated:
    """A transformers reference whose prompt comes from the checkpoint's own chat template."""

    def __init__(self, reference):
        self.reference = reference

    def greedy(self, text: str, images: list[bytes]) -> tuple[list[int], list[int]]:
        prompt = self.reference.chat_prompt(text, len(images))
        return self.reference.greedy(prompt, images, MAX_TOKENS)


class _QwenVLDirect:
    """Qwen-VL v1: tiktoken ids of the ChatML turn, our vision module checked piece by piece elsewhere
    (tests/test_qwen_vl.py), and transformers' Qwen2ForCausalLM on the mapped weights."""

    def __init__(self, checkpoint):
        from tests.e2e.test_qwen_vl_stack import CHAT, Direct

        self.direct, self.chat = Direct(checkpoint), CHAT

    def greedy(self, text: str, images: list[bytes]) -> tuple[list[int], list[int]]:
        head, tail = self.chat.split("{}")
        pieces: list = [head]  # text pieces between images (None), as the chat format joins them
        for n in range(len(images)):
            pieces[-1] += f"Picture {n + 1}: "
            pieces += [None, "\n"]
        pieces[-1] += text + tail
        ids = self.direct.ids(pieces)
        return ids, self.direct.greedy(ids, images, MAX_TOKENS)


class _OriginalAsLlavaHF:
    """Original LLaVA: the same weights rearranged into transformers' LlavaForConditionalGeneration
    (the CLIP tower from the folder `mm_vision_tower` names, `model.mm_projector.{0,2}` as the
    projector's linear_1/linear_2), fed the vicuna_v1 prompt with the image padded to a square."""

    def __init__(self, checkpoint):
        from transformers import AutoTokenizer, CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration

        from gateway.prompt_llava_original import VICUNA_V1_SYSTEM
        from mmserve.checkpoint import load_weights
        from mmserve.llava_original import OriginalLlavaConfig, image_placeholder_id

        mm = OriginalLlavaConfig.from_checkpoint(checkpoint)
        assert mm.projector_type == "mlp2x_gelu" and mm.select_feature == "patch"
        self.tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        self.image_id = image_placeholder_id(self.tokenizer)
        tower = json.loads((checkpoint / "openai/clip-vit-large-patch14-336/config.json").read_text())
        config = LlavaConfig(
            vision_config=tower.get("vision_config", tower),
            text_config=mm.text_config().to_dict(),
            image_token_index=self.image_id,
            vision_feature_layer=mm.select_layer,
            vision_feature_select_strategy="default",
            projector_hidden_act="gelu",
        )
        projector = "model.multi_modal_projector."
        state = load_weights(checkpoint, {"model.mm_projector.0.": projector + "linear_1."})
        state |= load_weights(checkpoint, {"model.mm_projector.2.": projector + "linear_2."})
        skip = {"model.mm_projector.": "__skip__."}
        lm = load_weights(checkpoint, {**skip, "model.": "model.language_model.", "lm_head.": "lm_head."})
        state |= {k: v for k, v in lm.items() if not k.startswith("__skip__.")}
        state |= load_weights(mm.vision_tower, {"vision_model.": "model.vision_tower."})
        self.model = LlavaForConditionalGeneration(config).float().eval()
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        assert not unexpected and all("position_ids" in k for k in missing), (missing, unexpected)
        self.processor = CLIPImageProcessor.from_pretrained(mm.vision_tower)
        self.system = VICUNA_V1_SYSTEM
        self.tokens_per_image = (config.vision_config.image_size // config.vision_config.patch_size) ** 2

    @torch.inference_mode()
    def greedy(self, text: str, images: list[bytes]) -> tuple[list[int], list[int]]:
        from tests.e2e.test_llava_original import padded

        prompt = f"{self.system} USER: " + "<image>\n" * len(images) + f"{text} ASSISTANT:"
        pieces = prompt.split("<image>")
        ids = self.tokenizer(pieces[0])["input_ids"]
        for piece in pieces[1:]:
            ids += [self.image_id] * self.tokens_per_image
            ids += self.tokenizer(piece, add_special_tokens=False)["input_ids"]
        kwargs = {}
        if images:
            import io

            from PIL import Image

            pil = [Image.open(io.BytesIO(padded(b))).convert("RGB") for b in images]
            kwargs["pixel_values"] = self.processor(images=pil, return_tensors="pt")["pixel_values"]
        input_ids = torch.tensor([ids])
        # An explicit mask: the placeholder id is <unk> = pad_token_id 0 here, which generate() would
        # otherwise mask out as padding.
        out = self.model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            do_sample=False,
            max_new_tokens=MAX_TOKENS,
            **kwargs,
        )
        return ids, out[0, len(ids) :].tolist()


def test_serves_like_its_reference(hub, hub_images):
    name, spec, checkpoint, stack = hub
    client = openai_client(stack)
    reference = reference_for(spec, checkpoint)
    for images in (["square.png"], []):
        data = [(hub_images / f).read_bytes() for f in images]
        reply = greedy_chat(client, TEXT, [f"file://{hub_images / f}" for f in images], MAX_TOKENS)
        prompt_ids, new_ids = reference.greedy(TEXT, data)
        what = f"{name} with {len(images)} image(s)"
        assert reply.model_extra["prompt_token_ids"] == prompt_ids, what
        assert reply.choices[0].model_extra["token_ids"] == new_ids, what
    assert len(set(new_ids)) > 2, f"{name}: degenerate reference output makes a weak comparison"


def test_served_facts_follow_the_checkpoint(hub):
    """/v1/models reports the context length from config.json (never the tokenizer's sentinel)."""
    name, spec, checkpoint, stack = hub
    card = openai_client(stack).models.list().data[0]
    assert card.model_extra["dtype"] == "float32"  # the stack pins float32 for parity
    assert 0 < card.model_extra["max_model_len"] <= 200_000, name


def test_unset_sampling_fields_follow_generation_config(hub, hub_images):
    """A request that sets no sampling field answers as transformers' `generate` with no sampling
    arguments: both take the checkpoint's generation_config.json (Qwen2.5-VL's repetition_penalty
    1.05 and near-zero temperature; Qwen2-VL-2B's top_k 1 and its two eos ids)."""
    name, spec, checkpoint, stack = hub
    config_file = checkpoint / "generation_config.json"
    sampling = {"temperature", "top_k", "top_p", "repetition_penalty"}
    if spec.family not in ("qwen2_vl", "qwen2_5_vl") or not config_file.is_file():
        pytest.skip(f"{name}: only Qwen2(.5)-VL checkpoints carry sampling defaults here")
    config = json.loads(config_file.read_text())
    assert sampling & config.keys(), f"{name}: generation_config.json sets no sampling field"
    from tests.e2e.test_qwen2_vl import QwenReference

    reference = QwenReference(checkpoint, spec.family)
    client = openai_client(stack)
    reply = client.chat.completions.create(
        model=client.models.list().data[0].id,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": f"file://{hub_images / 'wide.png'}"}},
                    {"type": "text", "text": TEXT},
                ],
            }
        ],
        max_tokens=MAX_TOKENS,
        extra_body={"return_token_ids": True},
    )
    prompt = reference.chat_prompt(TEXT, 1)
    prompt_ids, new_ids = reference.greedy(
        prompt, [(hub_images / "wide.png").read_bytes()], MAX_TOKENS, checkpoint_defaults=True
    )
    assert reply.model_extra["prompt_token_ids"] == prompt_ids
    assert reply.choices[0].model_extra["token_ids"] == new_ids
