// C++ unit test of minimind_fast::moe_route on the CPU, run by ctest (CMakeLists.txt).
// Checks the op, called through the dispatcher (so the TORCH_LIBRARY schema is exercised),
// against a naive scalar reference written here: a stable sort per row, softmax/sigmoid in
// double, counting by brute force. Indices, counts and the permutation must match exactly;
// weights and means to 2e-6. Also: results independent of the thread count, the backward
// against central finite differences (fp64), and TORCH_CHECK on bad input.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "moe_route.h"

namespace {

using minimind_fast::RouteResult;
int failures = 0;

#define EXPECT(cond, ...)                                          \
  do {                                                             \
    if (!(cond)) {                                                 \
      ++failures;                                                  \
      std::printf("FAIL %s:%d: %s | ", __FILE__, __LINE__, #cond); \
      std::printf(__VA_ARGS__);                                    \
      std::printf("\n");                                           \
    }                                                              \
  } while (0)

RouteResult route(const at::Tensor& logits, int64_t k, bool norm, const std::string& scoring, int64_t seq_len) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("minimind_fast::moe_route", "")
                       .typed<RouteResult(const at::Tensor&, int64_t, bool, c10::string_view, int64_t)>();
  return op.call(logits, k, norm, scoring, seq_len);
}

enum class Pattern { kNormal, kTies, kAllEqual, kOneHot, kMinusInf };

std::vector<float> make_logits(int64_t T, int64_t E, Pattern pattern, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 2.0f);
  std::uniform_int_distribution<int> small(0, 2), expert(0, static_cast<int>(E) - 1);
  std::vector<float> x(T * E);
  for (int64_t t = 0; t < T; ++t) {
    const int hot = expert(rng);
    for (int64_t e = 0; e < E; ++e) {
      float v = normal(rng);
      if (pattern == Pattern::kTies) v = static_cast<float>(small(rng));
      if (pattern == Pattern::kAllEqual) v = 0.25f;
      if (pattern == Pattern::kOneHot) v = e == hot ? 8.0f : 0.0f;
      if (pattern == Pattern::kMinusInf && (e + t) % 3 == 0 && e != t % E) v = -std::numeric_limits<float>::infinity();
      x[t * E + e] = v;
    }
  }
  return x;
}

at::Tensor to_tensor(const std::vector<float>& values, int64_t T, int64_t E, at::ScalarType dtype) {
  at::Tensor out = at::empty({T, E}, at::kFloat);
  std::copy(values.begin(), values.end(), out.data_ptr<float>());
  return out.to(dtype);
}

bool close(double a, double b, double tol) { return (std::isnan(a) && std::isnan(b)) || std::abs(a - b) <= tol; }

void check_against_reference(int64_t T, int64_t E, int64_t k, int64_t seq_len, const std::string& scoring, bool norm,
                             at::ScalarType dtype, Pattern pattern, std::mt19937& rng) {
  const at::Tensor logits = to_tensor(make_logits(T, E, pattern, rng), T, E, dtype);
  const at::Tensor exact = logits.to(at::kDouble);  // the values the op sees, widened
  const double* x = exact.data_ptr<double>();
  const auto [w, idx, scores, pm, spm, counts, seq_counts, sorted, offsets, positions] =
      route(logits, k, norm, scoring, seq_len);
  const at::Tensor wf = w.to(at::kDouble), sf = scores.to(at::kDouble), pmf = pm.to(at::kDouble),
                   spmf = spm.to(at::kDouble);
  const int64_t L = seq_len == 0 ? T : seq_len, B = T / L;
  const double tol = 2e-6;
  char tag[160];
  std::snprintf(tag, sizeof(tag), "T=%ld E=%ld k=%ld L=%ld %s norm=%d dtype=%d pattern=%d", (long)T, (long)E, (long)k,
                (long)seq_len, scoring.c_str(), norm, (int)dtype, (int)pattern);

  std::vector<double> score(T * E), mean(E, 0.0), seq_mean(B * E, 0.0);
  std::vector<int64_t> ref_idx(T * k), count(E, 0), seq_count(B * E, 0);
  for (int64_t t = 0; t < T; ++t) {
    const double* row = x + t * E;
    double max_value = -std::numeric_limits<double>::infinity(), sum = 0.0;
    for (int64_t e = 0; e < E; ++e) max_value = std::max(max_value, row[e]);
    for (int64_t e = 0; e < E; ++e) {
      score[t * E + e] = scoring == "softmax" ? std::exp(row[e] - max_value) : 1.0 / (1.0 + std::exp(-row[e]));
      sum += score[t * E + e];
    }
    std::vector<int64_t> order(E);
    std::iota(order.begin(), order.end(), int64_t{0});
    std::stable_sort(order.begin(), order.end(), [row](int64_t a, int64_t b) { return row[a] > row[b]; });
    double selected = 0.0;
    for (int64_t e = 0; e < E; ++e) {
      if (scoring == "softmax") score[t * E + e] /= sum;
      EXPECT(close(sf.data_ptr<double>()[t * E + e], score[t * E + e], tol), "%s: scores[%ld, %ld]", tag, (long)t,
             (long)e);
      mean[e] += score[t * E + e] / T;
      seq_mean[(t / L) * E + e] += score[t * E + e] / L;
    }
    for (int64_t j = 0; j < k; ++j) {
      ref_idx[t * k + j] = order[j];
      ++count[order[j]];
      ++seq_count[(t / L) * E + order[j]];
      selected += score[t * E + order[j]];
      EXPECT(idx.data_ptr<int64_t>()[t * k + j] == order[j], "%s: topk_idx[%ld, %ld]", tag, (long)t, (long)j);
    }
    for (int64_t j = 0; j < k; ++j) {
      const double expected = score[t * E + order[j]] / (norm ? selected + 1e-20 : 1.0);
      EXPECT(close(wf.data_ptr<double>()[t * k + j], expected, tol), "%s: topk_weight[%ld, %ld] %g vs %g", tag,
             (long)t, (long)j, wf.data_ptr<double>()[t * k + j], expected);
    }
    // renormalised top-1 softmax: a score >= 1/E absorbs the 1e-20, so the weight is exactly 1
    if (norm && k == 1 && scoring == "softmax")
      EXPECT(wf.data_ptr<double>()[t] == 1.0, "%s: topk_weight[%ld] %.17g is not 1", tag, (long)t,
             wf.data_ptr<double>()[t]);
  }
  for (int64_t e = 0; e < E; ++e) {
    EXPECT(close(pmf.data_ptr<double>()[e], mean[e], tol), "%s: prob_mean[%ld]", tag, (long)e);
    EXPECT(counts.data_ptr<int64_t>()[e] == count[e], "%s: expert_counts[%ld]", tag, (long)e);
  }
  for (int64_t i = 0; i < B * E; ++i) {
    EXPECT(close(spmf.data_ptr<double>()[i], seq_mean[i], tol), "%s: seq_prob_mean[%ld]", tag, (long)i);
    EXPECT(seq_counts.data_ptr<int64_t>()[i] == seq_count[i], "%s: seq_expert_counts[%ld]", tag, (long)i);
  }
  // stable counting sort of the pairs by expert
  int64_t position = 0;
  for (int64_t e = 0; e < E; ++e) {
    EXPECT(offsets.data_ptr<int64_t>()[e] == position, "%s: expert_offsets[%ld]", tag, (long)e);
    for (int64_t p = 0; p < T * k; ++p) {
      if (ref_idx[p] != e) continue;
      EXPECT(sorted.data_ptr<int64_t>()[position] == p, "%s: sorted_pairs[%ld]", tag, (long)position);
      EXPECT(positions.data_ptr<int64_t>()[p] == position, "%s: pair_positions[%ld]", tag, (long)p);
      ++position;
    }
  }
  EXPECT(offsets.data_ptr<int64_t>()[E] == T * k, "%s: expert_offsets[E]", tag);
}

void check_thread_count_does_not_matter() {
  std::mt19937 rng(7);
  const at::Tensor logits = to_tensor(make_logits(3001, 6, Pattern::kNormal, rng), 3001, 6, at::kFloat);
  const int threads = at::get_num_threads();
  at::set_num_threads(1);
  const RouteResult one = route(logits, 2, true, "softmax", 3001);
  at::set_num_threads(std::max(2, threads));
  const RouteResult many = route(logits, 2, true, "softmax", 3001);
  at::set_num_threads(threads);
  EXPECT(std::get<0>(one).equal(std::get<0>(many)) && std::get<3>(one).equal(std::get<3>(many)) &&
             std::get<4>(one).equal(std::get<4>(many)) && std::get<7>(one).equal(std::get<7>(many)),
         "outputs differ between 1 and %d threads", std::max(2, threads));
}

// d/dx of sum(gw * topk_weight) + sum(gs * scores) + sum(gm * prob_mean) + sum(gsm * seq_prob_mean), by
// central differences.
void check_backward_fd(const std::string& scoring, bool norm, int64_t k) {
  const int64_t T = 6, E = 5, L = 3, B = 2;
  std::mt19937 rng(3);
  std::normal_distribution<double> normal(0.0, 1.0);
  at::Tensor logits = at::empty({T, E}, at::kDouble);
  at::Tensor gw = at::empty({T, k}, at::kDouble), gs = at::empty({T, E}, at::kDouble);
  at::Tensor gm = at::empty({E}, at::kDouble), gsm = at::empty({B, E}, at::kDouble);
  for (at::Tensor* t : {&logits, &gw, &gs, &gm, &gsm})
    for (int64_t i = 0; i < t->numel(); ++i) t->data_ptr<double>()[i] = normal(rng);
  auto objective = [&](const at::Tensor& x) {
    const RouteResult out = route(x, k, norm, scoring, L);
    double value = 0.0;
    for (int64_t i = 0; i < T * k; ++i) value += gw.data_ptr<double>()[i] * std::get<0>(out).data_ptr<double>()[i];
    for (int64_t i = 0; i < T * E; ++i) value += gs.data_ptr<double>()[i] * std::get<2>(out).data_ptr<double>()[i];
    for (int64_t i = 0; i < E; ++i) value += gm.data_ptr<double>()[i] * std::get<3>(out).data_ptr<double>()[i];
    for (int64_t i = 0; i < B * E; ++i) value += gsm.data_ptr<double>()[i] * std::get<4>(out).data_ptr<double>()[i];
    return value;
  };
  const RouteResult forward = route(logits, k, norm, scoring, L);
  const at::Tensor grad = minimind_fast::moe_route_backward_cpu(gw, gs, gm, gsm, std::get<2>(forward),
                                                                std::get<1>(forward), norm, scoring, L, at::kDouble);
  const double h = 1e-6;
  for (int64_t i = 0; i < T * E; ++i) {
    at::Tensor plus = logits.clone(), minus = logits.clone();
    plus.data_ptr<double>()[i] += h;
    minus.data_ptr<double>()[i] -= h;
    const double numeric = (objective(plus) - objective(minus)) / (2 * h);
    EXPECT(std::abs(numeric - grad.data_ptr<double>()[i]) < 1e-6,
           "backward %s norm=%d k=%ld: d/dx[%ld] %g vs %g", scoring.c_str(), norm, (long)k, (long)i,
           grad.data_ptr<double>()[i], numeric);
  }
}

void expect_error(const std::function<void()>& call, const std::string& fragment) {
  try {
    call();
  } catch (const c10::Error& error) {
    EXPECT(std::string(error.what()).find(fragment) != std::string::npos, "message '%s' lacks '%s'",
           error.what_without_backtrace(), fragment.c_str());
    return;
  }
  EXPECT(false, "no error raised (expected '%s')", fragment.c_str());
}

void check_bad_input() {
  const at::Tensor good = at::empty({8, 4}, at::kFloat).fill_(0.5f);
  expect_error([&] { route(at::empty({8}, at::kFloat), 1, true, "softmax", 0); }, "must be 2-D");
  expect_error([&] { route(good.to(at::kInt), 1, true, "softmax", 0); }, "must be float32");
  expect_error([&] { route(good, 5, true, "softmax", 0); }, "top_k=5 must be in [1, 4]");
  expect_error([&] { route(good, 0, true, "softmax", 0); }, "top_k=0");
  expect_error([&] { route(at::empty({8, 0}, at::kFloat), 1, true, "softmax", 0); }, "0 expert columns");
  expect_error([&] { route(at::empty({0, 4}, at::kFloat), 1, true, "softmax", 0); }, "0 token rows");
  expect_error([&] { route(good.t(), 1, true, "softmax", 0); }, "must be contiguous");
  expect_error([&] { route(good, 1, true, "relu", 0); }, "scoring must be 'softmax' or 'sigmoid'");
  expect_error([&] { route(good, 1, true, "softmax", 3); }, "does not divide");
  expect_error([&] { route(good, 1, true, "softmax", -1); }, "must be >= 0");
  const at::Tensor huge = at::empty({int64_t{1} << 29, 8}, at::TensorOptions().dtype(at::kFloat).device(at::kMeta));
  expect_error([&] { minimind_fast::check_route_inputs(huge, 8, true, "softmax", 0); }, "exceeds 2^31 - 1");
}

}  // namespace

int main() {
  std::mt19937 rng(0);
  const Pattern patterns[] = {Pattern::kNormal, Pattern::kTies, Pattern::kAllEqual, Pattern::kOneHot,
                              Pattern::kMinusInf};
  // Every CPU path this machine has: AVX-512 and AVX2 (8-lane blocks) and the SSE2/NEON baseline
  // (4 lanes); a cap above what the CPU supports runs its best path.
  for (const char* isa : {"avx512", "avx2", "baseline"}) {
    setenv("MINIMIND_FAST_CPU_ISA", isa, 1);
    for (Pattern pattern : patterns) {
      check_against_reference(37, 4, 2, 0, "softmax", true, at::kFloat, pattern, rng);
      check_against_reference(37, 4, 2, 0, "softmax", true, at::kBFloat16, pattern, rng);  // odd last block
      check_against_reference(1, 8, 8, 1, "sigmoid", true, at::kFloat, pattern, rng);
      check_against_reference(600, 6, 1, 100, "softmax", true, at::kBFloat16, pattern, rng);
      check_against_reference(515, 64, 8, 5, "softmax", false, at::kFloat, pattern, rng);
      check_against_reference(300, 32, 4, 300, "softmax", true, at::kBFloat16, pattern, rng);
      check_against_reference(260, 40, 20, 2, "sigmoid", true, at::kHalf, pattern, rng);
      check_against_reference(70, 7, 3, 7, "sigmoid", false, at::kDouble, pattern, rng);
      // top-1 renormalised (MiniMind-3's MoE): compile-time (E, k) blocks, run-time blocks, fp64
      check_against_reference(203, 4, 1, 29, "softmax", true, at::kFloat, pattern, rng);
      check_against_reference(203, 8, 1, 29, "sigmoid", true, at::kHalf, pattern, rng);
      check_against_reference(203, 33, 1, 0, "softmax", true, at::kBFloat16, pattern, rng);
      check_against_reference(70, 5, 1, 7, "softmax", true, at::kDouble, pattern, rng);
    }
  }
  unsetenv("MINIMIND_FAST_CPU_ISA");
  check_thread_count_does_not_matter();
  for (const char* scoring : {"softmax", "sigmoid"})
    for (bool norm : {true, false})
      for (int64_t k : {1, 2}) check_backward_fd(scoring, norm, k);
  check_bad_input();
  if (failures) {
    std::printf("%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("test_moe_route: all checks passed\n");
  return 0;
}
