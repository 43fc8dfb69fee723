// CPU build of the vocab-parallel entropy / log-prob kernels (torch extension "nemo_entropy_cpu_kernels").
//
// Forward: one read of each row of the logits shard, producing the per-row partial statistics that the
// Python autograd Function all-reduces over the TP group (see nemo_entropy/entropy/vocab_parallel.py).
// Backward: one read of each row and one write of its gradient, recomputing p from the saved per-row
// (global max, log S, H); nothing of size N x V is ever stored in fp32.
//
// Rows are split across at::get_num_threads() std::threads (not at::parallel_for: its inline OpenMP
// implementation would tie the extension to the OpenMP runtime torch was built with). Inside a row, columns are processed in blocks of
// kBlock converted to fp32 in a stack buffer (L1-resident), with kLanes independent accumulators so that
// the compiler vectorises the max and exp-sum loops without reassociating fp additions.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <thread>
#include <vector>

#include "entropy_row.h"

namespace {

using nemo_entropy::RowStats;

constexpr int64_t kBlock = 2048;
constexpr int64_t kLanes = 16;

template <typename scalar_t>
RowStats row_stats(const scalar_t* z, int64_t valid_width) {
  RowStats row = nemo_entropy::empty_row_stats();
  alignas(64) float buf[kBlock];
  for (int64_t start = 0; start < valid_width; start += kBlock) {
    const int64_t n = std::min(kBlock, valid_width - start);
    const int64_t padded = (n + kLanes - 1) / kLanes * kLanes;
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(z[start + i]);
    for (int64_t i = n; i < padded; ++i) buf[i] = -INFINITY;

    float lane_max[kLanes];
    for (int64_t j = 0; j < kLanes; ++j) lane_max[j] = -INFINITY;
    for (int64_t i = 0; i < padded; i += kLanes)
      for (int64_t j = 0; j < kLanes; ++j) lane_max[j] = nemo_entropy::max_nan(lane_max[j], buf[i + j]);
    float block_max = -INFINITY;
    for (int64_t j = 0; j < kLanes; ++j) block_max = nemo_entropy::max_nan(block_max, lane_max[j]);
    if (block_max == -INFINITY) continue;  // every column masked

    float lane_sum[kLanes], lane_shifted[kLanes];
    for (int64_t j = 0; j < kLanes; ++j) lane_sum[j] = lane_shifted[j] = 0.0f;
    for (int64_t i = 0; i < padded; i += kLanes)
      for (int64_t j = 0; j < kLanes; ++j)
        nemo_entropy::accumulate_at(buf[i + j], block_max, lane_sum[j], lane_shifted[j]);
    RowStats block{block_max, 0.0f, 0.0f};
    for (int64_t j = 0; j < kLanes; ++j) {
      block.sum_exp += lane_sum[j];
      block.sum_exp_shifted += lane_shifted[j];
    }
    row = nemo_entropy::merge_row_stats(row, block);
  }
  return row;
}

// The per-thread loop of the CUDA kernel (chunks of 8 logits, online rescaling), run sequentially: lets
// the CPU tests check that code path of the shared header, which the blocked CPU loop above does not use.
template <typename scalar_t>
RowStats row_stats_chunked(const scalar_t* z, int64_t valid_width, int64_t chunk) {
  RowStats row = nemo_entropy::empty_row_stats();
  float buf[64];
  for (int64_t start = 0; start < valid_width; start += chunk) {
    const int64_t n = std::min(chunk, valid_width - start);
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(z[start + i]);
    nemo_entropy::accumulate_chunk(row, buf, static_cast<int>(n));
  }
  return row;
}

template <typename scalar_t>
void row_grad(const scalar_t* z, scalar_t* grad, int64_t valid_width, int64_t total_width, int64_t target,
              float row_max, float log_sum, float entropy, float g_entropy, float g_logprob) {
  alignas(64) float buf[kBlock];
  for (int64_t start = 0; start < valid_width; start += kBlock) {
    const int64_t n = std::min(kBlock, valid_width - start);
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(z[start + i]);
    for (int64_t i = 0; i < n; ++i) buf[i] = nemo_entropy::logit_grad(buf[i], row_max, log_sum, entropy, g_entropy, g_logprob);
    for (int64_t i = 0; i < n; ++i) grad[start + i] = static_cast<scalar_t>(buf[i]);
  }
  // Padded vocabulary entries are not part of the distribution: zero gradient.
  for (int64_t i = valid_width; i < total_width; ++i) grad[i] = static_cast<scalar_t>(0.0f);
  if (target >= 0 && target < valid_width) {
    // Recomputed in fp32 and rounded once (adding to the rounded value would round twice).
    const float zt = static_cast<float>(z[target]);
    grad[target] = static_cast<scalar_t>(nemo_entropy::logit_grad(zt, row_max, log_sum, entropy, g_entropy, g_logprob) + g_logprob);
  }
}

void check_inputs(const char* fn, const at::Tensor& logits, const at::Tensor& local_targets, int64_t valid_width) {
  TORCH_CHECK(logits.device().is_cpu(), fn, ": logits must be a CPU tensor, got ", logits.device());
  TORCH_CHECK(logits.dim() == 2, fn, ": logits must be 2-D [rows, V_local], got ", logits.sizes());
  TORCH_CHECK(logits.size(1) == 0 || logits.stride(1) == 1, fn, ": logits rows must be contiguous (stride(1) == 1), got strides ",
              logits.strides());
  const auto dt = logits.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, fn,
              ": logits dtype must be float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK(local_targets.scalar_type() == at::kLong && local_targets.is_contiguous() && local_targets.dim() == 1 &&
                  local_targets.size(0) == logits.size(0),
              fn, ": local_targets must be a contiguous int64 tensor of shape [", logits.size(0), "], got ",
              local_targets.scalar_type(), " ", local_targets.sizes());
  TORCH_CHECK(valid_width >= 0 && valid_width <= logits.size(1), fn, ": valid_width must be in [0, ", logits.size(1),
              "], got ", valid_width);
}

void check_row_vector(const char* fn, const char* name, const at::Tensor& t, int64_t rows) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.dim() == 1 && t.size(0) == rows, fn, ": ", name,
              " must be a contiguous float32 tensor of shape [", rows, "], got ", t.scalar_type(), " ", t.sizes());
}

// Run fn(begin, end) over row ranges on up to at::get_num_threads() threads; small shards stay on the
// calling thread (starting a thread costs more than a few thousand logits).
template <typename Fn>
void parallel_rows(int64_t rows, int64_t width, const Fn& fn) {
  const int64_t work = rows * std::max<int64_t>(1, width);
  int64_t threads = std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(1, work / (1 << 18)));
  threads = std::max<int64_t>(1, std::min(threads, rows));
  if (threads == 1) {
    fn(0, rows);
    return;
  }
  std::vector<std::thread> pool;
  const int64_t per = (rows + threads - 1) / threads;
  for (int64_t t = 1; t < threads; ++t) {
    const int64_t begin = t * per, end = std::min(rows, begin + per);
    if (begin < end) pool.emplace_back([&fn, begin, end] { fn(begin, end); });
  }
  fn(0, std::min(rows, per));
  for (auto& th : pool) th.join();
}

// Returns (local_max, sum_exp, sum_exp_shifted, target_logit), each float32 [rows]. chunk > 0 selects the
// CUDA per-thread code path (sequential, for tests); chunk == 0 the blocked, vectorised CPU path.
std::vector<at::Tensor> shard_stats(const at::Tensor& logits, const at::Tensor& local_targets, int64_t valid_width,
                                    int64_t chunk) {
  check_inputs("shard_stats", logits, local_targets, valid_width);
  TORCH_CHECK(chunk >= 0 && chunk <= 64, "shard_stats: chunk must be in [0, 64], got ", chunk);
  const int64_t rows = logits.size(0);
  auto opts = logits.options().dtype(at::kFloat);
  at::Tensor out_max = at::empty({rows}, opts), out_sum = at::empty({rows}, opts);
  at::Tensor out_shifted = at::empty({rows}, opts), out_target = at::empty({rows}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "shard_stats", [&] {
    const scalar_t* base = logits.data_ptr<scalar_t>();
    const int64_t stride = logits.stride(0);
    const int64_t* targets = local_targets.data_ptr<int64_t>();
    float *mx = out_max.data_ptr<float>(), *se = out_sum.data_ptr<float>();
    float *ss = out_shifted.data_ptr<float>(), *tl = out_target.data_ptr<float>();
    parallel_rows(rows, chunk > 0 ? 0 : valid_width, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* z = base + r * stride;
        const RowStats s = chunk > 0 ? row_stats_chunked(z, valid_width, chunk) : row_stats(z, valid_width);
        mx[r] = s.max;
        se[r] = s.sum_exp;
        ss[r] = s.sum_exp_shifted;
        const int64_t t = targets[r];
        tl[r] = (t >= 0 && t < valid_width) ? static_cast<float>(z[t]) : 0.0f;
      }
    });
  });
  return {out_max, out_sum, out_shifted, out_target};
}

// Gradient of sum_r (grad_logprobs[r] * logp[r] + grad_entropy[r] * H[r]) with respect to the shard,
// in the dtype of the logits.
at::Tensor shard_grad(const at::Tensor& logits, const at::Tensor& local_targets, int64_t valid_width,
                      const at::Tensor& row_max, const at::Tensor& log_sum, const at::Tensor& entropy,
                      const at::Tensor& grad_entropy, const at::Tensor& grad_logprobs) {
  check_inputs("shard_grad", logits, local_targets, valid_width);
  const int64_t rows = logits.size(0), width = logits.size(1);
  check_row_vector("shard_grad", "row_max", row_max, rows);
  check_row_vector("shard_grad", "log_sum", log_sum, rows);
  check_row_vector("shard_grad", "entropy", entropy, rows);
  check_row_vector("shard_grad", "grad_entropy", grad_entropy, rows);
  check_row_vector("shard_grad", "grad_logprobs", grad_logprobs, rows);
  at::Tensor grad = at::empty({rows, width}, logits.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "shard_grad", [&] {
    const scalar_t* base = logits.data_ptr<scalar_t>();
    scalar_t* gbase = grad.data_ptr<scalar_t>();
    const int64_t stride = logits.stride(0);
    const int64_t* targets = local_targets.data_ptr<int64_t>();
    const float *mx = row_max.data_ptr<float>(), *ls = log_sum.data_ptr<float>(), *h = entropy.data_ptr<float>();
    const float *gh = grad_entropy.data_ptr<float>(), *gl = grad_logprobs.data_ptr<float>();
    parallel_rows(rows, width, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        row_grad(base + r * stride, gbase + r * width, valid_width, width, targets[r], mx[r], ls[r], h[r], gh[r], gl[r]);
    });
  });
  return grad;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "nemo-entropy: vocab-parallel entropy / log-prob shard kernels (CPU build)";
  m.def("shard_stats", &shard_stats, "per-row partial softmax statistics of a logits shard", pybind11::arg("logits"),
        pybind11::arg("local_targets"), pybind11::arg("valid_width"), pybind11::arg("chunk") = 0);
  m.def("shard_grad", &shard_grad, "gradient of a logits shard from the saved per-row statistics",
        pybind11::arg("logits"), pybind11::arg("local_targets"), pybind11::arg("valid_width"), pybind11::arg("row_max"),
        pybind11::arg("log_sum"), pybind11::arg("entropy"), pybind11::arg("grad_entropy"), pybind11::arg("grad_logprobs"));
}
