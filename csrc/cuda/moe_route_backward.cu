// CUDA backward of the fused MoE routing op (declared in moe_route_kernels.h): one warp per token
// from the saved scores (the maths above route_backward_rows in csrc/moe_route_backward_cpu.cpp).
// No torch header.
#include "moe_route_device.cuh"

namespace minimind_fast {
namespace cuda {
namespace {

using namespace detail;  // NOLINT: the shared device helpers of this op

template <typename scalar_t, typename acc_t, int EPL>
__global__ void __launch_bounds__(kBlockThreads)
    route_backward_kernel(const RouteProblem p, const acc_t* __restrict__ grad_weight,
                          const acc_t* __restrict__ grad_scores, const acc_t* __restrict__ grad_mean,
                          const acc_t* __restrict__ grad_seq_mean, const acc_t* __restrict__ scores,
                          const int64_t* __restrict__ topk_idx, scalar_t* __restrict__ grad_logits) {
  const int lane = threadIdx.x % kWarp;
  const int64_t T = p.tokens, E = p.experts, k = p.top_k, L = p.seq_len;
  const acc_t inv_tokens = acc_t(1) / static_cast<acc_t>(T), inv_len = acc_t(1) / static_cast<acc_t>(L);
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / kWarp);
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarp) + threadIdx.x / kWarp; t < T;
       t += warps) {
    const acc_t* s_row = scores + t * E;
    acc_t s[EPL], g[EPL];
#pragma unroll
    for (int i = 0; i < EPL; ++i) {
      const int64_t e = lane + kWarp * i;
      s[i] = g[i] = acc_t(0);
      if (e < E) {
        s[i] = s_row[e];
        if (grad_scores) g[i] += grad_scores[t * E + e];
        if (grad_mean) g[i] += grad_mean[e] * inv_tokens;
        if (grad_seq_mean) g[i] += grad_seq_mean[(t / L) * E + e] * inv_len;
      }
    }
    if (grad_weight) {
      acc_t dot = 0, denom = 1;
      if (p.normalize) {  // every lane walks the k slots (broadcast loads), in slot order
        acc_t selected = 0, weighted = 0;
        for (int64_t j = 0; j < k; ++j) {
          const int64_t id = topk_idx[t * k + j];  // ids outside [0, E) (never from the forward) add nothing
          const acc_t sj = id >= 0 && id < E ? s_row[id] : acc_t(0);
          selected += sj;
          weighted += grad_weight[t * k + j] * sj;
        }
        denom = selected + static_cast<acc_t>(kNormEps);
        dot = weighted / denom;
      }
      for (int64_t j = 0; j < k; ++j) {
        const int64_t id = topk_idx[t * k + j];
        if (id < 0 || id >= E) continue;
        const int expert = static_cast<int>(id);
        if (lane != expert % kWarp) continue;
        const acc_t gj = grad_weight[t * k + j];
        const acc_t add = p.normalize ? (gj - dot) / denom : gj;
#pragma unroll
        for (int i = 0; i < EPL; ++i)
          if (i == expert / kWarp) g[i] += add;
      }
    }
    acc_t out[EPL];
    if (p.scoring == Scoring::kSoftmax) {
      acc_t dot = 0;
#pragma unroll
      for (int i = 0; i < EPL; ++i) dot += g[i] * s[i];
      dot = warp_sum(dot);
#pragma unroll
      for (int i = 0; i < EPL; ++i) out[i] = s[i] * (g[i] - dot);
    } else {
#pragma unroll
      for (int i = 0; i < EPL; ++i) out[i] = g[i] * s[i] * (acc_t(1) - s[i]);
    }
#pragma unroll
    for (int i = 0; i < EPL; ++i) {
      const int64_t e = lane + kWarp * i;
      if (e < E) grad_logits[t * E + e] = from_acc<scalar_t>(out[i]);
    }
  }
}

template <typename scalar_t, int EPL>
void backward_typed(const RouteProblem& p, const RouteBackwardInputs& in, void* grad_logits, cudaStream_t stream) {
  using acc_t = typename AccOf<scalar_t>::type;
  route_backward_kernel<scalar_t, acc_t, EPL>
      <<<grid_for(p.tokens, kBlockThreads / kWarp, 65536), kBlockThreads, 0, stream>>>(
          p, static_cast<const acc_t*>(in.grad_topk_weight), static_cast<const acc_t*>(in.grad_scores),
          static_cast<const acc_t*>(in.grad_prob_mean), static_cast<const acc_t*>(in.grad_seq_prob_mean),
          static_cast<const acc_t*>(in.scores), in.topk_idx, static_cast<scalar_t*>(grad_logits));
}

template <typename scalar_t>
void backward_by_width(const RouteProblem& p, const RouteBackwardInputs& in, void* grad_logits, cudaStream_t stream) {
  switch (experts_per_lane(p.experts)) {
    case 1: return backward_typed<scalar_t, 1>(p, in, grad_logits, stream);
    case 2: return backward_typed<scalar_t, 2>(p, in, grad_logits, stream);
    case 4: return backward_typed<scalar_t, 4>(p, in, grad_logits, stream);
    default: return backward_typed<scalar_t, 8>(p, in, grad_logits, stream);
  }
}

}  // namespace

cudaError_t launch_route_backward(const RouteProblem& problem, const RouteBackwardInputs& in, void* grad_logits,
                                  cudaStream_t stream) {
  if (problem.experts < 1 || problem.experts > kMaxExperts || problem.tokens < 1) return cudaErrorInvalidValue;
  switch (problem.dtype) {
    case DType::kFloat64: backward_by_width<double>(problem, in, grad_logits, stream); break;
    case DType::kBFloat16: backward_by_width<__nv_bfloat16>(problem, in, grad_logits, stream); break;
    case DType::kFloat16: backward_by_width<__half>(problem, in, grad_logits, stream); break;
    default: backward_by_width<float>(problem, in, grad_logits, stream); break;
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace minimind_fast
