/* y[M,N] = x[M,K] . W[N,K]^T (+ b) in fp32 for a few rows x, on an AVX-512 CPU.
 *
 * The product a decode step makes for every session (2 rows each) by every weight of the
 * model. It is bound by memory (each weight is read once per step) and, past a few rows, by
 * the multiply-adds; the library kernels wait for one and then do the other. This one keeps
 * the weight streaming while it computes: W is packed once as blocks of 48 output columns,
 * [ceil(N/48)][K][48] (each block one sequential run of memory), and every k step asks for
 * the weight 256 steps ahead into L2 and 48 ahead into L1. Per 128 k, the rows run in passes
 * of 8 against the same 24 KB of weight (3 x 8 = 24 vector accumulators in registers).
 *
 * Each output is summed in k order by one fused multiply-add chain, whatever the number of
 * rows or threads: a row's result does not depend on the other rows of the batch.
 *
 * Built by streaming/few_rows.py with gcc at first use; called through ctypes.
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

static inline __attribute__((always_inline)) void pass(const int rows, const float *x, int64_t ldx,
                                                       const float *w, int64_t kn, float *acc) {
    __m512 c[MR][3];
    for (int m = 0; m < rows; ++m)
        for (int j = 0; j < 3; ++j) c[m][j] = _mm512_loadu_ps(acc + m * NR + 16 * j);
    for (int64_t k = 0; k < kn; ++k) {
        const float *wk = w + k * NR;
        for (int j = 0; j < 3; ++j) {
            _mm_prefetch((const char *)(wk + FAR * NR + 16 * j), _MM_HINT_T1);
            _mm_prefetch((const char *)(wk + NEAR * NR + 16 * j), _MM_HINT_T0);
        }
        const __m512 w0 = _mm512_loadu_ps(wk), w1 = _mm512_loadu_ps(wk + 16), w2 = _mm512_loadu_ps(wk + 32);
        for (int m = 0; m < rows; ++m) {
            const __m512 xb = _mm512_set1_ps(x[m * ldx + k]);
            c[m][0] = _mm512_fmadd_ps(xb, w0, c[m][0]);
            c[m][1] = _mm512_fmadd_ps(xb, w1, c[m][1]);
            c[m][2] = _mm512_fmadd_ps(xb, w2, c[m][2]);
        }
    }
    for (int m = 0; m < rows; ++m)
        for (int j = 0; j < 3; ++j) _mm512_storeu_ps(acc + m * NR + 16 * j, c[m][j]);
}

/* one specialised copy per row count, so the accumulators stay in registers */
static void pass_rows(int64_t rows, const float *x, int64_t ldx, const float *w, int64_t kn, float *acc) {
    switch (rows) {
    case 1: pass(1, x, ldx, w, kn, acc); break;
    case 2: pass(2, x, ldx, w, kn, acc); break;
    case 3: pass(3, x, ldx, w, kn, acc); break;
    case 4: pass(4, x, ldx, w, kn, acc); break;
    case 5: pass(5, x, ldx, w, kn, acc); break;
    case 6: pass(6, x, ldx, w, kn, acc); break;
    case 7: pass(7, x, ldx, w, kn, acc); break;
    default: pass(8, x, ldx, w, kn, acc); break;
    }
}

int omni2_block_columns(void) { return NR; }

/* x [m,k] and y [m,n] contiguous; packed [ceil(n/48), k, 48] zero-padded; bias [n] or NULL.
 * Returns 0, or -1 if a thread could not get its accumulator buffer. */
int omni2_few_rows_linear(const float *x, int64_t m, int64_t k, const float *packed, int64_t n,
                          const float *bias, float *y, int threads) {
    const int64_t blocks = (n + NR - 1) / NR;
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        float *acc = aligned_alloc(64, (size_t)(m * NR * sizeof(float) + 63) / 64 * 64);
        failed = acc == NULL;
#pragma omp for schedule(static)
        for (int64_t b = 0; b < blocks; ++b) {
            if (acc == NULL) continue;
            memset(acc, 0, (size_t)m * NR * sizeof(float));
            const float *block = packed + b * k * NR;
            for (int64_t k0 = 0; k0 < k; k0 += KB) {
                const int64_t kn = k - k0 < KB ? k - k0 : KB;
                for (int64_t r = 0; r < m; r += MR)
                    pass_rows(m - r < MR ? m - r : MR, x + r * k + k0, k, block + k0 * NR, kn, acc + r * NR);
            }
            const int64_t n0 = b * NR, cols = n - n0 < NR ? n - n0 : NR;
            for (int64_t r = 0; r < m; ++r) {
                float *out = y + r * n + n0;
                const float *sum = acc + r * NR;
                if (bias)
                    for (int64_t j = 0; j < cols; ++j) out[j] = sum[j] + bias[n0 + j];
                else
                    memcpy(out, sum, (size_t)cols * sizeof(float));
            }
        }
        free(acc);
    }
    return failed ? -1 : 0;
}
