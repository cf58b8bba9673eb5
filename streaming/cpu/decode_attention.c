/* One decode step's attention for every row of a layer, in fp32, on an AVX-512 CPU.
 *
 * Model.Attention does this in ~15 torch calls per layer (rotary embedding, two indexed
 * writes into the KV cache, SDPA, the reshapes between them); in a decode step each call
 * finds its caches cold, as the weights streamed in between evict them, and costs 20-200 us
 * for a few kilobytes of work. Here it is one call per layer. For each row b and key/value
 * group g (in parallel):
 *
 *   1. rotate the group's queries and key by position pos[b] (rotate-half layout:
 *      x*cos + rot(x)*sin, each product and the sum rounded as torch's three calls round
 *      them: this file is compiled with -ffp-contract=off, so the key written is bitwise
 *      the model's);
 *   2. write that key and the group's value into the cache at (b, g, pos[b]);
 *   3. attend the group's queries to cache positions 0..pos[b] (a causal decode step):
 *      scores q.k * scale, softmax (max subtracted, exp, sum), weighted sum of the values.
 *
 * Step 3 sums in another order than SDPA's kernel, so the output differs from it in the
 * last bits (as SDPA's own blocked kernels differ between spans). A row's result does not
 * depend on the other rows.
 *
 * Built by streaming/cpu/native.py with the C compiler at first use; called through ctypes
 * (streaming/cpu/decode_attention.py).
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#define MAX_CHUNKS 8   /* head <= 128 */
#define MAX_QUERIES 64 /* queries per key/value group */

/* e^x for x <= 0 (scores minus their maximum): 2^n e^r with |r| <= ln2/2, e^r by its
 * Taylor series to r^7 (relative error < 1e-8, below fp32's 6e-8), 2^n by scalef (which
 * underflows to 0 for the smallest x). */
static inline __m512 exp_nonpositive(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x); /* ln2, high bits (exact product) */
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);     /* ln2, the rest */
    __m512 p = _mm512_set1_ps(1.0f / 5040);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* lanes [d, d+16) of a head of size `head` */
static inline __mmask16 lanes(int64_t d, int64_t head) {
    const int64_t left = head - d;
    return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
}

/* 16 dot products q . k_j (j = 0..15, keys `head` floats apart) as one vector: per key a
 * vector of partial sums, then the 16 vectors summed across their lanes together
 * (transposing as they are added: 45 shuffles and adds instead of 16 full reductions). */
static inline __m512 dot16(const float *q, const float *keys, const int64_t head) {
    __m512 t[16];
    for (int j = 0; j < 16; ++j) {
        __m512 acc = _mm512_setzero_ps();
        for (int64_t d = 0; d < head; d += 16) {
            const __mmask16 m = lanes(d, head);
            acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, q + d), _mm512_maskz_loadu_ps(m, keys + j * head + d), acc);
        }
        t[j] = acc;
    }
    __m512 u[8], w[4];
    for (int i = 0; i < 8; ++i) /* per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3] */
        u[i] = _mm512_add_ps(_mm512_unpacklo_ps(t[2 * i], t[2 * i + 1]), _mm512_unpackhi_ps(t[2 * i], t[2 * i + 1]));
    for (int i = 0; i < 4; ++i) { /* per 128-bit lane: the lane's sums of 4 keys */
        const __m512d a = _mm512_castps_pd(u[2 * i]), b = _mm512_castps_pd(u[2 * i + 1]);
        w[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    /* w[i] holds keys 4i..4i+3 in each of its four 128-bit lanes: add the lanes */
    const __m512 s01 = _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], 0x44), _mm512_shuffle_f32x4(w[0], w[1], 0xEE));
    const __m512 s23 = _mm512_add_ps(_mm512_shuffle_f32x4(w[2], w[3], 0x44), _mm512_shuffle_f32x4(w[2], w[3], 0xEE));
    return _mm512_add_ps(_mm512_shuffle_f32x4(s01, s23, 0x88), _mm512_shuffle_f32x4(s01, s23, 0xDD));
}

/* one dot product (the keys past the last whole block of 16) */
static inline float dot(const float *a, const float *b, const int64_t head) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t d = 0; d < head; d += 16) {
        const __mmask16 m = lanes(d, head);
        acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + d), _mm512_maskz_loadu_ps(m, b + d), acc);
    }
    return _mm512_reduce_add_ps(acc);
}

/* out = x*cos + rot(x)*sin, rot(x) = (-x[h:], x[:h]); plain C, each operation rounded */
static void rotate(const float *x, const float *cos, const float *sin, int64_t head, float *out) {
    const int64_t half = head / 2;
    for (int64_t d = 0; d < head; ++d) {
        const float rot = d < half ? -x[d + half] : x[d - half];
        const float a = x[d] * cos[d];
        const float b = rot * sin[d];
        out[d] = a + b;
    }
}

/* Ask for n rows of `head` floats into L2 (the next group's keys or values: they are read
 * from memory while this group computes). */
static inline void prefetch_rows(const float *rows, int64_t n, int64_t head) {
    const char *p = (const char *)rows, *end = (const char *)(rows + n * head);
    for (; p < end; p += 64) _mm_prefetch(p, _MM_HINT_T1);
}

/* One (row, group): rotate, write the cache, attend. Inlined with head = 64 (Qwen2-0.5B's)
 * as a constant, so those loops unroll, and once for any other size. Keys are read in
 * blocks of 16 (4 KB at head 64, kept in L1 while every query uses them), values once per
 * QB queries. next_k/next_v/next_n: the group computed next, prefetched meanwhile. */
#define QB 4 /* queries per pass over the values: QB x head/16 accumulators */
static inline __attribute__((always_inline)) void attend_group(
    const float *src, int64_t Q, const int64_t head, int64_t p, const float *c, const float *s, float *kg,
    float *vg, float scale, float *scratch, int64_t max_len, float *out, const float *next_k,
    const float *next_v, int64_t next_n) {
    const int64_t n = p + 1, C = (head + 15) / 16;
    float *q = scratch, *score = scratch + Q * head;
    for (int64_t i = 0; i < Q; ++i) rotate(src + i * head, c, s, head, q + i * head);
    rotate(src + Q * head, c, s, head, kg + p * head);
    for (int64_t d = 0; d < head; ++d) vg[p * head + d] = src[(Q + 1) * head + d];
    /* scores q_i . k_j * scale, and each query's maximum */
    const __m512 scale16 = _mm512_set1_ps(scale);
    __m512 top16[MAX_QUERIES];
    for (int64_t i = 0; i < Q; ++i) top16[i] = _mm512_set1_ps(-INFINITY);
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) {
        if (j < next_n) {
            const int64_t rows = next_n - j < 16 ? next_n - j : 16;
            prefetch_rows(next_k + j * head, rows, head);
            prefetch_rows(next_v + j * head, rows, head);
        }
        for (int64_t i = 0; i < Q; ++i) {
            const __m512 sj = _mm512_mul_ps(dot16(q + i * head, kg + j * head, head), scale16);
            _mm512_storeu_ps(score + i * max_len + j, sj);
            top16[i] = _mm512_max_ps(top16[i], sj);
        }
    }
    if (j < next_n) {
        prefetch_rows(next_k + j * head, next_n - j, head);
        prefetch_rows(next_v + j * head, next_n - j, head);
    }
    float inv[MAX_QUERIES];
    for (int64_t i = 0; i < Q; ++i) {
        float *si = score + i * max_len, top = _mm512_reduce_max_ps(top16[i]);
        for (int64_t t = j; t < n; ++t) {
            si[t] = dot(q + i * head, kg + t * head, head) * scale;
            top = si[t] > top ? si[t] : top;
        }
        /* softmax numerators e_ij = exp(s_ij - max) and 1 / their sum */
        __m512 total = _mm512_setzero_ps();
        for (int64_t t = 0; t < n; t += 16) {
            const __mmask16 m = lanes(t, n);
            const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, si + t), _mm512_set1_ps(top)));
            _mm512_mask_storeu_ps(si + t, m, e);
            total = _mm512_add_ps(total, _mm512_maskz_mov_ps(m, e));
        }
        inv[i] = 1.0f / _mm512_reduce_add_ps(total);
    }
    /* y_i = sum_j e_ij v_j / sum_j e_ij, QB queries a pass: QB x head/16 independent
     * multiply-add chains over j, each value row read once a pass */
    for (int64_t i0 = 0; i0 < Q; i0 += QB) {
        const float *e[QB]; /* a short last pass repeats its last query (same sums, written twice) */
        int64_t qi[QB];
        for (int a = 0; a < QB; ++a) {
            qi[a] = i0 + a < Q ? i0 + a : Q - 1;
            e[a] = score + qi[a] * max_len;
        }
        __m512 acc[QB][MAX_CHUNKS];
        for (int a = 0; a < QB; ++a)
            for (int64_t ch = 0; ch < C; ++ch) acc[a][ch] = _mm512_setzero_ps();
        for (int64_t t = 0; t < n; ++t) {
            __m512 vt[MAX_CHUNKS];
            for (int64_t ch = 0; ch < C; ++ch) vt[ch] = _mm512_maskz_loadu_ps(lanes(16 * ch, head), vg + t * head + 16 * ch);
            for (int a = 0; a < QB; ++a) {
                const __m512 w = _mm512_set1_ps(e[a][t]);
                for (int64_t ch = 0; ch < C; ++ch) acc[a][ch] = _mm512_fmadd_ps(w, vt[ch], acc[a][ch]);
            }
        }
        for (int a = 0; a < QB; ++a)
            for (int64_t ch = 0; ch < C; ++ch)
                _mm512_mask_storeu_ps(out + qi[a] * head + 16 * ch, lanes(16 * ch, head),
                                      _mm512_mul_ps(acc[a][ch], _mm512_set1_ps(inv[qi[a]])));
    }
}

/* qkv [rows, groups, q_per_kv + 2, head] (per group: its queries, its key, its value);
 * pos [rows]; cos/sin [rows, head] (each row's rotation angles); the layer's caches k/v [rows, groups, max_len,
 * head] with the given strides (in floats; head contiguous); y [rows, groups, q_per_kv,
 * head]. Returns 0; -1 if a position is out of range (nothing written); -2 if a thread
 * could not get its scratch memory; -3 for heads over 128 or over 64 queries a group. */
int omni2_decode_attention(const float *qkv, int64_t rows, int64_t groups, int64_t q_per_kv, int64_t head,
                           const int64_t *pos, const float *cos, const float *sin,
                           float *k, float *v, int64_t row_stride, int64_t group_stride, int64_t max_len,
                           float scale, float *y, int threads) {
    if (head > 16 * MAX_CHUNKS || q_per_kv > MAX_QUERIES) return -3;
    for (int64_t b = 0; b < rows; ++b)
        if (pos[b] < 0 || pos[b] >= max_len) return -1;
    const int64_t Q = q_per_kv, per_group = (Q + 2) * head;
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        /* rotated queries [Q][head], then scores [Q][max_len] */
        float *scratch = aligned_alloc(64, (size_t)((Q * head + Q * max_len) * sizeof(float) + 63) / 64 * 64);
        failed = scratch == NULL;
#pragma omp for schedule(static)
        for (int64_t item = 0; item < rows * groups; ++item) {
            if (scratch == NULL) continue;
            const int64_t b = item / groups, g = item % groups, p = pos[b];
            const float *src = qkv + item * per_group, *c = cos + b * head, *s = sin + b * head;
            float *kg = k + b * row_stride + g * group_stride, *vg = v + b * row_stride + g * group_stride;
            float *out = y + item * Q * head;
            /* the next (row, group): prefetched while this one computes */
            const int64_t nb = (item + 1) / groups, ng = (item + 1) % groups;
            const int64_t next_n = item + 1 < rows * groups ? pos[nb] + 1 : 0;
            const float *next_k = k + nb * row_stride + ng * group_stride, *next_v = v + nb * row_stride + ng * group_stride;
            if (head == 64)
                attend_group(src, Q, 64, p, c, s, kg, vg, scale, scratch, max_len, out, next_k, next_v, next_n);
            else
                attend_group(src, Q, head, p, c, s, kg, vg, scale, scratch, max_len, out, next_k, next_v, next_n);
        }
        free(scratch);
    }
    return failed ? -2 : 0;
}
