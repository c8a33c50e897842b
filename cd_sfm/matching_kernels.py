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
from numba.cpython.unsafe.numbers import trailing_zeros  # tzcnt (numba's own intrinsic, there since 0.47)

_jit = njit(nogil=True, cache=True, boundscheck=False)

@_jit
def _insert(vals, idx, pos, a, v, k):
    """Put (v, k) in list ``a``'s slot ``pos[a]`` (its smallest value); point ``pos[a]`` at the new smallest and
    return it."""
    p = pos[a]
    vals[a, p] = v
    idx[a, p] = k
    p = 0
    mv = vals[a, 0]
    for t in range(1, vals.shape[1]):  # selects, no branches (the comparisons are unpredictable)
        x = vals[a, t]
        lt = x < mv
        p = t if lt else p
        mv = x if lt else mv
    pos[a] = p
    return mv


@_jit
def topk_tile(S, r0, c0, rows, cols):
    """Fold the tile ``S`` (rows ``r0..``, columns ``c0..`` of the similarity matrix) into the row lists ``rows`` and
    the column lists ``cols``, each a tuple (values (N, T) float32, indices (N, T) int32, bar (N,) float32, slot of
    the bar (N,) int64): the T largest values seen so far, in no order, with their column / row index, and their
    minimum, which a new value must pass. A value enters only when strictly larger than that bar, so among equal
    largest values the first index seen (rows and columns are visited in increasing order) stays, as ``argmax``
    decides; which of several values equal to the T-th largest stays is not specified.

    Per row: one vectorised pass flags the values above the row's or their column's bar (bytes, read back 8 at a
    time as one uint64), then only flagged values are looked at one by one, found by their trailing zero count (no
    branch per byte). Flags past the row's end stay 0."""
    rv, ri, rmin, rpos = rows
    cv, ci, cmin, cpos = cols
    b, m = S.shape
    cm = cmin[c0 : c0 + m]  # a slice, indexed from 0 in the loops: vectorisable (no negative-index checks)
    m8 = (m + 7) // 8
    flags = np.zeros(m8 * 8, np.uint8)
    words = flags.view(np.uint64)
    one = np.uint64(1)
    for r in range(b):
        i = r0 + r
        row = S[r]
        thr = rmin[i]
        for j in range(m):
            flags[j] = np.uint8(row[j] > thr) | np.uint8(row[j] > cm[j])
        for w in range(m8):
            x = words[w]  # in a register: re-reading the flag bytes would stall on the vector store
            while x:  # each set flag (bit 0 of its byte), in increasing column order
                j = w * 8 + (trailing_zeros(x) >> 3)
                x &= x - one
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
def _transpose_lists(idx, n):
    """CSR (start (n + 1,), members) of the lists ``idx`` (M, T) turned around: for each k < n, the a with k in
    idx[a]."""
    start = np.zeros(n + 1, np.int64)
    for a in range(idx.shape[0]):
        for t in range(idx.shape[1]):
            if idx[a, t] >= 0:
                start[idx[a, t] + 1] += 1
    for k in range(n):
        start[k + 1] += start[k]
    members = np.empty(start[n], np.int64)
    fill = start[:n].copy()
    for a in range(idx.shape[0]):
        for t in range(idx.shape[1]):
            k = idx[a, t]
            if k >= 0:
                members[fill[k]] = a
                fill[k] += 1
    return start, members


@_jit
def _push(v, k, best, arg, second):
    """Fold (v, k) into a running (best, arg, second): larger values first, the smaller index on ties."""
    if arg < 0 or v > best or (v == best and k < arg):
        if arg >= 0:
            second = max(second, best)
        return v, k, second
    return best, arg, max(second, v)


@_jit
def screen_top2(d0, d1, ri, ci):
    """Exact top-2 over the screened candidates: for each row i of ``d0`` the columns ri[i] plus the columns j with
    i in ci[j] (each once); for each column j the rows ci[j] plus the rows i with j in ri[i]. Returns the rows' best
    value, its column and second value, and the columns' best and second value (the same pair gets the very same
    float32 value from either side)."""
    n0, n1 = d0.shape[0], d1.shape[0]
    cs, cm = _transpose_lists(ci, n0)  # for row i: the columns j whose list holds i
    rs, rm = _transpose_lists(ri, n1)  # for column j: the rows i whose list holds j
    best = np.full(n0, -np.inf, np.float32)
    nn = np.full(n0, -1, np.int64)
    second = np.full(n0, -np.inf, np.float32)
    for i in range(n0):
        b, a, s = np.float32(-np.inf), -1, np.float32(-np.inf)
        for t in range(ri.shape[1]):
            j = ri[i, t]
            if j >= 0:
                b, a, s = _push(_dot(d0[i], d1[j]), j, b, a, s)
        for q in range(cs[i], cs[i + 1]):
            j = cm[q]
            seen = False
            for t in range(ri.shape[1]):
                seen |= ri[i, t] == j
            if not seen:
                b, a, s = _push(_dot(d0[i], d1[j]), j, b, a, s)
        best[i], nn[i], second[i] = b, a, s
    col_best = np.full(n1, -np.inf, np.float32)
    col_second = np.full(n1, -np.inf, np.float32)
    for j in range(n1):
        b, a, s = np.float32(-np.inf), -1, np.float32(-np.inf)
        for t in range(ci.shape[1]):
            i = ci[j, t]
            if i >= 0:
                seen = False
                for u in range(t):
                    seen |= ci[j, u] == i
                if not seen:
                    b, a, s = _push(_dot(d0[i], d1[j]), i, b, a, s)
        for q in range(rs[j], rs[j + 1]):
            i = rm[q]
            seen = False
            for t in range(ci.shape[1]):
                seen |= ci[j, t] == i
            if not seen:
                b, a, s = _push(_dot(d0[i], d1[j]), i, b, a, s)
        col_best[j], col_second[j] = b, s
    return best, nn, second, col_best, col_second


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
