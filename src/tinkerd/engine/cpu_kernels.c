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
