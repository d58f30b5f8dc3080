// The one TORCH_LIBRARY(oqfl) block: every op schema of the package. Backends register their
// kernels with TORCH_LIBRARY_IMPL in cpu/ and cuda/; fake kernels and autograd formulas are
// registered from Python (oqfl_ext/_meta.py, oqfl_ext/_autograd.py).
#include <Python.h>

#include <torch/library.h>

#include "cpu/cpu_capability.h"
#include "integer_plan.h"

TORCH_LIBRARY(oqfl, m) {
  // Tells torch where the fake kernels live when an op is first used under FakeTensorMode.
  m.set_python_module("oqfl_ext._meta");

  m.def(
      "fake_quant(Tensor x, Tensor scale, Tensor? zero_point=None, *, int quant_min, "
      "int quant_max, int? axis=None, float grad_factor=1.0) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "fake_quant_backward(Tensor grad_output, Tensor x, Tensor scale, Tensor? zero_point=None, "
      "*, int quant_min, int quant_max, int? axis=None, float grad_factor=1.0, "
      "bool[3] output_mask=[True, True, True]) -> (Tensor, Tensor, Tensor)",
      {at::Tag::pt2_compliant_tag});

  // Packed integer codes (layout in common/bitpack.h). Not differentiable: no autograd.
  // quantize_pack is nondeterministic_seeded: with stochastic=True it draws its seed from a
  // generator, which tells torch.compile to keep the RNG draw in order (as for bernoulli).
  m.def("pack(Tensor q, int bits) -> Tensor", {at::Tag::pt2_compliant_tag});
  // max |x| per slice along axis 0 of a float32 CPU tensor (the update codec's step sizes)
  m.def("_row_absmax(Tensor x) -> Tensor");
  m.def("unpack(Tensor packed, int bits, int numel, bool signed=True) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  m.def(
      "quantize_pack(Tensor x, Tensor scale, Tensor? zero_point=None, *, int bits, "
      "int? axis=None, bool stochastic=False, Generator? generator=None) -> Tensor",
      {at::Tag::nondeterministic_seeded, at::Tag::pt2_compliant_tag});
  m.def(
      "unpack_dequantize(Tensor packed, Tensor scale, Tensor? zero_point=None, *, int bits, "
      "int[] shape, int? axis=None) -> Tensor",
      {at::Tag::pt2_compliant_tag});

  // Integer inference (contract, fused epilogue and weight layout in qconv_args.h). Not
  // differentiable.
  m.def(
      "qconv2d(Tensor x, Tensor x_scale, Tensor x_zero_point, Tensor w_packed, Tensor w_scale, "
      "Tensor? bias=None, *, int w_bits, int[2] stride=1, int[2] padding=0, int[2] dilation=1, "
      "int groups=1, bool relu=False, int x_quant_min=0, int x_quant_max=255, "
      "Tensor? residual=None, float? clamp_max=None, Tensor? out_scale=None, "
      "Tensor? out_zero_point=None, int out_quant_min=0, int out_quant_max=255) -> Tensor",
      {at::Tag::pt2_compliant_tag});
  m.def(
      "qlinear(Tensor x, Tensor x_scale, Tensor x_zero_point, Tensor w_packed, Tensor w_scale, "
      "Tensor? bias=None, *, int w_bits, bool relu=False, int x_quant_min=0, "
      "int x_quant_max=255, Tensor? residual=None, float? clamp_max=None, "
      "Tensor? out_scale=None, Tensor? out_zero_point=None, int out_quant_min=0, "
      "int out_quant_max=255) -> Tensor",
      {at::Tag::pt2_compliant_tag});

  // A converted network's forward run in C++ (integer_plan.h; built by oqfl_ext/nn/plan.py).
  m.class_<oqfl::IntegerPlan>("IntegerPlan")
      .def(torch::init<>())
      .def("add_qconv", &oqfl::IntegerPlan::add_qconv)
      .def("add_qlinear", &oqfl::IntegerPlan::add_qlinear)
      .def("add_max_pool", &oqfl::IntegerPlan::add_max_pool)
      .def("add_adaptive_avg_pool", &oqfl::IntegerPlan::add_adaptive_avg_pool)
      .def("add_flatten", &oqfl::IntegerPlan::add_flatten)
      .def("finish", &oqfl::IntegerPlan::finish)
      .def("run", &oqfl::IntegerPlan::run)
      .def("step_seconds", &oqfl::IntegerPlan::step_seconds)
      .def("step_kinds", &oqfl::IntegerPlan::step_kinds)
      .def("num_steps", &oqfl::IntegerPlan::num_steps);

  // Which CPU instruction set the kernels use (see cpu/cpu_capability.h).
  m.def("_cpu_capability() -> str", &oqfl::cpu::cpu_capability);
  m.def("_set_cpu_capability(str capability) -> str", &oqfl::cpu::set_cpu_capability);
}

// Importing oqfl_ext._C loads the library and runs the registrations above; the module itself
// has no Python functions.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
