#include "qconv_args.h"

#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include <ATen/ATen.h>

#include "common/checks.h"
#include "common/quant_math.h"

namespace oqfl {
namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// *out = a * b (a + b), false when that overflows int64: huge stride/padding/dilation values must
// be refused, never wrapped into small or negative sizes that pass the checks.
bool mul_fits(int64_t a, int64_t b, int64_t* out) { return !__builtin_mul_overflow(a, b, out); }
bool add_fits(int64_t a, int64_t b, int64_t* out) { return !__builtin_add_overflow(a, b, out); }

// The product of `factors`, or -1 when it overflows int64 (the factors are sizes, >= 0).
int64_t checked_product(std::initializer_list<int64_t> factors) {
  int64_t p = 1;
  for (int64_t f : factors)
    if (!mul_fits(p, f, &p)) return -1;
  return p;
}

std::string shape_str(std::initializer_list<int64_t> dims) {
  std::string s = "[";
  bool first = true;
  for (int64_t d : dims) {
    if (!first) s += ", ";
    s += std::to_string(d);
    first = false;
  }
  return s + "]";
}

void check_same_device(const char* op, const char* arg, const at::Tensor& t,
                       const at::Tensor& x) {
  OQFL_CHECK_ARG(t.device() == x.device(), op, arg,
                 "to be on the device of x (" + x.device().str() + ")", t.device().str());
}

void check_x_dtype(const char* op, const at::Tensor& x) {
  const auto t = x.scalar_type();
  OQFL_CHECK_DTYPE(t == at::kFloat || t == at::kByte || t == at::kChar, op, "x",
                   "dtype float32 (values), uint8 or int8 (codes)", t);
}

// The scalar quantization arguments and the weight metadata shared by qconv2d and qlinear.
// `w_row_dim` is the index of the [16, 4|2] row inside w_packed.
void check_common(const char* op, QConvGeometry& g, const at::Tensor& x,
                  const at::Tensor& x_scale, const at::Tensor& x_zero_point,
                  const at::Tensor& w_packed, const at::Tensor& w_scale,
                  const std::optional<at::Tensor>& bias, int64_t w_bits, bool relu,
                  int64_t x_quant_min, int64_t x_quant_max) {
  check_x_dtype(op, x);
  g.input_is_float = x.scalar_type() == at::kFloat;

  OQFL_CHECK_DTYPE(x_scale.scalar_type() == at::kFloat, op, "x_scale", "dtype float32",
                   x_scale.scalar_type());
  OQFL_CHECK_ARG(x_scale.numel() == 1 && x_scale.dim() <= 1, op, "x_scale",
                 "a single value (shape [] or [1])", "shape ", x_scale.sizes());
  check_same_device(op, "x_scale", x_scale, x);

  const auto zt = x_zero_point.scalar_type();
  OQFL_CHECK_DTYPE(zt == at::kInt || zt == at::kLong, op, "x_zero_point",
                   "an integer dtype (int32 or int64)", zt);
  OQFL_CHECK_ARG(x_zero_point.numel() == 1 && x_zero_point.dim() <= 1, op, "x_zero_point",
                 "a single value (shape [] or [1])", "shape ", x_zero_point.sizes());
  check_same_device(op, "x_zero_point", x_zero_point, x);

  OQFL_CHECK_ARG(w_bits == 4 || w_bits == 8, op, "w_bits", "4 or 8", w_bits);
  g.w_bits = w_bits;
  const auto wt = w_packed.scalar_type();
  if (w_bits == 8) {
    OQFL_CHECK_DTYPE(wt == at::kChar, op, "w_packed", "dtype int8 for w_bits=8", wt);
  } else {
    OQFL_CHECK_DTYPE(wt == at::kByte, op, "w_packed",
                     "dtype uint8 (two int4 codes per byte) for w_bits=4", wt);
  }
  check_same_device(op, "w_packed", w_packed, x);

  OQFL_CHECK_DTYPE(w_scale.scalar_type() == at::kFloat, op, "w_scale", "dtype float32",
                   w_scale.scalar_type());
  OQFL_CHECK_ARG(w_scale.dim() == 1 && w_scale.size(0) >= 1, op, "w_scale",
                 "shape [OC] with OC >= 1 (one step size per output channel)", "shape ",
                 w_scale.sizes());
  check_same_device(op, "w_scale", w_scale, x);
  g.out_channels = w_scale.size(0);

  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    OQFL_CHECK_DTYPE(b.scalar_type() == at::kFloat, op, "bias", "dtype float32",
                     b.scalar_type());
    OQFL_CHECK_ARG(b.dim() == 1 && b.size(0) == g.out_channels, op, "bias",
                   "shape [" + std::to_string(g.out_channels) + "] (the size of w_scale)",
                   "shape ", b.sizes());
    check_same_device(op, "bias", b, x);
  }
  g.relu = relu;

  if (g.input_is_float) {
    OQFL_CHECK_ARG(x_quant_min < x_quant_max, op, "x_quant_min",
                   "less than x_quant_max (" + std::to_string(x_quant_max) + ")", x_quant_min);
    if (x_quant_min < 0) {
      OQFL_CHECK_ARG(x_quant_min >= -128 && x_quant_max <= 127, op, "x_quant_min/x_quant_max",
                     "a range inside -128..127 (signed codes, x_quant_min < 0)",
                     x_quant_min, "..", x_quant_max);
    } else {
      OQFL_CHECK_ARG(x_quant_max <= 255, op, "x_quant_max",
                     "at most 255 (unsigned codes, x_quant_min >= 0)", x_quant_max);
    }
    g.signed_domain = x_quant_min < 0;
    g.x_quant_min = x_quant_min;
    g.x_quant_max = x_quant_max;
  } else {
    g.signed_domain = x.scalar_type() == at::kChar;
    g.x_quant_min = g.signed_domain ? -128 : 0;
    g.x_quant_max = g.signed_domain ? 127 : 255;
  }
}

int64_t pair_value(const char* op, const char* arg, at::IntArrayRef v, int64_t i) {
  OQFL_CHECK_ARG(v.size() == 1 || v.size() == 2, op, arg, "one or two integers", v);
  return v.size() == 1 ? v[0] : v[i];
}

// The limits shared by qconv2d and qlinear once the geometry is known: the padded code buffer
// (both backends allocate it) and the output fit in int64 bytes, and the reduction length keeps
// the int32 accumulation exact. `got` describes x (and the padding) for the messages.
void check_limits(const char* op, const QConvGeometry& g, const std::string& got) {
  const int64_t buffer = checked_product(
      {g.batch, g.padded_h, g.padded_w, g.groups, g.ic_blocks, kQConvIcBlock});
  OQFL_CHECK_ARG(buffer >= 0, op, g.pad_h > 0 || g.pad_w > 0 ? "padding" : "x",
                 "a zero-point-padded code buffer of N * (H + 2 * pad_h) * (W + 2 * pad_w) * "
                 "groups * ceil(C / groups / 4) * 4 bytes that fits in int64",
                 got);
  const int64_t out_bytes =
      checked_product({g.batch, g.out_channels, g.out_h, g.out_w, int64_t{sizeof(float)}});
  OQFL_CHECK_ARG(out_bytes >= 0, op, "w_scale",
                 "a length OC for which the output of N * OC * OH * OW float32 values (OH=" +
                     std::to_string(g.out_h) + ", OW=" + std::to_string(g.out_w) +
                     ") fits in int64 bytes",
                 "OC = ", g.out_channels, " for x of ", got);
  const int64_t reduction = checked_product({g.in_per_group, g.kernel_h, g.kernel_w});
  const int64_t limit = qconv_max_reduction(g.w_bits);
  OQFL_CHECK_ARG(reduction >= 0 && reduction <= limit, op, "x",
                 "a reduction length K = C / groups * KH * KW of at most " +
                     std::to_string(limit) + " for w_bits=" + std::to_string(g.w_bits) +
                     " (K * 255 * max|weight code| must fit the int32 accumulator)",
                 "K = ", reduction >= 0 ? std::to_string(reduction) : "more than 2^63",
                 " (C / groups = ", g.in_per_group, ", KH = ", g.kernel_h, ", KW = ", g.kernel_w,
                 ") for ", got);
}

// The epilogue arguments (qconv_args.h), checked once the output's shape `out_sizes` is known.
void check_qconv_epilogue(const char* op, QConvGeometry& g, const at::Tensor& x,
                          at::IntArrayRef out_sizes, const QConvEpilogueArgs& e) {
  if (e.residual.has_value()) {
    const at::Tensor& r = *e.residual;
    OQFL_CHECK_DTYPE(r.scalar_type() == at::kFloat, op, "residual", "dtype float32",
                     r.scalar_type());
    OQFL_CHECK_ARG(r.sizes().equals(out_sizes), op, "residual",
                   "the output's shape " + c10::str(out_sizes), "shape ", r.sizes());
    check_same_device(op, "residual", r, x);
    g.has_residual = true;
  }
  if (e.clamp_max.has_value()) {
    const double c = *e.clamp_max;
    OQFL_CHECK_ARG(std::isfinite(c) && std::fabs(c) <= std::numeric_limits<float>::max(), op,
                   "clamp_max", "a finite float32 value", c);
    OQFL_CHECK_ARG(!g.relu || c >= 0.0, op, "clamp_max", "a value >= 0 when relu=True", c);
    g.has_clamp = true;
    g.clamp_max = static_cast<float>(c);
  }
  OQFL_CHECK_ARG(e.out_scale.has_value() || !e.out_zero_point.has_value(), op, "out_scale",
                 "a tensor when out_zero_point is given (code output)", "None");
  if (!e.out_scale.has_value()) return;
  const at::Tensor& s = *e.out_scale;
  OQFL_CHECK_DTYPE(s.scalar_type() == at::kFloat, op, "out_scale", "dtype float32",
                   s.scalar_type());
  OQFL_CHECK_ARG(s.numel() == 1 && s.dim() <= 1, op, "out_scale",
                 "a single value (shape [] or [1])", "shape ", s.sizes());
  check_same_device(op, "out_scale", s, x);
  OQFL_CHECK_ARG(e.out_zero_point.has_value(), op, "out_zero_point",
                 "a tensor when out_scale is given (code output)", "None");
  const at::Tensor& z = *e.out_zero_point;
  OQFL_CHECK_DTYPE(z.scalar_type() == at::kInt || z.scalar_type() == at::kLong, op,
                   "out_zero_point", "an integer dtype (int32 or int64)", z.scalar_type());
  OQFL_CHECK_ARG(z.numel() == 1 && z.dim() <= 1, op, "out_zero_point",
                 "a single value (shape [] or [1])", "shape ", z.sizes());
  check_same_device(op, "out_zero_point", z, x);
  const int64_t lo = e.out_quant_min, hi = e.out_quant_max;
  OQFL_CHECK_ARG(lo <= hi, op, "out_quant_min",
                 "at most out_quant_max (" + std::to_string(hi) + ")", lo);
  if (lo < 0) {
    OQFL_CHECK_ARG(lo >= -128 && hi <= 127, op, "out_quant_min/out_quant_max",
                   "a range inside -128..127 (int8 codes, out_quant_min < 0)", lo, "..", hi);
  } else {
    OQFL_CHECK_ARG(hi <= 255, op, "out_quant_max",
                   "at most 255 (uint8 codes, out_quant_min >= 0)", hi);
  }
  g.code_output = true;
  g.out_signed = lo < 0;
  g.out_quant_min = lo;
  g.out_quant_max = hi;
}

}  // namespace

int64_t qconv_max_reduction(int64_t w_bits) {
  const int64_t max_weight = w_bits == 8 ? 128 : 8;
  return std::numeric_limits<int32_t>::max() / (kQConvMaxCodeSpan * max_weight);
}

QConvGeometry check_qconv2d_args(const char* op, const at::Tensor& x, const at::Tensor& x_scale,
                                 const at::Tensor& x_zero_point, const at::Tensor& w_packed,
                                 const at::Tensor& w_scale, const std::optional<at::Tensor>& bias,
                                 int64_t w_bits, at::IntArrayRef stride, at::IntArrayRef padding,
                                 at::IntArrayRef dilation, int64_t groups, bool relu,
                                 int64_t x_quant_min, int64_t x_quant_max,
                                 const QConvEpilogueArgs& epilogue) {
  QConvGeometry g;
  OQFL_CHECK_ARG(x.dim() == 4, op, "x", "a 4-d tensor [N, C, H, W]", "shape ", x.sizes());
  check_common(op, g, x, x_scale, x_zero_point, w_packed, w_scale, bias, w_bits, relu,
               x_quant_min, x_quant_max);
  g.batch = x.size(0);
  g.in_channels = x.size(1);
  g.in_h = x.size(2);
  g.in_w = x.size(3);
  g.channels_last = x.suggest_memory_format() == at::MemoryFormat::ChannelsLast;

  OQFL_CHECK_ARG(groups >= 1, op, "groups", "a positive integer", groups);
  g.groups = groups;
  OQFL_CHECK_ARG(g.in_channels >= groups && g.in_channels % groups == 0, op, "x",
                 "a channel count that is a positive multiple of groups (" +
                     std::to_string(groups) + ")",
                 "shape ", x.sizes());
  OQFL_CHECK_ARG(g.out_channels >= groups && g.out_channels % groups == 0, op, "w_scale",
                 "a length (OC) that is a positive multiple of groups (" +
                     std::to_string(groups) + ")",
                 "shape ", w_scale.sizes());
  g.in_per_group = g.in_channels / groups;
  g.out_per_group = g.out_channels / groups;
  g.oc_blocks = ceil_div(g.out_per_group, kQConvOcBlock);
  g.ic_blocks = ceil_div(g.in_per_group, kQConvIcBlock);

  const int64_t row = w_bits == 8 ? 4 : 2;
  OQFL_CHECK_ARG(w_packed.dim() == 7, op, "w_packed",
                 "a 7-d blocked weight [G, OCB, KH, KW, ICB, 16, " + std::to_string(row) + "]",
                 "shape ", w_packed.sizes());
  g.kernel_h = w_packed.size(2);
  g.kernel_w = w_packed.size(3);
  OQFL_CHECK_ARG(g.kernel_h >= 1 && g.kernel_w >= 1, op, "w_packed",
                 "a kernel size KH, KW >= 1 (dims 2 and 3)", "shape ", w_packed.sizes());
  const auto expected =
      shape_str({groups, g.oc_blocks, g.kernel_h, g.kernel_w, g.ic_blocks, 16, row});
  OQFL_CHECK_ARG(w_packed.size(0) == groups && w_packed.size(1) == g.oc_blocks &&
                     w_packed.size(4) == g.ic_blocks && w_packed.size(5) == 16 &&
                     w_packed.size(6) == row,
                 op, "w_packed",
                 "shape " + expected + " for groups=" + std::to_string(groups) +
                     ", OC=" + std::to_string(g.out_channels) + " (w_scale), IC=" +
                     std::to_string(g.in_channels) + " (x) and w_bits=" + std::to_string(w_bits),
                 "shape ", w_packed.sizes());

  g.stride_h = pair_value(op, "stride", stride, 0);
  g.stride_w = pair_value(op, "stride", stride, 1);
  g.pad_h = pair_value(op, "padding", padding, 0);
  g.pad_w = pair_value(op, "padding", padding, 1);
  g.dil_h = pair_value(op, "dilation", dilation, 0);
  g.dil_w = pair_value(op, "dilation", dilation, 1);
  OQFL_CHECK_ARG(g.stride_h >= 1 && g.stride_w >= 1, op, "stride", "positive integers", stride);
  OQFL_CHECK_ARG(g.pad_h >= 0 && g.pad_w >= 0, op, "padding", "non-negative integers", padding);
  OQFL_CHECK_ARG(g.dil_h >= 1 && g.dil_w >= 1, op, "dilation", "positive integers", dilation);

  // The dilated kernel extent dil * (K - 1) + 1 and the padded input size H + 2 * pad.
  int64_t eff_h = 0, eff_w = 0;
  OQFL_CHECK_ARG(mul_fits(g.dil_h, g.kernel_h - 1, &eff_h) && add_fits(eff_h, 1, &eff_h) &&
                     mul_fits(g.dil_w, g.kernel_w - 1, &eff_w) && add_fits(eff_w, 1, &eff_w),
                 op, "dilation",
                 "a dilated kernel extent dilation * (K - 1) + 1 that fits in int64 for the "
                 "kernel size " + shape_str({g.kernel_h, g.kernel_w}),
                 dilation);
  int64_t hp = 0, wp = 0;
  OQFL_CHECK_ARG(mul_fits(g.pad_h, 2, &hp) && add_fits(hp, g.in_h, &hp) &&
                     mul_fits(g.pad_w, 2, &wp) && add_fits(wp, g.in_w, &wp),
                 op, "padding",
                 "a padded input size (H + 2 * padding, W + 2 * padding) that fits in int64 for "
                 "x of shape " + c10::str(x.sizes()),
                 padding);
  const int64_t span_h = hp - eff_h, span_w = wp - eff_w;  // both terms >= 0: no overflow
  OQFL_CHECK_ARG(span_h >= 0 && span_w >= 0, op, "x",
                 "a padded input (H + 2 * padding, W + 2 * padding) at least as large as the "
                 "dilated kernel " + shape_str({eff_h, eff_w}) + " (a non-empty output)",
                 "shape ", x.sizes(), " with padding ", padding);
  g.padded_h = hp;
  g.padded_w = wp;
  g.out_h = span_h / g.stride_h + 1;  // span <= INT64_MAX - 1 (eff >= 1): no overflow
  g.out_w = span_w / g.stride_w + 1;
  check_limits(op, g, "shape " + c10::str(x.sizes()) + " with padding " + c10::str(padding));
  check_qconv_epilogue(op, g, x, {g.batch, g.out_channels, g.out_h, g.out_w}, epilogue);
  return g;
}

QConvGeometry check_qlinear_args(const char* op, const at::Tensor& x, const at::Tensor& x_scale,
                                 const at::Tensor& x_zero_point, const at::Tensor& w_packed,
                                 const at::Tensor& w_scale, const std::optional<at::Tensor>& bias,
                                 int64_t w_bits, bool relu, int64_t x_quant_min,
                                 int64_t x_quant_max, const QConvEpilogueArgs& epilogue) {
  QConvGeometry g;
  OQFL_CHECK_ARG(x.dim() >= 1, op, "x", "at least one dimension ([..., IC])", "shape ",
                 x.sizes());
  check_common(op, g, x, x_scale, x_zero_point, w_packed, w_scale, bias, w_bits, relu,
               x_quant_min, x_quant_max);
  g.in_channels = x.size(-1);
  OQFL_CHECK_ARG(g.in_channels >= 1, op, "x", "a last dimension (IC) of at least 1", "shape ",
                 x.sizes());
  g.batch = x.numel() / g.in_channels;
  g.in_h = g.in_w = g.out_h = g.out_w = 1;
  g.groups = 1;
  g.in_per_group = g.in_channels;
  g.out_per_group = g.out_channels;
  g.oc_blocks = ceil_div(g.out_channels, kQConvOcBlock);
  g.ic_blocks = ceil_div(g.in_channels, kQConvIcBlock);
  const int64_t row = w_bits == 8 ? 4 : 2;
  const auto expected = shape_str({g.oc_blocks, g.ic_blocks, 16, row});
  OQFL_CHECK_ARG(w_packed.dim() == 4 && w_packed.size(0) == g.oc_blocks &&
                     w_packed.size(1) == g.ic_blocks && w_packed.size(2) == 16 &&
                     w_packed.size(3) == row,
                 op, "w_packed",
                 "shape " + expected + " for OC=" + std::to_string(g.out_channels) +
                     " (w_scale), IC=" + std::to_string(g.in_channels) +
                     " (x.shape[-1]) and w_bits=" + std::to_string(w_bits),
                 "shape ", w_packed.sizes());
  g.channels_last = true;
  check_limits(op, g, "shape " + c10::str(x.sizes()));
  std::vector<int64_t> out_sizes(x.sizes().begin(), x.sizes().end());
  out_sizes.back() = g.out_channels;
  check_qconv_epilogue(op, g, x, out_sizes, epilogue);
  return g;
}

// The value of a one-element CPU tensor whose dtype check_common / check_qconv_epilogue checked
// (float32; int32 or int64), read in place: .item() goes through the dispatcher (aten::item,
// _local_scalar_dense), a few microseconds per call, and a batch-1 layer makes up to four.
static float one_float(const at::Tensor& t) { return *t.const_data_ptr<float>(); }
static int64_t one_int(const at::Tensor& t) {
  return t.scalar_type() == at::kInt ? *t.const_data_ptr<int32_t>() : *t.const_data_ptr<int64_t>();
}

QConvScalars check_qconv_scalars_cpu(const char* op, const QConvGeometry& g,
                                     const at::Tensor& x_scale, const at::Tensor& x_zero_point,
                                     const at::Tensor& w_scale, const QConvEpilogueArgs& epilogue) {
  QConvScalars s;
  s.x_scale = one_float(x_scale);
  OQFL_CHECK_ARG(step_is_valid(s.x_scale), op, "x_scale", "a positive finite value", s.x_scale);
  const int64_t zp = one_int(x_zero_point);
  const int64_t lo = g.signed_domain ? -128 : 0, hi = g.signed_domain ? 127 : 255;
  OQFL_CHECK_ARG(zp >= lo && zp <= hi, op, "x_zero_point",
                 "a code inside " + std::to_string(lo) + ".." + std::to_string(hi) +
                     (g.signed_domain ? " (signed codes)" : " (unsigned codes)"),
                 zp);
  s.x_zero_point = static_cast<int32_t>(zp);
  const at::Tensor ws = w_scale.contiguous();
  const float* w = ws.const_data_ptr<float>();
  for (int64_t i = 0; i < ws.numel(); ++i)
    OQFL_CHECK_ARG(step_is_valid(w[i]), op, "w_scale", "positive finite step sizes", w[i],
                   " at index ", i);
  if (!g.code_output) return s;
  s.out_scale = one_float(*epilogue.out_scale);
  OQFL_CHECK_ARG(step_is_valid(s.out_scale), op, "out_scale", "a positive finite value",
                 s.out_scale);
  const int64_t ozp = one_int(*epilogue.out_zero_point);
  const int64_t olo = g.out_signed ? -128 : 0, ohi = g.out_signed ? 127 : 255;
  OQFL_CHECK_ARG(ozp >= olo && ozp <= ohi, op, "out_zero_point",
                 "a code inside " + std::to_string(olo) + ".." + std::to_string(ohi) +
                     (g.out_signed ? " (int8 output codes)" : " (uint8 output codes)"),
                 ozp);
  s.out_zero_point = static_cast<int32_t>(ozp);
  return s;
}

at::ScalarType qconv_output_dtype(const QConvGeometry& g) {
  if (!g.code_output) return at::kFloat;
  return g.out_signed ? at::kChar : at::kByte;
}

at::Tensor qconv_empty_output(const QConvGeometry& g, const at::Tensor& x) {
  const bool nhwc = g.code_output || g.channels_last;
  return at::empty({g.batch, g.out_channels, g.out_h, g.out_w},
                   x.options().dtype(qconv_output_dtype(g)),
                   nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
}

}  // namespace oqfl
