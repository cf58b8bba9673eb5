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
 * Built by streaming/few_rows.py with the C compiler at first use; called through ctypes.
 */
#include <immintrin.h>
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
