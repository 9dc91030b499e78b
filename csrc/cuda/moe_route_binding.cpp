// CUDA binding of minimind_fast::moe_route: checks, output allocation, stream lookup, and the
// TORCH_LIBRARY_IMPL(minimind_fast, CUDA) registration. Compiled only when torch has CUDA (its
// CUDA headers are needed here); the kernels themselves live in moe_route_forward.cu and moe_route_backward.cu.
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../moe_route.h"
#include "moe_route_kernels.h"

namespace minimind_fast {
namespace {

cuda::DType to_kernel_dtype(at::ScalarType dtype) {
  switch (dtype) {
    case at::kDouble: return cuda::DType::kFloat64;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    case at::kHalf: return cuda::DType::kFloat16;
    default: return cuda::DType::kFloat32;
  }
}

cuda::RouteProblem to_problem(const RouteShape& shape, at::ScalarType dtype) {
  TORCH_CHECK(shape.experts <= cuda::kMaxExperts, "moe_route (CUDA): at most ", cuda::kMaxExperts,
              " experts are supported, got ", shape.experts);
  return cuda::RouteProblem{shape.tokens,   shape.experts,   shape.top_k,           shape.seq_len,
                            shape.num_seqs, shape.scoring, shape.normalize, to_kernel_dtype(dtype)};
}

void* pointer_or_null(const at::Tensor& tensor) { return tensor.defined() ? tensor.data_ptr() : nullptr; }

RouteResult moe_route_cuda(const at::Tensor& router_logits, int64_t top_k, bool norm_topk_prob,
                           c10::string_view scoring, int64_t seq_len) {
  const RouteShape shape = check_route_inputs(router_logits, top_k, norm_topk_prob, scoring, seq_len);
  TORCH_CHECK(router_logits.is_cuda(), "moe_route_cuda: router_logits must be a CUDA tensor");
  const cuda::RouteProblem problem = to_problem(shape, router_logits.scalar_type());
  const c10::cuda::CUDAGuard guard(router_logits.device());
  RouteResult result = allocate_route_outputs(router_logits, shape);
  const auto workspace_bytes = static_cast<int64_t>(cuda::route_forward_workspace_bytes(problem));
  at::Tensor workspace = at::empty({workspace_bytes}, router_logits.options().dtype(at::kByte));
  const cuda::RouteForwardOutputs out{
      std::get<0>(result).data_ptr(),          std::get<1>(result).data_ptr<int64_t>(),
      std::get<2>(result).data_ptr(),          std::get<3>(result).data_ptr(),
      std::get<4>(result).data_ptr(),          std::get<5>(result).data_ptr<int64_t>(),
      std::get<6>(result).data_ptr<int64_t>(), std::get<7>(result).data_ptr<int64_t>(),
      std::get<8>(result).data_ptr<int64_t>(), std::get<9>(result).data_ptr<int64_t>()};
  const cudaError_t status = cuda::launch_route_forward(problem, router_logits.const_data_ptr(), out,
                                                        workspace.data_ptr(), at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(status == cudaSuccess, "moe_route (CUDA): kernel launch failed: ", cudaGetErrorString(status));
  return result;
}

at::Tensor moe_route_backward_cuda(const OptionalTensor& grad_topk_weight, const OptionalTensor& grad_scores,
                                   const OptionalTensor& grad_prob_mean, const OptionalTensor& grad_seq_prob_mean,
                                   const at::Tensor& scores, const at::Tensor& topk_idx, bool norm_topk_prob,
                                   c10::string_view scoring, int64_t seq_len, at::ScalarType logits_dtype) {
  const RouteShape shape = check_route_backward_inputs(grad_topk_weight, grad_scores, grad_prob_mean,
                                                       grad_seq_prob_mean, scores, topk_idx, norm_topk_prob, scoring,
                                                       seq_len, logits_dtype);
  TORCH_CHECK(scores.is_cuda(), "moe_route_backward_cuda: scores must be a CUDA tensor");
  const cuda::RouteProblem problem = to_problem(shape, logits_dtype);
  const c10::cuda::CUDAGuard guard(scores.device());
  const RouteGrads grads = dense_route_grads(grad_topk_weight, grad_scores, grad_prob_mean, grad_seq_prob_mean);
  at::Tensor grad_logits = at::empty(scores.sizes(), scores.options().dtype(logits_dtype));
  const cuda::RouteBackwardInputs in{pointer_or_null(grads.topk_weight), pointer_or_null(grads.scores),
                                     pointer_or_null(grads.prob_mean),   pointer_or_null(grads.seq_prob_mean),
                                     scores.const_data_ptr(),
                                     topk_idx.const_data_ptr<int64_t>()};
  const cudaError_t status =
      cuda::launch_route_backward(problem, in, grad_logits.data_ptr(), at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(status == cudaSuccess, "moe_route_backward (CUDA): kernel launch failed: ",
              cudaGetErrorString(status));
  return grad_logits;
}

}  // namespace
}  // namespace minimind_fast

TORCH_LIBRARY_IMPL(minimind_fast, CUDA, m) {
  m.impl("moe_route", &minimind_fast::moe_route_cuda);
  m.impl("moe_route_backward", &minimind_fast::moe_route_backward_cuda);
}
