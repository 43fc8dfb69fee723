// Python binding of the CUDA kernels in entropy_cuda.cu (torch extension "nemo_entropy_cuda_kernels").
// Same functions and contract as the CPU build (entropy_cpu.cpp): shard_stats and shard_grad.
#include <torch/extension.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <limits>
#include <vector>

namespace nemo_entropy {
cudaError_t launch_shard_stats(int dtype, const void* logits, int64_t row_stride, int64_t rows, int64_t valid_width,
                               const int64_t* local_targets, float* out_max, float* out_sum_exp, float* out_sum_shifted,
                               float* out_target_logit, cudaStream_t stream);
cudaError_t launch_shard_grad(int dtype, const void* logits, int64_t row_stride, void* grad, int64_t rows,
                              int64_t valid_width, int64_t total_width, const int64_t* local_targets,
                              const float* row_max, const float* log_sum, const float* entropy, const float* grad_entropy, const float* grad_logprobs,
                              cudaStream_t stream);
}  // namespace nemo_entropy

namespace {

int dtype_code(const at::Tensor& logits, const char* fn) {
  switch (logits.scalar_type()) {
    case at::kFloat:
      return 0;
    case at::kHalf:
      return 1;
    case at::kBFloat16:
      return 2;
    default:
      TORCH_CHECK(false, fn, ": logits dtype must be float32, float16 or bfloat16, got ", logits.scalar_type());
  }
}

void check_inputs(const char* fn, const at::Tensor& logits, const at::Tensor& local_targets, int64_t valid_width) {
  TORCH_CHECK(logits.is_cuda(), fn, ": logits must be a CUDA tensor, got ", logits.device());
  TORCH_CHECK(logits.dim() == 2, fn, ": logits must be 2-D [rows, V_local], got ", logits.sizes());
  TORCH_CHECK(logits.size(1) == 0 || logits.stride(1) == 1, fn,
              ": logits rows must be contiguous (stride(1) == 1), got strides ", logits.strides());
  TORCH_CHECK(logits.size(0) <= std::numeric_limits<int32_t>::max(), fn, ": at most 2^31 - 1 rows, got ",
              logits.size(0));
  TORCH_CHECK(local_targets.is_cuda() && local_targets.device() == logits.device() &&
                  local_targets.scalar_type() == at::kLong && local_targets.is_contiguous() &&
                  local_targets.dim() == 1 && local_targets.size(0) == logits.size(0),
              fn, ": local_targets must be a contiguous int64 tensor of shape [", logits.size(0), "] on ",
              logits.device(), ", got ", local_targets.scalar_type(), " ", local_targets.sizes(), " on ",
              local_targets.device());
  TORCH_CHECK(valid_width >= 0 && valid_width <= logits.size(1), fn, ": valid_width must be in [0, ",
              logits.size(1), "], got ", valid_width);
}

void check_row_vector(const char* fn, const char* name, const at::Tensor& t, const at::Tensor& logits) {
  TORCH_CHECK(t.device() == logits.device() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.dim() == 1 &&
                  t.size(0) == logits.size(0),
              fn, ": ", name, " must be a contiguous float32 tensor of shape [", logits.size(0), "] on ",
              logits.device(), ", got ", t.scalar_type(), " ", t.sizes(), " on ", t.device());
}

std::vector<at::Tensor> shard_stats(const at::Tensor& logits, const at::Tensor& local_targets, int64_t valid_width) {
  check_inputs("shard_stats", logits, local_targets, valid_width);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t rows = logits.size(0);
  at::Tensor out = at::empty({4, rows}, logits.options().dtype(at::kFloat));
  const cudaError_t err = nemo_entropy::launch_shard_stats(
      dtype_code(logits, "shard_stats"), logits.data_ptr(), logits.stride(0), rows, valid_width,
      local_targets.data_ptr<int64_t>(), out[0].data_ptr<float>(), out[1].data_ptr<float>(),
      out[2].data_ptr<float>(), out[3].data_ptr<float>(), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "shard_stats: kernel launch failed: ", cudaGetErrorString(err));
  return {out[0], out[1], out[2], out[3]};
}

at::Tensor shard_grad(const at::Tensor& logits, const at::Tensor& local_targets, int64_t valid_width,
                      const at::Tensor& row_max, const at::Tensor& log_sum, const at::Tensor& entropy,
                      const at::Tensor& grad_entropy, const at::Tensor& grad_logprobs) {
  check_inputs("shard_grad", logits, local_targets, valid_width);
  check_row_vector("shard_grad", "row_max", row_max, logits);
  check_row_vector("shard_grad", "log_sum", log_sum, logits);
  check_row_vector("shard_grad", "entropy", entropy, logits);
  check_row_vector("shard_grad", "grad_entropy", grad_entropy, logits);
  check_row_vector("shard_grad", "grad_logprobs", grad_logprobs, logits);
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor grad = at::empty({logits.size(0), logits.size(1)}, logits.options());
  const cudaError_t err = nemo_entropy::launch_shard_grad(
      dtype_code(logits, "shard_grad"), logits.data_ptr(), logits.stride(0), grad.data_ptr(), logits.size(0),
      valid_width, logits.size(1), local_targets.data_ptr<int64_t>(), row_max.data_ptr<float>(),
      log_sum.data_ptr<float>(), entropy.data_ptr<float>(), grad_entropy.data_ptr<float>(), grad_logprobs.data_ptr<float>(),
      c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "shard_grad: kernel launch failed: ", cudaGetErrorString(err));
  return grad;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "nemo-entropy: vocab-parallel entropy / log-prob shard kernels (CUDA build)";
  m.def("shard_stats", &shard_stats, "per-row partial softmax statistics of a logits shard", pybind11::arg("logits"),
        pybind11::arg("local_targets"), pybind11::arg("valid_width"));
  m.def("shard_grad", &shard_grad, "gradient of a logits shard from the saved per-row statistics",
        pybind11::arg("logits"), pybind11::arg("local_targets"), pybind11::arg("valid_width"), pybind11::arg("row_max"),
        pybind11::arg("log_sum"), pybind11::arg("entropy"), pybind11::arg("grad_entropy"), pybind11::arg("grad_logprobs"));
}
