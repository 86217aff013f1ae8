"""Memory bound of the sequential attention kernel, forward AND backward (CPB gradient included).

tests/test_kernels.py already checks the LARGEST single (N, N)-shaped tensor at two resolutions.
These tests track every tensor storage's lifetime (swinv2_tools.live_memory.LiveMemoryTracker) and
bound the peak of the SUM of live attention-shaped bytes, separately in the forward and in the
backward, so a backward that keeps every chunk's scores (or its bias-gradient partials) alive
until the end would fail here even though each tensor is chunk-sized.
"""
import pytest
import torch

from swinv2_tools.live_memory import LiveMemoryTracker
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


UNIT = HEADS * N * N * 4  # bytes of one fp32 (nH, N, N) head-set of scores


@pytest.mark.parametrize("kernel", ["sequential"])
def test_live_score_memory_independent_of_window_count(kernel):
    chunk = 4
    f_small, b_small, nw_small = _attention_peaks(kernel, 16, chunk)
    f_big, b_big, nw_big = _attention_peaks(kernel, 32, chunk)
    assert nw_big == 4 * nw_small == 64
    # 4x the windows, same chunk: the same live score memory, forward and backward
    assert b_big == b_small and f_big == f_small
    # and that memory is a few chunks' worth, far below one materialised (B*nW, nH, N, N) tensor
    assert 0 < f_big <= (4 + 4 * chunk) * UNIT and 0 < b_big <= (4 + 5 * chunk) * UNIT
    assert b_big < nw_big * UNIT / 2


@pytest.mark.parametrize("kernel", ["sequential"])
def test_live_score_memory_linear_in_chunk(kernel):
    # same input (64 windows), chunk 2, 4, 8: peak = constant + slope * chunk, exactly linear,
    # with a constant of a few (nH, N, N) tensors (bias, its gradient, a bias+mask slice)
    peaks = {c: _attention_peaks(kernel, 32, c)[:2] for c in (2, 4, 8)}
    for phase in (0, 1):
        p2, p4, p8 = (peaks[c][phase] for c in (2, 4, 8))
        slope = (p4 - p2) / 2
        assert slope > 0
        assert p8 == pytest.approx(p4 + 4 * slope, rel=0.02)
        assert p2 - 2 * slope <= 4 * UNIT


def test_probe_sees_materialised_scores_of_reference_kernel():
    # the same probe on the reference kernel grows with the window count, forward and backward:
    # the bounds above are a real measurement, not a probe that sees nothing
    f_small, b_small, _ = _attention_peaks("reference", 16, 4)
    f_big, b_big, nw_big = _attention_peaks("reference", 32, 4)
    assert f_big >= nw_big * UNIT and b_big >= nw_big * UNIT
    assert f_big >= 3.5 * f_small and b_big >= 3.5 * b_small
