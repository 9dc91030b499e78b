// Autograd of minimind_fast::moe_route (the Autograd dispatch key), the op's only autograd: in
// C++ because a Python autograd wrapper adds a per-call cost that is a sizeable share of a whole
// routing forward + backward at the benchmark's shapes (bench/bench_moe.py). Without the extension
// the op is the pure-PyTorch reference under plain autograd (minimind_fast/ops/moe_route.py).
//
// Saves the forward's scores and topk_idx (the backward needs no logits), marks the integer
// outputs non-differentiable, and hands unused output gradients to the backward op as None.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <string>

#include "moe_route.h"

namespace minimind_fast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

const auto& forward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("minimind_fast::moe_route", "")
                             .typed<RouteResult(const at::Tensor&, int64_t, bool, c10::string_view, int64_t)>();
  return op;
}

const auto& backward_op() {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("minimind_fast::moe_route_backward", "")
          .typed<at::Tensor(const OptionalTensor&, const OptionalTensor&, const OptionalTensor&, const OptionalTensor&,
                            const at::Tensor&, const at::Tensor&, bool, c10::string_view, int64_t, at::ScalarType)>();
  return op;
}

class MoeRouteFunction : public torch::autograd::Function<MoeRouteFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& router_logits, int64_t top_k,
                               bool norm_topk_prob, const std::string& scoring, int64_t seq_len) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [weight, idx, scores, prob_mean, seq_prob_mean, counts, seq_counts, sorted, offsets, positions] =
        forward_op().call(router_logits, top_k, norm_topk_prob, scoring, seq_len);
    ctx->save_for_backward({scores, idx});
    ctx->saved_data["norm_topk_prob"] = norm_topk_prob;
    ctx->saved_data["scoring"] = scoring;
    ctx->saved_data["seq_len"] = seq_len;
    ctx->saved_data["logits_dtype"] = static_cast<int64_t>(router_logits.scalar_type());
    ctx->mark_non_differentiable({idx, counts, seq_counts, sorted, offsets, positions});
    ctx->set_materialize_grads(false);
    return {weight, idx, scores, prob_mean, seq_prob_mean, counts, seq_counts, sorted, offsets, positions};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    auto optional = [](const at::Tensor& grad) -> OptionalTensor {
      return grad.defined() ? OptionalTensor(grad) : std::nullopt;
    };
    const std::string scoring = ctx->saved_data["scoring"].toStringRef();
    at::Tensor grad = backward_op().call(
        optional(grads[0]), optional(grads[2]), optional(grads[3]), optional(grads[4]), saved[0], saved[1],
        ctx->saved_data["norm_topk_prob"].toBool(), scoring, ctx->saved_data["seq_len"].toInt(),
        static_cast<at::ScalarType>(ctx->saved_data["logits_dtype"].toInt()));
    return {grad, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

RouteResult moe_route_autograd(const at::Tensor& router_logits, int64_t top_k, bool norm_topk_prob,
                               c10::string_view scoring, int64_t seq_len) {
  const std::string scoring_name(scoring.data(), scoring.size());
  const variable_list out = MoeRouteFunction::apply(router_logits, top_k, norm_topk_prob, scoring_name, seq_len);
  return RouteResult(out[0], out[1], out[2], out[3], out[4], out[5], out[6], out[7], out[8], out[9]);
}

}  // namespace
}  // namespace minimind_fast

TORCH_LIBRARY_IMPL(minimind_fast, Autograd, m) { m.impl("moe_route", &minimind_fast::moe_route_autograd); }
