"""A small C kernel for integer-weight matrix-vector products on CPU, built once with the system C compiler.

Inductor's code for the same reduction (``y[n] = sum_g s[n, g] * (x_g . q[n, g]) - s[n, g] * z[n, g] * sum(x_g)``)
loads 8 one-byte codes per 8 floats through a partial vector load that stalls on store forwarding: on this
project's machine (AMD EPYC, AVX2, torch 2.13) it ran 1536 x 576 int4 g128 in ~870 us at 2 threads, 8x slower than
fp32 ``F.linear``, where this loop (AVX2: 8 codes widened with one ``vpmovzxbd``, FMA into 4 accumulators) runs it
in ~100 us on one thread (scratch runs, 2026-12-03, scripts not kept). The source is compiled with ``cc -O3`` (AVX2
+ FMA intrinsics where the CPU has them, a plain loop otherwise) into ``$TORCHSLIM_CACHE_DIR/native`` on first use
and called through ``ctypes`` (which releases the GIL); the library name carries a hash of the source and flags.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from torchslim.errors import MissingDependencyError

__all__ = ["GemvLayer", "gemv_library"]

_SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

static float dot_u8(const float* x, const uint8_t* q, int64_t n) {
    int64_t k = 0;
    float total = 0.0f;
#ifdef __AVX2__
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    for (; k + 32 <= n; k += 32) {
        a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(q + k)))),
                             _mm256_loadu_ps(x + k), a0);
        a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(q + k + 8)))),
                             _mm256_loadu_ps(x + k + 8), a1);
        a2 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(q + k + 16)))),
                             _mm256_loadu_ps(x + k + 16), a2);
        a3 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(q + k + 24)))),
                             _mm256_loadu_ps(x + k + 24), a3);
    }
    for (; k + 8 <= n; k += 8) {
        a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(q + k)))),
                             _mm256_loadu_ps(x + k), a0);
    }
    __m256 s = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    total = _mm_cvtss_f32(h);
#endif
    for (; k < n; k++) total += x[k] * (float)q[k];
    return total;
}

/* y[m, n] = sum_g scale[n, g] * (x_mg . q[n, g]) - scale_zero[n, g] * sum(x_mg) + bias[n]
   q: rows of ldq codes (ldq >= k); groups of group_len inputs, the last may be shorter. */
void gemv_u8(const float* x, int64_t m, int64_t k, const uint8_t* q, int64_t n, int64_t ldq,
             const float* scale, const float* scale_zero, int64_t groups, int64_t group_len,
             const float* bias, float* y, int threads) {
    float* sums = (float*)malloc(sizeof(float) * (size_t)(groups > 0 ? groups : 1));
    for (int64_t r = 0; r < m; r++) {
        const float* xr = x + r * k;
        for (int64_t g = 0; g < groups; g++) {
            int64_t start = g * group_len, len = k - start < group_len ? k - start : group_len;
            float t = 0.0f;
            for (int64_t j = 0; j < len; j++) t += xr[start + j];
            sums[g] = t;
        }
        float* yr = y + r * n;
        #pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t i = 0; i < n; i++) {
            const uint8_t* row = q + i * ldq;
            const float* s = scale + i * groups;
            const float* sz = scale_zero + i * groups;
            float acc = bias ? bias[i] : 0.0f;
            for (int64_t g = 0; g < groups; g++) {
                int64_t start = g * group_len, len = k - start < group_len ? k - start : group_len;
                acc += s[g] * dot_u8(xr + start, row + start, len) - sz[g] * sums[g];
            }
            yr[i] = acc;
        }
    }
    free(sums);
}

/* The same product with the layer's constants in one struct (one ctypes argument instead of eight). */
typedef struct {
    const uint8_t* q; int64_t n; int64_t ldq; const float* scale; const float* scale_zero;
    int64_t groups; int64_t group_len; int64_t k;
} gemv_layer;

void gemv_u8_layer(const gemv_layer* p, const float* x, int64_t m, const float* bias, float* y, int threads) {
    gemv_u8(x, m, p->k, p->q, p->n, p->ldq, p->scale, p->scale_zero, p->groups, p->group_len, bias, y, threads);
}
"""


class GemvLayer(ctypes.Structure):
    """The constants of one layer for ``gemv_u8_layer`` (pointers stay valid while the tensors live)."""

    _fields_ = [("q", ctypes.c_void_p), ("n", ctypes.c_int64), ("ldq", ctypes.c_int64), ("scale", ctypes.c_void_p),
                ("scale_zero", ctypes.c_void_p), ("groups", ctypes.c_int64), ("group_len", ctypes.c_int64),
                ("k", ctypes.c_int64)]

_LIBRARY: ctypes.CDLL | None = None


def _flags() -> list[str]:
    capability = torch.backends.cpu.get_cpu_capability()
    vector = ["-mavx2", "-mfma"] if capability in ("AVX2", "AVX512") else []
    return ["-O3", "-fPIC", "-shared", "-fopenmp", *vector]


def _cache_dir() -> Path:
    root = os.environ.get("TORCHSLIM_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "torchslim")
    return Path(root) / "native"


def gemv_library() -> ctypes.CDLL:
    """The compiled kernel library (built and cached on first use; one per process after that).

    Returns:
        The ``ctypes`` library: ``gemv_u8`` (argument types set) and ``gemv_u8_layer(GemvLayer*, x, m, bias, y,
        threads)`` (no argument types: pass ``c_void_p``, ``c_int64`` and ``int``).

    Raises:
        MissingDependencyError: no C compiler (``$CC``, ``cc``, ``gcc``) or the build failed (the message has the
            compiler's first line of output).
    """
    global _LIBRARY
    if _LIBRARY is not None:
        return _LIBRARY
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise MissingDependencyError("the native GEMV needs a C compiler (cc or gcc; $CC): none was found")
    flags = _flags()
    digest = hashlib.sha256((_SOURCE + " ".join(flags) + compiler).encode()).hexdigest()[:16]
    path = _cache_dir() / f"gemv-{digest}.so"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as scratch:
            source = Path(scratch) / "gemv.c"
            source.write_text(_SOURCE)
            built = path.with_suffix(f".{os.getpid()}.tmp")  # beside the target: os.replace is then atomic
            result = subprocess.run([compiler, *flags, str(source), "-o", str(built)], capture_output=True, text=True,
                                    check=False)
            if result.returncode != 0:
                built.unlink(missing_ok=True)
                first = (result.stderr.strip().splitlines() or ["(no output)"])[0]
                raise MissingDependencyError(f"the native GEMV did not build with {compiler}: {first}")
            os.replace(built, path)
    library = ctypes.CDLL(str(path))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    library.gemv_u8.argtypes = [ptr, i64, i64, ptr, i64, i64, ptr, ptr, i64, i64, ptr, ptr, ctypes.c_int]
    library.gemv_u8.restype = None
    # no argtypes: ctypes' per-call conversion of declared types cost ~2 us of a ~5 us call; callers pass
    # ctypes.c_void_p pointers, a ctypes.c_int64 row count and a plain int thread count
    library.gemv_u8_layer.restype = None
    _LIBRARY = library
    return library
