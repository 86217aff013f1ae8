"""Memory bound of the sequential attention kernel, forward AND backward (CPB gradient included).

tests/test_kernels.py already checks the LARGEST single (N, N)-shaped tensor at two resolutions.
These tests track every tensor storage's lifetime (scripts.memory_model.LiveMemoryTracker) and
bound the peak of the SUM of live attention-shaped bytes, separately in the forward and in the
backward, so a backward that keeps every chunk's scores (or its bias-gradient partials) alive
until the end would fail here even though each tensor is chunk-sized.
"""
import pytest
import torch

from scripts.memory_model import LiveMemoryTracker
from swinv2.attention import WindowAttention
from swinv2.windows import shifted_window_mask

WS, HEADS, DIM = 4, 2, 24  # N = 16 tokens per window; DIM != N so token tensors never look like scores
N = WS * WS


def _attention_peaks(kernel: str, res: int, chunk: int, batch: int = 1):
    """(forward peak, backward peak) of live bytes in (B*nW-ish, nH, N, N)-shaped tensors, and nW."""
    torch.manual_seed(0)
    attn = WindowAttention(DIM, WS, HEADS, kernel=kernel, sequential_chunk=chunk)
    mask = shifted_window_mask(res, res, WS, WS // 2)
    nw = mask.shape[0]
    x = torch.randn(batch * nw, N, DIM, requires_grad=True)
    params = list(attn.parameters()) + list(attn.buffers()) + [x, mask]
    with LiveMemoryTracker().ignore_existing(params) as tr:
        out = attn(x, mask)
        loss = out.square().sum()
        fwd_end = tr.step
        loss.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    g = attn.cpb_mlp[0].weight.grad  # the CPB gradient (a sum over all windows) reached the MLP
    assert g is not None and g.abs().sum() > 0
    assert tr.step > fwd_end + 5, "the tracker must see the backward ops"

    # attention-shaped: trailing (N, N) with more than one head's worth (the (nH, N, N) bias itself,
    # its fp32 gradient accumulator and a bias+mask chunk slice are chunk-independent constants)
    def scores(shape):
        return len(shape) >= 3 and tuple(shape[-2:]) == (N, N)
    return tr.peak_where(scores, 0, fwd_end), tr.peak_where(scores, fwd_end), nw


@pytest.mark.parametrize("kernel", ["sequential"])
def test_live_score_memory_independent_of_window_count(kernel):
    chunk = 4
    f_small, b_small, nw_small = _attention_peaks(kernel, 16, chunk)
    f_big, b_big, nw_big = _attention_peaks(kernel, 32, chunk)
    assert nw_big == 4 * nw_small == 64
    # bounded by the chunk: a few fp32 (chunk, nH, N, N) buffers + the (nW, N, N)-free constants
    bound = 8 * chunk * HEADS * N * N * 4
    assert 0 < b_big <= bound and 0 < f_big <= bound
    assert b_big == b_small and f_big == f_small


def test_live_score_memory_grows_with_chunk():
    # same resolution (64 windows), chunk 2 vs 8: the chunk-proportional part scales 4x
    f2, b2, _ = _attention_peaks("sequential", 32, 2)
    f8, b8, _ = _attention_peaks("sequential", 32, 8)
    const = HEADS * N * N * 4 * 4  # chunk-independent (nH, N, N) tensors: bias, its grad, a few slices
    assert b8 > b2 and f8 > f2
    assert (b8 - const) >= 3 * (b2 - 0) * 0.9 or b8 >= 3 * b2, (b2, b8)
    assert b8 <= 8 * 8 * HEADS * N * N * 4


def test_tracker_detects_materialised_scores():
    # the same probe on the reference kernel: live score bytes grow with the window count (so the
    # bound above is a real measurement, not a probe that sees nothing)
    _, b_small, nw_small = _attention_peaks("reference", 16, 4)
    _, b_big, nw_big = _attention_peaks("reference", 32, 4)
    full = nw_big * HEADS * N * N * 4  # one fp32 (B*nW, nH, N, N) tensor
    assert b_big >= full and b_big >= 3.5 * b_small
