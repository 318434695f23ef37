/* Fused CPU kernels for the float32 decode step (one new token per row).
 *
 * Between two matmuls a decode step does little arithmetic but many small tensor
 * operations (rotary embedding, cache writes, attention over the cached span, residual
 * add + RMSNorm); each of these kernels does one such stretch in a single
 * pass over memory. Same math as the torch path in model/llama.py, in float32; results agree
 * with it to float32 rounding. Loaded through ctypes by kernels.py; threads come from
 * the OpenMP runtime torch already loaded (same soname), so they share one pool.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* exp(x) for float32, vectorisable (Cephes-style: 2^n * p(r), |r| <= ln2/2); ~1 ulp. */
static inline float vexp(float x) {
    x = x < -87.3f ? -87.3f : x;
    x = x > 88.3f ? 88.3f : x;
    float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f; /* round to nearest */
    float r = x - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* Rotary embedding of one head: out[d] = x[d] * cos[d] + x[(d + D/2) % D] * ssin[d],
 * where ssin is sin with its first half negated (rotate_half folded in). */
static inline void rope(float *out, const float *x, const float *cos, const float *ssin, int D) {
    int half = D / 2;
#pragma omp simd
    for (int d = 0; d < half; d++) out[d] = x[d] * cos[d] + x[d + half] * ssin[d];
#pragma omp simd
    for (int d = half; d < D; d++) out[d] = x[d] * cos[d] + x[d - half] * ssin[d];
}

/* One decode step's attention for one layer.
 *   qkv   [B, (H + 2*KVH) * D]: this step's projections (q heads, then k, then v)
 *   cos, ssin [B, D]: rotary tables of each row's position
 *   pos   [B]: each row's position; the row attends to cached positions 0..pos
 *   kc, vc: this layer's cache, element (b, g, l, d) at b*row_stride + g*head_stride + l*D + d
 *   out   [B, H * D]
 * Writes the rotated k and v of position pos[b] into the cache, then attends. Query head
 * h uses kv head h / (H / KVH). Work is split over (row, kv head) pairs. */
void decode_attention(int B, int H, int KVH, int D, const float *qkv, const float *cos, const float *ssin,
                      const int64_t *pos, float *kc, float *vc, int64_t row_stride, int64_t head_stride,
                      float scale, float *out, int nthreads) {
    const int G = H / KVH;
    const int64_t width = (int64_t)(H + 2 * KVH) * D;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int task = 0; task < B * KVH; task++) {
        const int b = task / KVH, g = task % KVH;
        const int64_t p = pos[b];
        const float *row = qkv + b * width;
        const float *c = cos + (int64_t)b * D, *s = ssin + (int64_t)b * D;
        float *kb = kc + b * row_stride + g * head_stride;
        float *vb = vc + b * row_stride + g * head_stride;
        rope(kb + p * D, row + (int64_t)(H + g) * D, c, s, D);
        memcpy(vb + p * D, row + (int64_t)(H + KVH + g) * D, sizeof(float) * D);

        const int64_t span = p + 1;
        float q[G * D];
        for (int j = 0; j < G; j++) {
            rope(q + j * D, row + (int64_t)(g * G + j) * D, c, s, D);
            for (int d = 0; d < D; d++) q[j * D + d] *= scale;
        }
        float *scores = malloc(sizeof(float) * G * span);
        float top[G];
        for (int j = 0; j < G; j++) top[j] = -INFINITY;
        for (int64_t l = 0; l < span; l++) {
            const float *k = kb + l * D;
            for (int j = 0; j < G; j++) {
                const float *qj = q + j * D;
                float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
                for (int d = 0; d < D; d++) acc += qj[d] * k[d];
                scores[j * span + l] = acc;
                if (acc > top[j]) top[j] = acc;
            }
        }
        float total[G];
        for (int j = 0; j < G; j++) {
            float *sj = scores + j * span, m = top[j], sum = 0.0f;
#pragma omp simd reduction(+ : sum)
            for (int64_t l = 0; l < span; l++) {
                float e = vexp(sj[l] - m);
                sj[l] = e;
                sum += e;
            }
            total[j] = sum;
        }
        float acc[G * D];
        memset(acc, 0, sizeof acc);
        for (int64_t l = 0; l < span; l++) {
            const float *v = vb + l * D;
            for (int j = 0; j < G; j++) {
                const float w = scores[j * span + l];
                float *aj = acc + j * D;
#pragma omp simd
                for (int d = 0; d < D; d++) aj[d] += w * v[d];
            }
        }
        free(scores);
        for (int j = 0; j < G; j++) {
            float *o = out + (int64_t)b * H * D + (int64_t)(g * G + j) * D;
            const float inv = 1.0f / total[j];
#pragma omp simd
            for (int d = 0; d < D; d++) o[d] = acc[j * D + d] * inv;
        }
    }
}

/* x += delta (when delta is not NULL); out = x / sqrt(mean(x^2) + eps) * weight. x, delta, out [B, N]. */
void add_rms_norm(int B, int N, float *x, const float *delta, const float *weight, float eps, float *out, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static) if (B >= 8)
    for (int b = 0; b < B; b++) {
        float *xb = x + (int64_t)b * N;
        float *ob = out + (int64_t)b * N;
        float sq = 0.0f;
        if (delta) {
            const float *db = delta + (int64_t)b * N;
#pragma omp simd reduction(+ : sq)
            for (int i = 0; i < N; i++) {
                float v = xb[i] + db[i];
                xb[i] = v;
                sq += v * v;
            }
        } else {
#pragma omp simd reduction(+ : sq)
            for (int i = 0; i < N; i++) sq += xb[i] * xb[i];
        }
        const float inv = 1.0f / sqrtf(sq / (float)N + eps);
#pragma omp simd
        for (int i = 0; i < N; i++) ob[i] = weight[i] * (xb[i] * inv);
    }
}

/* ---- Grouped LoRA for decode rows of several adapters ------------------------------------
 *
 * out[row, o0 + c] += sum_k u[row, r0 + k] * B_p,g[k][c],  u[row] = x[row] @ A_g   (g = row's adapter)
 *
 * A decode step with rows of G adapters reads every adapter's A and B once: memory bound
 * (8 rank-32 adapters of the default model are ~365 MB of float32 per step). Both halves
 * stream their weights in order and keep the row sums in vector registers:
 *   a[g] [in, a_cols[g]] (a multiple of 16): one unit per (adapter, up to 64 columns of u);
 *   b[p * G + g] [tiles, rank, 64] (each 64-column tile one contiguous run): one unit per
 *   (part, adapter, tile); the rows of an adapter are done 4 at a time over a tile in L1.
 * Each adapter's weights are their own tensors (best one run: A, then its B parts), so any
 * set of adapters is a list of pointers (nothing is copied when the set changes); the
 * second half goes adapter by adapter, so a thread streams each adapter's B in order.
 * Rows are listed adapter by adapter in `order` (offsets [G + 1]); a NULL a[g] or
 * b[p * G + g] (rank 0) adds nothing (base-model rows, modules an adapter lacks). Vector extensions: zmm with AVX-512, pairs of ymm with
 * AVX2. Returns 0, or -1 on arguments the caller should not have passed. */
typedef float v16 __attribute__((vector_size(64)));
#define LG_ROWS 4
#define LG_TILE 64

static inline v16 v16_load(const float *p) {
    v16 v;
    memcpy(&v, p, sizeof v);
    return v;
}
static inline void v16_add_store(float *p, v16 v) {
    v16 o;
    memcpy(&o, p, sizeof o);
    o += v;
    memcpy(p, &o, sizeof o);
}

#define LG_DOWN(NV)                                                                                              \
    static void lg_down_##NV(int64_t in_dim, const float *const *xr, const float *a, int64_t lda, float *const *ur, \
                             int count) {                                                                        \
        v16 acc[LG_ROWS][NV];                                                                                    \
        for (int j = 0; j < LG_ROWS; j++)                                                                        \
            for (int v = 0; v < NV; v++) acc[j][v] = (v16){0};                                                   \
        for (int64_t k = 0; k < in_dim; k++) {                                                                   \
            const float *ak = a + k * lda;                                                                       \
            v16 w[NV];                                                                                           \
            for (int v = 0; v < NV; v++) w[v] = v16_load(ak + 16 * v);                                           \
            for (int j = 0; j < LG_ROWS; j++) {                                                                  \
                const v16 xv = (v16){0} + xr[j][k];                                                              \
                for (int v = 0; v < NV; v++) acc[j][v] += xv * w[v];                                             \
            }                                                                                                    \
        }                                                                                                        \
        for (int j = 0; j < count; j++)                                                                          \
            for (int v = 0; v < NV; v++) memcpy(ur[j] + 16 * v, &acc[j][v], sizeof(v16));                       \
    }
LG_DOWN(1)
LG_DOWN(2)
LG_DOWN(3)
LG_DOWN(4)

/* rows `count` (<= 4) of one adapter times one tile of B (rank x 64, contiguous): out += */
static void lg_up(int64_t rank, const float *const *urow, const float *tile, float *const *orow, int count, int width) {
    v16 acc[LG_ROWS][4];
    for (int j = 0; j < LG_ROWS; j++)
        for (int v = 0; v < 4; v++) acc[j][v] = (v16){0};
    for (int64_t k = 0; k < rank; k++) {
        const float *bk = tile + k * LG_TILE;
        v16 w[4];
        for (int v = 0; v < 4; v++) w[v] = v16_load(bk + 16 * v);
        for (int j = 0; j < LG_ROWS; j++) {
            const v16 uv = (v16){0} + urow[j][k];
            for (int v = 0; v < 4; v++) acc[j][v] += uv * w[v];
        }
    }
    for (int j = 0; j < count; j++) {
        if (width == LG_TILE) {
            for (int v = 0; v < 4; v++) v16_add_store(orow[j] + 16 * v, acc[j][v]);
        } else {
            float tmp[LG_TILE];
            memcpy(tmp, acc[j], sizeof tmp);
            for (int c = 0; c < width; c++) orow[j][c] += tmp[c];
        }
    }
}

int lora_grouped(int64_t n, int64_t in_dim, const float *x, int64_t groups, const int32_t *order,
                 const int32_t *offsets, const float *const *a, const int64_t *a_cols, int64_t u_cols, float *u,
                 int64_t parts, const int64_t *part_info, const float *const *b, const int64_t *b_r0,
                 const int64_t *b_rank, float *out, int64_t ld_out, int nthreads) {
    if (u_cols % 16 || offsets[0] != 0 || offsets[groups] != n) return -1;
    for (int64_t g = 0; g < groups; g++)
        if (offsets[g + 1] < offsets[g] || (a[g] && (a_cols[g] % 16 || a_cols[g] > u_cols))) return -1;
    for (int64_t i = 0; i < n; i++)
        if (order[i] < 0 || order[i] >= n) return -1;
    for (int64_t p = 0; p < parts; p++) {
        const int64_t o0 = part_info[2 * p], width = part_info[2 * p + 1];
        if (o0 < 0 || width < 0 || o0 + width > ld_out) return -1;
        for (int64_t g = 0; g < groups; g++) {
            const int64_t pg = p * groups + g;
            if (b[pg] && (!a[g] || b_r0[pg] < 0 || b_rank[pg] < 0 || b_r0[pg] + b_rank[pg] > a_cols[g])) return -1;
        }
    }
    if (n == 0) return 0;
    const int64_t chunks = (u_cols + 63) / 64; /* columns of u per unit: up to 4 vectors */
    int64_t *ends = malloc(sizeof(int64_t) * (parts + 1)); /* tiles of parts before p, for one adapter */
    if (!ends) return -1;
    ends[0] = 0;
    for (int64_t p = 0; p < parts; p++) ends[p + 1] = ends[p] + (part_info[2 * p + 1] + LG_TILE - 1) / LG_TILE;
    const int64_t down_units = groups * chunks, up_units = groups * ends[parts];

#pragma omp parallel num_threads(nthreads)
    {
#pragma omp for schedule(static)
        for (int64_t d = 0; d < down_units; d++) {
            const int64_t g = d / chunks, c0 = (d % chunks) * 64;
            if (!a[g] || c0 >= a_cols[g]) continue;
            const int nv = (int)((a_cols[g] - c0 < 64 ? a_cols[g] - c0 : 64) / 16);
            const float *ag = a[g] + c0;
            for (int64_t s = offsets[g]; s < offsets[g + 1]; s += LG_ROWS) {
                const int count = (int)(offsets[g + 1] - s < LG_ROWS ? offsets[g + 1] - s : LG_ROWS);
                const float *xr[LG_ROWS];
                float *ur[LG_ROWS];
                for (int j = 0; j < LG_ROWS; j++) {
                    const int64_t row = order[s + (j < count ? j : 0)];
                    xr[j] = x + row * in_dim;
                    ur[j] = u + row * u_cols + c0;
                }
                switch (nv) {
                case 1: lg_down_1(in_dim, xr, ag, a_cols[g], ur, count); break;
                case 2: lg_down_2(in_dim, xr, ag, a_cols[g], ur, count); break;
                case 3: lg_down_3(in_dim, xr, ag, a_cols[g], ur, count); break;
                default: lg_down_4(in_dim, xr, ag, a_cols[g], ur, count); break;
                }
            }
        }
        /* implicit barrier: u is complete */
#pragma omp for schedule(static)
        for (int64_t t = 0; t < up_units; t++) { /* adapter by adapter: its parts' tiles in memory order */
            const int64_t g = t / ends[parts], local = t % ends[parts];
            int64_t p = 0;
            while (local >= ends[p + 1]) p++;
            const int64_t o0 = part_info[2 * p], width = part_info[2 * p + 1];
            const int64_t tile = local - ends[p], pg = p * groups + g;
            const int64_t rank = b_rank[pg];
            if (!b[pg] || rank == 0) continue;
            const int64_t c0 = tile * LG_TILE;
            const int w = (int)(width - c0 < LG_TILE ? width - c0 : LG_TILE);
            const float *bt = b[pg] + tile * rank * LG_TILE;
            for (int64_t s = offsets[g]; s < offsets[g + 1]; s += LG_ROWS) {
                const int count = (int)(offsets[g + 1] - s < LG_ROWS ? offsets[g + 1] - s : LG_ROWS);
                const float *urow[LG_ROWS];
                float *orow[LG_ROWS];
                for (int j = 0; j < LG_ROWS; j++) {
                    const int64_t row = order[s + (j < count ? j : 0)];
                    urow[j] = u + row * u_cols + b_r0[pg];
                    orow[j] = out + row * ld_out + o0 + c0;
                }
                lg_up(rank, urow, bt, orow, count, w);
            }
        }
    }
    free(ends);
    return 0;
}
