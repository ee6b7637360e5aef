/* NPO's noisy log-softmax on CPU, fused (noisepo/noise.py, METHODS §4.2).

   Rows are response positions, columns the vocabulary. Eager PyTorch spends ~15 passes over each
   (n, V) block between the two matmuls (sigmoid, softplus, z + σε, Σσ², Σσ, two products, softmax,
   row maxima, ...); here one row at a time stays in cache and the passes are three. ε comes from
   `normal_fill` below, ~4× faster than torch's CPU generator (mt19937, serial). Compiled at
   run time by noisepo/native.py (-O3 -march=native -ffast-math: the loops vectorise, exp and log
   through glibc's vector maths); every input is float32 and contiguous, checked by the caller. */
#include <math.h>
#include <stdint.h>

/* log(1 + e) for e in [0, 1], as 2·atanh(s) with s = e / (2 + e) in [0, 1/3]: its odd series to
   s^15 is within float rounding, keeps relative precision for tiny e (σ = softplus of a very negative
   u), and costs less than glibc's vector log1pf. */
static inline float log1p_unit(float e)
{
    float s = e / (2.0f + e), s2 = s * s;
    float series = 1.0f / 15;
    series = series * s2 + 1.0f / 13;
    series = series * s2 + 1.0f / 11;
    series = series * s2 + 1.0f / 9;
    series = series * s2 + 1.0f / 7;
    series = series * s2 + 1.0f / 5;
    series = series * s2 + 1.0f / 3;
    series = series * s2 + 1.0f;
    return 2.0f * s * series;
}

/* In: z (n, V) reference logits, u (n, V) = W_σ g without the bias, bias (V), eps (n, V) = ε,
   targets (n) in [0, V), sigma_max (0: σ = softplus(u); > 0: the bounded σ = sigma_max·sigmoid(u)).
   Out, in place: z <- exp(z̃ − max) (scratch), u <- Q/2 = σ ⊙ σ'(u), eps <- P = ε ⊙ σ'(u) ⊙ softmax(z̃),
   σ' = dσ/du (the "gate": sigmoid(u) for softplus, σ·(1 − sigmoid(u)) bounded); per row: the noisy
   log-prob of the target, the logsumexp of z̃, Σσ², Σσ, and (ε ⊙ σ'(u)) at the target. */
void npo_forward(int64_t rows, int64_t V, float *z, float *u, const float *bias, float *eps,
                 const int64_t *targets, float *logps, float *lse, float *sq, float *total, float *gate_at_target,
                 float sigma_max)
{
    const int bounded = sigma_max > 0.0f;
    for (int64_t i = 0; i < rows; i++) {
        float *zr = z + i * V, *ur = u + i * V, *er = eps + i * V;
        int64_t t = targets[i];
        float row_max = -3.0e38f, sum_sq = 0.0f, sum_sigma = 0.0f;
#pragma omp simd reduction(max : row_max) reduction(+ : sum_sq, sum_sigma)
        for (int64_t j = 0; j < V; j++) {
            float x = ur[j] + bias[j];
            float e = expf(-fabsf(x));  /* one exp serves sigmoid and softplus */
            float r = 1.0f / (1.0f + e);
            float gate = x >= 0.0f ? r : e * r;                             /* sigmoid(x) */
            float sigma = x > 20.0f ? x : fmaxf(x, 0.0f) + log1p_unit(e);  /* softplus, torch's threshold */
            if (bounded) {                                  /* σ = σ_max·s, dσ/du = σ·(1 − s), s = sigmoid(x) */
                sigma = sigma_max * gate;
                gate = sigma * (1.0f - gate);
            }
            float noisy = zr[j] + sigma * er[j];
            zr[j] = noisy;
            sum_sq += sigma * sigma;
            sum_sigma += sigma;
            ur[j] = sigma * gate;
            er[j] *= gate;
            row_max = fmaxf(row_max, noisy);
        }
        float noisy_t = zr[t], gate_t = er[t], sum_exp = 0.0f;
#pragma omp simd reduction(+ : sum_exp)
        for (int64_t j = 0; j < V; j++) {
            float x = expf(zr[j] - row_max);
            zr[j] = x;
            sum_exp += x;
        }
        float inverse = 1.0f / sum_exp;
#pragma omp simd
        for (int64_t j = 0; j < V; j++) er[j] *= zr[j] * inverse;
        lse[i] = row_max + logf(sum_exp);
        logps[i] = noisy_t - lse[i];
        sq[i] = sum_sq;
        total[i] = sum_sigma;
        gate_at_target[i] = gate_t;
    }
}

/* du = scale · Q/2 − g ⊙ P, plus g · (ε ⊙ sigmoid(u)) at each target, written over Q/2 (q);
   column sums (the bias's gradient) added into bias_grad (V). */
void npo_backward(int64_t rows, int64_t V, float *q, const float *p, const int64_t *targets, const float *grad,
                  float scale, const float *gate_at_target, float *bias_grad)
{
    for (int64_t i = 0; i < rows; i++) {
        float *qr = q + i * V;
        const float *pr = p + i * V;
        float g = grad[i];
#pragma omp simd
        for (int64_t j = 0; j < V; j++) {
            float du = scale * qr[j] - g * pr[j];
            qr[j] = du;
            bias_grad[j] += du;
        }
        float at_target = g * gate_at_target[i];
        qr[targets[i]] += at_target;
        bias_grad[targets[i]] += at_target;
    }
}

/* ε ~ N(0, 1): SplitMix64 (Vigna; Java's SplittableRandom) seeded with mix64(seed), its k-th 64-bit
   output giving the k-th pair of normals by Box–Muller from two 24-bit uniforms (as torch's CPU
   randn, |ε| ≤ 5.8). Counter-based: any range of the stream can be drawn alone, so threads split
   it and get the same numbers. Within a block of NORMAL_BLOCK values the pair's cosines fill the
   first half and its sines the second (separate loops vectorise; sin(a) = cos(a − π/2)). */
#define NORMAL_BLOCK 512

static inline uint64_t mix64(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

static void normal_block(uint64_t start, int64_t first_pair, int64_t count, float *out)
{
    const uint64_t golden = 0x9E3779B97F4A7C15ULL;
    const float two_to_minus_24 = 5.9604644775390625e-08f;
    float u1[NORMAL_BLOCK / 2], angle[NORMAL_BLOCK / 2], radius[NORMAL_BLOCK / 2];
    int64_t pairs = (count + 1) / 2;
#pragma omp simd
    for (int64_t k = 0; k < pairs; k++) {
        uint64_t bits = mix64(start + (uint64_t)(first_pair + k + 1) * golden);
        u1[k] = ((float)(int32_t)(bits >> 40) + 0.5f) * two_to_minus_24;  /* (0, 1): log is finite */
        angle[k] = (float)(int32_t)((bits >> 8) & 0xFFFFFF) * (6.2831853071795865f * two_to_minus_24);
    }
#pragma omp simd
    for (int64_t k = 0; k < pairs; k++) radius[k] = sqrtf(-2.0f * logf(u1[k]));
#pragma omp simd
    for (int64_t k = 0; k < pairs; k++) out[k] = radius[k] * cosf(angle[k]);
#pragma omp simd
    for (int64_t k = 0; k < count - pairs; k++) out[pairs + k] = radius[k] * cosf(angle[k] - 1.5707963267948966f);
}

/* Values [first, first + count) of the stream of `seed` into out; first is a multiple of NORMAL_BLOCK. */
void normal_fill(uint64_t seed, int64_t first, int64_t count, float *out)
{
    uint64_t start = mix64(seed);
    for (int64_t i = 0; i < count; i += NORMAL_BLOCK) {
        int64_t size = count - i < NORMAL_BLOCK ? count - i : NORMAL_BLOCK;
        normal_block(start, (first + i) / 2, size, out + i);
    }
}

int64_t normal_block_size(void) { return NORMAL_BLOCK; }
