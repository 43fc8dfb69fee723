// CUDA kernels of the vocab-parallel entropy / log-prob (torch extension "nemo_entropy_cuda_kernels",
// bound to Python by entropy_cuda_binding.cpp). Pure CUDA: no torch header is needed to compile this file,
// which keeps the compile-only CI check (nvcc -c for sm_80 and sm_90) to a second or two.
//
// One thread block per row (one token's logits on this shard). Each thread reads 16-byte vectors
// (8 bf16/fp16 or 4 fp32 logits) when the row is 16-byte aligned, keeping a running RowStats with the
// shared per-row code of entropy_row.h (accumulate_chunk: one rescale per vector that raises the max, one
// exp per logit); the block then merges the per-thread summaries with merge_row_stats (warp shuffles,
// then shared memory). The forward reads the shard once and writes 4 floats per row; the backward reads
// it once, writes the gradient once in the logits' dtype, and uses 3 floats per row of saved state.
// Nothing of size rows x V is ever materialised in fp32.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "entropy_row.h"

namespace nemo_entropy {
namespace {

template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// 16-byte vector of logits.
template <typename T>
struct alignas(16) Vec16 {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

__device__ __forceinline__ RowStats shfl_xor_stats(RowStats s, int lane_mask) {
  RowStats o;
  o.max = __shfl_xor_sync(0xffffffffu, s.max, lane_mask);
  o.sum_exp = __shfl_xor_sync(0xffffffffu, s.sum_exp, lane_mask);
  o.sum_exp_shifted = __shfl_xor_sync(0xffffffffu, s.sum_exp_shifted, lane_mask);
  return o;
}

// Merge the RowStats of every thread of the block; the result is valid in thread 0.
template <int kThreads>
__device__ RowStats block_merge(RowStats s) {
  static_assert(kThreads % 32 == 0 && kThreads <= 1024, "block size must be a multiple of 32, at most 1024");
  constexpr int kWarps = kThreads / 32;
  __shared__ RowStats per_warp[kWarps];
  for (int mask = 16; mask > 0; mask >>= 1) s = merge_row_stats(s, shfl_xor_stats(s, mask));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) per_warp[warp] = s;
  __syncthreads();
  if (warp == 0) {
    s = lane < kWarps ? per_warp[lane] : empty_row_stats();
    for (int mask = 16; mask > 0; mask >>= 1) s = merge_row_stats(s, shfl_xor_stats(s, mask));
  }
  return s;
}

template <typename T, int kThreads, bool kVectorized>
__global__ void __launch_bounds__(kThreads)
    shard_stats_kernel(const T* __restrict__ logits, int64_t row_stride, int64_t valid_width,
                       const int64_t* __restrict__ local_targets, float* __restrict__ out_max,
                       float* __restrict__ out_sum_exp, float* __restrict__ out_sum_shifted,
                       float* __restrict__ out_target_logit) {
  const int64_t row = blockIdx.x;
  const T* z = logits + row * row_stride;
  RowStats s = empty_row_stats();
  int64_t scalar_from = 0;
  if (kVectorized) {
    constexpr int K = Vec16<T>::kSize;
    const int64_t n_vec = valid_width / K;
    const Vec16<T>* zv = reinterpret_cast<const Vec16<T>*>(z);
    for (int64_t i = threadIdx.x; i < n_vec; i += kThreads) {
      const Vec16<T> chunk = zv[i];
      float f[K];
#pragma unroll
      for (int k = 0; k < K; ++k) f[k] = to_float(chunk.v[k]);
      accumulate_chunk(s, f, K);
    }
    scalar_from = n_vec * K;
  }
  for (int64_t i = scalar_from + threadIdx.x; i < valid_width; i += kThreads) {
    const float f = to_float(z[i]);
    accumulate_chunk(s, &f, 1);
  }
  s = block_merge<kThreads>(s);
  if (threadIdx.x == 0) {
    out_max[row] = s.max;
    out_sum_exp[row] = s.sum_exp;
    out_sum_shifted[row] = s.sum_exp_shifted;
    const int64_t t = local_targets[row];
    out_target_logit[row] = (t >= 0 && t < valid_width) ? to_float(z[t]) : 0.0f;
  }
}

__device__ __forceinline__ float grad_at(float z, int64_t col, int64_t valid_width, int64_t target, float row_max,
                                         float log_sum, float entropy, float g_entropy, float g_logprob) {
  if (col >= valid_width) return 0.0f;  // padded vocabulary entry
  const float g = logit_grad(z, row_max, log_sum, entropy, g_entropy, g_logprob);
  return col == target ? g + g_logprob : g;
}

template <typename T, int kThreads, bool kVectorized>
__global__ void __launch_bounds__(kThreads)
    shard_grad_kernel(const T* __restrict__ logits, int64_t row_stride, T* __restrict__ grad, int64_t valid_width,
                      int64_t total_width, const int64_t* __restrict__ local_targets, const float* __restrict__ max_in,
                      const float* __restrict__ log_sum_in,
                      const float* __restrict__ entropy_in, const float* __restrict__ grad_entropy_in,
                      const float* __restrict__ grad_logprobs_in) {
  const int64_t row = blockIdx.x;
  const T* z = logits + row * row_stride;
  T* g = grad + row * total_width;
  const int64_t target = local_targets[row];
  const float row_max = max_in[row], log_sum = log_sum_in[row], entropy = entropy_in[row];
  const float g_entropy = grad_entropy_in[row], g_logprob = grad_logprobs_in[row];
  int64_t scalar_from = 0;
  if (kVectorized) {
    constexpr int K = Vec16<T>::kSize;
    const int64_t n_vec = total_width / K;
    const Vec16<T>* zv = reinterpret_cast<const Vec16<T>*>(z);
    Vec16<T>* gv = reinterpret_cast<Vec16<T>*>(g);
    for (int64_t i = threadIdx.x; i < n_vec; i += kThreads) {
      const Vec16<T> chunk = zv[i];
      Vec16<T> out;
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const int64_t col = i * K + k;
        out.v[k] = from_float<T>(
            grad_at(to_float(chunk.v[k]), col, valid_width, target, row_max, log_sum, entropy, g_entropy, g_logprob));
      }
      gv[i] = out;
    }
    scalar_from = n_vec * K;
  }
  for (int64_t col = scalar_from + threadIdx.x; col < total_width; col += kThreads) {
    const float zf = col < valid_width ? to_float(z[col]) : 0.0f;
    g[col] = from_float<T>(grad_at(zf, col, valid_width, target, row_max, log_sum, entropy, g_entropy, g_logprob));
  }
}

bool aligned16(const void* p, int64_t row_bytes) {
  return (reinterpret_cast<uintptr_t>(p) % 16 == 0) && (row_bytes % 16 == 0);
}

// Fewer threads for narrow shards: a block of 512 on a 2k-column row would leave most threads idle.
int threads_for(int64_t width) { return width >= 16384 ? 512 : (width >= 2048 ? 256 : 128); }

template <typename T, int kThreads>
cudaError_t launch_stats_t(const T* logits, int64_t row_stride, int64_t rows, int64_t valid_width,
                           const int64_t* local_targets, float* out_max, float* out_sum_exp, float* out_sum_shifted,
                           float* out_target_logit, cudaStream_t stream) {
  if (aligned16(logits, row_stride * static_cast<int64_t>(sizeof(T)))) {
    shard_stats_kernel<T, kThreads, true><<<rows, kThreads, 0, stream>>>(
        logits, row_stride, valid_width, local_targets, out_max, out_sum_exp, out_sum_shifted, out_target_logit);
  } else {
    shard_stats_kernel<T, kThreads, false><<<rows, kThreads, 0, stream>>>(
        logits, row_stride, valid_width, local_targets, out_max, out_sum_exp, out_sum_shifted, out_target_logit);
  }
  return cudaGetLastError();
}

template <typename T, int kThreads>
cudaError_t launch_grad_t(const T* logits, int64_t row_stride, T* grad, int64_t rows, int64_t valid_width,
                          int64_t total_width, const int64_t* local_targets, const float* row_max, const float* log_sum,
                          const float* entropy,
                          const float* grad_entropy, const float* grad_logprobs, cudaStream_t stream) {
  const int64_t elem = sizeof(T);
  if (aligned16(logits, row_stride * elem) && aligned16(grad, total_width * elem)) {
    shard_grad_kernel<T, kThreads, true><<<rows, kThreads, 0, stream>>>(
        logits, row_stride, grad, valid_width, total_width, local_targets, row_max, log_sum, entropy, grad_entropy, grad_logprobs);
  } else {
    shard_grad_kernel<T, kThreads, false><<<rows, kThreads, 0, stream>>>(
        logits, row_stride, grad, valid_width, total_width, local_targets, row_max, log_sum, entropy, grad_entropy, grad_logprobs);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_stats(const void* logits, int64_t row_stride, int64_t rows, int64_t valid_width,
                         const int64_t* local_targets, float* out_max, float* out_sum_exp, float* out_sum_shifted,
                         float* out_target_logit, cudaStream_t stream) {
  const T* z = static_cast<const T*>(logits);
  switch (threads_for(valid_width)) {
    case 512:
      return launch_stats_t<T, 512>(z, row_stride, rows, valid_width, local_targets, out_max, out_sum_exp,
                                    out_sum_shifted, out_target_logit, stream);
    case 256:
      return launch_stats_t<T, 256>(z, row_stride, rows, valid_width, local_targets, out_max, out_sum_exp,
                                    out_sum_shifted, out_target_logit, stream);
    default:
      return launch_stats_t<T, 128>(z, row_stride, rows, valid_width, local_targets, out_max, out_sum_exp,
                                    out_sum_shifted, out_target_logit, stream);
  }
}

template <typename T>
cudaError_t launch_grad(const void* logits, int64_t row_stride, void* grad, int64_t rows, int64_t valid_width,
                        int64_t total_width, const int64_t* local_targets, const float* row_max, const float* log_sum,
                          const float* entropy,
                        const float* grad_entropy, const float* grad_logprobs, cudaStream_t stream) {
  const T* z = static_cast<const T*>(logits);
  T* g = static_cast<T*>(grad);
  switch (threads_for(total_width)) {
    case 512:
      return launch_grad_t<T, 512>(z, row_stride, g, rows, valid_width, total_width, local_targets, row_max, log_sum, entropy,
                                   grad_entropy, grad_logprobs, stream);
    case 256:
      return launch_grad_t<T, 256>(z, row_stride, g, rows, valid_width, total_width, local_targets, row_max, log_sum, entropy,
                                   grad_entropy, grad_logprobs, stream);
    default:
      return launch_grad_t<T, 128>(z, row_stride, g, rows, valid_width, total_width, local_targets, row_max, log_sum, entropy,
                                   grad_entropy, grad_logprobs, stream);
  }
}

}  // namespace

// Entry points for the binding. dtype: 0 = float32, 1 = float16, 2 = bfloat16. rows must be <= 2^31 - 1
// (one block per row; checked by the binding).
cudaError_t launch_shard_stats(int dtype, const void* logits, int64_t row_stride, int64_t rows, int64_t valid_width,
                               const int64_t* local_targets, float* out_max, float* out_sum_exp, float* out_sum_shifted,
                               float* out_target_logit, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  switch (dtype) {
    case 0:
      return launch_stats<float>(logits, row_stride, rows, valid_width, local_targets, out_max, out_sum_exp,
                                 out_sum_shifted, out_target_logit, stream);
    case 1:
      return launch_stats<__half>(logits, row_stride, rows, valid_width, local_targets, out_max, out_sum_exp,
                                  out_sum_shifted, out_target_logit, stream);
    case 2:
      return launch_stats<__nv_bfloat16>(logits, row_stride, rows, valid_width, local_targets, out_max, out_sum_exp,
                                         out_sum_shifted, out_target_logit, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

cudaError_t launch_shard_grad(int dtype, const void* logits, int64_t row_stride, void* grad, int64_t rows,
                              int64_t valid_width, int64_t total_width, const int64_t* local_targets, const float* row_max,
                              const float* log_sum, const float* entropy, const float* grad_entropy, const float* grad_logprobs,
                              cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  switch (dtype) {
    case 0:
      return launch_grad<float>(logits, row_stride, grad, rows, valid_width, total_width, local_targets, row_max, log_sum, entropy,
                                grad_entropy, grad_logprobs, stream);
    case 1:
      return launch_grad<__half>(logits, row_stride, grad, rows, valid_width, total_width, local_targets, row_max, log_sum,
                                 entropy, grad_entropy, grad_logprobs, stream);
    case 2:
      return launch_grad<__nv_bfloat16>(logits, row_stride, grad, rows, valid_width, total_width, local_targets, row_max, log_sum,
                                        entropy, grad_entropy, grad_logprobs, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace nemo_entropy
