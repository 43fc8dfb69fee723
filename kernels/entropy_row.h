// Per-row arithmetic of the vocab-parallel entropy / log-prob kernels, shared by the CPU build
// (entropy_cpu.cpp) and the CUDA build (entropy_cuda.cu) so that the CPU tests exercise the same
// update, merge and gradient code that runs on the GPU.
//
// A row (one token's logits on this vocabulary shard) is summarised by three fp32 numbers relative to
// its running maximum m:
//     sum_exp         = sum_v exp(z_v - m)
//     sum_exp_shifted = sum_v exp(z_v - m) * (z_v - m)
// With S and T the global sums at the global max M:  lse = M + log S,  H = log S - T / S.
// Accumulating (z - m) rather than z keeps H = lse - E[z] free of the cancellation that loses all
// digits when |M| is large (logits of 1e4 give M ~ 1e4 and H ~ 1).
//
// Special values: a -inf logit (masked token) contributes p = 0 and p * (z - m) = 0 exactly; a NaN
// logit makes the row NaN (never silently dropped); a +inf logit makes the row NaN, as torch's
// log_softmax does. Everything below is plain float arithmetic with selects instead of branches where
// it runs per element, so that GCC vectorises the CPU row loops.
#pragma once

#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__)
#define NE_HD __host__ __device__ __forceinline__
#else
#define NE_HD inline
#endif

namespace nemo_entropy {

// exp(x) for x below this is a subnormal (or zero) fp32 number: against sums that are >= 1 it is below
// rounding, so it is taken as exactly 0. That is what makes a masked logit contribute nothing.
constexpr float kExpUnderflow = -87.0f;
// Shifts z - m are floored here before being multiplied by their (then zero) weight: 0 * -inf would
// be NaN. The floor is below kExpUnderflow, so a floored shift always has weight exactly 0.
constexpr float kShiftFloor = -100.0f;

struct RowStats {
  float max;              // running maximum of the row's valid logits (-inf: nothing seen yet)
  float sum_exp;          // sum exp(z - max)
  float sum_exp_shifted;  // sum exp(z - max) * (z - max)
};

NE_HD RowStats empty_row_stats() { return RowStats{-INFINITY, 0.0f, 0.0f}; }

// Maximum that propagates NaN (fmaxf would drop it and hide a broken logit).
NE_HD float max_nan(float a, float b) { return (a > b || a != a) ? a : b; }

// Floor a shift at kShiftFloor; NaN passes through (the comparison is false).
NE_HD float floor_shift(float d) { return d < kShiftFloor ? kShiftFloor : d; }

#if !defined(__CUDA_ARCH__)
NE_HD float bits_as_float(int32_t bits) {
  float out;
  memcpy(&out, &bits, sizeof(out));
  return out;
}
#endif

// exp(x) for the x <= ~0 that the kernels need (shifts from a maximum), 0 below kExpUnderflow.
// On the GPU: the hardware exp2 (__expf); the kernels are bandwidth bound there. On the CPU: Cody-Waite
// reduction x = n ln2 + r, |r| <= ln2/2, a degree-8 Taylor polynomial (truncation < 1e-8 relative) and
// 2^n from exponent bits, branch-free so that the row loops vectorise (libm's expf does not).
NE_HD float exp_nonpositive(float x) {
#if defined(__CUDA_ARCH__)
  return x < kExpUnderflow ? 0.0f : __expf(x);
#else
  const float t = x * 1.44269504088896341f;
  // Round to nearest by the 1.5 * 2^23 trick; exact for |t| < 2^22 and vectorisable without SSE4.1.
  const float n = (t + 12582912.0f) - 12582912.0f;
  float r = x - n * 0.693145751953125f;  // ln2 split in a high part exact in fp32 ...
  r = r - n * 1.42860682030941723212e-6f;  // ... and the rest (Cody-Waite)
  float p = 2.48015873015873e-5f;          // 1/8!
  p = p * r + 1.98412698412698e-4f;        // 1/7!
  p = p * r + 1.38888888888889e-3f;        // 1/6!
  p = p * r + 8.33333333333333e-3f;        // 1/5!
  p = p * r + 4.16666666666667e-2f;        // 1/4!
  p = p * r + 1.66666666666667e-1f;        // 1/3!
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  // Exponent bits of 2^n; n is sanitised first so that the float->int conversion is always defined
  // (a NaN x still gives a NaN result through p).
  float n_safe = (n == n) ? n : 0.0f;
  n_safe = n_safe < -126.0f ? -126.0f : n_safe;
  n_safe = n_safe > 127.0f ? 127.0f : n_safe;
  const float scale = bits_as_float((static_cast<int32_t>(n_safe) + 127) << 23);
  const float y = p * scale;
  return x < kExpUnderflow ? 0.0f : (x > 88.0f ? INFINITY : y);
#endif
}

// Add one logit z to running sums taken at a fixed reference maximum m (m must not be -inf).
NE_HD void accumulate_at(float z, float m, float& sum_exp, float& sum_exp_shifted) {
  const float d = floor_shift(z - m);
  const float e = exp_nonpositive(d);
  sum_exp += e;
  sum_exp_shifted += e * d;
}

// Re-express stats at a new reference maximum new_max >= s.max:
//   S' = S e^(m - M),  T' = e^(m - M) (T + (m - M) S).
// An empty summary (S == 0, e.g. a shard whose logits are all -inf or all padding) stays empty; this is
// the guard that a running max initialised at -inf needs (-inf - -inf is NaN).
NE_HD RowStats rescale_row_stats(RowStats s, float new_max) {
  if (s.sum_exp == 0.0f) return RowStats{new_max, 0.0f, 0.0f};
  const float delta = floor_shift(s.max - new_max);
  const float scale = exp_nonpositive(delta);
  return RowStats{new_max, s.sum_exp * scale, scale * (s.sum_exp_shifted + delta * s.sum_exp)};
}

// Combine the summaries of two disjoint sets of columns of the same row (associative up to rounding).
NE_HD RowStats merge_row_stats(RowStats a, RowStats b) {
  const float m = max_nan(a.max, b.max);
  if (m == -INFINITY) return empty_row_stats();
  const RowStats ra = rescale_row_stats(a, m);
  const RowStats rb = rescale_row_stats(b, m);
  return RowStats{m, ra.sum_exp + rb.sum_exp, ra.sum_exp_shifted + rb.sum_exp_shifted};
}

// Online update of a running summary with a chunk of k logits (the per-thread loop of the CUDA kernel):
// one rescale per chunk when the chunk raises the maximum, then one exp per logit.
NE_HD void accumulate_chunk(RowStats& s, const float* z, int k) {
  float chunk_max = -INFINITY;
  for (int i = 0; i < k; ++i) chunk_max = max_nan(chunk_max, z[i]);
  if (chunk_max == -INFINITY) return;  // all masked: nothing to add
  const float m = max_nan(s.max, chunk_max);
  if (m != s.max) s = rescale_row_stats(s, m);  // also taken when m is NaN: the row becomes NaN
  for (int i = 0; i < k; ++i) accumulate_at(z[i], m, s.sum_exp, s.sum_exp_shifted);
}

// Gradient of  g_logprob * logp_target + g_entropy * H  with respect to one logit z that is NOT the
// target (the target adds g_logprob on top):
//   dlogp/dz = [v == target] - p,   dH/dz = -p (z - E_p[z]),   p = exp(z - lse),
// and z - E_p[z] = (z - lse) + H. lse is passed as (global max M, log S) and z - lse is formed as
// (z - M) - log S: z - M is exact for the logits that matter, while M + log S rounded to fp32 would
// carry an absolute error of ulp(|M|) into every p (5e-4 relative at |M| ~ 1e4).
NE_HD float logit_grad(float z, float row_max, float log_sum, float entropy, float g_entropy, float g_logprob) {
  const float d = floor_shift((z - row_max) - log_sum);
  const float p = exp_nonpositive(d);
  return -p * (g_logprob + g_entropy * (d + entropy));
}

}  // namespace nemo_entropy
