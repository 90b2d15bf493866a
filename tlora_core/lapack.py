"""The top-k eigenpairs of a weight's Gram matrix on the CPU, straight from LAPACK, with the GIL released.

SciPy (which ComfyUI itself requires) ships LAPACK; its `dsyrk` (a symmetric rank-k update: W^T W with half the
multiplies of a full product) and `dsyevr` (MRRR, computes only the k eigenvectors wanted) are called through the
function pointers SciPy exports for Cython, by ctypes, which releases the GIL: several layers can then be
decomposed at once on several cores, each with a single-threaded BLAS (`openblas_set_num_threads_local`), which
uses 2 cores better than one layer on a 2-thread BLAS (its tridiagonal reduction is mostly memory-bound).
`available()` is False where any of this is missing; callers then use torch's full eigh.
"""

from __future__ import annotations

import ctypes
import glob
import os
from collections.abc import Callable
from functools import cache
from typing import Any

import numpy as np

_P = ctypes.c_void_p


@cache
def _functions() -> dict[str, Any] | None:
    try:
        import scipy
        import scipy.linalg.cython_blas as cblas
        import scipy.linalg.cython_lapack as clapack
    except ImportError:
        return None
    api = ctypes.pythonapi
    api.PyCapsule_GetName.restype, api.PyCapsule_GetName.argtypes = ctypes.c_char_p, [ctypes.py_object]
    api.PyCapsule_GetPointer.restype = ctypes.c_void_p
    api.PyCapsule_GetPointer.argtypes = [ctypes.py_object, ctypes.c_char_p]

    def fn(module: Any, name: str, nargs: int) -> Callable[..., None]:
        capsule = module.__pyx_capi__[name]
        ptr = api.PyCapsule_GetPointer(capsule, api.PyCapsule_GetName(capsule))
        return ctypes.CFUNCTYPE(None, *([_P] * nargs))(ptr)

    out: dict[str, Any] = {"dsyrk": fn(cblas, "dsyrk", 10), "dgemm": fn(cblas, "dgemm", 13),
                           "dsyevr": fn(clapack, "dsyevr", 21), "threads": None}
    for lib in glob.glob(os.path.join(os.path.dirname(scipy.__file__) + ".libs", "libscipy_openblas*.so")):
        setter = getattr(ctypes.CDLL(lib), "openblas_set_num_threads_local", None)
        if setter is not None:
            setter.argtypes, setter.restype = [ctypes.c_int], ctypes.c_int
            out["threads"] = setter
    return out


def available() -> bool:
    return _functions() is not None


def single_threaded_blas() -> None:
    """This thread's BLAS calls run on one thread (OpenBLAS >= 0.3.27; a no-op elsewhere)."""
    f = _functions()
    if f is not None and f["threads"] is not None:
        f["threads"](1)


def _ref(x: Any) -> Any:
    return ctypes.byref(x)


def top_gram_eigh(w: np.ndarray, tall: bool, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k eigenvalues (ascending) and eigenvectors of W^T W (tall) or W W^T (wide) for a C-ordered float64
    W, without copying W (its Fortran view is W^T)."""
    f = _functions()
    assert f is not None
    a = np.asarray(w, dtype=np.float64).T  # Fortran (in, out)
    rows, cols = a.shape
    n, inner = (rows, cols) if tall else (cols, rows)
    gram = np.zeros((n, n), order="F")
    c_int, c_dbl = ctypes.c_int, ctypes.c_double
    n_, inner_, lda, ldc = c_int(n), c_int(inner), c_int(rows), c_int(n)
    f["dsyrk"](b"U", b"N" if tall else b"T", _ref(n_), _ref(inner_), _ref(c_dbl(1.0)), _P(a.ctypes.data), _ref(lda),
               _ref(c_dbl(0.0)), _P(gram.ctypes.data), _ref(ldc))
    evals, evecs = np.zeros(n), np.zeros((n, k), order="F")
    isuppz, found, info = np.zeros(2 * k, dtype=np.int32), c_int(0), c_int(0)
    il, iu, zero = c_int(n - k + 1), c_int(n), c_dbl(0.0)
    work, iwork = np.zeros(1), np.zeros(1, dtype=np.int32)
    for lwork, liwork in ((c_int(-1), c_int(-1)), (None, None)):  # workspace query, then the decomposition
        if lwork is None:
            work, iwork = np.zeros(int(work[0])), np.zeros(int(iwork[0]), dtype=np.int32)
            lwork, liwork = c_int(len(work)), c_int(len(iwork))
        f["dsyevr"](b"V", b"I", b"U", _ref(n_), _P(gram.ctypes.data), _ref(ldc), _ref(zero), _ref(zero), _ref(il),
                    _ref(iu), _ref(zero), _ref(found), _P(evals.ctypes.data), _P(evecs.ctypes.data), _ref(ldc),
                    _P(isuppz.ctypes.data), _P(work.ctypes.data), _ref(lwork), _P(iwork.ctypes.data), _ref(liwork),
                    _ref(info))
    if info.value != 0 or found.value != k:
        raise ArithmeticError(f"LAPACK dsyevr failed (info {info.value}, {found.value} of {k} eigenpairs)")
    return evals[:k], evecs


def project(w: np.ndarray, vecs: np.ndarray, tall: bool) -> np.ndarray:
    """W @ V (tall) or W^T @ U (wide) for the C-ordered float64 W and the Fortran eigenvectors of `top_gram_eigh`,
    on this thread's BLAS (no process-wide thread setting), with the GIL released."""
    f = _functions()
    assert f is not None
    a = np.asarray(w, dtype=np.float64).T  # Fortran (in, out)
    rows, cols = a.shape
    b = np.asfortranarray(vecs, dtype=np.float64)
    k = b.shape[1]
    m, inner = (cols, rows) if tall else (rows, cols)
    out = np.zeros((m, k), order="F")
    c_int, c_dbl = ctypes.c_int, ctypes.c_double
    m_, n_, k_, lda, ldb, ldc = c_int(m), c_int(k), c_int(inner), c_int(rows), c_int(inner), c_int(m)
    f["dgemm"](b"T" if tall else b"N", b"N", _ref(m_), _ref(n_), _ref(k_), _ref(c_dbl(1.0)), _P(a.ctypes.data),
               _ref(lda), _P(b.ctypes.data), _ref(ldb), _ref(c_dbl(0.0)), _P(out.ctypes.data), _ref(ldc))
    return out
