#include "cpu/cpu_capability.h"

#include <atomic>
#include <cstdlib>

#if defined(__linux__) && (defined(__x86_64__) || defined(_M_X64))
#include <sys/syscall.h>
#include <unistd.h>
#endif
#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#endif

#include "common/checks.h"

namespace oqfl {
namespace cpu {
namespace {

enum Capability { kDefault = 0, kAvx2 = 1, kAvx512 = 2, kAmx = 3 };
constexpr const char* kNames[] = {"default", "avx2", "avx512", "amx"};

bool has_avx512_vnni();

// AMX-INT8: CPUID leaf 7 EDX bits 24 (amx-tile) and 25 (amx-int8), plus AVX-512 VNNI (the
// leftover k-steps and pixel tails), and Linux must grant this process the tile data state
// (ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA) before any tile instruction; asked once. If
// anything is missing or refused, "amx" is unsupported and the VNNI path stays the best.
bool has_amx_int8() {
#if defined(__linux__) && (defined(__x86_64__) || defined(_M_X64)) && \
    (defined(__GNUC__) || defined(__clang__))
  static const bool ok = [] {
    if (!has_avx512_vnni()) return false;
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
    if (((edx >> 24) & 1u) == 0 || ((edx >> 25) & 1u) == 0) return false;
    constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ok;
#else
  return false;
#endif
}

Capability best_supported() {
#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return has_amx_int8() ? kAmx : kAvx512;
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
  for (int i = 0; i <= kAmx; ++i)
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
    case kAmx:
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
  if (cap == kAmx) return qconv_kernels_amx();  // kAmx implies VNNI and the tile permission
  if (vnni && cap == kAvx512) return qconv_kernels_avx512_vnni();
  // AVX-512 without VNNI has no faster integer product than AVX2's vpmaddwd.
  if (cap == kAvx512 || cap == kAvx2) return qconv_kernels_avx2();
#endif
  return qconv_kernels_default();
}

const PackingKernelTable& active_packing_kernels() {
#if defined(__x86_64__) || defined(_M_X64)
  switch (active().load(std::memory_order_relaxed)) {
    case kAmx:
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
                 "one of 'default', 'avx2', 'avx512', 'amx'", "'", name, "'");
  const int best = best_supported();
  OQFL_CHECK_ARG(wanted <= best, "_set_cpu_capability", "capability",
                 std::string("one this CPU supports (up to '") + kNames[best] + "')", "'", name,
                 "'");
  return kNames[active().exchange(wanted)];
}

}  // namespace cpu
}  // namespace oqfl
