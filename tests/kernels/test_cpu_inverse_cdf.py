"""The CPU inverse-CDF sampling kernel against a float64 numpy reference of its definition."""

import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels.cpu as cpu_kernels
from pallas_kernels.cpu import inverse_cdf as cpu_cdf

# Skipped only where no CPU kernel builds at all (no compiler, not x86-64 Linux...): where the
# attention kernel builds, this one must too, so a broken build fails here instead of hiding.
pytestmark = pytest.mark.skipif(not cpu_kernels.is_available(), reason="CPU kernels do not build here")


def test_kernel_builds_where_the_attention_kernel_does():
    assert cpu_cdf.is_available(), cpu_cdf._state.get("error")


def reference(logits, temp, thr, u):
    """Per row: (token, ambiguous) -- the first kept token whose running mass exceeds u * total;
    ambiguous when u * total lies within rounding of a boundary between two tokens."""
    out, amb = [], []
    for row, t, th, q in zip(logits.astype(np.float64), temp, thr, u, strict=True):
        x = (row.astype(np.float32) / np.float32(t)).astype(np.float64)
        m = np.nanmax(np.where(np.isnan(x), -np.inf, x))
        th = m if np.isnan(th) else th
        keep = (x >= th) & (x > -np.inf)
        if not keep.any():
            out.append(len(x) - 1), amb.append(False)
            continue
        w = np.where(keep, np.exp(np.where(keep, x - m, 0.0)), 0.0)
        cs = np.cumsum(w)
        target = q * cs[-1]
        idx = int(np.searchsorted(cs, target, side="right"))
        idx = min(idx, int(np.flatnonzero(keep)[-1]))
        out.append(idx)
        amb.append(bool(np.min(np.abs(cs[keep] - target)) <= 1e-5 * cs[-1]))
    return np.array(out), np.array(amb)


def draw(logits, temp, thr, u):
    return np.asarray(cpu_cdf.inverse_cdf(*(jnp.asarray(a) for a in (logits, temp, thr, u))))


@pytest.mark.parametrize("vocab", [7, 256, 600, 4099])
def test_matches_reference(vocab):
    rng = np.random.default_rng(vocab)
    s = 64
    logits = (rng.normal(size=(s, vocab)) * rng.choice([0.1, 1.0, 5.0], size=(s, 1))).astype(np.float32)
    logits[rng.random((s, vocab)) < 0.05] = -np.inf
    temp = rng.choice([0.3, 0.7, 1.0, 1.5], size=s).astype(np.float32)
    x = logits / temp[:, None]
    # thresholds: none, a value of the row (top-k/top-p style), or the maximum (greedy: NaN)
    kind = rng.integers(0, 3, size=s)
    kth = np.sort(np.where(np.isfinite(x), x, -np.inf), axis=1)[:, -min(5, vocab)]
    thr = np.where(kind == 0, -np.inf, np.where(kind == 1, kth, np.nan)).astype(np.float32)
    u = rng.random(s).astype(np.float32)
    u[:4] = 0.0
    got = draw(logits, temp, thr, u)
    want, amb = reference(logits, temp, thr, u)
    assert (~amb).sum() > s // 2
    np.testing.assert_array_equal(got[~amb], want[~amb])
    # never a masked token
    xs = x[np.arange(s), got]
    thr_eff = np.where(np.isnan(thr), np.max(np.where(np.isfinite(x), x, -np.inf), axis=1), thr)
    assert np.all(xs >= thr_eff) and np.all(xs > -np.inf)


def test_first_kept_token_and_edge_rows():
    v = 40
    logits = np.zeros((4, v), np.float32)
    logits[0, [3, 9]] = 2.0  # greedy row (thr NaN, and the sampler gives it u = 0): first argmax
    logits[1] = -np.inf  # nothing kept: last token
    logits[2, :] = -np.inf
    logits[2, [5, 17]] = [1.0, 0.5]  # u just below 1: the last kept token
    logits[3, 12] = np.nan  # NaN is never kept; u = 0 -> first kept token
    temp = np.ones(4, np.float32)
    thr = np.array([np.nan, -np.inf, -np.inf, -np.inf], np.float32)
    u = np.array([0.0, 0.5, np.nextafter(np.float32(1), np.float32(0)), 0.0], np.float32)
    got = draw(logits, temp, thr, u)
    assert got.tolist() == [3, v - 1, 17, 0]


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"\[S, V\]"):
        cpu_cdf.inverse_cdf(jnp.zeros((4,)), jnp.ones(4), jnp.zeros(4), jnp.zeros(4))
