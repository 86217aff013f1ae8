"""Loading and saving checkpoints in the official SwinV2 format.

The official format (microsoft/Swin-Transformer ``models/swin_transformer_v2.py``) is a dict
``{"model": state_dict, ...}`` whose keys are the module names our model also uses
(``patch_embed.proj``, ``layers.{i}.blocks.{j}.attn.cpb_mlp.0``, ``layers.{i}.downsample``,
``norm``, ``head``).  Loading follows the official ``utils.load_pretrained`` and
``utils_simmim`` loaders, but is strict by default:

* the window-dependent buffers (``relative_position_index``, ``relative_coords_table``,
  ``attn_mask``) are dropped from the checkpoint and the model keeps its own, rebuilt for its
  window / ``pretrained_window_sizes``.  This is what makes window transfer (e.g. a W12
  checkpoint into a W16 model) work: ``cpb_mlp``, ``logit_scale`` and the q/v biases do not
  depend on the window;
* SimMIM names are normalised (``encoder.`` prefix, ``rpe_mlp`` -> ``cpb_mlp``), as are wrapper
  prefixes (DDP/DeepSpeed ``module.``, ``torch.compile`` ``_orig_mod.``, activation-checkpoint
  ``_checkpoint_wrapped_module.``);
* head: 21841 -> 1000 rows are sliced with a class map (``map22kto1k.txt``); any other head
  mismatch re-initialises the model's head with a warning;
* anything else that does not match raises :class:`CheckpointMismatchError`.

This module imports torch only.
"""
from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = [
    "CheckpointMismatchError",
    "LoadReport",
    "BUFFER_KEYWORDS",
    "load_official_state_dict",
    "official_state_dict",
    "save_official_state_dict",
    "canonical_key",
    "read_class_map",
]

#: Keys containing one of these are window-dependent buffers: never loaded, always rebuilt.
BUFFER_KEYWORDS = ("relative_position_index", "relative_coords_table", "attn_mask")

#: Path components inserted by wrappers (DDP / DeepSpeed engine, torch.compile, activation
#: checkpointing, FSDP).  None of them is an official module name, so removing them anywhere in a
#: key is safe.
_WRAPPER_COMPONENTS = frozenset(
    {"module", "_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module"}
)

#: Parameters that only exist in SimMIM pre-training checkpoints (besides ``decoder.*``).
_SIMMIM_ONLY = ("mask_token",)

_HEAD_KEYS = ("head.weight", "head.bias")
_NUM_22K = 21841
_NUM_1K = 1000
_MAX_LISTED = 12


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model (missing / unexpected keys or wrong shapes)."""


@dataclass
class LoadReport:
    """What :func:`load_official_state_dict` did.

    ``loaded``: model keys (canonical names) that received checkpoint values.
    ``dropped_buffers``: checkpoint keys of window-dependent buffers that were ignored.
    ``head_action``: ``"loaded"``, ``"mapped_22k_to_1k"``, ``"reinitialised"``, or ``"absent"``
    (the model has no ``head`` parameters, e.g. ``num_classes=0``; checkpoint head dropped).
    ``messages``: human-readable notes (renames, dropped SimMIM keys, window transfer, ...).
    ``missing`` / ``unexpected`` / ``mismatched``: only non-empty with ``strict=False``.
    """

    loaded: list[str] = field(default_factory=list)
    dropped_buffers: list[str] = field(default_factory=list)
    head_action: str = "loaded"
    messages: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _format_keys(keys: Sequence[str], limit: int = _MAX_LISTED) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    if len(keys) > limit:
        shown += f", ... and {len(keys) - limit} more"
    return f"[{shown}]"


def canonical_key(key: str) -> str:
    """Official name of a (possibly wrapped / SimMIM) state-dict key.

    Removes wrapper components (``module``, ``_orig_mod``, ``_checkpoint_wrapped_module``,
    ``_fsdp_wrapped_module``) anywhere, a leading ``encoder.`` (SimMIM), and renames
    ``rpe_mlp`` -> ``cpb_mlp``.
    """
    parts = [p for p in key.split(".") if p not in _WRAPPER_COMPONENTS]
    if parts and parts[0] == "encoder":
        parts = parts[1:]
    parts = ["cpb_mlp" if p == "rpe_mlp" else p for p in parts]
    return ".".join(parts)


def _is_buffer_key(key: str) -> bool:
    return any(word in key for word in BUFFER_KEYWORDS)


def _unwrap_checkpoint(obj: Any) -> Mapping[str, Any]:
    """Return the state dict inside an official / DeepSpeed / plain checkpoint object."""
    if isinstance(obj, (str, os.PathLike)):
        # weights_only: a released official file is {"model": tensors}.  Full training
        # checkpoints also pickle a yacs config; load those yourself and pass checkpoint["model"].
        obj = torch.load(obj, map_location="cpu", weights_only=True)
    if not isinstance(obj, Mapping):
        raise TypeError(f"expected a state dict (Mapping) or a path, got {type(obj).__name__}")
    for wrapper in ("model", "state_dict", "module"):
        inner = obj.get(wrapper)
        if isinstance(inner, Mapping):
            return _unwrap_checkpoint(inner)
    return obj


def _unwrap_model(model: nn.Module) -> nn.Module:
    """Peel DDP / DeepSpeed engine (``.module``) and torch.compile (``._orig_mod``) wrappers."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model = inner
            continue
        inner = getattr(model, "module", None)
        if isinstance(inner, nn.Module) and not hasattr(model, "patch_embed"):
            model = inner
            continue
    return model


def read_class_map(class_map: Any, num_source: int = _NUM_22K) -> torch.Tensor:
    """Class map as a 1-D int64 tensor of indices into the ``num_source`` classes.

    Accepts a tensor, a sequence of ints or a path to a text file with one integer per line
    (the official ``data/map22kto1k.txt``; blank lines and ``#`` comments are ignored).
    """
    if isinstance(class_map, (str, os.PathLike)):
        values = []
        with open(class_map, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                text = line.split("#", 1)[0].strip()
                if not text:
                    continue
                try:
                    values.append(int(text))
                except ValueError as e:
                    raise ValueError(f"{class_map}:{lineno}: not an integer: {line.strip()!r}") from e
        index = torch.tensor(values, dtype=torch.int64)
    else:
        index = torch.as_tensor(class_map)
        if index.is_floating_point() or index.dtype == torch.bool:
            raise TypeError(f"class_map must hold integers, got dtype {index.dtype}")
        index = index.to(torch.int64).flatten().cpu()
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= num_source):
        raise ValueError(
            f"class_map indices must lie in [0, {num_source}); got range "
            f"[{int(index.min())}, {int(index.max())}]"
        )
    return index


def _window_of(coords_table_shape: torch.Size) -> int | None:
    # relative_coords_table is (1, 2W-1, 2W-1, 2)
    if len(coords_table_shape) == 4:
        return (int(coords_table_shape[1]) + 1) // 2
    return None


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------


def load_official_state_dict(
    model: nn.Module,
    state_dict: Any,
    class_map: Any = None,
    strict: bool = True,
    head_init: str = "trunc_normal",
) -> LoadReport:
    """Load an official-format SwinV2 checkpoint into ``model`` (in place).

    Args:
        model: a ``SwinTransformerV2`` (possibly wrapped by DDP / DeepSpeed / torch.compile /
            activation-checkpoint wrappers).
        state_dict: the checkpoint dict, with or without the top-level ``"model"`` key, or a
            path to a file holding one.
        class_map: for a 21841-class checkpoint head and a 1000-class model: 1000 indices into
            the 22K classes (sequence, tensor, or path to ``map22kto1k.txt``).
        strict: raise :class:`CheckpointMismatchError` on missing / unexpected parameter keys and
            on shape mismatches (the head is handled separately, see module docs).  With
            ``strict=False`` these are skipped and listed in the report.
        head_init: how a mismatched head is re-initialised: ``"trunc_normal"`` (weight
            trunc-normal std 0.02, bias 0: the model's own init) or ``"zeros"`` (weight and bias
            0, as the official ``load_pretrained`` does).

    Returns:
        a :class:`LoadReport`.
    """
    if head_init not in ("trunc_normal", "zeros"):
        raise ValueError(f"head_init must be 'trunc_normal' or 'zeros', got {head_init!r}")
    report = LoadReport()
    raw = _unwrap_checkpoint(state_dict)

    # ---- checkpoint: canonical names, drop buffers and SimMIM-only entries ---------------
    def _bare(k: Any) -> str:
        return ".".join(p for p in str(k).split(".") if p not in _WRAPPER_COMPONENTS)

    has_simmim_encoder = any(_bare(k).startswith("encoder.") for k in raw)
    ckpt: dict[str, torch.Tensor] = {}
    renamed = 0
    simmim_dropped: list[str] = []
    ckpt_buffer_shapes: dict[str, torch.Size] = {}
    for key, value in raw.items():
        key = str(key)
        bare = _bare(key)
        if has_simmim_encoder and not bare.startswith("encoder."):
            # SimMIM: only the encoder is the backbone (decoder.* is the pixel decoder)
            simmim_dropped.append(key)
            continue
        name = canonical_key(key)
        if name != bare and "rpe_mlp" in bare:
            renamed += 1
        if _is_buffer_key(name):
            report.dropped_buffers.append(key)
            if torch.is_tensor(value):
                ckpt_buffer_shapes[name] = value.shape
            continue
        if name in _SIMMIM_ONLY:
            simmim_dropped.append(key)
            continue
        if not torch.is_tensor(value):
            raise CheckpointMismatchError(f"checkpoint entry {key!r} is not a tensor ({type(value).__name__})")
        if name in ckpt:
            raise CheckpointMismatchError(f"checkpoint has two entries for {name!r} (after renaming)")
        ckpt[name] = value
    if renamed:
        report.messages.append(f"renamed {renamed} SimMIM 'rpe_mlp' keys to 'cpb_mlp'")
    if simmim_dropped:
        report.messages.append(
            f"dropped {len(simmim_dropped)} SimMIM-only keys {_format_keys(simmim_dropped, 6)}"
        )
    if report.dropped_buffers:
        report.messages.append(
            f"dropped {len(report.dropped_buffers)} window-dependent buffers from the checkpoint; "
            "the model keeps its own (rebuilt for its window)"
        )

    # ---- model: canonical name -> actual state-dict key -----------------------------------
    model_sd = model.state_dict()
    targets: dict[str, str] = {}
    model_buffers: dict[str, torch.Tensor] = {}
    for key, value in model_sd.items():
        name = canonical_key(key)
        if _is_buffer_key(name):
            model_buffers[name] = value
            continue
        if name in targets:
            raise RuntimeError(f"model keys {targets[name]!r} and {key!r} have the same official name {name!r}")
        targets[name] = key

    _note_window_transfer(report, ckpt_buffer_shapes, model_buffers)

    # ---- head --------------------------------------------------------------------------------
    new_values: dict[str, torch.Tensor] = {}
    reinit_head = False
    model_has_head = all(k in targets for k in _HEAD_KEYS)
    ckpt_head = {k: ckpt.pop(k) for k in _HEAD_KEYS if k in ckpt}
    if not model_has_head:
        report.head_action = "absent"
        if ckpt_head:
            report.messages.append(
                f"model has no classification head; dropped checkpoint {sorted(ckpt_head)}"
            )
    else:
        mw, mb = model_sd[targets["head.weight"]], model_sd[targets["head.bias"]]
        cw, cb = ckpt_head.get("head.weight"), ckpt_head.get("head.bias")
        if cw is None or cb is None:
            reinit_head = True
            _warn(report, f"checkpoint has no complete head ({sorted(ckpt_head) or 'no head keys'}); "
                  f"re-initialising the model head {tuple(mw.shape)}")
        elif cw.shape == mw.shape and cb.shape == mb.shape:
            new_values["head.weight"], new_values["head.bias"] = cw, cb
            report.head_action = "loaded"
        elif (
            class_map is not None
            and cw.ndim == 2
            and cw.shape[0] == _NUM_22K
            and mw.shape[0] == _NUM_1K
            and cw.shape[1] == mw.shape[1]
            and cb.shape == (_NUM_22K,)
        ):
            index = read_class_map(class_map, _NUM_22K)
            if index.numel() != _NUM_1K:
                raise ValueError(f"class_map has {index.numel()} entries; expected {_NUM_1K}")
            new_values["head.weight"] = cw.index_select(0, index)
            new_values["head.bias"] = cb.index_select(0, index)
            report.head_action = "mapped_22k_to_1k"
            report.messages.append(f"head: selected {_NUM_1K} of {_NUM_22K} rows with the class map")
        else:
            reinit_head = True
            hint = ""
            if cw.ndim == 2 and cw.shape[0] == _NUM_22K and mw.shape[0] == _NUM_1K and class_map is None:
                hint = " (pass class_map=map22kto1k.txt to keep the 22K->1K classifier)"
            _warn(report, f"head shape mismatch: checkpoint head.weight {tuple(cw.shape)} / head.bias "
                  f"{tuple(cb.shape)} vs model {tuple(mw.shape)} / {tuple(mb.shape)}; "
                  f"re-initialising the model head{hint}")

    # ---- strict key / shape checks -------------------------------------------------------------
    expected = {n for n in targets if n not in _HEAD_KEYS}
    missing = sorted(expected - ckpt.keys())
    unexpected = sorted(ckpt.keys() - expected)
    mismatched = []
    for name in sorted(expected & ckpt.keys()):
        have, want = ckpt[name].shape, model_sd[targets[name]].shape
        if have != want:
            mismatched.append(f"{name}: checkpoint {tuple(have)} vs model {tuple(want)}")
        else:
            new_values[name] = ckpt[name]
    problems = []
    if missing:
        problems.append(f"missing keys (in the model, not in the checkpoint): {_format_keys(missing)}")
    if unexpected:
        problems.append(f"unexpected keys (in the checkpoint, not in the model): {_format_keys(unexpected)}")
    if mismatched:
        problems.append("shape mismatch: " + "; ".join(mismatched[:_MAX_LISTED])
                        + (f"; ... and {len(mismatched) - _MAX_LISTED} more" if len(mismatched) > _MAX_LISTED else ""))
    if problems and strict:
        raise CheckpointMismatchError("checkpoint does not match the model: " + " | ".join(problems))
    report.missing, report.unexpected, report.mismatched = missing, unexpected, mismatched
    for p in problems:
        report.messages.append("ignored (strict=False): " + p)

    # ---- copy ----------------------------------------------------------------------------------
    with torch.no_grad():
        to_load = {targets[name]: value for name, value in new_values.items()}
        result = model.load_state_dict(to_load, strict=False)
        assert not result.unexpected_keys, result.unexpected_keys  # by construction
        if reinit_head:
            _reinit_head(model, model_sd, targets, head_init)
            report.head_action = "reinitialised"
            report.messages.append(
                "head re-initialised: " + ("weight trunc_normal(std=0.02), bias 0" if head_init == "trunc_normal"
                                           else "weight 0, bias 0 (official load_pretrained)")
            )
    report.loaded = sorted(new_values)
    return report


def _warn(report: LoadReport, message: str) -> None:
    report.messages.append(message)
    warnings.warn(message, stacklevel=3)


def _reinit_head(model: nn.Module, model_sd: Mapping[str, torch.Tensor], targets: Mapping[str, str], how: str) -> None:
    # model_sd tensors share storage with the parameters (state_dict() is not a copy)
    weight, bias = model_sd[targets["head.weight"]], model_sd[targets["head.bias"]]
    if how == "zeros":
        weight.zero_()
    else:
        nn.init.trunc_normal_(weight, std=0.02)
    bias.zero_()


def _note_window_transfer(report: LoadReport, ckpt_shapes: Mapping[str, torch.Size],
                          model_buffers: Mapping[str, torch.Tensor]) -> None:
    changed = []
    for name, shape in ckpt_shapes.items():
        if not name.endswith("relative_coords_table") or name not in model_buffers:
            continue
        src, dst = _window_of(shape), _window_of(model_buffers[name].shape)
        if src is not None and dst is not None and src != dst:
            changed.append((name.rsplit(".attn.", 1)[0], src, dst))
    if changed:
        pairs = sorted({(s, d) for _, s, d in changed})
        report.messages.append(
            "window transfer: checkpoint windows -> model windows "
            + ", ".join(f"W{s}->W{d}" for s, d in pairs)
            + f" in {len(changed)} blocks; relative position buffers rebuilt for the model "
            "(set pretrained_window_sizes to the checkpoint's windows, as the official fine-tuning configs do)"
        )


# --------------------------------------------------------------------------------------------
# saving
# --------------------------------------------------------------------------------------------


def official_state_dict(model: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``{"model": state_dict}`` in the official format: official key names (wrapper prefixes
    removed), contiguous CPU tensors, floating point as fp32, buffers included (the official code
    registers ``relative_coords_table``, ``relative_position_index`` and ``attn_mask`` as
    persistent buffers)."""
    if isinstance(model, Mapping):
        source = _unwrap_checkpoint(model)
    else:
        source = _unwrap_model(model).state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, value in source.items():
        name = canonical_key(key)
        if name in out:
            raise RuntimeError(f"two state-dict entries map to the official name {name!r}")
        t = value.detach().to("cpu")
        if t.is_floating_point():
            t = t.to(torch.float32)
        out[name] = t.clone().contiguous()
    return {"model": out}


def save_official_state_dict(model: nn.Module | Mapping[str, torch.Tensor], path: str | os.PathLike) -> dict:
    """Write :func:`official_state_dict` to ``path`` with ``torch.save``; returns what was saved."""
    ckpt = official_state_dict(model)
    path = os.fspath(path)
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    tmp = path + ".tmp"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)
    return ckpt

