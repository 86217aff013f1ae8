"""Loading and saving weights in the official SwinV2 format.

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
from typing import Any, Callable

import torch
from torch import nn

from .class_map import load_class_map

__all__ = [
    "CheckpointMismatchError",
    "LoadReport",
    "BUFFER_KEYWORDS",
    "load_official_state_dict",
    "official_state_dict",
    "save_official_state_dict",
    "canonical_key",
    "read_class_map",
    # the loader's steps, in order
    "unwrap_checkpoint",
    "canonicalize_checkpoint",
    "model_key_index",
    "window_transfer_message",
    "plan_head",
    "match_parameters",
]

#: Keys containing one of these are window-dependent buffers: never loaded, always rebuilt.
BUFFER_KEYWORDS = ("relative_position_index", "relative_coords_table", "attn_mask")

#: Path components inserted by wrappers (DDP / DeepSpeed engine, torch.compile, activation
#: checkpointing, FSDP).  None of them is an official module name, so removing them anywhere in a
#: key is safe.
_WRAPPER_COMPONENTS = frozenset(
    {"module", "_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module"}
)

#: Parameters that only exist in SimMIM pre-training weight files (besides ``decoder.*``).
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


def strip_wrappers(key: str) -> str:
    """``key`` without wrapper components (``module``, ``_orig_mod``, checkpoint/FSDP wrappers)."""
    return ".".join(p for p in str(key).split(".") if p not in _WRAPPER_COMPONENTS)


def canonical_key(key: str) -> str:
    """Official name of a (possibly wrapped / SimMIM) state-dict key.

    Removes wrapper components (``module``, ``_orig_mod``, ``_checkpoint_wrapped_module``,
    ``_fsdp_wrapped_module``) anywhere, a leading ``encoder.`` (SimMIM), and renames
    ``rpe_mlp`` -> ``cpb_mlp``.
    """
    parts = strip_wrappers(key).split(".")
    if parts and parts[0] == "encoder":
        parts = parts[1:]
    parts = ["cpb_mlp" if p == "rpe_mlp" else p for p in parts]
    return ".".join(parts)


def _is_buffer_key(key: str) -> bool:
    return any(word in key for word in BUFFER_KEYWORDS)


def unwrap_checkpoint(obj: Any) -> Mapping[str, Any]:
    """Step 1: the state dict inside an official / DeepSpeed / plain checkpoint object (or a path to one)."""
    if isinstance(obj, (str, os.PathLike)):
        # weights_only: a released official file is {"model": tensors}.  Full training
        # files also pickle a yacs config; load those yourself and pass checkpoint["model"].
        obj = torch.load(obj, map_location="cpu", weights_only=True)
    if not isinstance(obj, Mapping):
        raise TypeError(f"expected a state dict (Mapping) or a path, got {type(obj).__name__}")
    for wrapper in ("model", "state_dict", "module"):
        inner = obj.get(wrapper)
        if isinstance(inner, Mapping):
            return unwrap_checkpoint(inner)
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
    """Class map as a 1-D int64 tensor: the source index (into ``num_source`` classes) of every target class.

    Reads every form :func:`swinv2.class_map.load_class_map` reads (the official text
    ``map22kto1k.txt``, JSON list or {source: target} object, a sequence or mapping) and integer
    tensors / arrays."""
    if not isinstance(class_map, (str, os.PathLike, Mapping, list, tuple)):  # tensor, array, ...
        index = torch.as_tensor(class_map)
        if index.is_floating_point() or index.dtype == torch.bool:
            raise TypeError(f"class_map must hold integers, got dtype {index.dtype}")
        class_map = index.to(torch.int64).flatten().cpu().tolist()
    return torch.tensor(load_class_map(class_map).source_indices(num_source), dtype=torch.int64)


def _window_of(coords_table_shape: torch.Size) -> int | None:
    # relative_coords_table is (1, 2W-1, 2W-1, 2)
    if len(coords_table_shape) == 4:
        return (int(coords_table_shape[1]) + 1) // 2
    return None


# --------------------------------------------------------------------------------------------
# loading: pure steps, then load_official_state_dict applies them
# --------------------------------------------------------------------------------------------


@dataclass
class CanonicalCheckpoint:
    """Step 2's result: parameters under official names, and what was left out."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    buffer_shapes: dict[str, torch.Size] = field(default_factory=dict)  # official name -> shape
    dropped_buffers: list[str] = field(default_factory=list)  # checkpoint keys
    messages: list[str] = field(default_factory=list)


def _bare_key(key: Any) -> str:
    return ".".join(p for p in str(key).split(".") if p not in _WRAPPER_COMPONENTS)


def canonicalize_checkpoint(raw: Mapping[str, Any]) -> CanonicalCheckpoint:
    """Step 2: official names (wrappers, SimMIM ``encoder.`` / ``rpe_mlp``), window-dependent buffers
    and SimMIM-only entries set aside. Raises on a non-tensor entry or two entries for one name."""
    out = CanonicalCheckpoint()
    # SimMIM: only the encoder is the backbone (decoder.* is the pixel decoder)
    simmim = any(_bare_key(k).startswith("encoder.") for k in raw)
    renamed, simmim_dropped = 0, []
    for key, value in raw.items():
        key, bare = str(key), _bare_key(key)
        name = canonical_key(key)
        if (simmim and not bare.startswith("encoder.")) or name in _SIMMIM_ONLY:
            simmim_dropped.append(key)
            continue
        renamed += name != bare and "rpe_mlp" in bare
        if _is_buffer_key(name):
            out.dropped_buffers.append(key)
            if torch.is_tensor(value):
                out.buffer_shapes[name] = value.shape
            continue
        if not torch.is_tensor(value):
            raise CheckpointMismatchError(f"checkpoint entry {key!r} is not a tensor ({type(value).__name__})")
        if name in out.tensors:
            raise CheckpointMismatchError(f"checkpoint has two entries for {name!r} (after renaming)")
        out.tensors[name] = value
    out.messages = _canonicalize_messages(renamed, simmim_dropped, out.dropped_buffers)
    return out


def _canonicalize_messages(renamed: int, simmim_dropped: list[str], dropped_buffers: list[str]) -> list[str]:
    messages = []
    if renamed:
        messages.append(f"renamed {renamed} SimMIM 'rpe_mlp' keys to 'cpb_mlp'")
    if simmim_dropped:
        messages.append(f"dropped {len(simmim_dropped)} SimMIM-only keys {_format_keys(simmim_dropped, 6)}")
    if dropped_buffers:
        messages.append(f"dropped {len(dropped_buffers)} window-dependent buffers from the checkpoint; "
                        "the model keeps its own (rebuilt for its window)")
    return messages


def model_key_index(model_sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """Step 3: ({official name: the model's state-dict key} of parameters, {official name: buffer})."""
    targets: dict[str, str] = {}
    buffers: dict[str, torch.Tensor] = {}
    for key, value in model_sd.items():
        name = canonical_key(key)
        if _is_buffer_key(name):
            buffers[name] = value
            continue
        if name in targets:
            raise RuntimeError(f"model keys {targets[name]!r} and {key!r} have the same official name {name!r}")
        targets[name] = key
    return targets, buffers


def window_transfer_message(ckpt_buffer_shapes: Mapping[str, torch.Size],
                            model_buffers: Mapping[str, torch.Tensor]) -> str | None:
    """Step 4: a note when the checkpoint's windows differ from the model's (their buffers are rebuilt)."""
    changed = []
    for name, shape in ckpt_buffer_shapes.items():
        if not name.endswith("relative_coords_table") or name not in model_buffers:
            continue
        src, dst = _window_of(shape), _window_of(model_buffers[name].shape)
        if src is not None and dst is not None and src != dst:
            changed.append((name.rsplit(".attn.", 1)[0], src, dst))
    if not changed:
        return None
    pairs = sorted({(s, d) for _, s, d in changed})
    return ("window transfer: checkpoint windows -> model windows "
            + ", ".join(f"W{s}->W{d}" for s, d in pairs)
            + f" in {len(changed)} blocks; relative position buffers rebuilt for the model "
            "(set pretrained_window_sizes to the checkpoint's windows, as the official fine-tuning configs do)")


@dataclass
class HeadPlan:
    """Step 5's result: what to do with the classification head."""

    action: str  # LoadReport.head_action: "loaded", "mapped_22k_to_1k", "reinitialised", "absent"
    values: dict[str, torch.Tensor] = field(default_factory=dict)  # head.weight / head.bias to load
    messages: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # also in messages; the loader warns with them

    @property
    def reinit(self) -> bool:
        return self.action == "reinitialised"


def plan_head(ckpt_head: Mapping[str, torch.Tensor], model_head: Mapping[str, torch.Tensor] | None,
              class_map: Any = None) -> HeadPlan:
    """Step 5: the checkpoint's ``head.*`` against the model's (None: the model has no head).

    Same shapes: load; 21841 -> 1000 rows with a class map: select rows; anything else: re-initialise."""
    if model_head is None:
        plan = HeadPlan("absent")
        if ckpt_head:
            plan.messages.append(f"model has no classification head; dropped checkpoint {sorted(ckpt_head)}")
        return plan
    mw, mb = model_head["head.weight"], model_head["head.bias"]
    cw, cb = ckpt_head.get("head.weight"), ckpt_head.get("head.bias")
    if cw is None or cb is None:
        return _reinit_plan(f"checkpoint has no complete head ({sorted(ckpt_head) or 'no head keys'}); "
                            f"re-initialising the model head {tuple(mw.shape)}")
    if cw.shape == mw.shape and cb.shape == mb.shape:
        return HeadPlan("loaded", {"head.weight": cw, "head.bias": cb})
    is_22k_to_1k = cw.ndim == 2 and cw.shape[0] == _NUM_22K and mw.shape[0] == _NUM_1K
    if class_map is not None and is_22k_to_1k and cw.shape[1] == mw.shape[1] and cb.shape == (_NUM_22K,):
        return _class_map_plan(cw, cb, class_map)
    hint = " (pass class_map=map22kto1k.txt to keep the 22K->1K classifier)" if is_22k_to_1k and class_map is None else ""
    return _reinit_plan(f"head shape mismatch: checkpoint head.weight {tuple(cw.shape)} / head.bias "
                        f"{tuple(cb.shape)} vs model {tuple(mw.shape)} / {tuple(mb.shape)}; "
                        f"re-initialising the model head{hint}")


def _reinit_plan(warning: str) -> HeadPlan:
    return HeadPlan("reinitialised", messages=[warning], warnings=[warning])


def _class_map_plan(cw: torch.Tensor, cb: torch.Tensor, class_map: Any) -> HeadPlan:
    index = read_class_map(class_map, _NUM_22K)
    if index.numel() != _NUM_1K:
        raise ValueError(f"class_map has {index.numel()} entries; expected {_NUM_1K}")
    return HeadPlan("mapped_22k_to_1k", {"head.weight": cw.index_select(0, index), "head.bias": cb.index_select(0, index)},
                    messages=[f"head: selected {_NUM_1K} of {_NUM_22K} rows with the class map"])


@dataclass
class KeyMatch:
    """Step 6's result: checkpoint parameters (head excluded) against the model's."""

    values: dict[str, torch.Tensor]  # official name -> value, shapes equal
    missing: list[str]
    unexpected: list[str]
    mismatched: list[str]  # "name: checkpoint (..) vs model (..)"

    def problems(self) -> list[str]:
        out = []
        if self.missing:
            out.append(f"missing keys (in the model, not in the checkpoint): {_format_keys(self.missing)}")
        if self.unexpected:
            out.append(f"unexpected keys (in the checkpoint, not in the model): {_format_keys(self.unexpected)}")
        if self.mismatched:
            more = len(self.mismatched) - _MAX_LISTED
            out.append("shape mismatch: " + "; ".join(self.mismatched[:_MAX_LISTED])
                       + (f"; ... and {more} more" if more > 0 else ""))
        return out


def match_parameters(ckpt: Mapping[str, torch.Tensor], targets: Mapping[str, str],
                     model_sd: Mapping[str, torch.Tensor]) -> KeyMatch:
    """Step 6: which non-head checkpoint parameters load, and which keys / shapes do not match."""
    expected = {n for n in targets if n not in _HEAD_KEYS}
    match = KeyMatch({}, sorted(expected - ckpt.keys()), sorted(ckpt.keys() - expected), [])
    for name in sorted(expected & ckpt.keys()):
        have, want = ckpt[name].shape, model_sd[targets[name]].shape
        if have != want:
            match.mismatched.append(f"{name}: checkpoint {tuple(have)} vs model {tuple(want)}")
        else:
            match.values[name] = ckpt[name]
    return match


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
            the 22K classes (sequence, tensor, or path to ``map22kto1k.txt``; see swinv2.class_map).
        strict: raise :class:`CheckpointMismatchError` on missing / unexpected parameter keys and
            on shape mismatches (the head is handled separately, see module docs).  With
            ``strict=False`` these are skipped and listed in the report.
        head_init: how a mismatched head is re-initialised: ``"trunc_normal"`` (weight
            trunc-normal std 0.02, bias 0: the model's own init) or ``"zeros"`` (weight and bias
            0, as the official ``load_pretrained`` does).

    Returns:
        a :class:`LoadReport`.
    """
    if head_init not in _HEAD_INITS:
        raise ValueError(f"head_init must be 'trunc_normal' or 'zeros', got {head_init!r}")
    ckpt = canonicalize_checkpoint(unwrap_checkpoint(state_dict))
    model_sd = model.state_dict()  # shares storage with the parameters: the head is re-initialised through it
    targets, model_buffers = model_key_index(model_sd)
    transfer = window_transfer_message(ckpt.buffer_shapes, model_buffers)
    body = {k: v for k, v in ckpt.tensors.items() if k not in _HEAD_KEYS}
    has_head = all(k in targets for k in _HEAD_KEYS)
    head = plan_head({k: ckpt.tensors[k] for k in _HEAD_KEYS if k in ckpt.tensors},
                     {k: model_sd[targets[k]] for k in _HEAD_KEYS} if has_head else None, class_map)
    for message in head.warnings:
        warnings.warn(message, stacklevel=2)
    match = match_parameters(body, targets, model_sd)
    problems = match.problems()
    if problems and strict:
        raise CheckpointMismatchError("checkpoint does not match the model: " + " | ".join(problems))
    values = {**head.values, **match.values}
    _copy_into(model, model_sd, targets, values, head_init if head.reinit else None)
    return LoadReport(
        loaded=sorted(values), dropped_buffers=ckpt.dropped_buffers, head_action=head.action,
        messages=(ckpt.messages + ([transfer] if transfer else []) + head.messages
                  + ["ignored (strict=False): " + p for p in problems]
                  + ([_HEAD_INITS[head_init]] if head.reinit else [])),
        missing=match.missing, unexpected=match.unexpected, mismatched=match.mismatched)


_HEAD_INITS = {"trunc_normal": "head re-initialised: weight trunc_normal(std=0.02), bias 0",
               "zeros": "head re-initialised: weight 0, bias 0 (official load_pretrained)"}


@torch.no_grad()
def _copy_into(model: nn.Module, model_sd: Mapping[str, torch.Tensor], targets: Mapping[str, str],
               values: Mapping[str, torch.Tensor], reinit_head: str | None) -> None:
    """Step 7 (the only one with effects): copy `values` (official names) into the model, then
    re-initialise the head if asked (``"trunc_normal"`` or ``"zeros"``)."""
    result = model.load_state_dict({targets[name]: value for name, value in values.items()}, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys  # by construction
    if reinit_head is None:
        return
    weight, bias = model_sd[targets["head.weight"]], model_sd[targets["head.bias"]]
    if reinit_head == "zeros":
        weight.zero_()
    else:
        nn.init.trunc_normal_(weight, std=0.02)
    bias.zero_()


# --------------------------------------------------------------------------------------------
# saving
# --------------------------------------------------------------------------------------------


def portable_state_dict(model: nn.Module | Mapping[str, torch.Tensor], rename: Callable[[str], str],
                        format_name: str) -> dict[str, dict[str, torch.Tensor]]:
    """``{"model": state_dict}`` of a model or a state dict, keys passed through ``rename``:
    contiguous CPU tensors, floating point as fp32, buffers included. The one writer behind the
    official classification and SimMIM formats."""
    source = unwrap_checkpoint(model) if isinstance(model, Mapping) else _unwrap_model(model).state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, value in source.items():
        name = rename(key)
        if name in out:
            raise RuntimeError(f"two state-dict entries map to the {format_name} name {name!r}")
        t = value.detach().to("cpu")
        out[name] = (t.to(torch.float32) if t.is_floating_point() else t).clone().contiguous()
    return {"model": out}


def write_checkpoint(ckpt: dict, path: str | os.PathLike) -> dict:
    """``torch.save`` to ``path`` atomically (a temporary file, then a rename); returns ``ckpt``."""
    path = os.fspath(path)
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    torch.save(ckpt, path + ".tmp")
    os.replace(path + ".tmp", path)
    return ckpt


def official_state_dict(model: nn.Module | Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``{"model": state_dict}`` in the official format: official key names (wrapper prefixes
    removed), contiguous CPU tensors, floating point as fp32, buffers included (the official code
    registers ``relative_coords_table``, ``relative_position_index`` and ``attn_mask`` as
    persistent buffers)."""
    return portable_state_dict(model, canonical_key, "official")


def save_official_state_dict(model: nn.Module | Mapping[str, torch.Tensor], path: str | os.PathLike) -> dict:
    """Write :func:`official_state_dict` to ``path`` with ``torch.save``; returns what was saved."""
    return write_checkpoint(official_state_dict(model), path)
