"""Activation checkpointing applied from outside the model.

Each selected block gets an instance-level `forward` that runs the class's forward under
non-reentrant `torch.utils.checkpoint`. No module is wrapped or renamed, so `state_dict()` keys are
unchanged, forward hooks on the block (probes) still fire exactly once per forward, and the block's
own code carries no checkpoint flag.

Granularity: ``"block"`` (default) recomputes the whole block in its backward; ``"half"`` makes the
attention half (x + DropPath(attention branch)) and the MLP half (x + DropPath(MLP branch), extra
norm) two checkpoint regions, so the backward holds one half's recomputed activations at a time
(peak working set roughly halved, at the cost of saving the block's middle residual stream).
Same operations in the same order, so outputs and RNG use (drop path) are identical.

``"selective"`` recomputes the whole block but with torch's selective-checkpoint contexts: the
outputs of the matrix products (aten mm/addmm/bmm/baddbmm and the fused attention ops
``_scaled_dot_product_*``, including those inside the kernels' autograd Functions) are kept from the
forward; everything else (LayerNorm, GELU, softmax, the cosine-attention normalisation, copies and
views) is recomputed in the backward. The expensive FLOPs run once, the many pointwise temporaries
are not held, so memory lands between no checkpointing and ``"block"`` at close to no-checkpoint time.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from .kernels.windowed import window_attention_op
from .model import iter_blocks

_FLAG = "_swinv2_activation_checkpointing"
_RELU_FLAG = "_swinv2_selective_relu_out_of_place"
GRANULARITIES = ("block", "half", "selective")


def _checkpointed_forward(block: nn.Module):
    plain = type(block).forward  # the unbound class forward; recompute calls it without hooks

    def forward(*args, **kwargs):
        if not torch.is_grad_enabled():  # nothing to save for backward: skip the bookkeeping
            return plain(block, *args, **kwargs)
        return checkpoint(plain, block, *args, use_reentrant=False, **kwargs)

    return forward


def _matmul_ops() -> frozenset:
    """The ops whose outputs "selective" keeps: every matrix product and fused attention, ours
    (the chunked kernels' custom op) included. Looked up by name because the set of
    `_scaled_dot_product_*` overloads differs between builds."""
    aten = torch.ops.aten
    names = ["mm", "addmm", "bmm", "baddbmm", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_efficient_attention",
             "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_fused_attention_overrideable"]
    ops = [getattr(aten, n).default for n in names if hasattr(aten, n)]
    return frozenset([*ops, window_attention_op._opoverload])


SELECTIVE_SAVE_OPS = _matmul_ops()


def _save_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    # PREFER_*: torch.compile's partitioner may still override; eager follows it exactly
    return CheckpointPolicy.MUST_SAVE if op in SELECTIVE_SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_contexts():
    return create_selective_checkpoint_contexts(_save_matmuls)


def _selective_forward(block: nn.Module):
    plain = type(block).forward
    # A kept output must not be changed in place later (torch refuses to replay it): the CPB MLP's
    # ReLU(inplace=True) writes into its Linear's output. Out of place it computes the same values.
    for m in block.modules():
        if isinstance(m, nn.ReLU) and m.inplace:
            m.inplace = False
            setattr(m, _RELU_FLAG, True)  # restored by remove_activation_checkpointing

    def forward(*args, **kwargs):
        if not torch.is_grad_enabled():
            return plain(block, *args, **kwargs)
        return checkpoint(plain, block, *args, use_reentrant=False, context_fn=_selective_contexts, **kwargs)

    return forward


def _checkpointed_halves_forward(block: nn.Module):
    cls = type(block)
    plain, attn_half, mlp_half = cls.forward, cls.forward_attention_half, cls.forward_mlp_half

    def forward(x):
        if not torch.is_grad_enabled():
            return plain(block, x)
        block.check_input(x)
        x = checkpoint(attn_half, block, x, use_reentrant=False)
        return checkpoint(mlp_half, block, x, use_reentrant=False)

    return forward


_FORWARDS = {"block": _checkpointed_forward, "half": _checkpointed_halves_forward, "selective": _selective_forward}


def apply_activation_checkpointing(model: nn.Module, every: int = 1, stages: Optional[Iterable[int]] = None,
                                   granularity: str = "block") -> int:
    """Checkpoint the blocks whose global index (as in `iter_blocks`) is a multiple of `every`,
    optionally only those in `stages`, as one region per block (`granularity="block"`), two
    (`"half"`: attention half and MLP half) or one region that keeps the matrix products' outputs
    and recomputes the rest (`"selective"`). Idempotent (an already checkpointed block is left as it
    is); returns the number of blocks checkpointed by this call."""
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    n_stages = len(model.layers)
    selected = set(range(n_stages)) if stages is None else set(stages)
    bad = sorted(s for s in selected if not 0 <= s < n_stages)
    if bad:
        raise ValueError(f"stages {bad} out of range: the model has stages 0..{n_stages - 1}")
    wrapped = 0
    for ref in iter_blocks(model):
        blk = ref.block
        if ref.stage not in selected or ref.index % every or getattr(blk, _FLAG, False):
            continue
        blk.forward = _FORWARDS[granularity](blk)
        setattr(blk, _FLAG, True)
        wrapped += 1
    return wrapped


def remove_activation_checkpointing(model: nn.Module) -> int:
    """Undo apply_activation_checkpointing; returns the number of blocks restored."""
    restored = 0
    for blk in (ref.block for ref in iter_blocks(model)):
        if getattr(blk, _FLAG, False):
            del blk.forward
            delattr(blk, _FLAG)
            for m in blk.modules():
                if getattr(m, _RELU_FLAG, False):
                    m.inplace = True
                    delattr(m, _RELU_FLAG)
            restored += 1
    return restored


def is_checkpointed(block: nn.Module) -> bool:
    return bool(getattr(block, _FLAG, False))
