// CPU kernels of the integer inference ops oqfl::qconv2d and oqfl::qlinear (contract and weight
// layout in qconv_args.h).
//
// 1. x (float32 in any memory format, or uint8 / int8 codes) is quantized into a padded NHWC
//    uint8 buffer [H + 2 pad_h, W + 2 pad_w, G, ICB * 4] per image whose border pixels and
//    padded channels hold the zero point, so the kernels never bounds-check a tap. Signed codes
//    are shifted by +128 (and the zero point with them) so the VNNI kernel can treat them as
//    unsigned bytes; acc - zp * wsum is unchanged by the shift.
// 2. An implicit GEMM over that buffer by the kernels of the active instruction set
//    (isa/qconv2d_table.h, chosen by cpu/cpu_capability.h): runs of output pixels of one output
//    row x 32 output channels (two 16-channel weight slabs), the epilogue (zero-point
//    correction, scale, bias, residual, relu, clamp) fused, float32 stored in the output's
//    memory format (non-temporal stores when the output is larger than the caches), or the
//    output codes stored NHWC.
// Two schedules (run_qconv): with many images each thread quantizes and convolves whole images
// (the padded image stays in its L2); with few images (or weights past 1 MB) one parallel pass
// quantizes the batch and the threads split the output channels (then the rows), so batch 1
// also uses every core. Depthwise layers go to the table's dw_row where it has one (AVX2, and
// AVX-512 for the VNNI and AMX tables): all channels of a pixel per run, weights gathered to
// int32 per channel once per call
// (docs/DESIGN.md section 7.1).
// int4 weights are unpacked to int8 once per slab (shared copy, or a thread-local one reused
// for all the pixels of the slab) and then run the int8 kernel.
// qlinear is the same 1x1 convolution over one row of M = prod(leading dims) pixels.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "common/checks.h"
#include "cpu/cpu_capability.h"
#include "ops.h"
#include "qconv_args.h"

namespace oqfl {
namespace {

using cpu::QConvKernelTable;
using cpu::QConvRowArgs;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Pixels per piece of an output row handed to the kernel at once (a multiple of the VNNI
// kernel's 14-pixel tile).
constexpr int64_t kRunPixels = 112;

// Outputs of at least this many bytes are written with non-temporal stores where aligned.
constexpr int64_t kStreamBytes = int64_t{2} << 20;

// The image-major schedule's limit on the weight bytes (int8 codes of every slab).
constexpr int64_t kImageMajorWeightBytes = int64_t{1} << 20;

struct Problem {
  QConvGeometry g;
  int32_t zp_u = 0;      // zero point in the unsigned (shifted) domain
  int32_t offset = 0;    // 128 for signed codes, else 0
  int64_t cg = 0;        // padded channels per group (ICB * 4; 1 for a depthwise dw_row)
  int64_t ctot = 0;      // G * cg: bytes per padded pixel
  int64_t hp = 0, wp = 0;
  int64_t i16_steps = 0;  // QConvRowArgs::i16_steps
};

// QConvRowArgs::i16_steps: with input bytes <= umax and |weight code| <= wmax, one pair sum
// is at most 2 * umax * wmax in magnitude, so 32767 / (2 * umax * wmax) of them add up in int16
// without saturating (docs/DESIGN.md section 7.1).
int64_t int16_steps(const QConvGeometry& g, int32_t zp_u, int32_t offset) {
  // Code input may hold any byte; a float input's codes stay in its range (a NaN gives code 0,
  // the byte `offset`); padding is zp_u.
  const int64_t umax =
      g.input_is_float ? std::max<int64_t>({g.x_quant_max + offset, int64_t{zp_u}, int64_t{offset}})
                       : 255;
  const int64_t wmax = g.w_bits == 8 ? 128 : 8;
  if (umax == 0) return 1 << 20;
  return std::min<int64_t>(32767 / (2 * umax * wmax), 1 << 20);
}

// Codes of one input row (n, h) in NHWC order [W, C] (uint8, shifted), written to `row`.
// `tmp` holds C * W bytes of scratch for NCHW inputs.
void row_codes(const QConvKernelTable& k, const Problem& p, const at::Tensor& x, float x_scale,
               int64_t n, int64_t h, uint8_t* row, std::vector<uint8_t>& tmp) {
  const QConvGeometry& g = p.g;
  const int64_t C = g.in_channels, W = g.in_w, H = g.in_h;
  const float z = static_cast<float>(p.zp_u - p.offset);
  const float qmin = static_cast<float>(g.x_quant_min), qmax = static_cast<float>(g.x_quant_max);
  if (g.channels_last) {
    const int64_t base = (n * H + h) * W * C;
    if (g.input_is_float) {
      k.quantize(x.const_data_ptr<float>() + base, row, W * C, x_scale, z, qmin, qmax, p.offset);
    } else {
      const uint8_t* src = static_cast<const uint8_t*>(x.const_data_ptr()) + base;
      if (p.offset == 0) {
        std::memcpy(row, src, W * C);
      } else {
        for (int64_t i = 0; i < W * C; ++i) row[i] = src[i] ^ 0x80;
      }
    }
    return;
  }
  // NCHW: channel rows, then a transpose.
  tmp.resize(C * W);
  for (int64_t c = 0; c < C; ++c) {
    const int64_t base = ((n * C + c) * H + h) * W;
    uint8_t* t = tmp.data() + c * W;
    if (g.input_is_float) {
      k.quantize(x.const_data_ptr<float>() + base, t, W, x_scale, z, qmin, qmax, p.offset);
    } else {
      const uint8_t* src = static_cast<const uint8_t*>(x.const_data_ptr()) + base;
      for (int64_t i = 0; i < W; ++i) t[i] = src[i] ^ static_cast<uint8_t>(p.offset);
    }
  }
  for (int64_t w = 0; w < W; ++w)
    for (int64_t c = 0; c < C; ++c) row[w * C + c] = tmp[c * W + w];
}

// Fills rows [begin, end) of the padded NHWC buffer (row r = n * Hp + hh), writing row r at
// buf + (r - base_row) * row_bytes.
void fill_rows(const QConvKernelTable& k, const Problem& p, const at::Tensor& x, float x_scale,
               uint8_t* buf, int64_t base_row, int64_t begin, int64_t end,
               std::vector<uint8_t>& tmp, std::vector<uint8_t>& line) {
  const QConvGeometry& g = p.g;
  const int64_t row_bytes = p.wp * p.ctot;
  const uint8_t fill = static_cast<uint8_t>(p.zp_u);
  const bool direct = p.cg == g.in_per_group;  // unpadded channels: codes land in place
  for (int64_t r = begin; r < end; ++r) {
    const int64_t n = r / p.hp, hh = r % p.hp, h = hh - g.pad_h;
    uint8_t* dst = buf + (r - base_row) * row_bytes;
    if (h < 0 || h >= g.in_h) {
      std::memset(dst, fill, row_bytes);
      continue;
    }
    const int64_t left = g.pad_w * p.ctot;
    std::memset(dst, fill, left);
    std::memset(dst + left + g.in_w * p.ctot, fill, g.pad_w * p.ctot);
    if (direct) {
      row_codes(k, p, x, x_scale, n, h, dst + left, tmp);
      continue;
    }
    line.resize(g.in_w * g.in_channels);
    row_codes(k, p, x, x_scale, n, h, line.data(), tmp);
    uint8_t* d = dst + left;
    const uint8_t* s = line.data();
    const int64_t icg = g.in_per_group;
    if (icg == 1 && p.cg == 4) {
      // One channel per group (depthwise): each code, then three bytes of the zero point
      // (plain stores, no call per channel).
      const int64_t count = g.in_w * g.groups;
      for (int64_t i = 0; i < count; ++i) {
        d[4 * i] = s[i];
        d[4 * i + 1] = d[4 * i + 2] = d[4 * i + 3] = fill;
      }
      continue;
    }
    for (int64_t w = 0; w < g.in_w; ++w) {
      for (int64_t grp = 0; grp < g.groups; ++grp, d += p.cg, s += icg) {
        std::memcpy(d, s, icg);
        std::memset(d + icg, fill, p.cg - icg);
      }
    }
  }
}

// Where run_qconv writes: float32 values to `out` or codes to `codes` (exactly one is set),
// dense NHWC when `nhwc` else dense NCHW; and the residual it adds (or null), dense NHWC when
// `res_nhwc` else dense NCHW.
struct QConvOutput {
  float* out = nullptr;
  uint8_t* codes = nullptr;
  bool nhwc = false;
  const float* residual = nullptr;
  bool res_nhwc = false;
};

// Everything the pixel loops need besides the input buffer and the weights.
struct ConvPlan {
  const Problem* p;
  const QConvKernelTable* k;
  QConvOutput o;
  const float* scale;  // [G * OCB * 16]
  const float* bias;   // [G * OCB * 16] or null
  const QConvScalars* sc;
  int64_t pieces, piece_w;
  bool stream;  // output larger than the caches: non-temporal stores
  // Depthwise through the table's dw_row (else null): weights [taps][dw_stride] int32; scale,
  // bias and the zws passed to conv_runs are then per channel, padded to dw_stride.
  const int32_t* dw_w = nullptr;
  int64_t dw_stride = 0;
};

// Runs [r0, r1) of one image's output rows (a run is a piece of a row: r = oh * pieces + piece)
// for one slab pair, reading the padded image at `img`.
void conv_runs(const ConvPlan& c, const uint8_t* img, int64_t n, int64_t grp, int64_t ob,
               const int8_t* w0, const int8_t* w1, const int32_t* zws, int64_t r0, int64_t r1) {
  const Problem& p = *c.p;
  const QConvGeometry& g = p.g;
  const int64_t OH = g.out_h, OW = g.out_w, OC = g.out_channels;
  const int64_t OCg = g.out_per_group, OCB = g.oc_blocks;
  const int64_t pad0 = (grp * OCB + ob) * 16;
  QConvRowArgs a;
  // A stride or dilation that never moves (one output column, a kernel of size 1) may be huge;
  // its step is 0 then, the product would overflow. Used steps stay inside the padded buffer.
  a.pix_step = g.out_w > 1 ? g.stride_w * p.ctot : 0;
  a.tap_h = g.kernel_h > 1 ? g.dil_h * p.wp * p.ctot : 0;
  a.tap_w = g.kernel_w > 1 ? g.dil_w * p.ctot : 0;
  a.kh = g.kernel_h;
  a.kw = g.kernel_w;
  a.icb = g.ic_blocks;
  a.w0 = w0;
  a.w1 = w1;
  a.zws = zws;
  a.scale = c.scale + pad0;
  a.bias = c.bias ? c.bias + pad0 : nullptr;
  a.noc = std::min<int64_t>(OCg - ob * 16, w1 ? 32 : 16);
  a.i16_steps = p.i16_steps;
  a.dw_w = c.dw_w;
  a.dw_stride = c.dw_stride;
  if (c.dw_w != nullptr) a.noc = OC;  // every channel in one run
  a.res_pix_stride = c.o.res_nhwc ? OC : 1;
  a.res_oc_stride = c.o.res_nhwc ? 1 : OH * OW;
  a.relu = g.relu;
  a.has_clamp = g.has_clamp;
  a.clamp_max = g.clamp_max;
  a.stream = c.stream;
  a.out_scale = c.sc->out_scale;
  a.out_zero_point = static_cast<float>(c.sc->out_zero_point);
  a.out_qmin = static_cast<float>(g.out_quant_min);
  a.out_qmax = static_cast<float>(g.out_quant_max);
  a.out_pix_stride = c.o.nhwc ? OC : 1;
  a.out_oc_stride = c.o.nhwc ? 1 : OH * OW;
  const int64_t oc0 = grp * OCg + ob * 16;
  // Points the output, codes and residual at (n, oc0, oh, ow0) of their dense NHWC / NCHW
  // tensors: the block path and the per-row loop share it.
  auto point_at = [&](int64_t oh, int64_t ow0) {
    const int64_t nhwc_at = ((n * OH + oh) * OW + ow0) * OC + oc0;
    const int64_t nchw_at = ((n * OC + oc0) * OH + oh) * OW + ow0;
    const int64_t out_at = c.o.nhwc ? nhwc_at : nchw_at;
    a.out = c.o.out != nullptr ? c.o.out + out_at : nullptr;
    a.out_codes = c.o.codes != nullptr ? c.o.codes + out_at : nullptr;
    a.residual = c.o.residual != nullptr ? c.o.residual + (c.o.res_nhwc ? nhwc_at : nchw_at)
                                         : nullptr;
  };
  // Stride 1 and whole rows: the table's conv_rows may take the rows as one block.
  const bool block = c.k->conv_rows != nullptr && c.dw_w == nullptr && c.pieces == 1 &&
                     g.stride_h == 1 && g.stride_w == 1 && OW > 1 && r1 - r0 > 1;
  if (block) {
    const int64_t oh = r0;
    a.in = img + oh * p.wp * p.ctot + grp * p.cg;
    a.npix = OW;
    point_at(oh, 0);
    cpu::QConvRows rows;
    rows.rows = r1 - r0;
    rows.row_pixels = p.wp;
    rows.out_row_stride = OW * a.out_pix_stride;
    rows.res_row_stride = OW * a.res_pix_stride;
    c.k->conv_rows(a, rows);
    return;
  }
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t piece = r % c.pieces, oh = r / c.pieces;
    const int64_t ow0 = piece * c.piece_w, ow1 = std::min(OW, ow0 + c.piece_w);
    if (ow0 >= ow1) continue;
    a.in = img + (oh * g.stride_h * p.wp + ow0 * g.stride_w) * p.ctot + grp * p.cg;
    a.npix = ow1 - ow0;
    point_at(oh, ow0);
    if (c.dw_w != nullptr) {
      c.k->dw_row(a);
    } else {
      c.k->conv_row(a);
    }
  }
}

void make_zws(int32_t zp_u, const int32_t* wsum, int32_t* zws, int n) {
  for (int j = 0; j < n; ++j)
    zws[j] = static_cast<int32_t>(static_cast<uint32_t>(zp_u) * static_cast<uint32_t>(wsum[j]));
}

// The convolution of the geometry on x (dense, NHWC when g.channels_last else NCHW), writing
// as `o` says.
//
// Two schedules:
//  - many images (N >= 4 threads) and weights within kImageMajorWeightBytes: each thread takes
//    whole images; per image it quantizes into a thread-local padded buffer (which stays in its
//    L2) and runs every slab pair over it. The slabs are prepared once up front (int4: unpacked
//    to one shared int8 copy).
//  - few images, or larger weights: one parallel pass quantizes the whole batch, then tasks
//    (slab pair, range of output rows) are split slab-major, so each thread prepares (int4:
//    unpacks into a thread-local buffer) each of its slab pairs once and both cores share one
//    image.
void run_qconv(const QConvGeometry& g, const QConvScalars& sc, const at::Tensor& x,
               const at::Tensor& w_packed, const at::Tensor& w_scale,
               const std::optional<at::Tensor>& bias, const QConvOutput& o) {
  if (g.batch == 0) return;
  const QConvKernelTable& k = cpu::active_qconv_kernels();
  Problem p;
  p.g = g;
  p.offset = g.signed_domain ? 128 : 0;
  p.zp_u = sc.x_zero_point + p.offset;
  // Depthwise (one input and one output channel per group) where the instruction set has a
  // kernel for it: one byte per channel in the padded buffer (the generic slabs need 4).
  const bool depthwise = k.dw_row != nullptr && g.in_per_group == 1 && g.out_per_group == 1;
  p.cg = depthwise ? 1 : g.ic_blocks * 4;
  p.ctot = g.groups * p.cg;
  p.hp = g.padded_h;
  p.wp = g.padded_w;
  p.i16_steps = int16_steps(g, p.zp_u, p.offset);

  // Per padded output channel (G * OCB * 16): the scale product and the bias.
  const int64_t G = g.groups, OCB = g.oc_blocks, OCg = g.out_per_group;
  const int64_t npad = G * OCB * 16;
  // (16 entries of slack: the AVX-512 epilogue loads 32 channels even for a lone last slab)
  std::vector<float> scale(npad + 16, 0.f), bias_pad;
  const at::Tensor ws = w_scale.contiguous();
  const float* wsp = ws.const_data_ptr<float>();
  at::Tensor bc;
  const float* bp = nullptr;
  if (bias.has_value()) {
    bc = bias->contiguous();
    bp = bc.const_data_ptr<float>();
    bias_pad.assign(npad + 16, 0.f);
  }
  for (int64_t grp = 0; grp < G; ++grp)
    for (int64_t o = 0; o < OCg; ++o) {
      scale[grp * OCB * 16 + o] = sc.x_scale * wsp[grp * OCg + o];
      if (bp) bias_pad[grp * OCB * 16 + o] = bp[grp * OCg + o];
    }

  const at::Tensor wc = w_packed.contiguous();
  const uint8_t* wbytes = static_cast<const uint8_t*>(wc.const_data_ptr());
  const int64_t slab_rows = g.kernel_h * g.kernel_w * g.ic_blocks;
  const int64_t slab_bytes = slab_rows * (g.w_bits == 8 ? 64 : 32);
  const int64_t slab_len = slab_rows * 64;  // int8 codes per slab
  const bool unpack = g.w_bits != 8;

  ConvPlan c;
  c.p = &p;
  c.k = &k;
  c.o = o;
  c.scale = scale.data();
  c.bias = bp ? bias_pad.data() : nullptr;
  c.sc = &sc;
  c.stream = o.out != nullptr && g.batch * g.out_channels * g.out_h * g.out_w * 4 >= kStreamBytes;
  c.pieces = ceil_div(g.out_w, kRunPixels);
  c.piece_w = ceil_div(ceil_div(g.out_w, c.pieces), 14) * 14;
  const int64_t runs = g.out_h * c.pieces;  // per image
  const int64_t pairs = ceil_div(OCB, 2);
  const int64_t slab_tasks = G * pairs;
  const int64_t threads = at::get_num_threads();
  const int64_t img_bytes = p.hp * p.wp * p.ctot;

  // Depthwise through dw_row: all channels of a pixel at once instead of one 16-channel slab
  // per channel.
  if (depthwise) {
    const int64_t C = g.out_channels, cpad = ceil_div(C, 8) * 8;
    const int64_t taps = g.kernel_h * g.kernel_w;
    std::vector<int32_t> dw_w(taps * cpad, 0), dw_zws(cpad, 0);
    std::vector<float> dw_scale(cpad, 0.f), dw_bias(bp ? cpad : 0, 0.f);
    for (int64_t ch = 0; ch < C; ++ch) {
      const uint8_t* slab = wbytes + ch * slab_bytes;  // group ch, block 0: element [0, 0]
      int32_t sum = 0;
      for (int64_t t = 0; t < taps; ++t) {
        const int32_t v = g.w_bits == 8 ? static_cast<int8_t>(slab[t * 64])
                                        : ((slab[t * 32] & 15) ^ 8) - 8;
        dw_w[t * cpad + ch] = v;
        sum += v;
      }
      make_zws(p.zp_u, &sum, &dw_zws[ch], 1);
      dw_scale[ch] = scale[ch * 16];
      if (bp) dw_bias[ch] = bias_pad[ch * 16];
    }
    c.scale = dw_scale.data();
    c.bias = bp ? dw_bias.data() : nullptr;
    c.dw_w = dw_w.data();
    c.dw_stride = cpad;
    if (g.batch >= 4 * threads) {
      at::parallel_for(0, g.batch, 1, [&](int64_t n0, int64_t n1) {
        std::vector<uint8_t> img(img_bytes), tmp, line;
        for (int64_t n = n0; n < n1; ++n) {
          fill_rows(k, p, x, sc.x_scale, img.data(), n * p.hp, n * p.hp, (n + 1) * p.hp, tmp,
                    line);
          conv_runs(c, img.data(), n, 0, 0, nullptr, nullptr, dw_zws.data(), 0, runs);
        }
      });
      return;
    }
    at::Tensor buf = at::empty({g.batch * img_bytes}, x.options().dtype(at::kByte));
    uint8_t* xb = buf.data_ptr<uint8_t>();
    at::parallel_for(0, g.batch * p.hp, 1, [&](int64_t begin, int64_t end) {
      std::vector<uint8_t> tmp, line;
      fill_rows(k, p, x, sc.x_scale, xb, 0, begin, end, tmp, line);
    });
    at::parallel_for(0, g.batch * runs, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end;) {  // split at image boundaries
        const int64_t n = r / runs, stop = std::min(end - n * runs, runs);
        conv_runs(c, xb + n * img_bytes, n, 0, 0, nullptr, nullptr, dw_zws.data(), r % runs,
                  stop);
        r = n * runs + stop;
      }
    });
    return;
  }

  // Whole images per thread while the weights stay in its L2; beyond that (e.g. 512 x 512 x 3
  // x 3 = 2.4 MB), slab-major so each slab pair is read once for the batch.
  const int64_t weight_bytes = G * OCB * slab_len;
  if (g.batch >= 4 * threads && weight_bytes <= kImageMajorWeightBytes) {
    // Slabs once: wsum (and int4: the unpacked codes) of every slab.
    std::vector<int32_t> wsum(npad);
    std::vector<int8_t> wun(unpack ? G * OCB * slab_len : 0);
    at::parallel_for(0, G * OCB, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t s = b0; s < b1; ++s)
        k.prepare_slab(wbytes + s * slab_bytes, static_cast<int>(g.w_bits), slab_rows,
                       unpack ? wun.data() + s * slab_len : nullptr, wsum.data() + s * 16);
    });
    std::vector<int32_t> zws(npad + 16, 0);  // slack as for scale
    make_zws(p.zp_u, wsum.data(), zws.data(), static_cast<int>(npad));
    const int8_t* wbase = unpack ? wun.data() : reinterpret_cast<const int8_t*>(wbytes);
    const int64_t slab_stride = unpack ? slab_len : slab_bytes;
    at::parallel_for(0, g.batch, 1, [&](int64_t n0, int64_t n1) {
      std::vector<uint8_t> img(img_bytes), tmp, line;
      for (int64_t n = n0; n < n1; ++n) {
        fill_rows(k, p, x, sc.x_scale, img.data(), n * p.hp, n * p.hp, (n + 1) * p.hp, tmp,
                  line);
        for (int64_t st = 0; st < slab_tasks; ++st) {
          const int64_t grp = st / pairs, ob = (st % pairs) * 2;
          const int64_t s0 = grp * OCB + ob;
          const int8_t* w0 = wbase + s0 * slab_stride;
          const int8_t* w1 = ob + 1 < OCB ? w0 + slab_stride : nullptr;
          conv_runs(c, img.data(), n, grp, ob, w0, w1, zws.data() + s0 * 16, 0, runs);
        }
      }
    });
    return;
  }

  at::Tensor buf = at::empty({g.batch * img_bytes}, x.options().dtype(at::kByte));
  uint8_t* xb = buf.data_ptr<uint8_t>();
  at::parallel_for(0, g.batch * p.hp, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> tmp, line;
    fill_rows(k, p, x, sc.x_scale, xb, 0, begin, end, tmp, line);
  });

  // Work: per slab pair, the batch's runs (n, run) in chunks.
  const int64_t all_runs = g.batch * runs;
  const int64_t chunks =
      std::min(all_runs, std::max<int64_t>(1, ceil_div(8 * threads, slab_tasks)));
  const int64_t runs_per_chunk = ceil_div(all_runs, chunks);
  const int64_t tasks = slab_tasks * chunks;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<int8_t> wbuf(unpack ? 2 * slab_len : 0);
    int64_t cached = -1;
    int32_t zws[32];
    const int8_t* w0 = nullptr;
    const int8_t* w1 = nullptr;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t st = t / chunks, chunk = t % chunks;
      const int64_t grp = st / pairs, ob = (st % pairs) * 2;
      const bool two = ob + 1 < OCB;
      if (st != cached) {
        int32_t wsum[32] = {0};
        for (int64_t b = 0; b < (two ? 2 : 1); ++b) {
          const uint8_t* src = wbytes + (grp * OCB + ob + b) * slab_bytes;
          int8_t* dst = unpack ? wbuf.data() + b * slab_len : nullptr;
          k.prepare_slab(src, static_cast<int>(g.w_bits), slab_rows, dst, wsum + 16 * b);
          const int8_t* ptr = unpack ? dst : reinterpret_cast<const int8_t*>(src);
          (b == 0 ? w0 : w1) = ptr;
        }
        if (!two) w1 = nullptr;
        make_zws(p.zp_u, wsum, zws, 32);
        cached = st;
      }
      // Split the chunk's runs at image boundaries.
      int64_t r = chunk * runs_per_chunk;
      const int64_t r_end = std::min(all_runs, r + runs_per_chunk);
      while (r < r_end) {
        const int64_t n = r / runs, rr = r % runs;
        const int64_t stop = std::min(r_end - n * runs, runs);
        conv_runs(c, xb + n * img_bytes, n, grp, ob, w0, w1, zws, rr, stop);
        r = n * runs + stop;
      }
    }
  });
}

// The residual as run_qconv reads it: in place when dense NHWC (preferred) or dense NCHW, else
// a dense copy in the output's layout. Sets *nhwc to the layout returned.
at::Tensor dense_residual(const at::Tensor& r, bool out_nhwc, bool* nhwc) {
  if (r.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    *nhwc = true;
    return r;
  }
  if (r.is_contiguous()) {
    *nhwc = false;
    return r;
  }
  *nhwc = out_nhwc;
  return r.contiguous(out_nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
}

// The output pointers of `out` (float32 or codes, as the geometry says).
QConvOutput output_of(const QConvGeometry& g, at::Tensor& out, bool nhwc) {
  QConvOutput o;
  o.nhwc = nhwc;
  if (g.code_output) {
    o.codes = static_cast<uint8_t*>(out.data_ptr());
  } else {
    o.out = out.data_ptr<float>();
  }
  return o;
}

}  // namespace

at::Tensor qconv2d_cpu(const at::Tensor& x, const at::Tensor& x_scale,
                       const at::Tensor& x_zero_point, const at::Tensor& w_packed,
                       const at::Tensor& w_scale, const std::optional<at::Tensor>& bias,
                       int64_t w_bits, at::IntArrayRef stride, at::IntArrayRef padding,
                       at::IntArrayRef dilation, int64_t groups, bool relu, int64_t x_quant_min,
                       int64_t x_quant_max, const std::optional<at::Tensor>& residual,
                       std::optional<double> clamp_max, const std::optional<at::Tensor>& out_scale,
                       const std::optional<at::Tensor>& out_zero_point, int64_t out_quant_min,
                       int64_t out_quant_max) {
  const char* op = "qconv2d";
  const QConvEpilogueArgs e{residual, clamp_max, out_scale, out_zero_point, out_quant_min,
                            out_quant_max};
  const QConvGeometry g =
      check_qconv2d_args(op, x, x_scale, x_zero_point, w_packed, w_scale, bias, w_bits, stride,
                         padding, dilation, groups, relu, x_quant_min, x_quant_max, e);
  const QConvScalars sc = check_qconv_scalars_cpu(op, g, x_scale, x_zero_point, w_scale, e);
  at::Tensor out = qconv_empty_output(g, x);
  if (out.numel() == 0) return out;
  const at::Tensor xd = x.contiguous(g.channels_last ? at::MemoryFormat::ChannelsLast
                                                     : at::MemoryFormat::Contiguous);
  QConvOutput o = output_of(g, out, g.code_output || g.channels_last);
  at::Tensor rd;
  if (g.has_residual) {
    rd = dense_residual(*residual, o.nhwc, &o.res_nhwc);
    o.residual = rd.const_data_ptr<float>();
  }
  run_qconv(g, sc, xd, w_packed, w_scale, bias, o);
  return out;
}

at::Tensor qlinear_cpu(const at::Tensor& x, const at::Tensor& x_scale,
                       const at::Tensor& x_zero_point, const at::Tensor& w_packed,
                       const at::Tensor& w_scale, const std::optional<at::Tensor>& bias,
                       int64_t w_bits, bool relu, int64_t x_quant_min, int64_t x_quant_max,
                       const std::optional<at::Tensor>& residual, std::optional<double> clamp_max,
                       const std::optional<at::Tensor>& out_scale,
                       const std::optional<at::Tensor>& out_zero_point, int64_t out_quant_min,
                       int64_t out_quant_max) {
  const char* op = "qlinear";
  const QConvEpilogueArgs e{residual, clamp_max, out_scale, out_zero_point, out_quant_min,
                            out_quant_max};
  QConvGeometry g = check_qlinear_args(op, x, x_scale, x_zero_point, w_packed, w_scale, bias,
                                       w_bits, relu, x_quant_min, x_quant_max, e);
  const QConvScalars sc = check_qconv_scalars_cpu(op, g, x_scale, x_zero_point, w_scale, e);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = g.out_channels;
  at::Tensor out = at::empty(shape, x.options().dtype(qconv_output_dtype(g)));
  if (out.numel() == 0) return out;
  // The M rows as one image row of M pixels (NHWC [1, 1, M, IC]): the same memory as
  // [M, IC, 1, 1] channels_last, but runs of pixels for the kernel.
  const int64_t m = g.batch;
  g.batch = 1;
  g.in_w = g.out_w = g.padded_w = m;
  const at::Tensor xd = x.contiguous();
  QConvOutput o = output_of(g, out, true);
  at::Tensor rd;
  if (g.has_residual) {
    rd = residual->contiguous();  // [..., OC] dense: NHWC of the M-pixel row
    o.residual = rd.const_data_ptr<float>();
    o.res_nhwc = true;
  }
  run_qconv(g, sc, xd, w_packed, w_scale, bias, o);
  return out;
}

TORCH_LIBRARY_IMPL(oqfl, CPU, m) {
  m.impl("qconv2d", &qconv2d_cpu);
  m.impl("qlinear", &qlinear_cpu);
}

}  // namespace oqfl
