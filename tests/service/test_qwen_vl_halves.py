"""Qwen-VL (v1) model halves, piece by piece: ViT/resampler vs independent computations, the LM weight
mapping vs a plain-torch Qwen v1 forward, strict loading of each half."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmserve.errors import CheckpointError, InvalidInputError

pytest_plugins = ("tests.qwen_vl_fixtures",)  # qwen_home, qwen_ckpt, prompt

IMG_PAD = 151859  # <imgpad>


@pytest.fixture(scope="module")
def state(qwen_ckpt):
    from safetensors.torch import load_file

    return load_file(str(qwen_ckpt / "model.safetensors"))


@pytest.fixture(scope="module")
def config(qwen_ckpt):
    from mmserve.checkpoint import read_config

    return read_config(qwen_ckpt)


# ---- vision --------------------------------------------------------------------------------------


def _sub(state: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _ln(x, sd, name):
    return F.layer_norm(x, (x.shape[-1],), sd[name + ".weight"], sd[name + ".bias"], 1e-6)


def ref_abs_pos(table: torch.Tensor, n: int) -> torch.Tensor:
    """Channel by channel: each channel of the (L, C) table is a sqrt(L) x sqrt(L) image, row-major."""
    src, tgt = math.isqrt(table.shape[0]), math.isqrt(n)
    if src == tgt:
        return table
    columns = [
        F.interpolate(
            table[:, c].reshape(1, 1, src, src), size=(tgt, tgt), mode="bicubic", align_corners=False
        )
        for c in range(table.shape[1])
    ]
    return torch.stack([col.reshape(-1) for col in columns], dim=1)


def ref_block(x: torch.Tensor, sd: dict, heads: int) -> torch.Tensor:
    """visual.py's VisualAttentionBlock, re-computed the way it does it (sequence first, bmm, baddbmm)."""
    x = x.permute(1, 0, 2)  # (L, B, w)
    sq, b, w = x.shape
    hn = w // heads
    mixed = _ln(x, sd, "ln_1") @ sd["attn.in_proj.weight"].T + sd["attn.in_proj.bias"]
    q, k, v = mixed.view(sq, b, heads, 3 * hn).split(hn, dim=-1)
    q, k, v = (t.reshape(sq, b * heads, hn).transpose(0, 1) for t in (q, k, v))
    probs = torch.bmm(q / math.sqrt(hn), k.transpose(-2, -1)).softmax(dim=-1)
    context = torch.bmm(probs, v).view(b, heads, sq, hn).permute(2, 0, 1, 3).reshape(sq, b, w)
    x = x + context @ sd["attn.out_proj.weight"].T + sd["attn.out_proj.bias"]
    hidden = F.gelu(_ln(x, sd, "ln_2") @ sd["mlp.c_fc.weight"].T + sd["mlp.c_fc.bias"])
    x = x + hidden @ sd["mlp.c_proj.weight"].T + sd["mlp.c_proj.bias"]
    return x.permute(1, 0, 2)


def ref_resampler(x: torch.Tensor, sd: dict) -> torch.Tensor:
    """visual.py's Resampler with a real torch.nn.MultiheadAttention (sequence first)."""
    dim = sd["query"].shape[1]
    mha = torch.nn.MultiheadAttention(dim, dim // 128)
    mha.load_state_dict(_sub(sd, "attn."))
    pos = ref_abs_pos(sd["pos_embed"], x.shape[1])
    x = x @ sd["kv_proj.weight"].T
    x = _ln(x, sd, "ln_kv").permute(1, 0, 2)
    q = _ln(sd["query"], sd, "ln_q")
    n = x.shape[1]
    out = mha(q.unsqueeze(1).repeat(1, n, 1) + sd["pos_embed"].unsqueeze(1), x + pos.unsqueeze(1), x)[0]
    return out.permute(1, 0, 2)


def ref_visual(pixels: torch.Tensor, sd: dict, visual: dict) -> torch.Tensor:
    x = F.conv2d(pixels, sd["conv1.weight"], stride=visual["patch_size"])
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    x = _ln(x + ref_abs_pos(sd["positional_embedding"], x.shape[1]), sd, "ln_pre")
    for i in range(visual["layers"]):
        x = ref_block(x, _sub(sd, f"transformer.resblocks.{i}."), visual["heads"])
    x = _ln(ref_resampler(x, _sub(sd, "attn_pool.")), sd, "ln_post")
    return x @ sd["proj"]


def test_positional_interpolation():
    from vision_service.models.qwen_vl import interpolate_pos

    torch.manual_seed(0)
    table = torch.randn(256, 24)
    assert interpolate_pos(table, 256) is table
    for n in (1024, 64, 16):  # 448/14 -> 32x32, and the tiny checkpoints' grids
        assert torch.allclose(interpolate_pos(table, n), ref_abs_pos(table, n), atol=1e-6)
    # A constant table stays constant; the layout is row-major (a row gradient stays a row gradient).
    assert torch.allclose(interpolate_pos(torch.full((256, 3), 2.5), 1024), torch.full((1024, 3), 2.5))
    rows = torch.arange(16.0).repeat_interleave(16)[:, None]
    up = interpolate_pos(rows, 1024).reshape(32, 32)
    assert torch.allclose(up, up[:, :1].expand(32, 32)) and (up[1:, 0] >= up[:-1, 0]).all()


def test_vit_block_matches_recomputation(state, config):
    from vision_service.models.qwen_vl import VisualAttentionBlock

    visual = config["visual"]
    sd = _sub(state, "transformer.visual.transformer.resblocks.1.")
    block = VisualAttentionBlock(visual["width"], visual["heads"], visual["mlp_ratio"])
    block.load_state_dict(sd)
    x = torch.randn(3, 64, visual["width"], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(block(x), ref_block(x, sd, visual["heads"]), atol=1e-5)


def test_resampler_matches_multihead_attention(state, config):
    from vision_service.models.qwen_vl import Resampler

    visual = config["visual"]
    sd = _sub(state, "transformer.visual.attn_pool.")
    resampler = Resampler(256, visual["output_dim"], visual["output_dim"] // 128, visual["width"])
    resampler.load_state_dict(sd)
    with torch.no_grad():
        for patches in (64, 1024):
            x = torch.randn(2, patches, visual["width"], generator=torch.Generator().manual_seed(patches))
            out = resampler(x)
            assert out.shape == (2, 256, visual["output_dim"])
            assert torch.allclose(out, ref_resampler(x, sd), atol=1e-4)


def test_vision_tower_and_preprocessing(qwen_ckpt, state, config):
    from PIL import Image

    from tests.helpers import make_image
    from vision_service.models.qwen_vl import CLIP_MEAN, CLIP_STD, QwenVLVision

    model = QwenVLVision.from_checkpoint(str(qwen_ckpt), torch.float32, "cpu")
    processor = QwenVLVision.load_processor(str(qwen_ckpt))
    images = [
        Image.open(__import__("io").BytesIO(make_image(w, h, seed=w))) for w, h in ((80, 60), (33, 200))
    ]
    items = [
        {k: torch.from_numpy(v) for k, v in QwenVLVision.preprocess_one(processor, im).items()}
        for im in images
    ]
    size = config["visual"]["image_size"]
    for image, item in zip(images, items, strict=True):  # plain bicubic resize, no crop, CLIP mean/std
        resized = torch.tensor(np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC)))
        expected = (resized.float() / 255 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
        assert torch.allclose(item["pixel_values"], expected.permute(2, 0, 1), atol=1e-5)
    out = model(**QwenVLVision.collate(items))
    assert [tuple(o.shape) for o in out] == [(256, config["hidden_size"])] * 2
    ref = ref_visual(
        torch.stack([i["pixel_values"] for i in items]), _sub(state, "transformer.visual."), config["visual"]
    )
    assert torch.allclose(torch.stack(out), ref, atol=1e-4)
    assert not torch.allclose(out[0], out[1], atol=1e-2)
    assert QwenVLVision.grid_thw(items[0]) == ()


def test_missing_visual_key_is_a_startup_error(tmp_path, qwen_ckpt, state):
    from safetensors.torch import save_file

    from vision_service.models.qwen_vl import QwenVLVision

    (tmp_path / "config.json").write_text((qwen_ckpt / "config.json").read_text())
    visual = {k: v for k, v in state.items() if k.startswith("transformer.visual.")}
    del visual["transformer.visual.attn_pool.kv_proj.weight"]
    save_file(visual, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="kv_proj"):
        QwenVLVision.from_checkpoint(str(tmp_path), torch.float32, "cpu")


# ---- language model ------------------------------------------------------------------------------


def ref_qwen_logits(sd: dict, config: dict, embeds: torch.Tensor) -> torch.Tensor:
    """Qwen v1 (modeling_qwen.py) forward for <= seq_length tokens, from the original keys: fused c_attn,
    rotate-half RoPE, RMSNorm, MLP c_proj(w1(x) * silu(w2(x)))."""
    hidden, heads, eps = config["hidden_size"], config["num_attention_heads"], config["layer_norm_epsilon"]
    hd, t = config["kv_channels"], embeds.shape[0]
    inv_freq = 1.0 / config["rotary_emb_base"] ** (torch.arange(0, hd, 2).float() / hd)
    freqs = torch.outer(torch.arange(t).float(), inv_freq)
    cos, sin = torch.cat([freqs, freqs], -1).cos(), torch.cat([freqs, freqs], -1).sin()

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    def rotate(x):
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-x2, x1], -1) * sin

    mask = torch.full((t, t), float("-inf")).triu(1)
    x = embeds
    for i in range(config["num_hidden_layers"]):
        p = f"transformer.h.{i}."
        qkv = rms(x, sd[p + "ln_1.weight"]) @ sd[p + "attn.c_attn.weight"].T + sd[p + "attn.c_attn.bias"]
        q, k, v = (z.view(t, heads, hd).transpose(0, 1) for z in qkv.split(hidden, dim=-1))
        att = (rotate(q) @ rotate(k).transpose(-1, -2) / math.sqrt(hd) + mask).softmax(-1)
        x = x + (att @ v).transpose(0, 1).reshape(t, hidden) @ sd[p + "attn.c_proj.weight"].T
        h = rms(x, sd[p + "ln_2.weight"])
        x = (
            x
            + ((h @ sd[p + "mlp.w1.weight"].T) * F.silu(h @ sd[p + "mlp.w2.weight"].T))
            @ sd[p + "mlp.c_proj.weight"].T
        )
    return rms(x, sd["transformer.ln_f.weight"]) @ sd["lm_head.weight"].T


@pytest.fixture(scope="module")
def language_model(qwen_ckpt):
    from llm_service.models.qwen_vl import QwenVLLanguageModel

    return QwenVLLanguageModel(str(qwen_ckpt), torch.float32, "cpu")


def test_lm_mapping_matches_qwen_v1(language_model, state, config, prompt, qwen_ckpt):
    from mmserve.wire import GenerateRequest, ImageSpan, SamplingParams
    from tests.reference import decoder_logits, engine_greedy, qwen_vl_reference_lm

    ids = prompt.tokenize(
        "<|im_start|>user\nPicture 1: <img><imgpad></img>\n这是什么<|im_end|>\n<|im_start|>assistant\n"
    )
    embeds = state["transformer.wte.weight"][ids]
    pad = ids.index(IMG_PAD)
    embeds[pad] = torch.randn(config["hidden_size"], generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = decoder_logits(language_model, embeds)
        ref = ref_qwen_logits(state, config, embeds)
        assert (ours - ref).abs().max() < 1e-3 * ref.abs().max()
        # Greedy through the engine (prefill, then one token at a time through the paged KV cache),
        # against Qwen v1's math re-run over the whole sequence at every step.
        seq, ref_tokens = embeds, []
        for _ in range(10):
            ref_tokens.append(int(ref_qwen_logits(state, config, seq)[-1].argmax()))
            seq = torch.cat([seq, state["transformer.wte.weight"][ref_tokens[-1]][None]])
        generated = (
            qwen_vl_reference_lm(qwen_ckpt)
            .generate(
                inputs_embeds=embeds[None],
                max_new_tokens=10,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )[0]
            .tolist()
        )
    request = GenerateRequest(
        "r",
        ids,
        [ImageSpan(pad, embeds[pad : pad + 1].clone(), "x")],
        SamplingParams(temperature=0, max_new_tokens=10, ignore_eos=True),
    )
    our_tokens = engine_greedy(language_model, request)
    assert our_tokens == ref_tokens == generated
    assert len(set(our_tokens)) > 2


def test_context_capped_at_seq_length(language_model):
    """Above 2048 tokens Qwen v1 turns on logn attention and dynamic NTK, which Qwen2 lacks: cap there."""
    from llm_service.engine import Engine
    from mmserve.wire import GenerateRequest, SamplingParams

    assert language_model.max_model_len == 2048
    assert language_model.image_token_id == IMG_PAD
    assert {151643, 151644, 151645} <= set(language_model.eos_token_ids)
    for configured, effective in ((0, 2048), (4096, 2048), (512, 512)):
        engine = Engine(language_model, max_model_len=configured)
        try:
            assert engine.max_model_len == effective
            request = GenerateRequest("r", [1] * effective, [], SamplingParams(max_new_tokens=1))
            with pytest.raises(InvalidInputError, match=f"at most {effective - 1}"):
                engine.validate(request)
            engine.validate(GenerateRequest("r", [1] * (effective - 1), [], SamplingParams(max_new_tokens=1)))
        finally:
            engine.stop()


def test_missing_lm_key_is_a_startup_error(tmp_path, qwen_ckpt, state):
    from safetensors.torch import save_file

    from llm_service.models.qwen_vl import QwenVLLanguageModel

    (tmp_path / "config.json").write_text((qwen_ckpt / "config.json").read_text())
    lm = {k: v for k, v in state.items() if not k.startswith("transformer.visual.") and "h.1.mlp.w2" not in k}
    save_file(lm, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"h\.1\.mlp\.w2"):
        QwenVLLanguageModel(str(tmp_path), torch.float32, "cpu")
