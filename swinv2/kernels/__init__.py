"""Attention kernels: interchangeable implementations of one function over windows.

Every kernel is called as ``kernel(q, k, v, bias, mask, attn_drop=0.0, chunk=0) -> (B_, nH, N, hd)``:

* q, k, v: (B_, nH, N, hd) with B_ = B * nW, the windows of one image contiguous (window_partition
  order); q already carries the attention scale (the module folds it in);
* bias: (nH, N, N), the position bias shared by all windows (it gets a gradient);
* mask: None, a dense additive (nW, N, N) window mask, or a :class:`~swinv2.windows.RegionMask`
  (the same mask as region ids, built per chunk of windows, never whole);
* attn_drop: dropout on the probabilities (0 in eval); chunk: windows per chunk (``sequential``).

``reference`` (``reference.py``) is the readable definition, written like the official code.
``fused`` and ``sequential`` (``windowed.py``) compute the same values with device-tuned code, a
``torch.library`` custom op (``swinv2::window_attention``) that ``torch.compile`` takes whole;
tests/test_kernels.py holds them to the reference (forward and every gradient), and
tests/test_compile_kernels.py compiled to eager, without graph breaks or recompilation.
``split_heads_cosine`` (``qk.py``) is the module's projection step for cosine attention: the head
split and s * normalize(q), normalize(k) as one autograd function; ``split_heads`` is the split alone
(dot attention) and ``scaled_cosine_qk`` the normalisation alone. All have hand-written backward
passes, held to their readable autograd forms by the same tests and tests/test_bf16.py.
"""
from __future__ import annotations

from typing import Callable

from ..config import ATTENTION_KERNELS
from .qk import scaled_cosine_qk, split_heads, split_heads_cosine
from .reference import reference_attention
from .windowed import fused_attention, sequential_attention

KERNELS: dict[str, Callable] = {
    "reference": reference_attention,
    "fused": fused_attention,
    "sequential": sequential_attention,
}
assert tuple(KERNELS) == ATTENTION_KERNELS

__all__ = ["KERNELS", "reference_attention", "fused_attention", "sequential_attention", "split_heads",
           "scaled_cosine_qk", "split_heads_cosine"]
