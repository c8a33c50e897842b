"""Compiled (numba) kernels of :mod:`cd_sfm.matching`: the top-k lists of the rows and columns of a similarity tile
in one pass, exact dot products of candidate pairs, and the top-2 of a list. Imported lazily by ``matching``; without
numba the matcher falls back to :func:`cd_sfm.matching.match_descriptors_reference`.

Every kernel releases the GIL (threads over row bands). The comparisons are exact; the similarity tiles come from
BLAS and the rescoring dot products are vectorised, so values can differ across CPUs by float rounding only, never
between two computations of the same pair in one run.
"""

from __future__ import annotations

import numpy as np
from numba import njit

_jit = njit(nogil=True, cache=True, boundscheck=False)

CHUNK = 8  # columns tested at once (one vectorised comparison) before the scalar update


@_jit
def _insert(vals, idx, pos, a, v, k):
    """Put (v, k) in list ``a``'s slot ``pos[a]`` (its smallest value); point ``pos[a]`` at the new smallest and
    return it."""
    p = pos[a]
    vals[a, p] = v
    idx[a, p] = k
    p = 0
    mv = vals[a, 0]
    for t in range(1, vals.shape[1]):
        if vals[a, t] < mv:
            mv = vals[a, t]
            p = t
    pos[a] = p
    return mv


@_jit
def _hit_chunks(row, thr, cmin, hits):
    """Indices of the CHUNK-column chunks of ``row`` holding a value above ``thr`` or above its column's bar ``cmin``
    (into ``hits``; the ragged last chunk is always listed); returns their number. Vectorised, no stores."""
    m = row.shape[0]
    nh = 0
    full = m // CHUNK
    for c in range(full):
        h = 0
        for q in range(CHUNK):
            v = row[c * CHUNK + q]
            h |= np.int32(v > thr) | np.int32(v > cmin[c * CHUNK + q])
        if h:
            hits[nh] = c
            nh += 1
    if full * CHUNK < m:
        hits[nh] = full
        nh += 1
    return nh


@_jit
def topk_tile(S, r0, c0, rows, cols):
    """Fold the tile ``S`` (rows ``r0..``, columns ``c0..`` of the similarity matrix) into the row lists ``rows`` and
    the column lists ``cols``, each a tuple (values (N, T) float32, indices (N, T) int32, bar (N,) float32, slot of
    the bar (N,) int64): the T largest values seen so far, in no order, with their column / row index, and their
    minimum, which a new value must pass. A value enters only when strictly larger than that bar, so on ties the
    first index seen (rows and columns are visited in increasing order) stays, as ``argmax`` decides."""
    rv, ri, rmin, rpos = rows
    cv, ci, cmin, cpos = cols
    b, m = S.shape
    cm = cmin[c0 : c0 + m]
    hits = np.empty((m + CHUNK - 1) // CHUNK, np.int64)
    for r in range(b):
        i = r0 + r
        row = S[r]
        thr = rmin[i]
        nh = _hit_chunks(row, thr, cm, hits)
        for h in range(nh):
            j0 = hits[h] * CHUNK
            for j in range(j0, min(j0 + CHUNK, m)):
                v = row[j]
                if v > thr:
                    thr = _insert(rv, ri, rpos, i, v, c0 + j)
                if v > cm[j]:
                    cm[j] = _insert(cv, ci, cpos, c0 + j, v, i)
        rmin[i] = thr


@njit(nogil=True, cache=True, boundscheck=False, fastmath={"reassoc", "contract", "nsz"})
def _dot(a, b):
    """float32 dot product of two rows, vectorised (the order of the sum follows the CPU's vector width: the same
    within a run, float rounding apart across CPUs)."""
    s = np.float32(0.0)
    for k in range(a.shape[0]):
        s += a[k] * b[k]
    return s


@_jit
def rescore(d0, d1, ri, ci):
    """Exact similarities of the candidate lists ``ri`` (N0, T; entry [i, t] indexes ``d1``) and ``ci`` (N1, T2;
    entry [j, t] indexes ``d0``): (N0, T) and (N1, T2) float32, -inf where the index is < 0. A pair gets the very
    same value from either list."""
    rv = np.full(ri.shape, -np.inf, np.float32)
    for i in range(ri.shape[0]):
        for t in range(ri.shape[1]):
            if ri[i, t] >= 0:
                rv[i, t] = _dot(d0[i], d1[ri[i, t]])
    cv = np.full(ci.shape, -np.inf, np.float32)
    for j in range(ci.shape[0]):
        for t in range(ci.shape[1]):
            if ci[j, t] >= 0:
                cv[j, t] = _dot(d0[ci[j, t]], d1[j])
    return rv, cv


@_jit
def top2(vals, idx):
    """Per list (row of ``vals``/``idx``; entries with idx < 0 are empty): the largest value, its index (the smallest
    index among equal largest values) and the second largest value counting repeats (-inf / -1 when empty)."""
    n, T = vals.shape
    best = np.full(n, -np.inf, np.float32)
    arg = np.full(n, -1, np.int64)
    second = np.full(n, -np.inf, np.float32)
    for a in range(n):
        bp = -1
        for t in range(T):
            k = idx[a, t]
            if k < 0:
                continue
            v = vals[a, t]
            if bp < 0 or v > vals[a, bp] or (v == vals[a, bp] and k < idx[a, bp]):
                bp = t
        if bp < 0:
            continue
        best[a] = vals[a, bp]
        arg[a] = idx[a, bp]
        s = -np.inf
        for t in range(T):
            if t != bp and idx[a, t] >= 0 and vals[a, t] > s:
                s = vals[a, t]
        second[a] = s
    return best, arg, second
