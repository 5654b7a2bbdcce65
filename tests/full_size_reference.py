"""The reference side of tests/unit/test_full_size_shapes.py: what transformers builds from a real,
full-size Hub config (on the meta device, no weights), or for Qwen-VL v1, which transformers lacks, the
remote code's tensor shapes (Qwen/Qwen-VL-Chat's modeling_qwen.py and visual.py): parameter counts of
both halves, and a checkpoint of meta tensors under the Hub's key names."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

CLIP_TOWER = "openai/clip-vit-large-patch14-336"
# openai/clip-vit-large-patch14-336's vision tower (the Hub repo is a full CLIPModel folder)
CLIP_VISION = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=336,
    patch_size=14,
    projection_dim=768,
)


def count(module: torch.nn.Module) -> int:
    """Parameters, each tensor once (transformers' tied lm_head is the embedding's own Parameter)."""
    return sum(p.numel() for p in module.parameters())


def numel(shape) -> int:
    return math.prod(int(s) for s in shape)


def qwen_vl_shapes(raw: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Qwen-VL (v1) checkpoint, named and shaped as the remote code
    (Qwen/Qwen-VL-Chat's modeling_qwen.py, visual.py) saves them."""
    return _qwen_vl_text_shapes(raw) | _qwen_vl_visual_shapes(raw)


def _qwen_vl_text_shapes(raw: dict) -> dict[str, tuple[int, ...]]:
    hidden, layers, vocab = raw["hidden_size"], raw["num_hidden_layers"], raw["vocab_size"]
    mlp = raw["intermediate_size"] // 2  # w1 and w2 each hold half of intermediate_size
    shapes: dict[str, tuple[int, ...]] = {
        "transformer.wte.weight": (vocab, hidden),
        "transformer.ln_f.weight": (hidden,),
        "lm_head.weight": (vocab, hidden),
    }
    for i in range(layers):
        h = f"transformer.h.{i}."
        shapes.update(
            {
                h + "ln_1.weight": (hidden,),
                h + "ln_2.weight": (hidden,),
                h + "attn.c_attn.weight": (3 * hidden, hidden),
                h + "attn.c_attn.bias": (3 * hidden,),
                h + "attn.c_proj.weight": (hidden, hidden),  # no_bias
                h + "mlp.w1.weight": (mlp, hidden),
                h + "mlp.w2.weight": (mlp, hidden),
                h + "mlp.c_proj.weight": (hidden, mlp),
            }
        )
    return shapes


def _qwen_vl_visual_shapes(raw: dict) -> dict[str, tuple[int, ...]]:
    v = raw["visual"]
    width, out, patch = v["width"], v["output_dim"], v["patch_size"]
    ff = int(width * v["mlp_ratio"])
    queries = 256
    p = "transformer.visual."
    shapes: dict[str, tuple[int, ...]] = {
        p + "conv1.weight": (width, 3, patch, patch),
        p + "positional_embedding": (256, width),
        p + "ln_pre.weight": (width,),
        p + "ln_pre.bias": (width,),
        p + "ln_post.weight": (out,),
        p + "ln_post.bias": (out,),
        p + "proj": (out, out),
        p + "attn_pool.pos_embed": (queries, out),
        p + "attn_pool.query": (queries, out),
        p + "attn_pool.kv_proj.weight": (out, width),
        p + "attn_pool.attn.in_proj_weight": (3 * out, out),
        p + "attn_pool.attn.in_proj_bias": (3 * out,),
        p + "attn_pool.attn.out_proj.weight": (out, out),
        p + "attn_pool.attn.out_proj.bias": (out,),
        p + "attn_pool.ln_q.weight": (out,),
        p + "attn_pool.ln_q.bias": (out,),
        p + "attn_pool.ln_kv.weight": (out,),
        p + "attn_pool.ln_kv.bias": (out,),
    }
    for i in range(v["layers"]):
        b = f"{p}transformer.resblocks.{i}."
        shapes.update(
            {
                b + "ln_1.weight": (width,),
                b + "ln_1.bias": (width,),
                b + "ln_2.weight": (width,),
                b + "ln_2.bias": (width,),
                b + "attn.in_proj.weight": (3 * width, width),
                b + "attn.in_proj.bias": (3 * width,),
                b + "attn.out_proj.weight": (width, width),
                b + "attn.out_proj.bias": (width,),
                b + "mlp.c_fc.weight": (ff, width),
                b + "mlp.c_fc.bias": (ff,),
                b + "mlp.c_proj.weight": (width, ff),
                b + "mlp.c_proj.bias": (width,),
            }
        )
    return shapes


@dataclass
class Reference:
    language: int  # decoder + lm_head, a tied tensor once
    vision: int  # everything the vision service holds
    tied: bool  # transformers' model shares lm_head with the embedding
    on_disk: dict[str, dict[str, torch.Tensor]]  # folder -> checkpoint key -> meta tensor


def _meta(shape) -> torch.Tensor:
    return torch.empty(shape, device="meta", dtype=torch.bfloat16)


def _rename(state: dict, table: list[tuple[str, str]], drop: tuple[str, ...] = ()) -> dict:
    out = {}
    for key, value in state.items():
        if key in drop:
            continue
        for old, new in table:
            if key.startswith(old):
                out[new + key[len(old) :]] = value
                break
        else:
            raise AssertionError(f"unmapped key {key}")
    return out


def reference(raw: dict, family: str, ckpt: Path) -> Reference:
    """transformers' model of the config `raw` (the family's, saved in `ckpt`) on meta: its counts, and a
    checkpoint in the Hub's key layout."""
    import transformers
    from transformers import AutoConfig

    if family == "qwen_vl":
        return _qwen_vl_reference(raw, ckpt)
    with torch.device("meta"):
        if family == "llava_original":
            return _llava_original_reference(raw, ckpt)
        config = AutoConfig.from_pretrained(ckpt)
        model = getattr(transformers, config.architectures[0])(config)
    tied = model.lm_head.weight is model.model.language_model.embed_tokens.weight
    lang = count(model.model.language_model) + (0 if tied else model.lm_head.weight.numel())
    state = dict(model.state_dict())
    drop = ("lm_head.weight",) if tied else ()  # a tied checkpoint has no lm_head tensor
    if family in ("qwen2_vl", "qwen2_5_vl"):
        vis = count(model.model.visual)
        hub = [("model.language_model.", "model."), ("model.visual.", "visual."), ("lm_head.", "lm_head.")]
    else:
        vis = count(model.model.vision_tower) + count(model.model.multi_modal_projector)
        if family == "llava_next":
            vis += model.model.image_newline.numel()
        nested = hasattr(model.model.vision_tower, "vision_model")  # Hub keys: vision_tower.vision_model.*
        hub = [
            ("model.language_model.", "language_model.model."),
            ("lm_head.", "language_model.lm_head."),
            ("model.vision_tower.", "vision_tower." if nested else "vision_tower.vision_model."),
            ("model.multi_modal_projector.", "multi_modal_projector."),
            ("model.image_newline", "image_newline"),
        ]
    assert vis + lang == count(model), "the two halves should partition transformers' model"
    return Reference(lang, vis, tied, {str(ckpt): _rename(state, hub, drop)})


def _qwen_vl_reference(raw: dict, ckpt: Path) -> Reference:
    """Qwen-VL (v1) has no transformers model: the counts and the checkpoint come from its shapes."""
    shapes = qwen_vl_shapes(raw)
    lang = sum(numel(s) for k, s in shapes.items() if not k.startswith("transformer.visual."))
    vis = sum(numel(s) for k, s in shapes.items() if k.startswith("transformer.visual."))
    return Reference(lang, vis, False, {str(ckpt): {k: _meta(s) for k, s in shapes.items()}})


def _llava_original_reference(raw: dict, ckpt: Path) -> Reference:
    """Original LLaVA: transformers' LLaMA for the language half, its LLaVA model for the vision half's
    count, and two folders on disk (the LLaMA checkpoint with mm_projector, the whole CLIP tower)."""
    import transformers

    text = transformers.LlamaConfig.from_dict(raw)  # flat LLaMA fields; mm_* ride along unused
    lm = transformers.LlamaForCausalLM(text)
    clip_full = transformers.CLIPConfig(vision_config=CLIP_VISION)
    hf = transformers.LlavaForConditionalGeneration(
        transformers.LlavaConfig(
            vision_config=CLIP_VISION | {"model_type": "clip_vision_model"},
            text_config=text.to_dict(),
            projector_hidden_act="gelu",
            vision_feature_layer=raw["mm_vision_select_layer"],
        )
    )
    tied = lm.lm_head.weight is lm.model.embed_tokens.weight
    vis = count(hf.model.vision_tower) + count(hf.model.multi_modal_projector)
    llm_disk = dict(lm.state_dict())
    if tied:
        del llm_disk["lm_head.weight"]
    llm_disk["model.mm_projector.0.weight"] = _meta((text.hidden_size, raw["mm_hidden_size"]))
    llm_disk["model.mm_projector.0.bias"] = _meta((text.hidden_size,))
    llm_disk["model.mm_projector.2.weight"] = _meta((text.hidden_size, text.hidden_size))
    llm_disk["model.mm_projector.2.bias"] = _meta((text.hidden_size,))
    # the Hub folder is a whole CLIPModel: vision_model.*, text_model.*, projections, logit_scale
    clip_disk = dict(transformers.CLIPModel(clip_full).state_dict())
    return Reference(count(lm), vis, tied, {str(ckpt): llm_disk, str(ckpt / CLIP_TOWER): clip_disk})
