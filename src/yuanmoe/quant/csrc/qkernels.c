/* Weight-only int4 / int8 matrix products on the CPU: one kernel per instruction set, chosen at
 * run time (quant/kernels.py), and a portable C kernel that compiles anywhere.
 *
 * Weights are stored in tiles of 16 output rows (packing.py writes them):
 *   int4: per tile, per chunk of 8 input columns, 64 bytes: row r's 4 bytes, byte i holding the
 *         codes of columns 8c+i (low nibble) and 8c+4+i (high nibble);
 *   int8: per tile, per chunk of 4 input columns, 64 bytes: row r's 4 signed bytes (code - 128).
 * So one 64-byte load feeds 16 output rows, each 32-bit lane holding 4 consecutive columns of one
 * row: the operand shape of the integer dot products (VNNI vpdpbusd, AVX2 vpmaddubsw).
 * Scales and zeros stay in the modules' [groups, out, 2] form (fp32 or bf16):
 *   w[o, k] = (code - mid) * scale[g, o] + zero[g, o],  mid = 8 (int4) or 128 (int8).
 *
 * Two activation modes:
 *   int8:  activations quantized per block of 32 values (scale = max|x| / 127), as llama.cpp's
 *          Q8_0; each block's integer dot product is scaled in fp32;
 *   float: fp32 activations times the codes decoded in registers (exact up to summation order).
 */
#ifdef YK_PYTHON_MODULE
#include <Python.h> /* only to be importable as yuanmoe.quant._qkernels; the kernels are called through ctypes */
#endif
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define YK_X86 1
#else
#define YK_X86 0
#endif

#define TILE 16
#define QBLOCK 32
#define MAX_NR 4
#define AHEAD 8 /* blocks of 32 columns prefetched ahead of the weights being read (a tile streams front to back) */

typedef struct {
    const uint8_t *w; /* tiled codes of this matrix */
    const void *sz;   /* [groups, out, 2] scale and zero, fp32 or bf16 */
    int64_t out, in, group;
    int32_t bits, sz_bf16, sym, pad_;
} yk_weight;

typedef struct {
    const int8_t *q;  /* int8 mode: [rows, in] codes */
    const float *d;   /* [rows, in / 32] block scales */
    const int32_t *s; /* [rows, in / 32] block sums of the codes */
    const float *f;   /* float mode: [rows, in] */
    int64_t in;
} yk_act;

enum { ISA_SCALAR = 0, ISA_AVX2 = 1, ISA_AVX512VNNI = 2 };

typedef void (*tile_fn)(const yk_weight *, int64_t, const yk_act *, const int64_t *, int, float *, int64_t);

static inline float bf16_to_f32(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline float sz_at(const yk_weight *W, int64_t g, int64_t row, int which) {
    int64_t i = (g * W->out + row) * 2 + which;
    return W->sz_bf16 ? bf16_to_f32(((const uint16_t *)W->sz)[i]) : ((const float *)W->sz)[i];
}

static inline int32_t load_i32(const void *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* the scales and zeros of group g for the rows from row0: a cache line apart from the last group's */
static inline const char *sz_line(const yk_weight *W, int64_t g, int64_t row0) {
    return (const char *)W->sz + (g * W->out + row0) * 2 * (W->sz_bf16 ? 2 : 4);
}

static inline const uint8_t *tile_base(const yk_weight *W, int64_t t) {
    return W->w + t * TILE * W->in * W->bits / 8;
}

/* ------------------------------------------------------------------ portable kernels */
static void tile_int_scalar(const yk_weight *W, int64_t t, const yk_act *X, const int64_t *rows, int nr,
                            float *y, int64_t ldy) {
    const int64_t in = W->in, nblk = in / QBLOCK, bpg = W->group / QBLOCK, ngroups = in / W->group;
    const uint8_t *base = tile_base(W, t);
    for (int r = 0; r < nr; r++) {
        const int8_t *xq = X->q + rows[r] * in;
        const float *xd = X->d + rows[r] * nblk;
        const int32_t *xs = X->s + rows[r] * nblk;
        float acc[TILE] = {0};
        for (int64_t g = 0; g < ngroups; g++) {
            float zs = 0.f;
            for (int64_t b = g * bpg; b < (g + 1) * bpg; b++) {
                int32_t id[TILE] = {0};
                if (W->bits == 4) {
                    for (int c = 0; c < 4; c++) {
                        const uint8_t *p = base + (b * 4 + c) * 64;
                        const int8_t *x = xq + b * QBLOCK + c * 8;
                        for (int o = 0; o < TILE; o++)
                            for (int i = 0; i < 4; i++)
                                id[o] += (p[o * 4 + i] & 15) * x[i] + (p[o * 4 + i] >> 4) * x[4 + i];
                    }
                    for (int o = 0; o < TILE; o++) id[o] -= 8 * xs[b];
                } else {
                    for (int c = 0; c < 8; c++) {
                        const int8_t *p = (const int8_t *)base + (b * 8 + c) * 64;
                        const int8_t *x = xq + b * QBLOCK + c * 4;
                        for (int o = 0; o < TILE; o++)
                            for (int i = 0; i < 4; i++) id[o] += p[o * 4 + i] * x[i];
                    }
                }
                for (int o = 0; o < TILE; o++) acc[o] += (float)id[o] * (sz_at(W, g, t * TILE + o, 0) * xd[b]);
                zs += xd[b] * (float)xs[b];
            }
            if (!W->sym)
                for (int o = 0; o < TILE; o++) acc[o] += sz_at(W, g, t * TILE + o, 1) * zs;
        }
        memcpy(y + r * ldy + t * TILE, acc, sizeof acc);
    }
}

/* Float mode: X->d holds each row's sums over the weight's groups ([rows, groups], yk_matmul fills
 * it), which take the codes' midpoint and the zeros out of the inner loop. */
#define FLOAT_TILE_BODY                                                                              \
    const int64_t in = W->in, ngroups = in / W->group;                                               \
    const int64_t chunk = W->bits == 4 ? 8 : 4, cpg = W->group / chunk;                              \
    const uint8_t *base = tile_base(W, t);                                                           \
    for (int r = 0; r < nr; r++) {                                                                   \
        const float *x = X->f + rows[r] * in;                                                        \
        float acc[TILE] = {0};                                                                       \
        for (int64_t g = 0; g < ngroups; g++) {                                                      \
            float ga[TILE] = {0};                                                                    \
            const float xs = X->d[rows[r] * ngroups + g];                                            \
            for (int64_t c = g * cpg; c < (g + 1) * cpg; c++) {                                      \
                uint32_t lanes[TILE];                                                                \
                memcpy(lanes, base + c * 64, sizeof lanes);                                          \
                const float *xc = x + c * chunk;                                                     \
                if (W->bits == 4) {                                                                  \
                    for (int i = 0; i < 4; i++) {                                                    \
                        const float xa = xc[i], xb = xc[4 + i];                                      \
                        for (int o = 0; o < TILE; o++)                                               \
                            ga[o] += xa * (float)((lanes[o] >> (8 * i)) & 15) +                      \
                                     xb * (float)((lanes[o] >> (8 * i + 4)) & 15);                   \
                    }                                                                                \
                } else {                                                                             \
                    for (int i = 0; i < 4; i++) {                                                    \
                        const float xa = xc[i];                                                      \
                        for (int o = 0; o < TILE; o++)                                               \
                            ga[o] += xa * (float)((int32_t)(lanes[o] << (24 - 8 * i)) >> 24);        \
                    }                                                                                \
                }                                                                                    \
            }                                                                                        \
            const float mid = W->bits == 4 ? 8.f : 0.f;                                              \
            for (int o = 0; o < TILE; o++) {                                                         \
                acc[o] += sz_at(W, g, t * TILE + o, 0) * (ga[o] - mid * xs);                         \
                if (!W->sym) acc[o] += sz_at(W, g, t * TILE + o, 1) * xs;                            \
            }                                                                                        \
        }                                                                                            \
        memcpy(y + r * ldy + t * TILE, acc, sizeof acc);                                             \
    }

static void tile_float_scalar(const yk_weight *W, int64_t t, const yk_act *X, const int64_t *rows, int nr,
                              float *y, int64_t ldy) {
    FLOAT_TILE_BODY
}

#if YK_X86
#define T256 __attribute__((target("avx2,fma")))
#define T512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma")))

/* ------------------------------------------------------------------ AVX2: vpmaddubsw */
/* scales and zeros of 8 rows (half h of tile t) in group g */
static inline T256 void sz8(const yk_weight *W, int64_t g, int64_t row0, __m256 *sc, __m256 *zr) {
    const int64_t off = (g * W->out + row0) * 2;
    if (W->sz_bf16) {
        const __m256i v = _mm256_loadu_si256((const __m256i *)((const uint16_t *)W->sz + off));
        *sc = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
        *zr = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xFFFF0000u)));
    } else {
        const float *p = (const float *)W->sz + off;
        const __m256 a = _mm256_loadu_ps(p), b = _mm256_loadu_ps(p + 8);
        *sc = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, 0x88)), 0xD8));
        *zr = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, 0xDD)), 0xD8));
    }
}

/* H halves of 8 rows per pass over the tile: 2 (one pass, each cache line read once) for one or
 * two rows, 1 (two passes) for more, where registers would run out. */
static inline __attribute__((always_inline)) T256 void tile_int_avx2_nr(
    const yk_weight *W, int64_t t, const yk_act *X, const int64_t *rows, float *y, int64_t ldy, const int nr,
    const int H) {
    const int64_t in = W->in, nblk = in / QBLOCK, bpg = W->group / QBLOCK, ngroups = in / W->group;
    const uint8_t *base = tile_base(W, t);
    const int8_t *xq[MAX_NR];
    const float *xd[MAX_NR];
    const int32_t *xs[MAX_NR];
    for (int r = 0; r < nr; r++) {
        xq[r] = X->q + rows[r] * in;
        xd[r] = X->d + rows[r] * nblk;
        xs[r] = X->s + rows[r] * nblk;
    }
    const __m256i m4 = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
    for (int h0 = 0; h0 < 2; h0 += H) {
        __m256 acc[2][MAX_NR];
        for (int h = 0; h < H; h++)
            for (int r = 0; r < nr; r++) acc[h][r] = _mm256_setzero_ps();
        for (int64_t g = 0; g < ngroups; g++) {
            __m256 sc[2], zr[2];
            for (int h = 0; h < H; h++) sz8(W, g, t * TILE + 8 * (h0 + h), &sc[h], &zr[h]);
            _mm_prefetch(sz_line(W, g + 1, t * TILE + 8 * h0), _MM_HINT_T0);
            float zs[MAX_NR] = {0};
            for (int64_t b = g * bpg; b < (g + 1) * bpg; b++) {
                __m256i ia[2][MAX_NR];
                if (W->bits == 4) {
                    const uint8_t *p = base + b * 256 + 32 * h0;
                    __m256i s16[2][MAX_NR];
                    for (int h = 0; h < H; h++)
                        for (int r = 0; r < nr; r++) s16[h][r] = _mm256_setzero_si256();
                    for (int c = 0; c < 4; c++) {
                        _mm_prefetch((const char *)(p + AHEAD * 256 + 64 * c), _MM_HINT_T0);
                        for (int h = 0; h < H; h++) {
                            const __m256i v = _mm256_loadu_si256((const __m256i *)(p + 64 * c + 32 * h));
                            const __m256i lo = _mm256_and_si256(v, m4);
                            const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
                            for (int r = 0; r < nr; r++) {
                                const int8_t *x = xq[r] + b * QBLOCK + c * 8;
                                const __m256i pa = _mm256_maddubs_epi16(lo, _mm256_set1_epi32(load_i32(x)));
                                const __m256i pb = _mm256_maddubs_epi16(hi, _mm256_set1_epi32(load_i32(x + 4)));
                                s16[h][r] = _mm256_add_epi16(s16[h][r], _mm256_add_epi16(pa, pb)); /* |sum| <= 30480 */
                            }
                        }
                    }
                    for (int h = 0; h < H; h++)
                        for (int r = 0; r < nr; r++)
                            ia[h][r] = _mm256_sub_epi32(_mm256_madd_epi16(s16[h][r], ones), _mm256_set1_epi32(8 * xs[r][b]));
                } else {
                    const uint8_t *p = base + b * 512 + 32 * h0;
                    for (int h = 0; h < H; h++)
                        for (int r = 0; r < nr; r++) ia[h][r] = _mm256_setzero_si256();
                    for (int c = 0; c < 8; c++) {
                        _mm_prefetch((const char *)(p + AHEAD * 512 + 64 * c), _MM_HINT_T0);
                        for (int h = 0; h < H; h++) {
                            const __m256i v = _mm256_loadu_si256((const __m256i *)(p + 64 * c + 32 * h));
                            const __m256i a = _mm256_sign_epi8(v, v); /* |w| as unsigned bytes (128 for -128) */
                            for (int r = 0; r < nr; r++) {
                                const __m256i x = _mm256_sign_epi8(_mm256_set1_epi32(load_i32(xq[r] + b * QBLOCK + c * 4)), v);
                                ia[h][r] = _mm256_add_epi32(ia[h][r], _mm256_madd_epi16(_mm256_maddubs_epi16(a, x), ones));
                            }
                        }
                    }
                }
                for (int r = 0; r < nr; r++) {
                    const __m256 d = _mm256_set1_ps(xd[r][b]);
                    for (int h = 0; h < H; h++)
                        acc[h][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ia[h][r]), _mm256_mul_ps(sc[h], d), acc[h][r]);
                    zs[r] += xd[r][b] * (float)xs[r][b];
                }
            }
            if (!W->sym)
                for (int h = 0; h < H; h++)
                    for (int r = 0; r < nr; r++) acc[h][r] = _mm256_fmadd_ps(zr[h], _mm256_set1_ps(zs[r]), acc[h][r]);
        }
        for (int h = 0; h < H; h++)
            for (int r = 0; r < nr; r++) _mm256_storeu_ps(y + r * ldy + t * TILE + 8 * (h0 + h), acc[h][r]);
    }
}

static T256 void tile_int_avx2(const yk_weight *W, int64_t t, const yk_act *X, const int64_t *rows, int nr,
                               float *y, int64_t ldy) {
    switch (nr) {
    case 4: tile_int_avx2_nr(W, t, X, rows, y, ldy, 4, 1); break;
    case 3: tile_int_avx2_nr(W, t, X, rows, y, ldy, 3, 1); break;
    case 2: tile_int_avx2_nr(W, t, X, rows, y, ldy, 2, 2); break;
    default: tile_int_avx2_nr(W, t, X, rows, y, ldy, 1, 2); break;
    }
}


/* float mode, 8 rows (half h of the tile) at a time: codes widened to fp32 lanes, 4 chains of FMAs a row */
static inline __attribute__((always_inline)) T256 void tile_float_avx2_nr(
    const yk_weight *W, int64_t t, const yk_act *X, const int64_t *rows, float *y, int64_t ldy, const int nr) {
    const int64_t in = W->in, ngroups = in / W->group, chunk = W->bits == 4 ? 8 : 4, cpg = W->group / chunk;
    const uint8_t *base = tile_base(W, t);
    const float *x[MAX_NR], *xs[MAX_NR];
    for (int r = 0; r < nr; r++) x[r] = X->f + rows[r] * in, xs[r] = X->d + rows[r] * ngroups;
    const __m256i m4 = _mm256_set1_epi32(15);
    for (int h = 0; h < 2; h++) {
        __m256 acc[MAX_NR];
        for (int r = 0; r < nr; r++) acc[r] = _mm256_setzero_ps();
        for (int64_t g = 0; g < ngroups; g++) {
            __m256 sc, zr, ga[4][MAX_NR];
            sz8(W, g, t * TILE + 8 * h, &sc, &zr);
            for (int k = 0; k < 4; k++)
                for (int r = 0; r < nr; r++) ga[k][r] = _mm256_setzero_ps();
            for (int64_t c = g * cpg; c < (g + 1) * cpg; c++) {
                const __m256i v = _mm256_loadu_si256((const __m256i *)(base + c * 64 + 32 * h));
                for (int i = 0; i < 4; i++) {
                    if (W->bits == 4) {
                        const __m256 lo = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(v, 8 * i), m4));
                        const __m256 hi = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(v, 8 * i + 4), m4));
                        for (int r = 0; r < nr; r++) {
                            ga[i & 1][r] = _mm256_fmadd_ps(lo, _mm256_set1_ps(x[r][c * 8 + i]), ga[i & 1][r]);
                            ga[2 + (i & 1)][r] = _mm256_fmadd_ps(hi, _mm256_set1_ps(x[r][c * 8 + 4 + i]), ga[2 + (i & 1)][r]);
                        }
                    } else {
                        const __m256 w = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(v, 24 - 8 * i), 24));
                        for (int r = 0; r < nr; r++) ga[i][r] = _mm256_fmadd_ps(w, _mm256_set1_ps(x[r][c * 4 + i]), ga[i][r]);
                    }
                }
            }
            for (int r = 0; r < nr; r++) {
                __m256 sum = _mm256_add_ps(_mm256_add_ps(ga[0][r], ga[1][r]), _mm256_add_ps(ga[2][r], ga[3][r]));
                if (W->bits == 4) sum = _mm256_sub_ps(sum, _mm256_set1_ps(8.f * xs[r][g]));
                acc[r] = _mm256_fmadd_ps(sc, sum, acc[r]);
                if (!W->sym) acc[r] = _mm256_fmadd_ps(zr, _mm256_set1_ps(xs[r][g]), acc[r]);
            }
        }
        for (int r = 0; r < nr; r++) _mm256_storeu_ps(y + r * ldy + t * TILE + 8 * h, acc[r]);
    }
}

static T256 void tile_float_avx2(const yk_weight *W, int64_t t, const yk_act *X, const int64_t *rows, int nr,
                                 float *y, int64_t ldy) {
    switch (nr) {
    case 4: tile_float_avx2_nr(W, t, X, rows, y, ldy, 4); break;
    case 3: tile_float_avx2_nr(W, t, X, rows, y, ldy, 3); break;
    case 2: tile_float_avx2_nr(W, t, X, rows, y, ldy, 2); break;
    default: tile_float_avx2_nr(W, t, X, rows, y, ldy, 1); break;
    }
}

/* ------------------------------------------------------------------ AVX-512 VNNI: vpdpbusd */
static inline T512 void sz16(const yk_weight *W, int64_t g, int64_t row0, __m512 *sc, __m512 *zr) {
    const int64_t off = (g * W->out + row0) * 2;
    if (W->sz_bf16) {
        const __m512i v = _mm512_loadu_si512((const void *)((const uint16_t *)W->sz + off));
        *sc = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
        *zr = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32((int)0xFFFF0000u)));
    } else {
        const float *p = (const float *)W->sz + off;
        const __m512 a = _mm512_loadu_ps(p), b = _mm512_loadu_ps(p + 16);
        const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
        *sc = _mm512_permutex2var_ps(a, even, b);
        *zr = _mm512_permutex2var_ps(a, _mm512_add_epi32(even, _mm512_set1_epi32(1)), b);
    }
}

static inline __attribute__((always_inline)) T512 void tile_int_avx512_nr(
    const yk_weight *W, int64_t t, const yk_act *X, const int64_t *rows, float *y, int64_t ldy, const int nr) {
    const int64_t in = W->in, nblk = in / QBLOCK, bpg = W->group / QBLOCK, ngroups = in / W->group;
    const uint8_t *base = tile_base(W, t);
    const int8_t *xq[MAX_NR];
    const float *xd[MAX_NR];
    const int32_t *xs[MAX_NR];
    for (int r = 0; r < nr; r++) {
        xq[r] = X->q + rows[r] * in;
        xd[r] = X->d + rows[r] * nblk;
        xs[r] = X->s + rows[r] * nblk;
    }
    const __m512i m4 = _mm512_set1_epi8(15), zero = _mm512_setzero_si512();
    __m512 acc[MAX_NR];
    for (int r = 0; r < nr; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < ngroups; g++) {
        __m512 sc, zr;
        sz16(W, g, t * TILE, &sc, &zr);
        _mm_prefetch(sz_line(W, g + 1, t * TILE), _MM_HINT_T0);
        float zs[MAX_NR] = {0};
        for (int64_t b = g * bpg; b < (g + 1) * bpg; b++) {
            /* two accumulators a row: two dependency chains of vpdpbusd instead of one */
            __m512i ia[MAX_NR], ib[MAX_NR];
            for (int r = 0; r < nr; r++) ia[r] = ib[r] = zero;
            if (W->bits == 4) {
                const uint8_t *p = base + b * 256;
                for (int c = 0; c < 4; c++) {
                    _mm_prefetch((const char *)(p + AHEAD * 256 + 64 * c), _MM_HINT_T0);
                    const __m512i v = _mm512_loadu_si512((const void *)(p + 64 * c));
                    const __m512i lo = _mm512_and_si512(v, m4);
                    const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
                    for (int r = 0; r < nr; r++) {
                        const int8_t *x = xq[r] + b * QBLOCK + c * 8;
                        ia[r] = _mm512_dpbusd_epi32(ia[r], lo, _mm512_set1_epi32(load_i32(x)));
                        ib[r] = _mm512_dpbusd_epi32(ib[r], hi, _mm512_set1_epi32(load_i32(x + 4)));
                    }
                }
                for (int r = 0; r < nr; r++)
                    ia[r] = _mm512_sub_epi32(_mm512_add_epi32(ia[r], ib[r]), _mm512_set1_epi32(8 * xs[r][b]));
            } else {
                const uint8_t *p = base + b * 512;
                for (int c = 0; c < 8; c++) {
                    _mm_prefetch((const char *)(p + AHEAD * 512 + 64 * c), _MM_HINT_T0);
                    const __m512i v = _mm512_loadu_si512((const void *)(p + 64 * c));
                    const __m512i a = _mm512_abs_epi8(v);
                    const __mmask64 neg = _mm512_movepi8_mask(v);
                    for (int r = 0; r < nr; r++) {
                        const __m512i x = _mm512_set1_epi32(load_i32(xq[r] + b * QBLOCK + c * 4));
                        const __m512i sx = _mm512_mask_sub_epi8(x, neg, zero, x);
                        if (c & 1) ib[r] = _mm512_dpbusd_epi32(ib[r], a, sx);
                        else ia[r] = _mm512_dpbusd_epi32(ia[r], a, sx);
                    }
                }
                for (int r = 0; r < nr; r++) ia[r] = _mm512_add_epi32(ia[r], ib[r]);
            }
            for (int r = 0; r < nr; r++) {
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ia[r]), _mm512_mul_ps(sc, _mm512_set1_ps(xd[r][b])), acc[r]);
                zs[r] += xd[r][b] * (float)xs[r][b];
            }
        }
        if (!W->sym)
            for (int r = 0; r < nr; r++) acc[r] = _mm512_fmadd_ps(zr, _mm512_set1_ps(zs[r]), acc[r]);
    }
    for (int r = 0; r < nr; r++) _mm512_storeu_ps(y + r * ldy + t * TILE, acc[r]);
}

static T512 void tile_int_avx512(const yk_weight *W, int64_t t, const yk_act *X, const int64_t *rows, int nr,
                                 float *y, int64_t ldy) {
    switch (nr) {
    case 4: tile_int_avx512_nr(W, t, X, rows, y, ldy, 4); break;
    case 3: tile_int_avx512_nr(W, t, X, rows, y, ldy, 3); break;
    case 2: tile_int_avx512_nr(W, t, X, rows, y, ldy, 2); break;
    default: tile_int_avx512_nr(W, t, X, rows, y, ldy, 1); break;
    }
}

/* float mode, 16 rows at a time: codes widened to fp32 lanes, 4 chains of FMAs a row */
static inline __attribute__((always_inline)) T512 void tile_float_avx512_nr(
    const yk_weight *W, int64_t t, const yk_act *X, const int64_t *rows, float *y, int64_t ldy, const int nr) {
    const int64_t in = W->in, ngroups = in / W->group, chunk = W->bits == 4 ? 8 : 4, cpg = W->group / chunk;
    const uint8_t *base = tile_base(W, t);
    const float *x[MAX_NR], *xs[MAX_NR];
    for (int r = 0; r < nr; r++) x[r] = X->f + rows[r] * in, xs[r] = X->d + rows[r] * ngroups;
    const __m512i m4 = _mm512_set1_epi32(15);
    {
        __m512 acc[MAX_NR];
        for (int r = 0; r < nr; r++) acc[r] = _mm512_setzero_ps();
        for (int64_t g = 0; g < ngroups; g++) {
            __m512 sc, zr, ga[4][MAX_NR];
            sz16(W, g, t * TILE, &sc, &zr);
            for (int k = 0; k < 4; k++)
                for (int r = 0; r < nr; r++) ga[k][r] = _mm512_setzero_ps();
            for (int64_t c = g * cpg; c < (g + 1) * cpg; c++) {
                const __m512i v = _mm512_loadu_si512((const void *)(base + c * 64));
                for (int i = 0; i < 4; i++) {
                    if (W->bits == 4) {
                        const __m512 lo = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(v, 8 * i), m4));
                        const __m512 hi = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(v, 8 * i + 4), m4));
                        for (int r = 0; r < nr; r++) {
                            ga[i & 1][r] = _mm512_fmadd_ps(lo, _mm512_set1_ps(x[r][c * 8 + i]), ga[i & 1][r]);
                            ga[2 + (i & 1)][r] = _mm512_fmadd_ps(hi, _mm512_set1_ps(x[r][c * 8 + 4 + i]), ga[2 + (i & 1)][r]);
                        }
                    } else {
                        const __m512 w = _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(v, 24 - 8 * i), 24));
                        for (int r = 0; r < nr; r++) ga[i][r] = _mm512_fmadd_ps(w, _mm512_set1_ps(x[r][c * 4 + i]), ga[i][r]);
                    }
                }
            }
            for (int r = 0; r < nr; r++) {
                __m512 sum = _mm512_add_ps(_mm512_add_ps(ga[0][r], ga[1][r]), _mm512_add_ps(ga[2][r], ga[3][r]));
                if (W->bits == 4) sum = _mm512_sub_ps(sum, _mm512_set1_ps(8.f * xs[r][g]));
                acc[r] = _mm512_fmadd_ps(sc, sum, acc[r]);
                if (!W->sym) acc[r] = _mm512_fmadd_ps(zr, _mm512_set1_ps(xs[r][g]), acc[r]);
            }
        }
        for (int r = 0; r < nr; r++) _mm512_storeu_ps(y + r * ldy + t * TILE, acc[r]);
    }
}

static T512 void tile_float_avx512(const yk_weight *W, int64_t t, const yk_act *X, const int64_t *rows, int nr,
                                 float *y, int64_t ldy) {
    switch (nr) {
    case 4: tile_float_avx512_nr(W, t, X, rows, y, ldy, 4); break;
    case 3: tile_float_avx512_nr(W, t, X, rows, y, ldy, 3); break;
    case 2: tile_float_avx512_nr(W, t, X, rows, y, ldy, 2); break;
    default: tile_float_avx512_nr(W, t, X, rows, y, ldy, 1); break;
    }
}

#endif /* YK_X86 */

/* ------------------------------------------------------------------ entry points */
/* 1 when this CPU (and its OS) can run kernel `isa`. */
int yk_isa_supported(int isa) {
    if (isa == ISA_SCALAR) return 1;
#if YK_X86
    __builtin_cpu_init();
    if (isa == ISA_AVX2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (isa == ISA_AVX512VNNI)
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
               __builtin_cpu_supports("avx512vnni");
#endif
    return 0;
}

static tile_fn pick(int isa, int float_mode) {
#if YK_X86
    if (isa == ISA_AVX512VNNI) return float_mode ? tile_float_avx512 : tile_int_avx512;
    if (isa == ISA_AVX2) return float_mode ? tile_float_avx2 : tile_int_avx2;
#endif
    (void)isa;
    return float_mode ? tile_float_scalar : tile_int_scalar;
}

/* Quantize rows of x (fp32, or bf16 when is_bf16) per block of 32: q = round(x / d), d = max|x| / 127. */
void yk_quantize(const void *x, int is_bf16, int64_t rows, int64_t in, int8_t *q, float *d, int32_t *s, int nt) {
    const int64_t nblk = in / QBLOCK;
    (void)nt;
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1 && rows * in >= (1 << 16))
    for (int64_t i = 0; i < rows * nblk; i++) {
        float v[QBLOCK], amax = 0.f;
        for (int j = 0; j < QBLOCK; j++) {
            v[j] = is_bf16 ? bf16_to_f32(((const uint16_t *)x)[i * QBLOCK + j]) : ((const float *)x)[i * QBLOCK + j];
            amax = fmaxf(amax, fabsf(v[j]));
        }
        const float scale = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
        int32_t sum = 0;
        for (int j = 0; j < QBLOCK; j++) {
            const int32_t c = (int32_t)lrintf(v[j] * inv);
            q[i * QBLOCK + j] = (int8_t)c;
            sum += c;
        }
        d[i] = scale;
        s[i] = sum;
    }
}

/* y[i, :] = act(rows[i]) @ W.T for i < n (fp32, row stride ldy); parallel over tiles of 16 outputs,
 * each tile's weights read once per 4 rows. */
void yk_matmul(int isa, int float_mode, const yk_weight *W, const yk_act *X, const int64_t *rows, int64_t n,
               float *y, int64_t ldy, int nt) {
    const tile_fn f = pick(isa, float_mode);
    const int64_t tiles = W->out / TILE;
    int64_t *own = NULL;
    if (!rows) { /* NULL: rows 0..n-1 */
        own = malloc(sizeof(int64_t) * (n ? n : 1));
        for (int64_t i = 0; i < n; i++) own[i] = i;
        rows = own;
    }
    yk_act act = *X;
    float *sums = NULL;
    if (float_mode) { /* each row's sums over the weight's groups, indexed by the row's index */
        const int64_t groups = W->in / W->group;
        int64_t top = 0;
        for (int64_t i = 0; i < n; i++) top = rows[i] > top ? rows[i] : top;
        sums = malloc(sizeof(float) * (top + 1) * groups);
        for (int64_t i = 0; i < n; i++)
            for (int64_t g = 0; g < groups; g++) {
                const float *x = X->f + rows[i] * W->in + g * W->group;
                float s = 0.f;
                for (int64_t k = 0; k < W->group; k++) s += x[k];
                sums[rows[i] * groups + g] = s;
            }
        act.d = sums;
        X = &act;
    }
    (void)nt;
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1 && tiles > 1)
    for (int64_t t = 0; t < tiles; t++)
        for (int64_t i = 0; i < n; i += MAX_NR)
            f(W, t, X, rows + i, (int)(n - i < MAX_NR ? n - i : MAX_NR), y + i * ldy, ldy);
    free(own);
    free(sums);
}

/* Activations as the kernels read them: int8 blocks, or fp32 rows (converted from bf16 if need be).
 * Returns the scratch memory to free. */
static void *make_act(const void *x, int x_bf16, int64_t rows, int64_t in, int float_mode, yk_act *act, int nt) {
    memset(act, 0, sizeof *act);
    act->in = in;
    if (float_mode) {
        if (!x_bf16) {
            act->f = x;
            return NULL;
        }
        float *f = malloc(sizeof(float) * rows * in);
        for (int64_t i = 0; i < rows * in; i++) f[i] = bf16_to_f32(((const uint16_t *)x)[i]);
        act->f = f;
        return f;
    }
    const int64_t nblk = rows * (in / QBLOCK);
    char *scratch = malloc(rows * in + nblk * (sizeof(float) + sizeof(int32_t)));
    int8_t *q = (int8_t *)scratch;
    float *d = (float *)(scratch + rows * in);
    int32_t *s = (int32_t *)(d + nblk);
    yk_quantize(x, x_bf16, rows, in, q, d, s, nt);
    act->q = q, act->d = d, act->s = s;
    return scratch;
}

/* y [rows, out] = x [rows, in] (fp32, or bf16 when x_bf16) @ W.T: activations prepared and
 * multiplied in one call. */
void yk_linear(int isa, int float_mode, const yk_weight *W, const void *x, int x_bf16, int64_t rows, float *y,
               int nt) {
    yk_act act;
    void *scratch = make_act(x, x_bf16, rows, W->in, float_mode, &act, nt);
    yk_matmul(isa, float_mode, W, &act, NULL, rows, y, W->out, nt);
    free(scratch);
}

/* The experts of one MoE layer: rows of X sorted by expert (counts[e] rows for expert e), each
 * through its expert's SwiGLU: out[i] = w2_e @ (silu(a) * b), [a, b] = w1_e @ x_i (x fp32, or bf16
 * when x_bf16; its rows prepared once, the hidden rows once per expert). w1 / w2 describe
 * expert 0; expert e's codes lie e * *_wstride bytes further, its scales e * *_sstride bytes. */
void yk_experts(int isa, int float_mode, const yk_weight *w1, int64_t w1_wstride, int64_t w1_sstride,
                const yk_weight *w2, int64_t w2_wstride, int64_t w2_sstride, int64_t experts,
                const void *x, int x_bf16, const int64_t *counts, float *out, int nt) {
    const int64_t f2 = w1->out, f = f2 / 2, d = w2->out;
    int64_t most = 0, total = 0;
    for (int64_t e = 0; e < experts; e++) {
        most = counts[e] > most ? counts[e] : most;
        total += counts[e];
    }
    if (!total) return;
    yk_act xa;
    void *xscratch = make_act(x, x_bf16, total, w1->in, float_mode, &xa, nt);
    const yk_act *X = &xa;
    float *h = malloc(sizeof(float) * most * f2), *g = malloc(sizeof(float) * most * f);
    int8_t *gq = float_mode ? NULL : malloc(most * f);
    float *gd = float_mode ? NULL : malloc(sizeof(float) * most * (f / QBLOCK));
    int32_t *gs = float_mode ? NULL : malloc(sizeof(int32_t) * most * (f / QBLOCK));
    int64_t *rows = malloc(sizeof(int64_t) * (total > most ? total : most));
    for (int64_t i = 0; i < total; i++) rows[i] = i;
    int64_t start = 0;
    for (int64_t e = 0; e < experts; e++) {
        const int64_t n = counts[e];
        if (!n) continue;
        yk_weight a = *w1, b = *w2;
        a.w += e * w1_wstride;
        a.sz = (const char *)a.sz + e * w1_sstride;
        b.w += e * w2_wstride;
        b.sz = (const char *)b.sz + e * w2_sstride;
        yk_matmul(isa, float_mode, &a, X, rows + start, n, h, f2, nt);
        for (int64_t i = 0; i < n; i++)
            for (int64_t j = 0; j < f; j++) {
                const float u = h[i * f2 + j];
                g[i * f + j] = u / (1.f + expf(-u)) * h[i * f2 + f + j];
            }
        yk_act hx = {0};
        hx.in = f;
        if (float_mode) {
            hx.f = g;
        } else {
            yk_quantize(g, 0, n, f, gq, gd, gs, nt);
            hx.q = gq, hx.d = gd, hx.s = gs;
        }
        yk_matmul(isa, float_mode, &b, &hx, rows, n, out + start * d, d, nt);
        start += n;
    }
    free(h), free(g), free(gq), free(gd), free(gs), free(rows), free(xscratch);
}

#ifdef YK_PYTHON_MODULE
static struct PyModuleDef qkernels_module = {PyModuleDef_HEAD_INIT, "_qkernels",
                                             "int4/int8 CPU kernels, called through ctypes", -1, NULL};
PyMODINIT_FUNC PyInit__qkernels(void) { return PyModule_Create(&qkernels_module); }
#endif
