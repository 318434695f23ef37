/* Fused CPU kernels for the float32 decode step (one new token per row).
 *
 * Between two matmuls a decode step does little arithmetic but many small tensor
 * operations (rotary embedding, cache writes, attention over the cached span, residual
 * add + RMSNorm); each of these kernels does one such stretch in a single
 * pass over memory. Same math as the torch path in model.py, in float32; results agree
 * with it to float32 rounding. Loaded through ctypes by cpu_kernels.py; threads come from
 * the OpenMP runtime torch already loaded (same soname), so they share one pool.
 */
#include <math.h>
#include <omp.h>
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

/* LoRA updates of a decode step's rows, each row with its own adapter (G adapters stacked):
 *   u[row] = x[row] @ a[g]                      a: [G, in, R]  (the fused modules' A side by side)
 *   out[row, o0 : o0 + w] += u[row, r0 : r0 + r] @ b_p[g]   for each part p, b_p: [G, r, w]
 * where g is the row's adapter. `order` lists the rows adapter by adapter (adapter g owns
 * order[offsets[g] : offsets[g + 1]]), so each adapter's weights are read once for all its
 * rows, straight from the stacks: no gather into a padded layout, no scatter back, and one
 * call per fused module instead of a dozen small operations. x @ a keeps a block of
 * LORA_ROWS x LORA_VEC sums in registers; u @ b walks b one row of a column tile at a time
 * (sums for up to LORA_CHUNK of the adapter's rows in that tile stay in L1).
 * `work` holds nthreads * LORA_ROWS * in floats. Returns 0, or -1 (nothing written) when
 * `order`, `offsets` or the parts do not describe the n rows and the output. */
#define LORA_ROWS 8
#define LORA_VEC 16
#define LORA_SUMS 4096                         /* floats of sums per u @ b unit (16 KB) */
#define LORA_CHUNK (LORA_SUMS / LORA_VEC)       /* rows per u @ b unit, at most */

/* Columns per u @ b unit for an adapter with `rows` rows: rows x tile sums fit LORA_SUMS. */
static inline int64_t lora_tile(int64_t rows) {
    rows = rows < 1 ? 1 : rows > LORA_CHUNK ? LORA_CHUNK : rows;
    return LORA_SUMS / rows / LORA_VEC * LORA_VEC;
}

int lora_grouped(int64_t n, int64_t in_dim, const float *x, int64_t groups, const int32_t *order, const int32_t *offsets,
                 const float *a, int64_t rank_total, float *u, int64_t parts, const int64_t *part_info,
                 const float *const *b, float *out, int64_t ld_out, float *work, int nthreads) {
    if (offsets[0] != 0 || offsets[groups] != n) return -1;
    int64_t items = 0;
    for (int64_t g = 0; g < groups; g++) {
        if (offsets[g + 1] < offsets[g]) return -1;
        items += (offsets[g + 1] - offsets[g] + LORA_ROWS - 1) / LORA_ROWS;
    }
    for (int64_t i = 0; i < n; i++)
        if (order[i] < 0 || order[i] >= n) return -1;
    for (int64_t p = 0; p < parts; p++) {
        const int64_t *info = part_info + 4 * p; /* r0, rank, o0, width */
        if (info[0] < 0 || info[1] < 0 || info[0] + info[1] > rank_total || info[2] < 0 || info[3] < 0 ||
            info[2] + info[3] > ld_out)
            return -1;
    }
    if (n == 0) return 0;
    /* x @ a units: (block of <= LORA_ROWS rows of one adapter, LORA_VEC columns of u);
     * u @ b units: (part, adapter, column tile), prefix-summed in `ends`. */
    int64_t *item_group = malloc(sizeof(int64_t) * (2 * items + parts * groups + 1));
    if (!item_group) return -1;
    int64_t *item_start = item_group + items, *ends = item_start + items;
    int64_t it = 0;
    for (int64_t g = 0; g < groups; g++)
        for (int64_t s = offsets[g]; s < offsets[g + 1]; s += LORA_ROWS) item_group[it] = g, item_start[it++] = s;
    ends[0] = 0;
    for (int64_t p = 0; p < parts; p++)
        for (int64_t g = 0; g < groups; g++) {
            int64_t rows = offsets[g + 1] - offsets[g], tile = lora_tile(rows), width = part_info[4 * p + 3];
            int64_t chunks = (rows + LORA_CHUNK - 1) / LORA_CHUNK;
            ends[p * groups + g + 1] = ends[p * groups + g] + chunks * ((width + tile - 1) / tile);
        }
    int64_t down_units = items * ((rank_total + LORA_VEC - 1) / LORA_VEC), up_units = ends[parts * groups];

#pragma omp parallel num_threads(nthreads)
    {
        float *xs = work + (int64_t)omp_get_thread_num() * LORA_ROWS * in_dim;
#pragma omp for schedule(static)
        for (int64_t d = 0; d < down_units; d++) {
            int64_t i = d % items, c0 = (d / items) * LORA_VEC;
            int64_t g = item_group[i], start = item_start[i], end = offsets[g + 1];
            int64_t count = end - start < LORA_ROWS ? end - start : LORA_ROWS;
            int64_t w = rank_total - c0 < LORA_VEC ? rank_total - c0 : LORA_VEC;
            for (int j = 0; j < LORA_ROWS; j++) {
                if (j < count) memcpy(xs + j * in_dim, x + (int64_t)order[start + j] * in_dim, sizeof(float) * in_dim);
                else memset(xs + j * in_dim, 0, sizeof(float) * in_dim);
            }
            float acc[LORA_ROWS][LORA_VEC] = {{0}};
            const float *m = a + g * in_dim * rank_total + c0;
            if (w == LORA_VEC) {
                for (int64_t k = 0; k < in_dim; k++) {
                    const float *mk = m + k * rank_total;
                    for (int j = 0; j < LORA_ROWS; j++) {
                        float xv = xs[j * in_dim + k];
#pragma omp simd
                        for (int c = 0; c < LORA_VEC; c++) acc[j][c] += xv * mk[c];
                    }
                }
            } else {
                for (int64_t k = 0; k < in_dim; k++)
                    for (int j = 0; j < LORA_ROWS; j++)
                        for (int64_t c = 0; c < w; c++) acc[j][c] += xs[j * in_dim + k] * m[k * rank_total + c];
            }
            for (int64_t j = 0; j < count; j++) memcpy(u + (int64_t)order[start + j] * rank_total + c0, acc[j], sizeof(float) * w);
        }
        /* implicit barrier: u is complete */
#pragma omp for schedule(static)
        for (int64_t t = 0; t < up_units; t++) {
            int64_t pg = 0;
            while (t >= ends[pg + 1]) pg++;
            int64_t p = pg / groups, g = pg % groups;
            const int64_t *info = part_info + 4 * p;
            int64_t r0 = info[0], rank = info[1], o0 = info[2], width = info[3];
            int64_t all_rows = offsets[g + 1] - offsets[g], tile = lora_tile(all_rows);
            int64_t ntiles = (width + tile - 1) / tile, local = t - ends[pg];
            int64_t start = offsets[g] + (local / ntiles) * LORA_CHUNK, c0 = (local % ntiles) * tile;
            int64_t rows = offsets[g + 1] - start < LORA_CHUNK ? offsets[g + 1] - start : LORA_CHUNK;
            int64_t w = width - c0 < tile ? width - c0 : tile;
            float sums[LORA_SUMS]; /* rows * w <= LORA_SUMS */
            memset(sums, 0, sizeof(float) * rows * w);
            const float *bg = b[p] + g * rank * width + c0;
            for (int64_t k = 0; k < rank; k++) { /* one row of b's tile at a time, in order */
                const float *bk = bg + k * width;
                for (int64_t j = 0; j < rows; j++) {
                    float uv = u[(int64_t)order[start + j] * rank_total + r0 + k], *sj = sums + j * w;
#pragma omp simd
                    for (int64_t c = 0; c < w; c++) sj[c] += uv * bk[c];
                }
            }
            for (int64_t j = 0; j < rows; j++) {
                float *o = out + (int64_t)order[start + j] * ld_out + o0 + c0, *sj = sums + j * w;
#pragma omp simd
                for (int64_t c = 0; c < w; c++) o[c] += sj[c];
            }
        }
    }
    free(item_group);
    return 0;
}
