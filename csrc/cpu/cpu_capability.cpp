#include "cpu/cpu_capability.h"

#include <atomic>
#include <cstdlib>

#include "common/checks.h"

namespace oqfl {
namespace cpu {
namespace {

enum Capability { kDefault = 0, kAvx2 = 1, kAvx512 = 2 };
constexpr const char* kNames[] = {"default", "avx2", "avx512"};

Capability best_supported() {
#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c"))
    return kAvx2;
#endif
  return kDefault;
}

bool has_avx512_vnni() {
#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vnni");
#else
  return false;
#endif
}

int parse(const std::string& name) {
  for (int i = 0; i <= kAvx512; ++i)
    if (name == kNames[i]) return i;
  return -1;
}

// OQFL_CPU_CAPABILITY, else PyTorch's ATEN_CPU_CAPABILITY, may lower the choice (never raise it).
Capability initial() {
  Capability best = best_supported();
  for (const char* var : {"OQFL_CPU_CAPABILITY", "ATEN_CPU_CAPABILITY"}) {
    const char* value = std::getenv(var);
    if (value == nullptr || *value == '\0') continue;
    const int wanted = parse(value);
    if (wanted >= 0 && wanted < best) best = static_cast<Capability>(wanted);
    break;
  }
  return best;
}

std::atomic<int>& active() {
  static std::atomic<int> capability{initial()};
  return capability;
}

}  // namespace

const FakeQuantKernelTable& active_fake_quant_kernels() {
  switch (active().load(std::memory_order_relaxed)) {
#if defined(__x86_64__) || defined(_M_X64)
    case kAvx512: return fake_quant_kernels_avx512();
    case kAvx2: return fake_quant_kernels_avx2();
#endif
    default: return fake_quant_kernels_default();
  }
}

const QConvKernelTable& active_qconv_kernels() {
#if defined(__x86_64__) || defined(_M_X64)
  static const bool vnni = has_avx512_vnni();
  const int cap = active().load(std::memory_order_relaxed);
  if (vnni && cap == kAvx512) return qconv_kernels_avx512_vnni();
  // AVX-512 without VNNI has no faster integer product than AVX2's vpmaddwd.
  if (cap == kAvx512 || cap == kAvx2) return qconv_kernels_avx2();
#endif
  return qconv_kernels_default();
}

const PackingKernelTable& active_packing_kernels() {
#if defined(__x86_64__) || defined(_M_X64)
  switch (active().load(std::memory_order_relaxed)) {
    case kAvx512: return packing_kernels_avx512();
    case kAvx2: return packing_kernels_avx2();
    default: break;
  }
#endif
  return packing_kernels_default();
}

std::string cpu_capability() { return kNames[active().load()]; }

std::string set_cpu_capability(const std::string& name) {
  const int wanted = parse(name);
  OQFL_CHECK_ARG(wanted >= 0, "_set_cpu_capability", "capability",
                 "one of 'default', 'avx2', 'avx512'", "'", name, "'");
  const int best = best_supported();
  OQFL_CHECK_ARG(wanted <= best, "_set_cpu_capability", "capability",
                 std::string("one this CPU supports (up to '") + kNames[best] + "')", "'", name,
                 "'");
  return kNames[active().exchange(wanted)];
}

}  // namespace cpu
}  // namespace oqfl
