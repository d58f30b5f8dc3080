// CPU entry points of oqfl::fake_quant and oqfl::fake_quant_backward: argument checks, the
// split of the work into threads, and deterministic reductions. The arithmetic itself is in
// the instruction-set kernels (cpu/isa/), picked at run time.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <unistd.h>

#include <vector>

#include "common/checks.h"
#include "common/dispatch.h"
#include "common/quant_math.h"
#include "cpu/cpu_capability.h"
#include "fake_quant_args.h"
#include "ops.h"

namespace oqfl {
namespace {

// Elements per reduction chunk. Fixed (not derived from the thread count), so the partial sums,
// and therefore the gradients, are the same bits whatever the number of threads.
constexpr int64_t kChunk = 16384;
// Rows of one channel shorter than this are handled as tiles across channels instead.
constexpr int64_t kMinRow = 16;
// Rows per tile at least: bounds the per-tile partial sums at numel / 8 floats.
constexpr int64_t kMinTileRows = 8;

// Outputs at least this large are written with non-temporal stores: they cannot stay in the
// last-level cache anyway, and skipping the read of the destination saves a third of the
// traffic. Half the L3 where the C library reports it, else 16 MiB.
int64_t streaming_threshold_bytes() {
  static const int64_t bytes = [] {
    long l3 = -1;
#ifdef _SC_LEVEL3_CACHE_SIZE
    l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
#endif
    return l3 > 0 ? static_cast<int64_t>(l3) / 2 : int64_t{16} << 20;
  }();
  return bytes;
}

template <typename T> struct Storage { using type = T; };
template <> struct Storage<c10::BFloat16> { using type = cpu::BF16; };
template <> struct Storage<c10::Half> { using type = cpu::F16; };

template <typename T> const cpu::FakeQuantKernels<T>& kernels_of(const cpu::FakeQuantKernelTable&);
template <> const cpu::FakeQuantKernels<float>& kernels_of(const cpu::FakeQuantKernelTable& t) { return t.f32; }
template <> const cpu::FakeQuantKernels<cpu::BF16>& kernels_of(const cpu::FakeQuantKernelTable& t) { return t.bf16; }
template <> const cpu::FakeQuantKernels<cpu::F16>& kernels_of(const cpu::FakeQuantKernelTable& t) { return t.f16; }

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Tiles for short channel rows: x seen as [outer, width] with width = channels * inner, column j
// belonging to channel j / inner; per-column step sizes and offsets are expanded once.
struct Tiling {
  int64_t width, rows_per_tile, cols_per_tile, row_tiles, col_tiles;
  std::vector<float> s, z;
  Tiling(const FakeQuantLayout& l, const Steps& st) {
    width = l.channels * l.inner;
    cols_per_tile = std::min(width, kChunk);
    rows_per_tile = std::max(kMinTileRows, kChunk / cols_per_tile);
    row_tiles = ceil_div(l.outer, rows_per_tile);
    col_tiles = ceil_div(width, cols_per_tile);
    s.resize(width);
    z.resize(width);
    for (int64_t j = 0; j < width; ++j) {
      s[j] = st.s()[j / l.inner];
      z[j] = st.z(j / l.inner);
    }
  }
  int64_t tiles() const { return row_tiles * col_tiles; }
};

template <typename T>
void forward_impl(const T* x, T* y, const FakeQuantLayout& l, const Steps& st, float qmin,
                  float qmax) {
  const auto& k = kernels_of<T>(cpu::active_fake_quant_kernels());
  const bool stream = l.outer * l.channels * l.inner * int64_t(sizeof(T)) >= streaming_threshold_bytes();
  if (l.channels == 1) {
    const float s = st.s()[0], z = st.z(0);
    at::parallel_for(0, l.inner, kChunk, [&](int64_t b, int64_t e) {
      k.forward(x + b, y + b, e - b, s, z, qmin, qmax, stream);
    });
  } else if (l.inner >= kMinRow) {
    const int64_t rows = l.outer * l.channels;
    at::parallel_for(0, rows, std::max<int64_t>(1, kChunk / l.inner), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const int64_t c = r % l.channels;
        k.forward(x + r * l.inner, y + r * l.inner, l.inner, st.s()[c], st.z(c), qmin, qmax,
                  stream);
      }
    });
  } else {
    const Tiling t(l, st);
    at::parallel_for(0, t.tiles(), 1, [&](int64_t b, int64_t e) {
      for (int64_t tile = b; tile < e; ++tile) {
        const int64_t r0 = (tile / t.col_tiles) * t.rows_per_tile;
        const int64_t c0 = (tile % t.col_tiles) * t.cols_per_tile;
        const int64_t off = r0 * t.width + c0;
        k.forward_tile(x + off, y + off, std::min(t.rows_per_tile, l.outer - r0),
                       std::min(t.cols_per_tile, t.width - c0), t.width, t.s.data() + c0,
                       t.z.data() + c0, qmin, qmax);
      }
    });
  }
}

// Sums of ds terms and clamped dy per channel, in float64, in an order fixed by the layout.
struct ChannelSums {
  std::vector<double> ds, dz;
  explicit ChannelSums(int64_t channels) : ds(channels, 0.0), dz(channels, 0.0) {}
};

template <typename T>
void backward_impl(const T* dy, const T* x, T* dx, const FakeQuantLayout& l, const Steps& st,
                   float qmin, float qmax, ChannelSums* sums) {
  const auto& k = kernels_of<T>(cpu::active_fake_quant_kernels());
  if (l.channels > 1 && l.inner < kMinRow) {
    const Tiling t(l, st);
    // One row of column partials per row tile; zero-filled because the kernel accumulates.
    std::vector<float> ds_part(sums ? t.row_tiles * t.width : 0, 0.f);
    std::vector<float> dz_part(ds_part.size(), 0.f);
    at::parallel_for(0, t.tiles(), 1, [&](int64_t b, int64_t e) {
      for (int64_t tile = b; tile < e; ++tile) {
        const int64_t rt = tile / t.col_tiles;
        const int64_t r0 = rt * t.rows_per_tile;
        const int64_t c0 = (tile % t.col_tiles) * t.cols_per_tile;
        const int64_t off = r0 * t.width + c0;
        k.backward_tile(dy + off, x + off, dx ? dx + off : nullptr,
                        std::min(t.rows_per_tile, l.outer - r0),
                        std::min(t.cols_per_tile, t.width - c0), t.width, t.s.data() + c0,
                        t.z.data() + c0, qmin, qmax,
                        sums ? ds_part.data() + rt * t.width + c0 : nullptr,
                        sums ? dz_part.data() + rt * t.width + c0 : nullptr);
      }
    });
    if (sums) {
      for (int64_t rt = 0; rt < t.row_tiles; ++rt)
        for (int64_t j = 0; j < t.width; ++j) {
          sums->ds[j / l.inner] += ds_part[rt * t.width + j];
          sums->dz[j / l.inner] += dz_part[rt * t.width + j];
        }
    }
    return;
  }
  // Rows of one channel (per-tensor: a single row), cut into fixed chunks.
  const int64_t rows = l.outer * l.channels;
  const bool stream = dx && rows * l.inner * int64_t(sizeof(T)) >= streaming_threshold_bytes();
  const int64_t pieces = ceil_div(l.inner, kChunk);
  std::vector<float> part(sums ? 2 * rows * pieces : 0);
  at::parallel_for(0, rows * pieces, 1, [&](int64_t b, int64_t e) {
    for (int64_t task = b; task < e; ++task) {
      const int64_t r = task / pieces;
      const int64_t c = r % l.channels;
      const int64_t begin = (task % pieces) * kChunk;
      const int64_t off = r * l.inner + begin;
      k.backward(dy + off, x + off, dx ? dx + off : nullptr,
                 std::min(kChunk, l.inner - begin), st.s()[c], st.z(c), qmin, qmax,
                 sums ? part.data() + 2 * task : nullptr, stream);
    }
  });
  if (sums) {
    for (int64_t task = 0; task < rows * pieces; ++task) {
      const int64_t c = (task / pieces) % l.channels;
      sums->ds[c] += part[2 * task];
      sums->dz[c] += part[2 * task + 1];
    }
  }
}

}  // namespace

at::Tensor fake_quant_cpu(const at::Tensor& x, const at::Tensor& scale,
                          const std::optional<at::Tensor>& zero_point, int64_t quant_min,
                          int64_t quant_max, std::optional<int64_t> axis, double grad_factor) {
  (void)grad_factor;  // only the backward uses it
  const at::Tensor xd =
      check_fake_quant_args("fake_quant", x, scale, zero_point, quant_min, quant_max, axis);
  const Steps st = checked_steps("fake_quant", scale, zero_point);
  at::Tensor y = at::empty_like(xd);
  if (xd.numel() == 0) return y;
  const FakeQuantLayout layout = fake_quant_layout(xd, axis);
  OQFL_DISPATCH_FLOAT_TYPES(xd.scalar_type(), "fake_quant_cpu", [&] {
    using T = typename Storage<scalar_t>::type;
    forward_impl<T>(reinterpret_cast<const T*>(xd.const_data_ptr<scalar_t>()),
                    reinterpret_cast<T*>(y.mutable_data_ptr<scalar_t>()), layout, st,
                    static_cast<float>(quant_min), static_cast<float>(quant_max));
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fake_quant_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& x, const at::Tensor& scale,
    const std::optional<at::Tensor>& zero_point, int64_t quant_min, int64_t quant_max,
    std::optional<int64_t> axis, double grad_factor, std::array<bool, 3> output_mask) {
  const char* op = "fake_quant_backward";
  const at::Tensor xd = check_fake_quant_args(op, x, scale, zero_point, quant_min, quant_max, axis);
  check_grad_output(op, grad_output, x);
  const Steps st = checked_steps(op, scale, zero_point);
  const bool want_dx = output_mask[0];
  const bool want_ds = output_mask[1];
  const bool want_dz = output_mask[2] && zero_point.has_value();

  const auto skipped = [&](const at::TensorOptions& o) { return at::empty({0}, o); };
  at::Tensor grad_x = want_dx ? at::empty_like(xd) : skipped(x.options());
  const FakeQuantLayout layout = fake_quant_layout(xd, axis);
  ChannelSums sums(layout.channels);
  if (xd.numel() > 0 && (want_dx || want_ds || want_dz)) {
    const at::Tensor dy = with_layout_of(grad_output, xd);
    OQFL_DISPATCH_FLOAT_TYPES(xd.scalar_type(), "fake_quant_backward_cpu", [&] {
      using T = typename Storage<scalar_t>::type;
      backward_impl<T>(reinterpret_cast<const T*>(dy.const_data_ptr<scalar_t>()),
                       reinterpret_cast<const T*>(xd.const_data_ptr<scalar_t>()),
                       want_dx ? reinterpret_cast<T*>(grad_x.mutable_data_ptr<scalar_t>()) : nullptr,
                       layout, st, static_cast<float>(quant_min), static_cast<float>(quant_max),
                       (want_ds || want_dz) ? &sums : nullptr);
    });
  }
  // Per-tensor layouts (and axes of size 1) have one sum for the one step size.
  at::Tensor grad_scale = skipped(scale.options());
  at::Tensor grad_zero_point = skipped(scale.options());
  if (want_ds) {
    grad_scale = at::empty(scale.sizes(), scale.options());
    float* out = grad_scale.mutable_data_ptr<float>();
    for (int64_t c = 0; c < grad_scale.numel(); ++c)
      out[c] = static_cast<float>(grad_factor * sums.ds[layout.channels == 1 ? 0 : c]);
  }
  if (want_dz) {
    grad_zero_point = at::empty(zero_point->sizes(), scale.options());
    float* out = grad_zero_point.mutable_data_ptr<float>();
    for (int64_t c = 0; c < grad_zero_point.numel(); ++c)
      out[c] = static_cast<float>(-static_cast<double>(st.s()[c]) * grad_factor *
                                  sums.dz[layout.channels == 1 ? 0 : c]);
  }
  return {grad_x, grad_scale, grad_zero_point};
}

TORCH_LIBRARY_IMPL(oqfl, CPU, m) {
  m.impl("fake_quant", &fake_quant_cpu);
  m.impl("fake_quant_backward", &fake_quant_backward_cpu);
}

}  // namespace oqfl
