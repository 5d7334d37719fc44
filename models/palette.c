/* The two loops of palettization (models/palette.py) that torch runs as thousands of small
 * operations, each with the same algorithm as its torch path (the fallback):
 *
 * kmeans1d: the weighted 1-D k-means per group that fits the tables (kmeans_tables; torch's
 * _Sorted, _lloyd, _split_merge), one group at a time, groups spread over OpenMP threads.
 * feedback_block: one lazy block of GPTQ's column-by-column rounding onto the tables
 * (_feedback_pass), rows spread over threads.
 *
 * Why C for k-means: in torch every split/merge round evaluates every cut of every group as a dozen
 * (G, P) fp64 tensors (gathers, searches, divisions); one group at a time the same round is a
 * single pass over the group's prefix sums held in cache, and a group stops as soon as it
 * stops moving. On SmolLM2's 120 fused projections the torch path took ~32 s on one thread.
 *
 * For each group: points x (P floats) with weights w (P floats, >= 0) are sorted by x; prefix
 * sums of w, w·x and w·x² (fp64) give any run's weight, mean and squared error in O(1); the
 * C centroids start at the weighted (c + 0.5)/C quantiles, take `iters` Lloyd iterations, then
 * up to `rounds` split/merge moves (the adjacent pair whose merge costs least becomes one
 * cluster, the cluster whose best cut gains most becomes two, when the gain exceeds the
 * cost), each followed by `iters` Lloyd iterations. Centroids come back sorted, fp64.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    float x, w;
} point;

typedef struct {
    const double *x, *W, *S, *Q; /* sorted points, prefix sums (P + 1) */
    int64_t P;
} run_sums;

/* fp32 bits -> unsigned integers in the same order (negatives flipped, positives offset) */
static uint32_t ordered(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u & 0x80000000u ? ~u : u | 0x80000000u;
}

/* stable LSD radix sort of points by x, 4 passes of 8 bits (qsort's comparator calls made
 * sorting ~half the time of a group) */
static void sort_points(point *pts, point *tmp, int64_t P) {
    for (int shift = 0; shift < 32; shift += 8) {
        int64_t count[257] = {0};
        for (int64_t p = 0; p < P; p++) count[((ordered(pts[p].x) >> shift) & 255) + 1]++;
        for (int k = 0; k < 256; k++) count[k + 1] += count[k];
        for (int64_t p = 0; p < P; p++) tmp[count[(ordered(pts[p].x) >> shift) & 255]++] = pts[p];
        memcpy(pts, tmp, sizeof(point) * P);
    }
}

/* first index i with x[i] >= v (torch.searchsorted, right=False) */
static int64_t lower_bound(const double *x, int64_t n, double v) {
    int64_t lo = 0, hi = n;
    while (lo < hi) {
        int64_t mid = lo + (hi - lo) / 2;
        if (x[mid] < v)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

static double error(const run_sums *r, int64_t i, int64_t j) {
    double w = r->W[j] - r->W[i], s = r->S[j] - r->S[i], q = r->Q[j] - r->Q[i];
    double e = q - s * s / (w > 1e-300 ? w : 1e-300);
    return e > 0 ? e : 0;
}

static double mean(const run_sums *r, int64_t i, int64_t j, double fallback) {
    double w = r->W[j] - r->W[i], s = r->S[j] - r->S[i];
    return w > 0 ? s / (w > 1e-300 ? w : 1e-300) : fallback;
}

static int by_value(const void *a, const void *b) {
    double da = *(const double *)a, db = *(const double *)b;
    return (da > db) - (da < db);
}

/* b[0..C]: where each cluster of sorted centroids c starts, then P */
static void bounds(const run_sums *r, const double *c, int C, int64_t *b) {
    b[0] = 0;
    for (int j = 1; j < C; j++) b[j] = lower_bound(r->x, r->P, (c[j] + c[j - 1]) / 2);
    b[C] = r->P;
}

static void lloyd(const run_sums *r, double *c, int C, int iters, int64_t *b) {
    for (int it = 0; it < iters; it++) {
        bounds(r, c, C, b);
        for (int j = 0; j < C; j++) c[j] = mean(r, b[j], b[j + 1], c[j]);
        qsort(c, C, sizeof(double), by_value);
    }
}

/* one split/merge move; 0 when no move gains */
static int split_merge(const run_sums *r, double *c, int C, int64_t *b, double *err) {
    bounds(r, c, C, b);
    for (int j = 0; j < C; j++) err[j] = error(r, b[j], b[j + 1]);
    int m = 0;
    double cost = INFINITY;
    for (int j = 0; j + 1 < C; j++) {
        double merge = error(r, b[j], b[j + 2]) - err[j] - err[j + 1];
        if (merge < cost) cost = merge, m = j;
    }
    double best = -INFINITY;
    int64_t cut = 0;
    int s = 0;
    for (int k = 0; k < C; k++) { /* cuts in increasing order: the first best, as torch.max */
        if (k == m || k == m + 1) continue;
        int64_t lo = b[k], hi = b[k + 1];
        for (int64_t t = lo; t < hi; t++) {
            double gain = err[k] - error(r, lo, t) - error(r, t, hi);
            if (gain > best) best = gain, cut = t, s = k;
        }
    }
    if (!(best > cost * (1 + 1e-9))) return 0;
    double fallback = c[0];
    c[m] = mean(r, b[m], b[m + 2], fallback);
    c[m + 1] = mean(r, b[s], cut, fallback);
    c[s] = mean(r, cut, b[s + 1], fallback);
    qsort(c, C, sizeof(double), by_value);
    return 1;
}

static void fit_group(const float *x, const float *w, int64_t P, int C, int iters, int rounds,
                      double *c, point *pts, double *buf, int64_t *b, double *err) {
    for (int64_t p = 0; p < P; p++) pts[p].x = x[p], pts[p].w = w[p];
    sort_points(pts, (point *)buf, P); /* buf is free until the prefix sums */
    double *xs = buf, *W = buf + P, *S = W + P + 1, *Q = S + P + 1;
    W[0] = S[0] = Q[0] = 0;
    for (int64_t p = 0; p < P; p++) {
        double xv = pts[p].x, wv = pts[p].w;
        xs[p] = xv;
        W[p + 1] = W[p] + wv;
        S[p + 1] = S[p] + wv * xv;
        Q[p + 1] = Q[p] + wv * xv * xv;
    }
    run_sums r = {xs, W, S, Q, P};
    for (int j = 0; j < C; j++) { /* weighted quantiles: where W first reaches the target */
        double target = (j + 0.5) / C * W[P];
        int64_t at = lower_bound(W, P + 1, target) - 1;
        c[j] = xs[at < 0 ? 0 : (at > P - 1 ? P - 1 : at)];
    }
    lloyd(&r, c, C, iters, b);
    for (int round = 0; round < rounds; round++) {
        /* no move: more Lloyd iterations may still shift the clusters enough for one, as the
         * torch path (which moves every group until none moves) finds; stop once they don't */
        int moved = split_merge(&r, c, C, b, err);
        double before[256];
        memcpy(before, c, sizeof(double) * C);
        lloyd(&r, c, C, iters, b);
        if (!moved && !memcmp(before, c, sizeof(double) * C)) break;
    }
}

/* x, w: (G, P) fp32 row-major; out: (G, C) fp64 sorted centroids. Returns 0, -1 when a
 * buffer cannot be allocated, -2 for C outside 2..256 (out is then undefined). */
int kmeans1d(const float *x, const float *w, int64_t G, int64_t P, int C, int iters, int rounds,
             double *out, int threads) {
    if (C < 2 || C > 256) return -2; /* fit_group keeps up to 256 centroids on its stack */
    int failed = 0;
#pragma omp parallel num_threads(threads > 0 ? threads : 1) reduction(| : failed)
    {
        point *pts = malloc(sizeof(point) * P);
        double *buf = malloc(sizeof(double) * (4 * P + 3));
        int64_t *b = malloc(sizeof(int64_t) * (C + 1));
        double *err = malloc(sizeof(double) * C);
        int ok = pts && buf && b && err;
        failed |= !ok;
        /* every thread reaches the loop (a worksharing construct); one without buffers skips
         * its groups and the call fails */
#pragma omp for schedule(dynamic, 4)
        for (int64_t g = 0; g < G; g++)
            if (ok)
                fit_group(x + g * P, w + g * P, P, C, iters, rounds, out + g * C, pts, buf, b,
                          err);
        free(pts), free(buf), free(b), free(err);
    }
    return failed ? -1 : 0;
}

/* One lazy block of GPTQ's rounding with error feedback onto per-row tables (models/
 * palette.py, _feedback_pass), every row on its own: rows do not interact inside a block (the
 * columns' order and H are shared), so each row runs its B columns in order, in cache, with
 * no per-column dispatch (in torch ~6 small operations per column, ~100k columns for SmolLM2).
 *
 * w: (N, B) fp32 row-major, the block's columns, updated in place; tables: (N, C) fp32 (each
 * row's table); h: (B, B) fp32 row-major, the block of the upper Cholesky factor of H^-1.
 * For column i of each row: index = the nearest entry (the first of equals, as torch.argmin),
 * target = w[i], err = (w[i] - entry) / h[i][i], then w[j] -= err * h[i][j] for j > i.
 * Outputs (N, B): idx (int64), targets, errs. */
void feedback_block(float *w, const float *tables, int64_t N, int64_t B, int C, const float *h,
                    int64_t *idx, float *targets, float *errs, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads > 0 ? threads : 1)
    for (int64_t n = 0; n < N; n++) {
        float *row = w + n * B;
        const float *table = tables + (int64_t)n * C;
        for (int64_t i = 0; i < B; i++) {
            float v = row[i], best = fabsf(table[0] - v);
            int k = 0;
            for (int c = 1; c < C; c++) {
                float d = fabsf(table[c] - v);
                if (d < best) best = d, k = c;
            }
            float err = (v - table[k]) / h[i * B + i];
            idx[n * B + i] = k, targets[n * B + i] = v, errs[n * B + i] = err;
            const float *hi = h + i * B;
            for (int64_t j = i + 1; j < B; j++) row[j] -= err * hi[j];
        }
    }
}
