"""Test helper: HF transformers' SwinV2 as an independent reference implementation.

``build_hf_model`` makes a randomly initialised ``Swinv2ForImageClassification`` from a local
``Swinv2Config`` (nothing is downloaded); ``hf_to_official`` converts its state dict into the
official checkpoint format (the inverse of HF's ``convert_swinv2_timm_to_pytorch`` renaming), so
it can be loaded with ``swinv2.load_official_state_dict``.

Name mapping (HF -> official), per block ``swinv2.encoder.layers.{i}.blocks.{j}.`` -> ``layers.{i}.blocks.{j}.``:

    attention.self.query/key/value.weight      -> attn.qkv.weight  (rows concatenated q, k, v)
    attention.self.query.bias / value.bias     -> attn.q_bias / attn.v_bias   (HF key has no bias)
    attention.self.logit_scale                 -> attn.logit_scale            (nH, 1, 1) both
    attention.self.continuous_position_bias_mlp.{0,2} -> attn.cpb_mlp.{0,2}
    attention.output.dense                     -> attn.proj
    layernorm_before                           -> norm1   (HF applies it AFTER attention: res-post-norm;
    layernorm_after                            -> norm2    the names are historical, checked numerically)
    intermediate.dense / output.dense          -> mlp.fc1 / mlp.fc2

and ``swinv2.embeddings.patch_embeddings.projection`` -> ``patch_embed.proj``,
``swinv2.embeddings.norm`` -> ``patch_embed.norm``, ``swinv2.encoder.layers.{i}.downsample`` ->
``layers.{i}.downsample`` (both place patch merging at the END of stage i, unlike timm),
``swinv2.layernorm`` -> ``norm``, ``classifier`` -> ``head``.

HF's ``relative_coords_table`` / ``relative_position_index`` are non-persistent buffers and HF
builds the shift mask on the fly, so the HF state dict has parameters only; the converted dict
therefore has no buffers, which the loader rebuilds anyway.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from transformers import Swinv2Config, Swinv2ForImageClassification

# per-block renames (HF suffix -> official suffix); q/k/v weights are handled separately
_BLOCK_RENAMES = {
    "attention.self.logit_scale": "attn.logit_scale",
    "attention.self.continuous_position_bias_mlp.0.weight": "attn.cpb_mlp.0.weight",
    "attention.self.continuous_position_bias_mlp.0.bias": "attn.cpb_mlp.0.bias",
    "attention.self.continuous_position_bias_mlp.2.weight": "attn.cpb_mlp.2.weight",
    "attention.self.query.bias": "attn.q_bias",
    "attention.self.value.bias": "attn.v_bias",
    "attention.output.dense.weight": "attn.proj.weight",
    "attention.output.dense.bias": "attn.proj.bias",
    "layernorm_before.weight": "norm1.weight",
    "layernorm_before.bias": "norm1.bias",
    "layernorm_after.weight": "norm2.weight",
    "layernorm_after.bias": "norm2.bias",
    "intermediate.dense.weight": "mlp.fc1.weight",
    "intermediate.dense.bias": "mlp.fc1.bias",
    "output.dense.weight": "mlp.fc2.weight",
    "output.dense.bias": "mlp.fc2.bias",
}
_QKV = ("attention.self.query.weight", "attention.self.key.weight", "attention.self.value.weight")
_TOP_RENAMES = {
    "swinv2.embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "swinv2.embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "swinv2.embeddings.norm.weight": "patch_embed.norm.weight",
    "swinv2.embeddings.norm.bias": "patch_embed.norm.bias",
    "swinv2.layernorm.weight": "norm.weight",
    "swinv2.layernorm.bias": "norm.bias",
    "classifier.weight": "head.weight",
    "classifier.bias": "head.bias",
}
_HF_BUFFERS = ("relative_coords_table", "relative_position_index")
_BLOCK_RE = re.compile(r"^swinv2\.encoder\.layers\.(\d+)\.blocks\.(\d+)\.(.+)$")
_DOWN_RE = re.compile(r"^swinv2\.encoder\.layers\.(\d+)\.downsample\.(reduction\.weight|norm\.weight|norm\.bias)$")


def _get(cfg: Any, name: str, default: Any = None) -> Any:
    if isinstance(cfg, Mapping):
        return cfg.get(name, default)
    return getattr(cfg, name, default)


def hf_config(
    *,
    embed_dim: int = 96,
    depths: Sequence[int] = (2, 2, 6, 2),
    num_heads: Sequence[int] = (3, 6, 12, 24),
    window_size: int = 8,
    image_size: int = 256,
    pretrained_window_sizes: Sequence[int] = (0, 0, 0, 0),
    num_labels: int = 1000,
    patch_size: int = 4,
    in_chans: int = 3,
    mlp_ratio: float = 4.0,
) -> Swinv2Config:
    """A ``Swinv2Config`` equivalent to our ``SwinV2Config`` (eval semantics: no dropout/drop path)."""
    return Swinv2Config(
        image_size=image_size,
        patch_size=patch_size,
        num_channels=in_chans,
        embed_dim=embed_dim,
        depths=list(depths),
        num_heads=list(num_heads),
        window_size=window_size,
        pretrained_window_sizes=list(pretrained_window_sizes),
        mlp_ratio=mlp_ratio,
        qkv_bias=True,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        drop_path_rate=0.0,
        hidden_act="gelu",  # exact (erf) GELU, as nn.GELU() in the official code
        use_absolute_embeddings=False,
        layer_norm_eps=1e-5,  # nn.LayerNorm default, used everywhere in the official code
        num_labels=num_labels,
    )


def hf_config_from_ours(cfg: Any) -> Swinv2Config:
    """``Swinv2Config`` mirroring one of our ``SwinV2Config`` objects (or a dict of its fields)."""
    return hf_config(
        embed_dim=_get(cfg, "embed_dim"),
        depths=tuple(_get(cfg, "depths")),
        num_heads=tuple(_get(cfg, "num_heads")),
        window_size=_get(cfg, "window_size"),
        image_size=_get(cfg, "img_size"),
        pretrained_window_sizes=tuple(_get(cfg, "pretrained_window_sizes", (0, 0, 0, 0))),
        num_labels=_get(cfg, "num_classes", 1000),
        patch_size=_get(cfg, "patch_size", 4),
        in_chans=_get(cfg, "in_chans", 3),
        mlp_ratio=_get(cfg, "mlp_ratio", 4.0),
    )


def build_hf_model(config: Swinv2Config | None = None, seed: int = 0, **kwargs: Any) -> Swinv2ForImageClassification:
    """Randomly initialised HF classifier in eval mode (``config`` or ``hf_config(**kwargs)``)."""
    config = config if config is not None else hf_config(**kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Swinv2ForImageClassification(config)
    return model.eval()


@torch.no_grad()
def perturb_(model: torch.nn.Module, seed: int = 0, scale: float = 0.05, norm_scale: float = 0.2) -> None:
    """Add Gaussian noise to EVERY parameter so that nothing is zero / identity / symmetric.

    LayerNorm weights and biases, biases and ``logit_scale`` get ``norm_scale`` noise; matrices
    get ``scale`` noise (HF initialises them with std 0.02).
    """
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        s = scale if p.ndim >= 2 and "logit_scale" not in name else norm_scale
        p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * s)


def hf_to_official(hf_state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Convert an HF ``Swinv2ForImageClassification`` state dict to official key names.

    Raises ``KeyError`` if any HF entry is not consumed (apart from HF's rebuilt buffers, should a
    transformers version make them persistent) or if a block lacks one of q/k/v.
    """
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    unconsumed = []
    for key, value in hf_state_dict.items():
        if key in _TOP_RENAMES:
            out[_TOP_RENAMES[key]] = value
            continue
        m = _DOWN_RE.match(key)
        if m:
            out[f"layers.{m.group(1)}.downsample.{m.group(2)}"] = value
            continue
        m = _BLOCK_RE.match(key)
        if m:
            prefix, suffix = f"layers.{m.group(1)}.blocks.{m.group(2)}.", m.group(3)
            if suffix in _QKV:
                qkv.setdefault(prefix, {})[suffix] = value
                continue
            if suffix in _BLOCK_RENAMES:
                out[prefix + _BLOCK_RENAMES[suffix]] = value
                continue
            if any(b in suffix for b in _HF_BUFFERS):
                continue  # window-dependent buffer; rebuilt by the loader
        unconsumed.append(key)
    if unconsumed:
        raise KeyError(f"HF keys not consumed by the conversion: {sorted(unconsumed)}")
    for prefix, parts in qkv.items():
        if set(parts) != set(_QKV):
            raise KeyError(f"{prefix}: incomplete q/k/v weights, have {sorted(parts)}")
        out[prefix + "attn.qkv.weight"] = torch.cat([parts[k] for k in _QKV], dim=0)
    return out


def official_param_keys(depths: Sequence[int], with_head: bool = True) -> set[str]:
    """All parameter keys of an official SwinV2 (buffers excluded), from the architecture alone."""
    keys = {"patch_embed.proj.weight", "patch_embed.proj.bias", "patch_embed.norm.weight",
            "patch_embed.norm.bias", "norm.weight", "norm.bias"}
    if with_head:
        keys |= {"head.weight", "head.bias"}
    block = ["attn.logit_scale", "attn.q_bias", "attn.v_bias", "attn.qkv.weight",
             "attn.cpb_mlp.0.weight", "attn.cpb_mlp.0.bias", "attn.cpb_mlp.2.weight",
             "attn.proj.weight", "attn.proj.bias", "norm1.weight", "norm1.bias", "norm2.weight",
             "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"]
    for i, depth in enumerate(depths):
        for j in range(depth):
            keys |= {f"layers.{i}.blocks.{j}.{s}" for s in block}
        if i < len(depths) - 1:
            keys |= {f"layers.{i}.downsample.{s}" for s in ("reduction.weight", "norm.weight", "norm.bias")}
    return keys
