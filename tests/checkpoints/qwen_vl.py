"""Build small random-weight Qwen-VL (v1) checkpoints in the remote-code layout, offline.

config.json with model_type "qwen" and a `visual` section, `transformer.*` + `lm_head.*` safetensors
keys (the ViT + resampler under `transformer.visual.*`), and the real `qwen.tiktoken` (151,643 ranks),
copied from the `dashscope` wheel, where it ships as dashscope/resources/qwen.tiktoken; or pass
`tiktoken_file`. The vocabulary is the real one, so the embedding tables are vocab_size x hidden.
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from tools.checkpoints import write_marker

N_QUERIES = 256  # Qwen-VL's resampler: 256 embeddings per image


@dataclass
class QwenVLShape:
    image_size: int = 112
    patch_size: int = 14
    vision_width: int = 32
    vision_layers: int = 2
    vision_heads: int = 2
    mlp_ratio: float = 2.0
    hidden_size: int = 128  # = visual.output_dim; >= 128 since the resampler has output_dim // 128 heads
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 256  # Qwen's config value: w1 and w2 each have half of it
    vocab_size: int = 151936  # padded, as in Qwen-VL-Chat (the tokenizer has 151,860 ids)
    seq_length: int = 2048


def dashscope_tiktoken() -> Path:
    """qwen.tiktoken from the installed dashscope wheel (dashscope/resources/qwen.tiktoken), found
    without importing dashscope (its import takes seconds)."""
    import importlib.util

    spec = importlib.util.find_spec("dashscope")
    path = Path(spec.origin).parent / "resources" / "qwen.tiktoken" if spec and spec.origin else None
    if path is None or not path.is_file():
        raise FileNotFoundError("qwen.tiktoken not found: `pip install dashscope`, or pass tiktoken_file")
    return path


def sincos_pos_embed(dim: int, grid: int) -> np.ndarray:
    """(grid*grid, dim) 2-D sin-cos table, as visual.py's get_2d_sincos_pos_embed builds it."""

    def one_d(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    w, h = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64))
    return np.concatenate([one_d(dim // 2, w), one_d(dim // 2, h)], axis=1).astype(np.float32)


def qwen_vl_config(shape: QwenVLShape) -> dict:
    return {
        "architectures": ["QWenLMHeadModel"],
        "auto_map": {
            "AutoConfig": "configuration_qwen.QWenConfig",
            "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel",
        },
        "model_type": "qwen",
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "kv_channels": shape.hidden_size // shape.num_heads,
        "layer_norm_epsilon": 1e-6,
        "max_position_embeddings": 8192,
        "no_bias": True,
        "num_attention_heads": shape.num_heads,
        "num_hidden_layers": shape.num_layers,
        "rotary_emb_base": 10000,
        "rotary_pct": 1.0,
        "scale_attn_weights": True,
        "seq_length": shape.seq_length,
        "tie_word_embeddings": False,
        "tokenizer_type": "QWenTokenizer",
        "use_dynamic_ntk": True,
        "use_logn_attn": True,
        "vocab_size": shape.vocab_size,
        "visual": {
            "heads": shape.vision_heads,
            "image_size": shape.image_size,
            "image_start_id": 151857,
            "layers": shape.vision_layers,
            "mlp_ratio": shape.mlp_ratio,
            "output_dim": shape.hidden_size,
            "patch_size": shape.patch_size,
            "width": shape.vision_width,
        },
    }


class _Draw:
    """Seeded random tensors: `normal` (weights, std 0.2 unless given) and `norm` (LayerNorm scales ~1)."""

    def __init__(self, seed: int):
        import torch

        self.generator = torch.Generator().manual_seed(seed)

    def normal(self, *size: int, std: float = 0.2):
        import torch

        return torch.randn(*size, generator=self.generator) * std

    def norm(self, n: int):
        return 1.0 + self.normal(n, std=0.1)


def _vit_weights(shape: QwenVLShape, draw: _Draw) -> dict:
    """transformer.visual.*: the patch conv and the ViT blocks."""
    normal, norm = draw.normal, draw.norm
    w, hid = shape.vision_width, int(shape.vision_width * shape.mlp_ratio)
    v = "transformer.visual."
    state = {
        v + "conv1.weight": normal(w, 3, shape.patch_size, shape.patch_size),
        v + "positional_embedding": normal(256, w, std=0.5),
        v + "ln_pre.weight": norm(w),
        v + "ln_pre.bias": normal(w, std=0.05),
    }
    for i in range(shape.vision_layers):
        b = f"{v}transformer.resblocks.{i}."
        state |= {
            b + "ln_1.weight": norm(w),
            b + "ln_1.bias": normal(w, std=0.05),
            b + "ln_2.weight": norm(w),
            b + "ln_2.bias": normal(w, std=0.05),
            b + "attn.in_proj.weight": normal(3 * w, w),
            b + "attn.in_proj.bias": normal(3 * w, std=0.05),
            b + "attn.out_proj.weight": normal(w, w),
            b + "attn.out_proj.bias": normal(w, std=0.05),
            b + "mlp.c_fc.weight": normal(hid, w),
            b + "mlp.c_fc.bias": normal(hid, std=0.05),
            b + "mlp.c_proj.weight": normal(w, hid),
            b + "mlp.c_proj.bias": normal(w, std=0.05),
        }
    return state


def _resampler_weights(shape: QwenVLShape, draw: _Draw) -> dict:
    """transformer.visual.attn_pool.* (256 learned queries) and the output projection."""
    import torch

    normal, norm = draw.normal, draw.norm
    w, d = shape.vision_width, shape.hidden_size
    v = "transformer.visual."
    p = v + "attn_pool."
    return {
        p + "pos_embed": torch.from_numpy(sincos_pos_embed(d, int(N_QUERIES**0.5))),
        p + "query": normal(N_QUERIES, d, std=0.5),
        p + "kv_proj.weight": normal(d, w),
        p + "attn.in_proj_weight": normal(3 * d, d),
        p + "attn.in_proj_bias": normal(3 * d, std=0.05),
        p + "attn.out_proj.weight": normal(d, d),
        p + "attn.out_proj.bias": normal(d, std=0.05),
        p + "ln_q.weight": norm(d),
        p + "ln_q.bias": normal(d, std=0.05),
        p + "ln_kv.weight": norm(d),
        p + "ln_kv.bias": normal(d, std=0.05),
        v + "ln_post.weight": norm(d),
        v + "ln_post.bias": normal(d, std=0.05),
        v + "proj": normal(d, d, std=0.3),
    }


def _lm_weights(shape: QwenVLShape, draw: _Draw) -> dict:
    """transformer.wte / h.N / ln_f and lm_head: the Qwen (v1) language model."""
    normal, norm = draw.normal, draw.norm
    d, half = shape.hidden_size, shape.intermediate_size // 2
    state = {
        "transformer.wte.weight": normal(shape.vocab_size, d, std=1.0),
        "transformer.ln_f.weight": norm(d),
        "lm_head.weight": normal(shape.vocab_size, d, std=1.0),
    }
    for i in range(shape.num_layers):
        b = f"transformer.h.{i}."
        state |= {
            b + "ln_1.weight": norm(d),
            b + "ln_2.weight": norm(d),
            b + "attn.c_attn.weight": normal(3 * d, d),
            b + "attn.c_attn.bias": normal(3 * d, std=0.1),
            b + "attn.c_proj.weight": normal(d, d),
            b + "mlp.w1.weight": normal(half, d),
            b + "mlp.w2.weight": normal(half, d),
            b + "mlp.c_proj.weight": normal(d, half),
        }
    return state


def random_weights(shape: QwenVLShape, seed: int = 0) -> dict:
    """Every tensor of the checkpoint, under the remote code's key names, drawn from one seeded stream."""
    draw = _Draw(seed)
    state = _vit_weights(shape, draw) | _resampler_weights(shape, draw) | _lm_weights(shape, draw)
    return {k: t.contiguous() for k, t in state.items()}


def build_qwen_vl_checkpoint(
    path: str | Path, shape: QwenVLShape | None = None, seed: int = 0, tiktoken_file: str | Path | None = None
) -> Path:
    """Write a random-weight Qwen-VL (remote-code layout) checkpoint; needs qwen.tiktoken (see module doc)."""
    from safetensors.torch import save_file

    shape = shape or QwenVLShape()
    source = Path(tiktoken_file) if tiktoken_file else dashscope_tiktoken()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, path / "qwen.tiktoken")
    (path / "config.json").write_text(json.dumps(qwen_vl_config(shape), indent=2))
    (path / "tokenizer_config.json").write_text(
        json.dumps({"model_max_length": 8192, "tokenizer_class": "QWenTokenizer"}, indent=2)
    )
    save_file(random_weights(shape, seed), str(path / "model.safetensors"), metadata={"format": "pt"})
    write_marker(path, seed, **asdict(shape))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("path", help="output folder")
    parser.add_argument("--tiktoken", help="qwen.tiktoken to copy (default: the dashscope wheel's)")
    args = parser.parse_args()
    print(build_qwen_vl_checkpoint(args.path, tiktoken_file=args.tiktoken))


if __name__ == "__main__":
    main()
