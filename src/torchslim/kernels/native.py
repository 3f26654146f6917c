"""A small C kernel for integer-weight matrix-vector products on CPU, built once with the system C compiler.

Inductor's code for the same reduction (``y[n] = sum_g s[n, g] * (x_g . q[n, g]) - s[n, g] * z[n, g] * sum(x_g)``)
loads 8 one-byte codes per 8 floats through a partial vector load that stalls on store forwarding: on this
project's machine (AMD EPYC, AVX2, torch 2.13) it ran 1536 x 576 int4 g128 in ~870 us at 2 threads, 8x slower than
fp32 ``F.linear``, where this loop (AVX2: 8 codes widened with one ``vpmovzxbd``, FMA into 4 accumulators) runs it
in ~100 us on one thread (scratch runs, 2026-12-03, scripts not kept). Codes held in 16-bit lanes (four 4-bit or
two 8-bit codes a lane, :mod:`torchslim.kernels.cpu_gemv`) are multiplied by the input rounded to 16 bits with
``vpmaddwd`` instead: 1536 x 576 int4 g128 35 vs 55 us, 49152 x 576 0.72-0.82 vs 1.4-1.9 ms at 2 threads, weights
from memory (a C scratch benchmark, 2026-12-03, quiet machine). Several input rows share each unpacked block
(tiles of 4 rows), so a short prompt costs little more memory traffic than one token. The source is compiled
with ``cc -O3`` (AVX2 + FMA intrinsics where the CPU has them, a plain loop otherwise) into
``$TORCHSLIM_CACHE_DIR/native`` on first use and called through ``ctypes`` (which releases the GIL); the library
name carries a hash of the source and flags.
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
#include <math.h>
#ifdef __AVX2__
#include <immintrin.h>

static inline float hsum(__m256 v) {  /* the sum of a vector's 8 lanes */
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h);
}
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
    total = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
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

/* Codes held in 16-bit lanes, in blocks of 16 lanes. Nibble lanes (codes of <= 4 bits): 64 codes a block, lane l
   holds codes l, 16+l, 32+l, 48+l in bits 0-3, 4-7, 8-11, 12-15. Byte lanes: 32 codes a block, lane l holds codes l
   and 16+l in its low and high byte. A code is a shift and a mask away (no shuffles), and vpmaddwd multiplies 16
   codes by 16 inputs rounded to 16 bits. Plain loops (CPUs without AVX2) sum in 64 bits. */
#ifndef __AVX2__
static int64_t dot_nibbles(const uint16_t* w, const int16_t* x, int64_t blocks) {
    int64_t total = 0;
    for (int64_t b = 0; b < blocks; b++) {
        const uint16_t* wb = w + b * 16;
        const int16_t* xb = x + b * 64;
        for (int l = 0; l < 16; l++) {
            int64_t v = wb[l];
            total += (v & 15) * xb[l] + ((v >> 4) & 15) * xb[16 + l] + ((v >> 8) & 15) * xb[32 + l]
                     + (v >> 12) * xb[48 + l];
        }
    }
    return total;
}

static int64_t dot_bytes(const uint16_t* w, const int16_t* x, int64_t blocks) {
    int64_t total = 0;
    for (int64_t b = 0; b < blocks; b++) {
        const uint16_t* wb = w + b * 16;
        const int16_t* xb = x + b * 32;
        for (int l = 0; l < 16; l++) total += (int64_t)(wb[l] & 255) * xb[l] + (int64_t)(wb[l] >> 8) * xb[16 + l];
    }
    return total;
}
#endif

/* One output row (codes `row`) against a tile of up to ROW_TILE quantized input rows (ldx apart): out[r] =
   sum_g scale[g] * steps[r, g] * (codes_g . xq[r]_g). Each block of codes is loaded and unpacked once for every row
   of the tile; a group's integer sums are scaled into float vectors, summed across lanes once per output row. At
   most CHUNK blocks are summed in 32 bits before they are scaled (4 * 256 nibble or 2 * 32 byte pair sums a lane:
   below 2^31 for any code and input). */
#define ROW_TILE 4
#define NIBBLE_CHUNK 256
#define BYTE_CHUNK 32
#ifdef __AVX2__
/* lanes_row for one input row (every decode step of an LLM): the same sums with every accumulator a named register
   (the tile's arrays indexed by a run-time row count were not kept in registers): 1.3-1.7x faster on SmolLM2's int4
   shapes, 1.2-1.4x int8 (scratch A/B against the tile loop, same outputs bit for bit, 2026-12-04). Always inlined
   with a constant `nibbles`, so each layout gets its own loop without a branch inside it. */
static inline __attribute__((always_inline)) float one_row(
        const uint16_t* row, const int16_t* xq, const float* scale, const float* steps, int64_t groups,
        int64_t group_blocks, int64_t last_blocks, const int nibbles) {
    const int64_t per_block = nibbles ? 64 : 32, chunk = nibbles ? NIBBLE_CHUNK : BYTE_CHUNK;
    const __m256i m = _mm256_set1_epi16(nibbles ? 0xF : 0xFF);
    __m256 f = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        const int64_t blocks = g == groups - 1 ? last_blocks : group_blocks;
        const uint16_t* wg = row + g * group_blocks * 16;
        const int16_t* xg = xq + g * group_blocks * per_block;
        for (int64_t b0 = 0; b0 < blocks; b0 += chunk) {
            const int64_t end = blocks - b0 < chunk ? blocks : b0 + chunk;
            __m256i a0 = _mm256_setzero_si256(), a1 = _mm256_setzero_si256();
            for (int64_t b = b0; b < end; b++) {
                const __m256i v = _mm256_loadu_si256((const __m256i*)(wg + b * 16));
                const int16_t* xb = xg + b * per_block;
                if (nibbles) {
                    a0 = _mm256_add_epi32(a0, _mm256_add_epi32(
                        _mm256_madd_epi16(_mm256_and_si256(v, m), _mm256_loadu_si256((const __m256i*)xb)),
                        _mm256_madd_epi16(_mm256_and_si256(_mm256_srli_epi16(v, 4), m),
                                          _mm256_loadu_si256((const __m256i*)(xb + 16)))));
                    a1 = _mm256_add_epi32(a1, _mm256_add_epi32(
                        _mm256_madd_epi16(_mm256_and_si256(_mm256_srli_epi16(v, 8), m),
                                          _mm256_loadu_si256((const __m256i*)(xb + 32))),
                        _mm256_madd_epi16(_mm256_srli_epi16(v, 12), _mm256_loadu_si256((const __m256i*)(xb + 48)))));
                } else {
                    a0 = _mm256_add_epi32(a0, _mm256_madd_epi16(_mm256_and_si256(v, m),
                                                                _mm256_loadu_si256((const __m256i*)xb)));
                    a1 = _mm256_add_epi32(a1, _mm256_madd_epi16(_mm256_srli_epi16(v, 8),
                                                                _mm256_loadu_si256((const __m256i*)(xb + 16))));
                }
            }
            f = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(a0, a1)), _mm256_set1_ps(scale[g] * steps[g]), f);
        }
    }
    return hsum(f);
}
#endif

static void lanes_row(const uint16_t* row, const int16_t* xq, int64_t ldx, int rows, int nibbles, const float* scale,
                      const float* steps, int64_t groups, int64_t group_blocks, int64_t last_blocks, float* out) {
    const int64_t per_block = nibbles ? 64 : 32, stride = group_blocks * per_block;
#ifdef __AVX2__
    if (rows == 1) {
        out[0] = nibbles ? one_row(row, xq, scale, steps, groups, group_blocks, last_blocks, 1)
                         : one_row(row, xq, scale, steps, groups, group_blocks, last_blocks, 0);
        return;
    }
    const int64_t chunk = nibbles ? NIBBLE_CHUNK : BYTE_CHUNK;
    const __m256i m = _mm256_set1_epi16(nibbles ? 0xF : 0xFF);
    __m256 f[ROW_TILE];
    for (int r = 0; r < ROW_TILE; r++) f[r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        const int64_t blocks = g == groups - 1 ? last_blocks : group_blocks;
        const uint16_t* wg = row + g * group_blocks * 16;
        const int16_t* xg = xq + g * stride;
        for (int64_t b0 = 0; b0 < blocks; b0 += chunk) {
            const int64_t end = blocks - b0 < chunk ? blocks : b0 + chunk;
            __m256i a[ROW_TILE];
            for (int r = 0; r < ROW_TILE; r++) a[r] = _mm256_setzero_si256();
            for (int64_t b = b0; b < end; b++) {
                __m256i v = _mm256_loadu_si256((const __m256i*)(wg + b * 16));
                if (nibbles) {
                    __m256i c0 = _mm256_and_si256(v, m), c1 = _mm256_and_si256(_mm256_srli_epi16(v, 4), m);
                    __m256i c2 = _mm256_and_si256(_mm256_srli_epi16(v, 8), m), c3 = _mm256_srli_epi16(v, 12);
                    for (int r = 0; r < rows; r++) {
                        const int16_t* xb = xg + r * ldx + b * 64;
                        __m256i t = _mm256_add_epi32(
                            _mm256_madd_epi16(c0, _mm256_loadu_si256((const __m256i*)xb)),
                            _mm256_madd_epi16(c1, _mm256_loadu_si256((const __m256i*)(xb + 16))));
                        t = _mm256_add_epi32(t, _mm256_madd_epi16(c2, _mm256_loadu_si256((const __m256i*)(xb + 32))));
                        t = _mm256_add_epi32(t, _mm256_madd_epi16(c3, _mm256_loadu_si256((const __m256i*)(xb + 48))));
                        a[r] = _mm256_add_epi32(a[r], t);
                    }
                } else {
                    __m256i lo = _mm256_and_si256(v, m), hi = _mm256_srli_epi16(v, 8);
                    for (int r = 0; r < rows; r++) {
                        const int16_t* xb = xg + r * ldx + b * 32;
                        a[r] = _mm256_add_epi32(a[r], _mm256_add_epi32(
                            _mm256_madd_epi16(lo, _mm256_loadu_si256((const __m256i*)xb)),
                            _mm256_madd_epi16(hi, _mm256_loadu_si256((const __m256i*)(xb + 16)))));
                    }
                }
            }
            for (int r = 0; r < rows; r++)
                f[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a[r]), _mm256_set1_ps(scale[g] * steps[r * groups + g]),
                                       f[r]);
        }
    }
    for (int r = 0; r < rows; r++) out[r] = hsum(f[r]);
#else
    for (int r = 0; r < rows; r++) {
        float total = 0.0f;
        for (int64_t g = 0; g < groups; g++) {
            const int64_t blocks = g == groups - 1 ? last_blocks : group_blocks;
            const uint16_t* wg = row + g * group_blocks * 16;
            const int16_t* xg = xq + r * ldx + g * stride;
            int64_t dot = nibbles ? dot_nibbles(wg, xg, blocks) : dot_bytes(wg, xg, blocks);
            total += scale[g] * steps[r * groups + g] * (float)dot;
        }
        out[r] = total;
    }
#endif
}

/* y = x W^T + bias for codes in 16-bit lanes (layout 1: nibbles, 2: bytes), each input group rounded to 16 bits:
   y[r, n] = sum_g scale[n, g] * step[r, g] * (q[n, g] . round(x[r]_g / step[r, g])) - scale_zero[n, g] * sum(x[r]_g)
   + bias[n], step[r, g] = max|x[r]_g| / 32767. Rows of q hold groups * group_blocks blocks (group_blocks covers
   group_len codes). All input rows are rounded first; output rows are split across threads. */
static void gemv_lanes(const uint16_t* q, int64_t n, int64_t ldq, int layout, const float* x, int64_t m, int64_t k,
                       const float* scale, const float* scale_zero, int64_t groups, int64_t group_len,
                       const float* bias, float* y, int threads) {
    const int64_t per_block = layout == 1 ? 64 : 32;
    const int64_t group_blocks = (group_len + per_block - 1) / per_block, stride = group_blocks * per_block;
    const int64_t last_len = k - (groups - 1) * group_len, last_blocks = (last_len + per_block - 1) / per_block;
    const int64_t ldx = groups * stride;  /* one rounded input row */
    float* sums = (float*)malloc(sizeof(float) * 2 * (size_t)(groups * m));
    float* steps = sums + groups * m;
    int16_t* xq = (int16_t*)calloc((size_t)(ldx * m), sizeof(int16_t));  /* past a group's end: zeros */
    for (int64_t r = 0; r < m; r++) {
        const float* xr = x + r * k;
        for (int64_t g = 0; g < groups; g++) {
            int64_t start = g * group_len, len = k - start < group_len ? k - start : group_len;
            float total = 0.0f, largest = 0.0f;
            for (int64_t j = 0; j < len; j++) {
                float v = xr[start + j], a = v < 0 ? -v : v;
                total += v;
                largest = a > largest ? a : largest;
            }
            float step = largest > 0.0f ? largest / 32767.0f : 1.0f, inverse = 1.0f / step;
            for (int64_t j = 0; j < len; j++) xq[r * ldx + g * stride + j] = (int16_t)lrintf(xr[start + j] * inverse);
            sums[r * groups + g] = total;
            steps[r * groups + g] = step;
        }
    }
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < n; i++) {
        const float* s = scale + i * groups;
        const float* sz = scale_zero + i * groups;
        for (int64_t r0 = 0; r0 < m; r0 += ROW_TILE) {  /* row i's codes stay in L1 across the tiles */
            int rows = m - r0 < ROW_TILE ? (int)(m - r0) : ROW_TILE;
            float out[ROW_TILE];
            lanes_row(q + i * ldq, xq + r0 * ldx, ldx, rows, layout == 1, s, steps + r0 * groups, groups,
                      group_blocks, last_blocks, out);
            for (int r = 0; r < rows; r++) {
                float zero = 0.0f;
                for (int64_t g = 0; g < groups; g++) zero += sz[g] * sums[(r0 + r) * groups + g];
                y[(r0 + r) * n + i] = out[r] - zero + (bias ? bias[i] : 0.0f);
            }
        }
    }
    free(xq);
    free(sums);
}

/* The product with the layer's constants in one struct (one ctypes argument instead of eleven).
   layout 0: one code a byte (ldq bytes a row), float products; 1/2: 16-bit lanes (ldq lanes a row). */
typedef struct {
    const void* q; int64_t n; int64_t ldq; const float* scale; const float* scale_zero;
    int64_t groups; int64_t group_len; int64_t k; int64_t layout;
} gemv_layer;

void gemv_u8_layer(const gemv_layer* p, const float* x, int64_t m, const float* bias, float* y, int threads) {
    if (p->layout == 0)
        gemv_u8(x, m, p->k, (const uint8_t*)p->q, p->n, p->ldq, p->scale, p->scale_zero, p->groups, p->group_len,
                bias, y, threads);
    else
        gemv_lanes((const uint16_t*)p->q, p->n, p->ldq, (int)p->layout, x, m, p->k, p->scale, p->scale_zero,
                   p->groups, p->group_len, bias, y, threads);
}
"""


class GemvLayer(ctypes.Structure):
    """The constants of one layer for ``gemv_u8_layer`` (pointers stay valid while the tensors live)."""

    _fields_ = [("q", ctypes.c_void_p), ("n", ctypes.c_int64), ("ldq", ctypes.c_int64), ("scale", ctypes.c_void_p),
                ("scale_zero", ctypes.c_void_p), ("groups", ctypes.c_int64), ("group_len", ctypes.c_int64),
                ("k", ctypes.c_int64), ("layout", ctypes.c_int64)]

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
            command = [compiler, *flags, str(source), "-o", str(built), "-lm"]
            result = subprocess.run(command, capture_output=True, text=True, check=False)
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
