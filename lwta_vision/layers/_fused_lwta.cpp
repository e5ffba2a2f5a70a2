// Fused LWTA forward and backward for CPU tensors (built on first use by lwta_vision/layers/fused.py).
//
// A contiguous tensor is seen as (R, U, I): R rows of blocks, U competitors, I inner positions
// (I = H*W for a conv map with competition along channels). Channels-last maps and inputs competing along their
// innermost axis (I = 1: tokens, vectors) have their own loop over blocks of U adjacent values, drawing the same
// noise as the contiguous layout.
// One pass reads x, draws the noise from a counter-based hash of (seed, row, position) and writes y; only
// x and the seed are kept for backward, which draws the same noise again. The reference layer
// (lwta_vision.layers.lwta) saves x, the softmax and the winner mask instead and runs a dozen passes.
//
// Compiled with -ffp-contract=off so that x + s * g rounds as the reference's separate torch ops do: the
// winner is then the same for the same noise and the output the same bits, losers' signed zeros included
// (tests/layers/test_fused.py). Inner loops are
// branch-free over I (and marked ivdep: x, y and the gradients never overlap) so that the compiler
// vectorises them, log and exp included (musl/Cephes polynomials,
// within 1-2 ulp of libm).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kChunk = 256;  // inner positions handled together: U * kChunk floats of scratch per thread

#define LWTA_INLINE static inline __attribute__((always_inline))

LWTA_INLINE uint32_t as_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
LWTA_INLINE float as_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

// lowbias32 (C. Wellons): a bijective 32-bit mixer with low avalanche bias
LWTA_INLINE uint32_t mix32(uint32_t x) {
  x ^= x >> 16; x *= 0x7feb352du; x ^= x >> 15; x *= 0x846ca68bu; x ^= x >> 16;
  return x;
}

// the call's 64-bit seed, mixed once (splitmix64 finaliser) into two 32-bit halves
struct Key {
  uint32_t a, b;
};

LWTA_INLINE Key make_key(uint64_t seed) {
  uint64_t z = seed + 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return Key{(uint32_t)z, (uint32_t)(z >> 32)};
}

// one 32-bit key per row of blocks: two rounds of the bijective mixer, so rows less than 2^32 apart never share a
// key; 32-bit operations only, so a loop over rows vectorises
LWTA_INLINE uint32_t row_key(Key key, uint64_t row) {
  return mix32(mix32((uint32_t)row ^ key.a) ^ ((uint32_t)(row >> 32) + key.b));
}

// uniform on the odd multiples of 2^-24, 2^-24 .. 1 - 2^-24: all exact in float, never 0 or 1, so every log below
// is finite and the noise bounded (|Gumbel|, |Logistic| <= 16.7). (Shifting the 2^-24 grid by half a step
// instead rounds its top value up to 1.0.)
LWTA_INLINE float uniform(uint32_t key, uint32_t j) {
  uint32_t h = mix32((j * 0x9E3779B9u) ^ key);
  return (float)(int32_t)((h >> 8) | 1u) * 5.9604644775390625e-08f;
}

// logf for positive normal x (musl's algorithm, < 1 ulp), written without branches; explicit fmaf, the same
// instruction in vector and scalar code, so the noise is the same wherever it is drawn
LWTA_INLINE float log_pos(float x) {
  uint32_t ix = as_bits(x) - 0x3f3504f3u;  // so that the mantissa lands in [sqrt(1/2), sqrt(2))
  float k = (float)((int32_t)ix >> 23);
  float f = as_float((ix & 0x007fffffu) + 0x3f3504f3u) - 1.0f;
  float s = f / (2.0f + f);
  float z = s * s, w = z * z;
  float t1 = w * std::fma(w, 0.24279078841f, 0.40000972152f);
  float t2 = z * std::fma(w, 0.28498786688f, 0.66666662693f);
  float r = t2 + t1, hfsq = 0.5f * f * f;
  return std::fma(k, 6.9313812256e-01f, -((hfsq - std::fma(s, hfsq + r, k * 9.0580006145e-06f)) - f));
}

// expf for x <= 0 (Cephes polynomial, ~1 ulp); flushes to 0 below -87
LWTA_INLINE float exp_nonpos(float x) {
  x = x < -87.0f ? -87.0f : x;
  float kf = (x * 1.44269504089f + 12582912.0f) - 12582912.0f;  // round(x / ln 2)
  float r = std::fma(kf, 2.12194440e-4f, std::fma(kf, -0.693359375f, x));
  float p = 1.9875691500e-4f;
  p = std::fma(p, r, 1.3981999507e-3f);
  p = std::fma(p, r, 8.3334519073e-3f);
  p = std::fma(p, r, 4.1665795894e-2f);
  p = std::fma(p, r, 1.6666665459e-1f);
  p = std::fma(p, r, 5.0000001201e-1f);
  p = std::fma(p * r, r, r) + 1.0f;
  float scaled = as_float((uint32_t)((int32_t)kf + 127) << 23);
  float y = p * scaled;
  return x <= -87.0f ? 0.0f : y;
}

LWTA_INLINE float gumbel(uint32_t key, uint32_t j) { return -log_pos(-log_pos(uniform(key, j))); }

LWTA_INLINE float logistic(uint32_t key, uint32_t j) {
  float u = uniform(key, j);
  return log_pos(u / (1.0f - u));
}

// the running block max and its unit, first on ties (k = 0 starts the block)
LWTA_INLINE void keep_max(float v, int64_t k, float& best, int32_t& arg) {
  if (k == 0) {  // loop-invariant in the callers' inner loops: hoisted, the loops stay vectorised
    best = v;
    arg = 0;
    return;
  }
  bool gt = v > best;
  best = gt ? v : best;
  arg = gt ? (int32_t)k : arg;
}

// U = 2 backward for one block: s = (a - b) + noise, unit 0 won iff s > 0; straight-through gradient plus the
// relaxation's, soft0 = sigmoid(s / tau) computed as 1 / (1 + exp(-|t|)) mirrored, so exp's argument stays <= 0
LWTA_INLINE void pair_grad(float a, float b, float ga, float gb, float s, float inv_tau, float& o0, float& o1) {
  bool w0 = s > 0.0f;
  float t = s * inv_tau;
  float e = exp_nonpos(t > 0.0f ? -t : t);
  float p = 1.0f / (1.0f + e);
  float soft0 = t > 0.0f ? p : 1.0f - p;
  float c = (ga * a - gb * b) * (soft0 * (1.0f - soft0)) * inv_tau;
  o0 = (w0 ? ga : 0.0f) + c;
  o1 = (w0 ? 0.0f : gb) - c;
}

struct Shape {
  int64_t rows, u, inner;
  float scale, inv_tau;
};

// z_k = float(x_k) + s * g_k for one chunk of positions, the running max and the winner (first on ties)
template <typename T>
LWTA_INLINE void noisy_chunk(const T* xr, const Shape& sh, uint32_t key, int64_t i0, int64_t n, float* z,
                             float* best, int32_t* arg) {
  const int64_t I = sh.inner;
  for (int64_t k = 0; k < sh.u; ++k) {
    const T* xk = xr + k * I + i0;
    float* zk = z + k * kChunk;
    const uint32_t j0 = (uint32_t)(k * I + i0);
    #pragma GCC ivdep
    for (int64_t i = 0; i < n; ++i) {
      float v = (float)xk[i] + sh.scale * gumbel(key, j0 + (uint32_t)i);
      zk[i] = v;
      keep_max(v, k, best[i], arg[i]);
    }
  }
}

template <typename T>
void forward_general(const T* x, T* y, const Shape& sh, Key seed) {
  const int64_t I = sh.inner, U = sh.u;
  at::parallel_for(0, sh.rows, 1, [&](int64_t r0, int64_t r1) {
    std::vector<float> z(U * kChunk);
    float best[kChunk];
    int32_t arg[kChunk];
    for (int64_t r = r0; r < r1; ++r) {
      const uint32_t key = row_key(seed, (uint64_t)r);
      const T* xr = x + r * U * I;
      T* yr = y + r * U * I;
      for (int64_t i0 = 0; i0 < I; i0 += kChunk) {
        const int64_t n = std::min(kChunk, I - i0);
        noisy_chunk(xr, sh, key, i0, n, z.data(), best, arg);
        for (int64_t k = 0; k < U; ++k) {
          const T* xk = xr + k * I + i0;
          T* yk = yr + k * I + i0;
          #pragma GCC ivdep
          for (int64_t i = 0; i < n; ++i) yk[i] = arg[i] == k ? xk[i] : (T)((float)xk[i] * 0.0f);
        }
      }
    }
  });
}

// grad_x = grad * hard + (1 / tau) * soft * (grad * x - sum_j soft_j grad_j x_j), soft = softmax(z / tau)
template <typename T>
void backward_general(const T* g, const T* x, T* gx, const Shape& sh, Key seed) {
  const int64_t I = sh.inner, U = sh.u;
  const float inv_tau = sh.inv_tau;
  at::parallel_for(0, sh.rows, 1, [&](int64_t r0, int64_t r1) {
    std::vector<float> z(U * kChunk);
    float best[kChunk], sum[kChunk], dot[kChunk];
    int32_t arg[kChunk];
    for (int64_t r = r0; r < r1; ++r) {
      const uint32_t key = row_key(seed, (uint64_t)r);
      const int64_t off = r * U * I;
      for (int64_t i0 = 0; i0 < I; i0 += kChunk) {
        const int64_t n = std::min(kChunk, I - i0);
        noisy_chunk(x + off, sh, key, i0, n, z.data(), best, arg);
        #pragma GCC ivdep
        for (int64_t i = 0; i < n; ++i) { sum[i] = 0.0f; dot[i] = 0.0f; }
        for (int64_t k = 0; k < U; ++k) {  // z becomes exp((z - max) / tau); sum and sum of e * g * x
          float* zk = z.data() + k * kChunk;
          const T* xk = x + off + k * I + i0;
          const T* gk = g + off + k * I + i0;
          #pragma GCC ivdep
          for (int64_t i = 0; i < n; ++i) {
            float e = exp_nonpos((zk[i] - best[i]) * inv_tau);
            zk[i] = e;
            sum[i] += e;
            dot[i] += e * ((float)gk[i] * (float)xk[i]);
          }
        }
        #pragma GCC ivdep
        for (int64_t i = 0; i < n; ++i) { sum[i] = 1.0f / sum[i]; dot[i] *= sum[i]; }
        for (int64_t k = 0; k < U; ++k) {
          const float* zk = z.data() + k * kChunk;
          const T* xk = x + off + k * I + i0;
          const T* gk = g + off + k * I + i0;
          T* ok = gx + off + k * I + i0;
          #pragma GCC ivdep
          for (int64_t i = 0; i < n; ++i) {
            float gi = (float)gk[i];
            float soft = zk[i] * sum[i];
            float v = (arg[i] == k ? gi : 0.0f) + inv_tau * soft * (gi * (float)xk[i] - dot[i]);
            ok[i] = (T)v;
          }
        }
      }
    }
  });
}

// U = 2: unit 0 wins iff (x0 - x1) + s * L > 0 with one Logistic(0, 1) draw per block
template <typename T>
void forward_pair(const T* x, T* y, const Shape& sh, Key seed) {
  const int64_t I = sh.inner;
  at::parallel_for(0, sh.rows, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const uint32_t key = row_key(seed, (uint64_t)r);
      const T* x0 = x + r * 2 * I;
      const T* x1 = x0 + I;
      T* y0 = y + r * 2 * I;
      T* y1 = y0 + I;
      #pragma GCC ivdep
      for (int64_t i = 0; i < I; ++i) {
        float s = ((float)x0[i] - (float)x1[i]) + sh.scale * logistic(key, (uint32_t)i);
        bool w0 = s > 0.0f;
        y0[i] = w0 ? x0[i] : (T)((float)x0[i] * 0.0f);  // a loser is x * 0, signed zero as in the reference
        y1[i] = w0 ? (T)((float)x1[i] * 0.0f) : x1[i];
      }
    }
  });
}

template <typename T>
void backward_pair(const T* g, const T* x, T* gx, const Shape& sh, Key seed) {
  const int64_t I = sh.inner;
  const float inv_tau = sh.inv_tau, scale = sh.scale;
  at::parallel_for(0, sh.rows, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const uint32_t key = row_key(seed, (uint64_t)r);
      const int64_t off = r * 2 * I;
      const T* __restrict__ x0 = x + off;
      const T* __restrict__ x1 = x0 + I;
      const T* __restrict__ g0 = g + off;
      const T* __restrict__ g1 = g0 + I;
      T* __restrict__ o0 = gx + off;
      T* __restrict__ o1 = o0 + I;
#pragma GCC ivdep
      for (int64_t i = 0; i < I; ++i) {
        float a = (float)x0[i], b = (float)x1[i];
        float ga = (float)g0[i], gb = (float)g1[i];
        float r0, r1;
        pair_grad(a, b, ga, gb, (a - b) + scale * logistic(key, (uint32_t)i), inv_tau, r0, r1);
        o0[i] = (T)r0;
        o1[i] = (T)r1;
      }
    }
  });
}

// Blocks of U adjacent values, memory order (N, HW, B, U): channels-last maps (B = C / U, HW = H * W) and
// inputs whose competition axis is innermost (tokens, vectors: N = HW = 1, B = all blocks). Each block's row is
// r = n * B + b and its values' positions j = k * HW + hw, the indices of the contiguous (rows, U, HW) layout,
// so a seed draws the same noise whatever the memory format. Work goes by chunks of consecutive blocks in
// memory; for U > 2 they are transposed into (U, chunk) float buffers so that the loops over blocks vectorise.
// memory blocks [m0, m0 + count): each one's row key and position hw (counters, not divisions, per block)
LWTA_INLINE int64_t block_keys(int64_t m0, int64_t total, int64_t HW, int64_t B, Key seed, uint32_t* keys,
                               uint32_t* hws) {
  const int64_t count = std::min(kChunk, total - m0);
  int64_t b = m0 % B, hw = (m0 / B) % HW, n = m0 / (B * HW);
  for (int64_t i = 0; i < count; ++i) {
    keys[i] = row_key(seed, (uint64_t)(n * B + b));
    hws[i] = (uint32_t)hw;
    if (++b == B) {
      b = 0;
      if (++hw == HW) { hw = 0; ++n; }
    }
  }
  return count;
}

// the noisy logits of a transposed chunk: z[k][i] = xt[k][i] + s * g, the max and the winner (first on ties)
LWTA_INLINE void noisy_blocks(const float* xt, const uint32_t* keys, const uint32_t* hws, const Shape& sh,
                              int64_t HW, int64_t count, float* z, float* best, int32_t* arg) {
  for (int64_t k = 0; k < sh.u; ++k) {
    const uint32_t jk = (uint32_t)(k * HW);
    const float* xk = xt + k * kChunk;
    float* zk = z + k * kChunk;
    #pragma GCC ivdep
    for (int64_t i = 0; i < count; ++i) {
      float v = xk[i] + sh.scale * gumbel(keys[i], jk + hws[i]);
      zk[i] = v;
      keep_max(v, k, best[i], arg[i]);
    }
  }
}

template <typename T>
void forward_blocks(const T* x, T* y, const Shape& sh, Key seed, int64_t N, int64_t HW, int64_t B) {
  const int64_t U = sh.u, total = N * HW * B, chunks = (total + kChunk - 1) / kChunk;
  at::parallel_for(0, chunks, 1, [&](int64_t w0, int64_t w1) {
    std::vector<float> xt(U * kChunk), z(U * kChunk);
    uint32_t keys[kChunk], hws[kChunk];
    float best[kChunk];
    int32_t arg[kChunk];
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t count = block_keys(w * kChunk, total, HW, B, seed, keys, hws);
      const T* xc = x + w * kChunk * U;
      T* yc = y + w * kChunk * U;
      if (U == 2) {  // pairs read in place (stride-2 loads vectorise); larger U goes through a transposed buffer
        #pragma GCC ivdep
        for (int64_t i = 0; i < count; ++i) {
          const T a = xc[2 * i], b = xc[2 * i + 1];
          float s = ((float)a - (float)b) + sh.scale * logistic(keys[i], hws[i]);
          bool w0 = s > 0.0f;
          yc[2 * i] = w0 ? a : (T)((float)a * 0.0f);
          yc[2 * i + 1] = w0 ? (T)((float)b * 0.0f) : b;
        }
        continue;
      }
      for (int64_t i = 0; i < count; ++i)
        for (int64_t k = 0; k < U; ++k) xt[k * kChunk + i] = (float)xc[i * U + k];
      noisy_blocks(xt.data(), keys, hws, sh, HW, count, z.data(), best, arg);
      for (int64_t i = 0; i < count; ++i)
        for (int64_t k = 0; k < U; ++k) yc[i * U + k] = arg[i] == k ? xc[i * U + k] : (T)((float)xc[i * U + k] * 0.0f);
    }
  });
}

template <typename T>
void backward_blocks(const T* g, const T* x, T* gx, const Shape& sh, Key seed, int64_t N, int64_t HW, int64_t B) {
  const int64_t U = sh.u, total = N * HW * B, chunks = (total + kChunk - 1) / kChunk;
  const float inv_tau = sh.inv_tau, scale = sh.scale;
  at::parallel_for(0, chunks, 1, [&](int64_t w0, int64_t w1) {
    std::vector<float> xt(U * kChunk), gt(U * kChunk), z(U * kChunk);
    uint32_t keys[kChunk], hws[kChunk];
    float best[kChunk], sum[kChunk], dot[kChunk];
    int32_t arg[kChunk];
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t n = block_keys(w * kChunk, total, HW, B, seed, keys, hws);
      const int64_t base = w * kChunk * U;
      if (U == 2) {
        const T* __restrict__ xc = x + base;
        const T* __restrict__ gc = g + base;
        T* __restrict__ oc = gx + base;
        #pragma GCC ivdep
        for (int64_t i = 0; i < n; ++i) {
          float a = (float)xc[2 * i], b = (float)xc[2 * i + 1], ga = (float)gc[2 * i], gb = (float)gc[2 * i + 1];
          float r0, r1;
          pair_grad(a, b, ga, gb, (a - b) + scale * logistic(keys[i], hws[i]), inv_tau, r0, r1);
          oc[2 * i] = (T)r0;
          oc[2 * i + 1] = (T)r1;
        }
        continue;
      }
      for (int64_t i = 0; i < n; ++i)
        for (int64_t k = 0; k < U; ++k) {
          xt[k * kChunk + i] = (float)x[base + i * U + k];
          gt[k * kChunk + i] = (float)g[base + i * U + k];
        }
      noisy_blocks(xt.data(), keys, hws, sh, HW, n, z.data(), best, arg);
      {
        #pragma GCC ivdep
        for (int64_t i = 0; i < n; ++i) { sum[i] = 0.0f; dot[i] = 0.0f; }
        for (int64_t k = 0; k < U; ++k) {
          float* zk = z.data() + k * kChunk;
          const float* xk = xt.data() + k * kChunk;
          const float* gk = gt.data() + k * kChunk;
          #pragma GCC ivdep
          for (int64_t i = 0; i < n; ++i) {
            float e = exp_nonpos((zk[i] - best[i]) * inv_tau);
            zk[i] = e;
            sum[i] += e;
            dot[i] += e * (gk[i] * xk[i]);
          }
        }
        #pragma GCC ivdep
        for (int64_t i = 0; i < n; ++i) { sum[i] = 1.0f / sum[i]; dot[i] *= sum[i]; }
        for (int64_t k = 0; k < U; ++k) {
          float* zk = z.data() + k * kChunk;
          const float* xk = xt.data() + k * kChunk;
          const float* gk = gt.data() + k * kChunk;
          #pragma GCC ivdep
          for (int64_t i = 0; i < n; ++i) {
            float gi = gk[i];
            zk[i] = (arg[i] == k ? gi : 0.0f) + inv_tau * (zk[i] * sum[i]) * (gi * xk[i] - dot[i]);
          }
        }
      }
      for (int64_t i = 0; i < n; ++i)
        for (int64_t k = 0; k < U; ++k) gx[base + i * U + k] = (T)z[k * kChunk + i];
    }
  });
}

Shape shape_of(const at::Tensor& x, int64_t competitors, int64_t inner, double noise_scale, double temperature) {
  TORCH_CHECK(x.device().is_cpu(), "fused LWTA: CPU tensors only");
  TORCH_CHECK(x.is_non_overlapping_and_dense(), "fused LWTA: x must be dense");
  TORCH_CHECK(competitors >= 2 && inner >= 1 && x.numel() % (competitors * inner) == 0,
              "fused LWTA: numel ", x.numel(), " is not a multiple of competitors * inner = ", competitors * inner);
  TORCH_CHECK(inner * competitors < (int64_t(1) << 32), "fused LWTA: a row of blocks must hold < 2^32 values");
  return Shape{x.numel() / (competitors * inner), competitors, inner, (float)noise_scale, (float)(1.0 / temperature)};
}

#define LWTA_DISPATCH(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)

// inner: positions per row of blocks in the logical (rows, U, inner) view; cl_blocks: 0 for a contiguous x,
// else B = C / U of a channels-last (N, C, H, W) x (then inner = H * W).
at::Tensor forward(const at::Tensor& x, int64_t seed, int64_t competitors, int64_t inner, int64_t cl_blocks,
                   double noise_scale, double temperature) {
  Shape sh = shape_of(x, competitors, inner, noise_scale, temperature);
  at::Tensor y = at::empty_like(x);  // same strides: memory order is the (R, U, I) order for both
  LWTA_DISPATCH(x.scalar_type(), "lwta_forward", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* yp = y.mutable_data_ptr<scalar_t>();
    const Key key = make_key((uint64_t)seed);
    if (cl_blocks > 0) forward_blocks(xp, yp, sh, key, sh.rows / cl_blocks, inner, cl_blocks);
    else if (inner == 1) forward_blocks(xp, yp, sh, key, 1, 1, sh.rows);
    else if (competitors == 2) forward_pair(xp, yp, sh, key);
    else forward_general(xp, yp, sh, key);
  });
  return y;
}

at::Tensor backward(const at::Tensor& grad, const at::Tensor& x, int64_t seed, int64_t competitors, int64_t inner,
                    int64_t cl_blocks, double noise_scale, double temperature) {
  Shape sh = shape_of(x, competitors, inner, noise_scale, temperature);
  at::Tensor g = grad.to(x.scalar_type());
  if (g.strides() != x.strides()) g = at::empty_like(x).copy_(g);  // same memory order as x
  at::Tensor gx = at::empty_like(x);
  LWTA_DISPATCH(x.scalar_type(), "lwta_backward", [&] {
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* op = gx.mutable_data_ptr<scalar_t>();
    const Key key = make_key((uint64_t)seed);
    if (cl_blocks > 0) backward_blocks(gp, xp, op, sh, key, sh.rows / cl_blocks, inner, cl_blocks);
    else if (inner == 1) backward_blocks(gp, xp, op, sh, key, 1, 1, sh.rows);
    else if (competitors == 2) backward_pair(gp, xp, op, sh, key);
    else backward_general(gp, xp, op, sh, key);
  });
  return gx;
}

// The noise forward draws, in the logical (rows, U, inner) order whatever x's memory format: Gumbel(0, 1) per
// value (shape (R, U * I)), or for U = 2 one Logistic(0, 1) per block (shape (R, I)). Unscaled; for the tests that feed the reference layer the same noise.
at::Tensor noise(const at::Tensor& x, int64_t seed, int64_t competitors, int64_t inner) {
  Shape sh = shape_of(x, competitors, inner, 1.0, 1.0);
  const Key key0 = make_key((uint64_t)seed);
  const int64_t per_row = competitors == 2 ? inner : competitors * inner;
  at::Tensor out = at::empty({sh.rows, per_row}, x.options().dtype(at::kFloat));
  float* o = out.mutable_data_ptr<float>();
  at::parallel_for(0, sh.rows, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const uint32_t key = row_key(key0, (uint64_t)r);
      for (int64_t j = 0; j < per_row; ++j)
        o[r * per_row + j] = competitors == 2 ? logistic(key, (uint32_t)j) : gumbel(key, (uint32_t)j);
    }
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "fused LWTA forward (hard straight-through sample)");
  m.def("backward", &backward, "fused LWTA backward (recomputes the noise from the seed)");
  m.def("noise", &noise, "the noise the fused forward draws for a seed");
}
