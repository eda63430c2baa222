"""Property tests (hypothesis) for the gates and aligners over shapes and magnitudes up to 1e4: every output is
finite, the gate lies in [0, 1], the mixing weight in [0, lambda], and m lies between q and p."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hkt_hf.mixture import GATES, STATIC_PARENT_WEIGHT, build_gate
from hkt_hf.transfer import build_aligner, match_size

FAST = settings(max_examples=50, deadline=None)
MAX_MAGNITUDE = 1e4

# Per-sample feature shapes: vectors [C], tokens [N, D] and maps [C, H, W].
dims = st.integers(1, 12)
sample_shapes = st.one_of(
    st.tuples(dims), st.tuples(dims, dims), st.tuples(dims, st.integers(1, 6), st.integers(1, 6))
)
magnitudes = st.floats(1e-6, MAX_MAGNITUDE)


def features(shape: tuple[int, ...], scale: float, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Gaussian features times `scale`, with a batch of 3."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(3, *shape, generator=g) * scale).to(dtype)


@FAST
@given(
    name=st.sampled_from(sorted(GATES)), shape=sample_shapes, q_scale=magnitudes, p_scale=magnitudes,
    lam=st.floats(0.0, 1.0), seed=st.integers(0, 2**16), half=st.booleans(),
)
def test_gates_stay_finite_and_in_range(name, shape, q_scale, p_scale, lam, seed, half):
    dtype = torch.bfloat16 if half else torch.float32
    q, p = features(shape, q_scale, seed, dtype), features(shape, p_scale, seed + 1, dtype)
    channels = shape[0] if len(shape) == 3 else shape[-1]
    gate = build_gate(name, channels, lam)
    out = gate(q, p)

    assert out.mixed.dtype == torch.float32 and out.mixed.shape == q.shape
    assert torch.isfinite(out.mixed).all() and torch.isfinite(out.gate).all() and torch.isfinite(out.weight).all()
    assert ((out.gate >= 0) & (out.gate <= 1)).all()
    if name == "static":
        cap = STATIC_PARENT_WEIGHT
    elif name == "learned":  # lambda is trainable, sigmoid(theta), initialised to lam kept inside (0, 1)
        cap = float(torch.sigmoid(gate.lam_logit.detach()))
    else:
        cap = lam
    assert ((out.weight >= 0) & (out.weight <= cap + 1e-6)).all()
    # m = q + w (p - q) with w in [0, 1]: each element lies between q and p (up to float32 rounding).
    qf, pf = q.float(), p.float()
    slack = 1e-5 * (qf.abs() + pf.abs()) + 1e-6
    assert (out.mixed >= torch.minimum(qf, pf) - slack).all() and (out.mixed <= torch.maximum(qf, pf) + slack).all()


same_kind_pairs = st.one_of(
    st.tuples(st.tuples(dims), st.tuples(dims)),
    st.tuples(st.tuples(dims, dims), st.tuples(dims, dims)),
    st.tuples(
        st.tuples(dims, st.integers(1, 8), st.integers(1, 8)), st.tuples(dims, st.integers(1, 8), st.integers(1, 8))
    ),
)


@FAST
@given(pair=same_kind_pairs, scale=magnitudes, seed=st.integers(0, 2**16))
def test_aligners_map_any_same_kind_shapes_to_finite_features(pair, scale, seed):
    """Channels by the aligner, spatial size by `match_size`; tokens keep their length (parent and child tokens must
    be aligned), so token pairs take the source length."""
    src, dst = pair
    if len(src) == 2:
        dst = (src[0], dst[1])
    torch.manual_seed(seed)
    aligner = build_aligner(src, dst)
    x = features(src, scale, seed)
    y = match_size(aligner(x), torch.zeros(3, *dst))
    assert y.shape == (3, *dst)
    assert torch.isfinite(y).all()
    if src == dst:
        assert torch.equal(y, x)


@FAST
@given(
    name=st.sampled_from(sorted(GATES)), shape=sample_shapes, scale=magnitudes, lam=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_gate_gradients_are_finite(name, shape, scale, lam, seed):
    """Training through a saturated gate must not produce NaN gradients either."""
    q = features(shape, scale, seed).requires_grad_(True)
    p = features(shape, scale, seed + 1).requires_grad_(True)
    gate = build_gate(name, shape[0] if len(shape) == 3 else shape[-1], lam)
    out = gate(q, p)
    (out.mixed.sum() + out.gate.sum()).backward()
    grads = [q.grad, p.grad, *(param.grad for param in gate.parameters())]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
