/* Lookup-table matmul for palettized weights (models/lut.py builds and loads this file).

   y (n, N) = x (n, K) · Wᵀ, where W[o, i] = tables[(o / group) · 16 + index(o, i)] and
   index(o, i) is the bits-wide field of packed row o at bit i·bits (models/palette.py's
   pack_indices: the first index in the low bits of each byte). Tables are fp32, 16 entries
   per group of `group` output rows; a table of a 2-bit palette repeats its 4 entries
   (entry k = T[k mod 4]), so both widths index it with the low 4 bits of a lane.

   The weight is read once per call whatever n is: each 16-index chunk becomes 16 weights in
   a register by a table permute (AVX-512 vpermps holds a whole 16-entry table) and is
   multiplied into every row of x. Decoding reads bits/32 of the bytes an fp32 matmul reads.
   Rows of W are shared among OpenMP threads. Without AVX-512 a scalar loop does the same
   arithmetic (correct, slower: the caller measures before choosing this path). */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define MAX_ROWS 8

static inline float table_entry(const float *table, const uint8_t *row, int64_t i, int bits) {
    int64_t bit = i * bits;
    int field = (row[bit >> 3] >> (bit & 7)) & ((1 << bits) - 1);
    return table[field];
}

#ifdef __AVX512F__
/* 16 indices starting at index i (a multiple of 16) of a packed row, one per int32 lane,
   each lane's low 4 bits the index (higher bits hold later indices: vpermps ignores them). */
static inline __m512i chunk_indices(const uint8_t *row, int64_t i, int bits,
                                    __m512i spread, __m512i shifts) {
    if (bits == 4) {
        uint64_t word;
        memcpy(&word, row + i / 2, 8);
        __m512i w = _mm512_castsi128_si512(_mm_cvtsi64_si128((long long)word));
        return _mm512_srlv_epi32(_mm512_permutexvar_epi32(spread, w), shifts);
    }
    uint32_t word;
    memcpy(&word, row + i / 4, 4);
    return _mm512_srlv_epi32(_mm512_set1_epi32((int)word), shifts);
}

/* Output rows o and o + 1 (same table: groups have an even size) for R rows of x: each x
   chunk is loaded once for both weight rows, and the two rows are independent FMA chains. */
static inline void row_block(const float *x, int64_t K, const uint8_t *row, int64_t row_bytes,
                             const float *table, int bits, float *y, int64_t N, int64_t o,
                             const int R, const int pair) {
    const __m512i spread = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    const __m512i shifts4 = _mm512_set_epi32(28, 24, 20, 16, 12, 8, 4, 0,
                                             28, 24, 20, 16, 12, 8, 4, 0);
    const __m512i shifts2 = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16,
                                             14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i shifts = bits == 4 ? shifts4 : shifts2;
    const __m512 lut = _mm512_loadu_ps(table);
    const uint8_t *row1 = row + row_bytes;
    __m512 acc0[MAX_ROWS], acc1[MAX_ROWS];
    for (int r = 0; r < R; r++) acc0[r] = acc1[r] = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= K; i += 16) {
        __m512 w0 = _mm512_permutexvar_ps(chunk_indices(row, i, bits, spread, shifts), lut);
        if (pair) {
            __m512 w1 = _mm512_permutexvar_ps(chunk_indices(row1, i, bits, spread, shifts), lut);
            for (int r = 0; r < R; r++) {
                __m512 xr = _mm512_loadu_ps(x + r * K + i);
                acc0[r] = _mm512_fmadd_ps(w0, xr, acc0[r]);
                acc1[r] = _mm512_fmadd_ps(w1, xr, acc1[r]);
            }
        } else {
            for (int r = 0; r < R; r++)
                acc0[r] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + r * K + i), acc0[r]);
        }
    }
    for (int r = 0; r < R; r++) {
        float s0 = _mm512_reduce_add_ps(acc0[r]), s1 = _mm512_reduce_add_ps(acc1[r]);
        for (int64_t j = i; j < K; j++) {
            s0 += table_entry(table, row, j, bits) * x[r * K + j];
            if (pair) s1 += table_entry(table, row1, j, bits) * x[r * K + j];
        }
        y[r * N + o] = s0;
        if (pair) y[r * N + o + 1] = s1;
    }
}

/* Decoding (one row of x): 16 bytes of a row per step, 32 indices at 4 bits or 64 at 2,
   instead of 16. The bytes are broadcast to the four 128-bit lanes and lane j shifts its
   dword (j mod 4) right by 8·(j / 4) + bits·f for field f of the byte: one table permute per
   field then yields 16 weights, in an order that x is rearranged into once per call
   (``lanes_of``). No index permute (half the shuffle-port work of the path above) and one
   independent FMA chain per field and weight row. One thread, 3072×576, against the path
   above: 1.30× (4-bit) and 1.14× (2-bit) with the matrix in cache, 1.23× and 1.08× streaming
   60 of them (53 MB); SmolLM2 4-bit decoding 35.7 -> 37.6 tokens/s, where the rest of a step
   and memory bandwidth dominate. */
static inline int64_t lane_source(int j, int f, int bits) {
    return (8 / bits) * (4 * (j % 4) + j / 4) + f;
}

static void lanes_of(const float *x, int64_t K, int bits, float *xs) {
    const int per = 8 / bits, step = 16 * per;
    for (int64_t c = 0; c + step <= K; c += step)
        for (int f = 0; f < per; f++)
            for (int j = 0; j < 16; j++) xs[c + 16 * f + j] = x[c + lane_source(j, f, bits)];
}

static inline void gemv_pair(const float *x, const float *xs, int64_t K, const uint8_t *row,
                             int64_t row_bytes, const float *table, float *y, int64_t o,
                             const int bits, const int pair) {
    const int per = 8 / bits, step = 16 * per;
    const __m512i base = _mm512_set_epi32(24, 24, 24, 24, 16, 16, 16, 16,
                                          8, 8, 8, 8, 0, 0, 0, 0);
    const __m512 lut = _mm512_loadu_ps(table);
    const uint8_t *row1 = row + row_bytes;
    __m512 acc0[4], acc1[4];
    for (int f = 0; f < per; f++) acc0[f] = acc1[f] = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + step <= K; i += step) {
        const int64_t at = i * bits / 8;
        __m512i v0 = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(row + at)));
        __m512i v1 = pair ? _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(row1 + at)))
                          : v0;
        for (int f = 0; f < per; f++) {
            const __m512i shift = _mm512_add_epi32(base, _mm512_set1_epi32(bits * f));
            const __m512 xf = _mm512_loadu_ps(xs + i + 16 * f);
            acc0[f] = _mm512_fmadd_ps(
                _mm512_permutexvar_ps(_mm512_srlv_epi32(v0, shift), lut), xf, acc0[f]);
            if (pair)
                acc1[f] = _mm512_fmadd_ps(
                    _mm512_permutexvar_ps(_mm512_srlv_epi32(v1, shift), lut), xf, acc1[f]);
        }
    }
    for (int f = 1; f < per; f++) {
        acc0[0] = _mm512_add_ps(acc0[0], acc0[f]);
        acc1[0] = _mm512_add_ps(acc1[0], acc1[f]);
    }
    float s0 = _mm512_reduce_add_ps(acc0[0]), s1 = _mm512_reduce_add_ps(acc1[0]);
    for (int64_t j = i; j < K; j++) {
        s0 += table_entry(table, row, j, bits) * x[j];
        if (pair) s1 += table_entry(table, row1, j, bits) * x[j];
    }
    y[o] = s0;
    if (pair) y[o + 1] = s1;
}

#else
static inline void row_block(const float *x, int64_t K, const uint8_t *row, int64_t row_bytes,
                             const float *table, int bits, float *y, int64_t N, int64_t o,
                             const int R, const int pair) {
    for (int p = 0; p <= pair; p++)
        for (int r = 0; r < R; r++) {
            float s = 0.0f;
            for (int64_t j = 0; j < K; j++)
                s += table_entry(table, row + p * row_bytes, j, bits) * x[r * K + j];
            y[r * N + o + p] = s;
        }
}
#endif

/* Rows of x in blocks of up to MAX_ROWS, so each block's accumulators stay in registers
   (R and pair are constants after inlining). */
static inline void rows_of(const float *x, int64_t n, int64_t K, const uint8_t *row,
                           int64_t row_bytes, const float *table, int bits, float *y, int64_t N,
                           int64_t o, const int pair) {
#define BLOCK(R) row_block(x + r * K, K, row, row_bytes, table, bits, y + r * N, N, o, R, pair)
    int64_t r = 0;
    for (; r + 8 <= n; r += 8) BLOCK(8);
    switch (n - r) {
    case 7: BLOCK(7); break;
    case 6: BLOCK(6); break;
    case 5: BLOCK(5); break;
    case 4: BLOCK(4); break;
    case 3: BLOCK(3); break;
    case 2: BLOCK(2); break;
    case 1: BLOCK(1); break;
    default: break;
    }
#undef BLOCK
}

/* Output rows o and, with pair, o + 1 for every row of x: the one-row path where x was
   rearranged into xs, else row blocks. The width and pair are literals at each inlined call,
   so the loops unroll (inside the OpenMP-outlined loop a parameter would not be a constant). */
static inline void output_rows(const float *x, const float *xs, int64_t n, int64_t K,
                               const uint8_t *row, int64_t row_bytes, const float *table,
                               int bits, float *y, int64_t N, int64_t o, const int pair) {
#ifdef __AVX512F__
    if (xs != NULL) {
        if (bits == 4) gemv_pair(x, xs, K, row, row_bytes, table, y, o, 4, pair);
        else gemv_pair(x, xs, K, row, row_bytes, table, y, o, 2, pair);
        return;
    }
#endif
    rows_of(x, n, K, row, row_bytes, table, bits, y, N, o, pair);
}

/* The exported entry point: returns 0, or -1 for a width it does not take. */
int lut_linear(const float *x, int64_t n, int64_t K, const uint8_t *packed, int64_t row_bytes,
               const float *tables, int64_t N, int64_t group, int bits, float *y, int threads) {
    if (bits != 2 && bits != 4) return -1;
    if (group % 2) return -1;
    float *xs = NULL; /* x rearranged for the one-row path; NULL: row blocks */
#ifdef __AVX512F__
    if (n == 1 && K >= 16 * 8 / bits) xs = malloc((size_t)K * sizeof(float));
    if (xs != NULL) lanes_of(x, K, bits, xs);
#endif
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t p = 0; p < N / 2; p++) {
        int64_t o = 2 * p;
        output_rows(x, xs, n, K, packed + o * row_bytes, row_bytes, tables + (o / group) * 16,
                    bits, y, N, o, 1);
    }
    if (N % 2) {
        int64_t o = N - 1;
        output_rows(x, xs, n, K, packed + o * row_bytes, row_bytes, tables + (o / group) * 16,
                    bits, y, N, o, 0);
    }
    free(xs);
    return 0;
}

/* 1 when this build has the vector path, for the caller's choice and the tests. */
int lut_vectorised(void) {
#ifdef __AVX512F__
    return 1;
#else
    return 0;
#endif
}
