/* silu(group_norm(x)) for a channels-last map, forward and backward, each in two passes over memory
 * (synth7t.nn.native).
 *
 * The map is B samples x HW pixels x C channels (channels-last), float32 or bfloat16 (raw uint16 bits). Work is cut
 * into chunks of `rows` pixels of one sample: chunk k covers sample k / nk, pixels (k % nk) * rows .. + rows, with
 * nk = ceil(HW / rows). Each call handles chunks k0 .. k1 - 1, so the caller can run calls on several threads; the
 * chunking does not depend on the number of threads, so neither does the result.
 *
 * Forward: pass 1 (`fwd_stats`): per chunk and channel, t1 = sum (x - k), t2 = sum (x - k)^2 around a per-(sample,
 * channel) shift k (the caller combines them into group means and variances in float64); pass 2 (`fwd_apply`):
 * y = silu(a * x + d) with per-(sample, channel) a = rstd * weight, d = bias - mean * a.
 *
 * Backward, with xc = x - m (m: the channel's group mean), z = a * xc + bias (a = rstd * weight), s = sigmoid(z):
 *   pass 1 (`sums`): dz = g * s * (1 + z * (1 - s)); per chunk and channel s1 = sum dz, s2 = sum dz * xc;
 *   pass 2 (`dx`):   dx = a * dz + cxc * xc + c0, with per-sample, per-channel coefficients from the caller.
 * Per-(sample, channel) arrays (m, a, cxc, c0) are B x C; bias is C; s1, s2 are (k1 - k0) x C.
 * Compiled with -O3 -march=native -ffast-math (vectorised expf from glibc's libmvec); linked without it. */
#include <math.h>
#include <stdint.h>

static inline float bf16_to_f32(uint16_t v) {
    union { uint32_t u; float f; } t;
    t.u = ((uint32_t)v) << 16;
    return t.f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch does (inputs are finite) */
    union { uint32_t u; float f; } t;
    t.f = f;
    uint32_t u = t.u;
    u += 0x7FFFu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float silu_grad(float g, float z) { /* d silu(z) / dz times the incoming gradient g */
    float s = 1.0f / (1.0f + expf(-z));
    return g * s * (1.0f + z * (1.0f - s));
}

#define DEFINE_FORWARD(SUFFIX, T, LOAD, STORE)                                                                     \
    void gn_silu_fwd_stats_##SUFFIX(const T *x, long hw, long c, long rows, long k0, long k1, const float *shift,    \
                                    float *t1, float *t2) {                                                        \
        long nk = (hw + rows - 1) / rows;                                                                          \
        for (long k = k0; k < k1; ++k) {                                                                           \
            long b = k / nk, p0 = (k % nk) * rows, p1 = p0 + rows < hw ? p0 + rows : hw;                           \
            const float *kb = shift + b * c;                                                                       \
            float *o1 = t1 + (k - k0) * c, *o2 = t2 + (k - k0) * c;                                                \
            for (long j = 0; j < c; ++j) o1[j] = o2[j] = 0.0f;                                                     \
            for (long p = p0; p < p1; ++p) {                                                                       \
                const T *xr = x + (b * hw + p) * c;                                                                \
                for (long j = 0; j < c; ++j) {                                                                     \
                    float v = LOAD(xr[j]) - kb[j];                                                                 \
                    o1[j] += v;                                                                                    \
                    o2[j] += v * v;                                                                                \
                }                                                                                                  \
            }                                                                                                      \
        }                                                                                                          \
    }                                                                                                              \
    void gn_silu_fwd_apply_##SUFFIX(const T *x, long hw, long c, long rows, long k0, long k1, const float *a,       \
                                    const float *d, T *y) {                                                        \
        long nk = (hw + rows - 1) / rows;                                                                          \
        for (long k = k0; k < k1; ++k) {                                                                           \
            long b = k / nk, p0 = (k % nk) * rows, p1 = p0 + rows < hw ? p0 + rows : hw;                           \
            const float *ab = a + b * c, *db = d + b * c;                                                          \
            for (long p = p0; p < p1; ++p) {                                                                       \
                long off = (b * hw + p) * c;                                                                       \
                const T *xr = x + off;                                                                             \
                T *out = y + off;                                                                                  \
                for (long j = 0; j < c; ++j) {                                                                     \
                    float z = ab[j] * LOAD(xr[j]) + db[j];                                                         \
                    out[j] = STORE(z / (1.0f + expf(-z)));                                                         \
                }                                                                                                  \
            }                                                                                                      \
        }                                                                                                          \
    }

#define DEFINE_KERNELS(SUFFIX, T, LOAD, STORE)                                                                     \
    void gn_silu_bwd_sums_##SUFFIX(const T *x, const T *g, long hw, long c, long rows, long k0, long k1,           \
                                   const float *m, const float *a, const float *bias, float *s1, float *s2) {     \
        long nk = (hw + rows - 1) / rows;                                                                          \
        for (long k = k0; k < k1; ++k) {                                                                           \
            long b = k / nk, p0 = (k % nk) * rows, p1 = p0 + rows < hw ? p0 + rows : hw;                           \
            const float *mb = m + b * c, *ab = a + b * c;                                                          \
            float *o1 = s1 + (k - k0) * c, *o2 = s2 + (k - k0) * c;                                                \
            for (long j = 0; j < c; ++j) o1[j] = o2[j] = 0.0f;                                                     \
            for (long p = p0; p < p1; ++p) {                                                                       \
                const T *xr = x + (b * hw + p) * c, *gr = g + (b * hw + p) * c;                                    \
                for (long j = 0; j < c; ++j) {                                                                     \
                    float xc = LOAD(xr[j]) - mb[j];                                                                \
                    float z = ab[j] * xc + bias[j];                                                                \
                    float dz = silu_grad(LOAD(gr[j]), z);                                                          \
                    o1[j] += dz;                                                                                   \
                    o2[j] += dz * xc;                                                                              \
                }                                                                                                  \
            }                                                                                                      \
        }                                                                                                          \
    }                                                                                                              \
    void gn_silu_bwd_dx_##SUFFIX(const T *x, const T *g, long hw, long c, long rows, long k0, long k1,             \
                                 const float *m, const float *a, const float *bias, const float *cxc,             \
                                 const float *c0, T *dx) {                                                         \
        long nk = (hw + rows - 1) / rows;                                                                          \
        for (long k = k0; k < k1; ++k) {                                                                           \
            long b = k / nk, p0 = (k % nk) * rows, p1 = p0 + rows < hw ? p0 + rows : hw;                           \
            const float *mb = m + b * c, *ab = a + b * c, *xb = cxc + b * c, *zb = c0 + b * c;                     \
            for (long p = p0; p < p1; ++p) {                                                                       \
                long off = (b * hw + p) * c;                                                                       \
                const T *xr = x + off, *gr = g + off;                                                              \
                T *out = dx + off;                                                                                 \
                for (long j = 0; j < c; ++j) {                                                                     \
                    float xc = LOAD(xr[j]) - mb[j];                                                                \
                    float z = ab[j] * xc + bias[j];                                                                \
                    float dz = silu_grad(LOAD(gr[j]), z);                                                          \
                    out[j] = STORE(ab[j] * dz + xb[j] * xc + zb[j]);                                               \
                }                                                                                                  \
            }                                                                                                      \
        }                                                                                                          \
    }

#define IDENTITY(v) (v)
DEFINE_FORWARD(f32, float, IDENTITY, IDENTITY)
DEFINE_FORWARD(bf16, uint16_t, bf16_to_f32, f32_to_bf16)
DEFINE_KERNELS(f32, float, IDENTITY, IDENTITY)
DEFINE_KERNELS(bf16, uint16_t, bf16_to_f32, f32_to_bf16)
