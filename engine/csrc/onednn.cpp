// LibTorch's matrix product on prepacked weights, which tch does not bind: the oneDNN operators
// `mkldnn::_reorder_linear_weight` (a weight laid out once, at load, for this CPU's kernels)
// and `mkldnn::_linear_pointwise` (the product on it), called by name through the dispatcher.
// Tensors cross as `at::Tensor*`, the handle tch's `Tensor` owns. A failure returns null and a
// message that the caller frees with `onehead_free_message`.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/ivalue.h>
#include <ATen/core/stack.h>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <optional>
#include <string>

namespace {

char *copy_message(const char *what) {
  auto *out = static_cast<char *>(std::malloc(std::strlen(what) + 1));
  if (out != nullptr) std::strcpy(out, what);
  return out;
}

// Runs `f`, which returns a tensor, turning exceptions into `*message`.
template <typename F>
at::Tensor *guarded(char **message, F &&f) {
  try {
    return new at::Tensor(f());
  } catch (const c10::Error &e) {
    *message = copy_message(e.what_without_backtrace());
  } catch (const std::exception &e) {
    *message = copy_message(e.what());
  }
  return nullptr;
}

std::optional<c10::OperatorHandle> find(const char *name) {
  return c10::Dispatcher::singleton().findSchema({name, ""});
}

// The first result of operator `name` on `stack`.
c10::IValue call(const char *name, torch::jit::Stack stack) {
  auto op = find(name);
  if (!op) throw std::runtime_error(std::string("this LibTorch has no operator ") + name);
  op->callBoxed(&stack);
  return stack.at(0);
}

}  // namespace

extern "C" {

// Whether this LibTorch has both operators, and for bf16 (`bf16` != 0) whether oneDNN runs
// bf16 natively on this CPU (AVX-512 or newer; elsewhere the plain product is the better one).
int onehead_onednn_linear_supported(int bf16) {
  try {
    if (!find("mkldnn::_reorder_linear_weight") || !find("mkldnn::_linear_pointwise")) return 0;
    if (bf16 == 0) return 1;
    return find("mkldnn::_is_mkldnn_bf16_supported") && call("mkldnn::_is_mkldnn_bf16_supported", {}).toBool();
  } catch (...) {
    return 0;
  }
}

// `weight` `(out, in)`, laid out for this CPU's kernels: an opaque oneDNN tensor that only
// `onehead_onednn_linear` reads.
at::Tensor *onehead_onednn_pack(const at::Tensor *weight, char **message) {
  return guarded(message, [&] {
    return call("mkldnn::_reorder_linear_weight", {c10::IValue(*weight), c10::IValue()}).toTensor();
  });
}

// `attr(input @ weight.T + bias)`, `weight` from `onehead_onednn_pack`; `bias` may be null.
// `attr` is oneDNN's post-op, applied to each output tile while it is in cache: "none", "relu"
// or "gelu" (`algorithm` "none" for erf, "tanh" for the approximation; null otherwise).
at::Tensor *onehead_onednn_linear(const at::Tensor *input, const at::Tensor *packed, const at::Tensor *bias,
                                  const char *attr, const char *algorithm, char **message) {
  return guarded(message, [&] {
    return call("mkldnn::_linear_pointwise",
                {
                    c10::IValue(*input),
                    c10::IValue(*packed),
                    bias != nullptr ? c10::IValue(*bias) : c10::IValue(),
                    c10::IValue(std::string(attr)),
                    c10::IValue(c10::List<std::optional<c10::Scalar>>()),
                    algorithm != nullptr ? c10::IValue(std::string(algorithm)) : c10::IValue(),
                })
        .toTensor();
  });
}

void onehead_free_message(char *message) { std::free(message); }

}  // extern "C"
