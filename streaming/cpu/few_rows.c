/* y[M,N] = x[M,K] . W[N,K]^T (+ b) in fp32 for a few rows x, on an AVX-512 CPU.
 *
 * The product a decode step makes for every session (2 rows each) by every weight of the
 * model. It is bound by memory (each weight is read once per step) and, past a few rows, by
 * the multiply-adds; the library kernels wait for one and then do the other. This one keeps
 * the weight streaming while it computes: W is packed once as blocks of 48 output columns,
 * [ceil(N/48)][K][48] (each block one sequential run of memory), and every k step asks for
 * the weight 256 steps ahead into L2 and 48 ahead into L1. Per 128 k, the rows run in passes
 * of 8 against the same slice of weight (3 x 8 = 24 vector accumulators in registers).
 *
 * Each output is summed in k order by one fused multiply-add chain, whatever the number of
 * rows or threads: a row's result does not depend on the other rows of the batch.
 *
 * The same loop reads bf16 weights (widened exactly: half the bytes, for a bf16 model's
 * decode steps of a few rows) and int8 weights (widened exactly, with one scale per output:
 * a quarter of the bytes, for the screened greedy heads (screened_argmax.py), whose error
 * bound covers it).
 *
 * Built by streaming/cpu/few_rows.py with the C compiler at first use; called through ctypes.
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define NR 48   /* output columns per packed block: three 16-float vectors */
#define KB 128  /* k per chunk: 24 KB of the block, kept in L1 across the row passes */
#define MR 8    /* rows per register pass */
#define FAR 256 /* prefetch distances, in k steps */
#define NEAR 48

/* 16 weights of a block row as fp32: loaded, or widened from int8 (exactly) */
static inline __m512 load16_f32(const float *p) { return _mm512_loadu_ps(p); }
static inline __m512 load16_i8(const int8_t *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}
/* bf16 is the top half of an fp32: widened exactly by a shift */
static inline __m512 load16_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

/* acc[rows][48] += x[rows, 0:kn] . w[0:kn][48], one FMA chain per output in k order;
 * prefetching the block FAR k steps ahead into L2 and NEAR ahead into L1 (one cache line
 * per 64 bytes of weight). */
#define DEFINE_PASS(NAME, T, LOAD)                                                                    \
    static inline __attribute__((always_inline)) void NAME(const int rows, const float *x, int64_t ldx, \
                                                           const T *w, int64_t kn, float *acc) {        \
        __m512 c[MR][3];                                                                              \
        for (int m = 0; m < rows; ++m)                                                                \
            for (int j = 0; j < 3; ++j) c[m][j] = _mm512_loadu_ps(acc + m * NR + 16 * j);             \
        for (int64_t k = 0; k < kn; ++k) {                                                            \
            const T *wk = w + k * NR;                                                                 \
            for (int j = 0; j < (int)(NR * sizeof(T)); j += 64) {                                     \
                _mm_prefetch((const char *)(wk + FAR * NR) + j, _MM_HINT_T1);                         \
                _mm_prefetch((const char *)(wk + NEAR * NR) + j, _MM_HINT_T0);                        \
            }                                                                                         \
            const __m512 w0 = LOAD(wk), w1 = LOAD(wk + 16), w2 = LOAD(wk + 32);                       \
            for (int m = 0; m < rows; ++m) {                                                          \
                const __m512 xb = _mm512_set1_ps(x[m * ldx + k]);                                     \
                c[m][0] = _mm512_fmadd_ps(xb, w0, c[m][0]);                                           \
                c[m][1] = _mm512_fmadd_ps(xb, w1, c[m][1]);                                           \
                c[m][2] = _mm512_fmadd_ps(xb, w2, c[m][2]);                                           \
            }                                                                                         \
        }                                                                                             \
        for (int m = 0; m < rows; ++m)                                                                \
            for (int j = 0; j < 3; ++j) _mm512_storeu_ps(acc + m * NR + 16 * j, c[m][j]);             \
    }                                                                                                 \
    /* one specialised copy per row count, so the accumulators stay in registers */                  \
    static void NAME##_rows(int64_t rows, const float *x, int64_t ldx, const T *w, int64_t kn, float *acc) { \
        switch (rows) {                                                                               \
        case 1: NAME(1, x, ldx, w, kn, acc); break;                                                   \
        case 2: NAME(2, x, ldx, w, kn, acc); break;                                                   \
        case 3: NAME(3, x, ldx, w, kn, acc); break;                                                   \
        case 4: NAME(4, x, ldx, w, kn, acc); break;                                                   \
        case 5: NAME(5, x, ldx, w, kn, acc); break;                                                   \
        case 6: NAME(6, x, ldx, w, kn, acc); break;                                                   \
        case 7: NAME(7, x, ldx, w, kn, acc); break;                                                   \
        default: NAME(8, x, ldx, w, kn, acc); break;                                                  \
        }                                                                                             \
    }

DEFINE_PASS(pass_f32, float, load16_f32)
DEFINE_PASS(pass_i8, int8_t, load16_i8)
DEFINE_PASS(pass_bf16, uint16_t, load16_bf16)

int omni2_block_columns(void) { return NR; }

/* x [m,k] and y [m,n] contiguous; packed [ceil(n/48), k, 48] zero-padded; then per output
 * column, int8 weights are multiplied by scale[n] and fp32 ones get bias[n] added (NULL: none).
 * Returns 0, or -1 if a thread could not get its accumulator buffer. */
#define DEFINE_LINEAR(NAME, T, PASS, FINISH)                                                          \
    int NAME(const float *x, int64_t m, int64_t k, const T *packed, int64_t n, const float *per_col, \
             float *y, int threads) {                                                                 \
        const int64_t blocks = (n + NR - 1) / NR;                                                     \
        int failed = 0;                                                                               \
        _Pragma("omp parallel num_threads(threads) reduction(| : failed)") {                          \
            float *acc = aligned_alloc(64, (size_t)(m * NR * sizeof(float) + 63) / 64 * 64);          \
            failed = acc == NULL;                                                                     \
            _Pragma("omp for schedule(static)") for (int64_t b = 0; b < blocks; ++b) {                \
                if (acc == NULL) continue;                                                            \
                memset(acc, 0, (size_t)m * NR * sizeof(float));                                       \
                const T *block = packed + b * k * NR;                                                 \
                for (int64_t k0 = 0; k0 < k; k0 += KB) {                                              \
                    const int64_t kn = k - k0 < KB ? k - k0 : KB;                                     \
                    for (int64_t r = 0; r < m; r += MR)                                               \
                        PASS(m - r < MR ? m - r : MR, x + r * k + k0, k, block + k0 * NR, kn, acc + r * NR); \
                }                                                                                     \
                const int64_t n0 = b * NR, cols = n - n0 < NR ? n - n0 : NR;                          \
                for (int64_t r = 0; r < m; ++r) {                                                     \
                    float *out = y + r * n + n0;                                                      \
                    const float *sum = acc + r * NR;                                                  \
                    FINISH;                                                                           \
                }                                                                                     \
            }                                                                                         \
            free(acc);                                                                                \
        }                                                                                             \
        return failed ? -1 : 0;                                                                       \
    }

/* fp32 weights: y = x W^T + bias */
DEFINE_LINEAR(omni2_few_rows_linear, float, pass_f32_rows,
              if (per_col) for (int64_t j = 0; j < cols; ++j) out[j] = sum[j] + per_col[n0 + j];
              else memcpy(out, sum, (size_t)cols * sizeof(float)))

/* bf16 weights, fp32 rows and sums: y = x W^T + bias, as the fp32 kernel computes for the
 * widened weights, bit for bit (half the bytes; a bf16 model's decode steps of few rows) */
DEFINE_LINEAR(omni2_few_rows_bf16, uint16_t, pass_bf16_rows,
              if (per_col) for (int64_t j = 0; j < cols; ++j) out[j] = sum[j] + per_col[n0 + j];
              else memcpy(out, sum, (size_t)cols * sizeof(float)))

/* int8 weights q with a scale per output: y = (x q^T) * scale, for screening (screened_argmax.py) */
DEFINE_LINEAR(omni2_few_rows_int8, int8_t, pass_i8_rows,
              for (int64_t j = 0; j < cols; ++j) out[j] = sum[j] * per_col[n0 + j])

/* ---- int8 x int8 with AVX512-VNNI (vpdpbusd), for screening ------------------------------
 * Rows quantized to int8 as well (xq = q_x + 128, unsigned), weights int8 packed as
 * [ceil(n/48)][k/4][48][4]: each vpdpbusd adds 4 products per output exactly in int32, 64
 * per instruction (the widening loop above does 16 per multiply-add plus two conversions,
 * which caps it below memory speed at 8 rows). The int32 sums are exact; out = (sum -
 * 128 * colsum) * row_scale * col_scale, the difference exact in fp32 (|q_x . q| < 2^24 for
 * k <= 1040), then two roundings. */
#define VNNI __attribute__((target("avx512f,avx512vnni")))

static inline __attribute__((always_inline)) VNNI void pass_u8s8(const int rows, const uint8_t *x, int64_t ldx,
                                                                const int8_t *w, int64_t k4n, int32_t *acc) {
    __m512i c[MR][3];
    for (int m = 0; m < rows; ++m)
        for (int j = 0; j < 3; ++j) c[m][j] = _mm512_loadu_si512(acc + m * NR + 16 * j);
    for (int64_t k4 = 0; k4 < k4n; ++k4) {
        const int8_t *wk = w + k4 * NR * 4;
        for (int j = 0; j < NR * 4; j += 64) {
            _mm_prefetch((const char *)(wk + FAR * NR * 4) + j, _MM_HINT_T1);
            _mm_prefetch((const char *)(wk + NEAR * NR * 4) + j, _MM_HINT_T0);
        }
        const __m512i w0 = _mm512_loadu_si512(wk), w1 = _mm512_loadu_si512(wk + 64), w2 = _mm512_loadu_si512(wk + 128);
        for (int m = 0; m < rows; ++m) {
            int32_t four;
            memcpy(&four, x + m * ldx + 4 * k4, 4);
            const __m512i xb = _mm512_set1_epi32(four);
            c[m][0] = _mm512_dpbusd_epi32(c[m][0], xb, w0);
            c[m][1] = _mm512_dpbusd_epi32(c[m][1], xb, w1);
            c[m][2] = _mm512_dpbusd_epi32(c[m][2], xb, w2);
        }
    }
    for (int m = 0; m < rows; ++m)
        for (int j = 0; j < 3; ++j) _mm512_storeu_si512(acc + m * NR + 16 * j, c[m][j]);
}

static VNNI void pass_u8s8_rows(int64_t rows, const uint8_t *x, int64_t ldx, const int8_t *w, int64_t k4n, int32_t *acc) {
    switch (rows) {
    case 1: pass_u8s8(1, x, ldx, w, k4n, acc); break;
    case 2: pass_u8s8(2, x, ldx, w, k4n, acc); break;
    case 3: pass_u8s8(3, x, ldx, w, k4n, acc); break;
    case 4: pass_u8s8(4, x, ldx, w, k4n, acc); break;
    case 5: pass_u8s8(5, x, ldx, w, k4n, acc); break;
    case 6: pass_u8s8(6, x, ldx, w, k4n, acc); break;
    case 7: pass_u8s8(7, x, ldx, w, k4n, acc); break;
    default: pass_u8s8(8, x, ldx, w, k4n, acc); break;
    }
}

/* xq [m, k] uint8 (k a multiple of 4), packed as above, colsum [n] (sum of each output's
 * int8 weights), row_scale [m], col_scale [n]; y [m, n]. Returns 0, or -1 if a thread could
 * not get its accumulators. */
VNNI int omni2_few_rows_u8s8(const uint8_t *xq, int64_t m, int64_t k, const int8_t *packed, int64_t n,
                             const int32_t *colsum, const float *row_scale, const float *col_scale, float *y,
                             int threads) {
    const int64_t blocks = (n + NR - 1) / NR, k4 = k / 4;
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        int32_t *acc = aligned_alloc(64, (size_t)(m * NR * sizeof(int32_t) + 63) / 64 * 64);
        failed = acc == NULL;
#pragma omp for schedule(static)
        for (int64_t b = 0; b < blocks; ++b) {
            if (acc == NULL) continue;
            memset(acc, 0, (size_t)m * NR * sizeof(int32_t));
            const int8_t *block = packed + b * k4 * NR * 4;
            for (int64_t q0 = 0; q0 < k4; q0 += KB / 4) {
                const int64_t qn = k4 - q0 < KB / 4 ? k4 - q0 : KB / 4;
                for (int64_t r = 0; r < m; r += MR)
                    pass_u8s8_rows(m - r < MR ? m - r : MR, xq + r * k + 4 * q0, k, block + q0 * NR * 4, qn, acc + r * NR);
            }
            const int64_t n0 = b * NR, cols = n - n0 < NR ? n - n0 : NR;
            for (int64_t r = 0; r < m; ++r)
                for (int64_t j = 0; j < cols; ++j)
                    y[r * n + n0 + j] = (float)(acc[r * NR + j] - 128 * colsum[n0 + j]) * row_scale[r] * col_scale[n0 + j];
        }
        free(acc);
    }
    return failed ? -1 : 0;
}

/* Rows x [m, k] fp32 -> int8 with a scale per row, for omni2_few_rows_u8s8: scale[r] =
 * max|x_r| / 127 (1 for an all-zero row), q = round(x / scale) in [-127, 127], stored as
 * q + 128 in xq [m, kp] (kp >= k; the padding is q = 0). Also, in float64, for the screen's
 * error bound: err[r] = ||x_r - scale[r] q_r|| and qnorm[r] = ||q_r||. A non-finite row
 * gives a non-finite scale (the caller's screen then falls back to the full head). */
void omni2_quantize_rows(const float *x, int64_t m, int64_t k, int64_t kp, uint8_t *xq, float *scale,
                         double *err, double *qnorm) {
    for (int64_t r = 0; r < m; ++r) {
        const float *row = x + r * k;
        float top = 0.0f;
        int finite = 1;
        for (int64_t i = 0; i < k; ++i) {
            finite &= isfinite(row[i]) != 0;
            top = fabsf(row[i]) > top ? fabsf(row[i]) : top;
        }
        const float s = !finite ? NAN : (top > 0.0f ? top / 127.0f : 1.0f);
        double e2 = 0.0, q2 = 0.0;
        for (int64_t i = 0; i < k; ++i) {
            float q = nearbyintf(row[i] / s);
            q = q > 127.0f ? 127.0f : (q < -127.0f ? -127.0f : q);
            if (q != q) q = 0.0f;
            xq[r * kp + i] = (uint8_t)(int)(q + 128.0f);
            const double e = (double)row[i] - (double)s * (double)q;
            e2 += e * e;
            q2 += (double)q * (double)q;
        }
        for (int64_t i = k; i < kp; ++i) xq[r * kp + i] = 128;
        scale[r] = s;
        err[r] = sqrt(e2);
        qnorm[r] = sqrt(q2);
    }
}
