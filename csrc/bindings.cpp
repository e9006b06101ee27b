// torch bindings of the crossvit-fast CUDA kernels: the seven primitives of the `cuda` backend as
// ops of the `crossvit_fast_cuda` library, with the schemas and output dtypes of
// crossvit_fast/backends/torch_backend.py, and the token-pass kernels' limits (attn_pool_limits).
// This is the only file that sees torch: it validates the tensors (with messages that name the
// argument and what was expected), converts parameters to contiguous fp32, allocates outputs,
// runs the Linear's GEMMs through ATen (cuBLAS) and calls the plain launchers of launchers.h on
// the current stream.
//
// Differences from the torch backend, handled by crossvit_fast/backends/cuda_backend.py:
// layer_norm_fwd returns an empty `h` when there is no residual (an op output may not alias its
// input x), and float64 is not taken here.
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <climits>
#include <optional>
#include <tuple>
#include <vector>

#include "attn_pool_plan.h"
#include "launchers.h"

namespace {

using at::Tensor;

// ---- argument checks --------------------------------------------------------------------------

void check_device(const char* op, const char* name, const Tensor& t, const at::Device& device) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.device() == device, op, ": ", name, " is on ", t.device(),
              " but the first input is on ", device);
}

cvf::DType activation_dtype(const char* op, const char* name, const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return cvf::DType::kFloat32;
    case at::kHalf: return cvf::DType::kFloat16;
    case at::kBFloat16: return cvf::DType::kBFloat16;
    default:
      TORCH_CHECK(false, op, ": ", name, " must be float32, float16 or bfloat16, got ",
                  t.scalar_type());
  }
}

void check_same_dtype(const char* op, const char* name, const Tensor& t, const char* ref_name,
                      const Tensor& ref) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " must have ", ref_name,
              "'s dtype ", ref.scalar_type(), ", got ", t.scalar_type());
}

void check_floating(const char* op, const char* name, const Tensor& t) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name,
              " must be a floating-point tensor, got ", t.scalar_type());
}

void check_shape(const char* op, const char* name, const Tensor& t, at::IntArrayRef expected) {
  TORCH_CHECK(t.sizes() == expected, op, ": ", name, " must have shape ", expected, ", got ",
              t.sizes());
}

void check_unit_last_stride(const char* op, const char* name, const Tensor& t) {
  TORCH_CHECK(t.size(-1) <= 1 || t.stride(-1) == 1, op, ": ", name,
              " must have unit stride along its last dim (a view such as tokens[:, 1:] is fine), "
              "got strides ", t.strides());
}

void check_int_range(const char* op, const char* what, int64_t value) {
  TORCH_CHECK(value >= 0 && value <= INT_MAX, op, ": ", what, " = ", value, " is out of range");
}

// A parameter as the kernels read it: contiguous fp32 (a no-op for contiguous fp32 tensors).
Tensor as_f32(const Tensor& t) { return t.to(at::kFloat).contiguous(); }

// Row stride of a [M, C] activation with unit column stride (any value when M <= 1).
int64_t row_stride(const Tensor& t) { return t.size(0) <= 1 ? t.size(1) : t.stride(0); }

cudaStream_t current_stream(const at::Device& device) {
  return c10::cuda::getCurrentCUDAStream(device.index()).stream();
}

void check_launch(const char* op, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA error: ", cudaGetErrorString(err));
}

void check_plan(const char* op, const cvf::AttnPoolPlan& plan, int64_t C, int64_t H) {
  check_launch(op, plan.error);
  TORCH_CHECK(plan.smem_bytes <= plan.smem_limit, op, ": C = ", C, " and H = ", H, " need ",
              plan.smem_bytes, " bytes of shared memory per block; this GPU allows ",
              plan.smem_limit, ". Use the triton or torch backend for this shape.");
}

// ---- CLS attention pooling --------------------------------------------------------------------

struct PoolInputs {
  cvf::AttnPoolArgs args;
  Tensor kt, gamma, beta;  // fp32 copies the args point into
  int64_t B, N, C, H;
};

PoolInputs pool_inputs(const char* op, const Tensor& x0, const Tensor& patches, const Tensor& kt,
                       const Tensor& gamma, const Tensor& beta, double eps) {
  const at::Device device = x0.device();
  check_device(op, "x0", x0, device);
  check_device(op, "patches", patches, device);
  check_device(op, "kt", kt, device);
  check_device(op, "gamma", gamma, device);
  check_device(op, "beta", beta, device);
  TORCH_CHECK(x0.dim() == 2, op, ": x0 must be [B, C], got shape ", x0.sizes());
  const int64_t B = x0.size(0), C = x0.size(1);
  TORCH_CHECK(patches.dim() == 3 && patches.size(0) == B && patches.size(2) == C, op,
              ": patches must be [B, N, C] = [", B, ", N, ", C, "] to match x0, got shape ",
              patches.sizes());
  TORCH_CHECK(kt.dim() == 3 && kt.size(0) == B && kt.size(2) == C, op,
              ": kt must be [B, H, C] = [", B, ", H, ", C, "] to match x0, got shape ", kt.sizes());
  const int64_t N = patches.size(1), H = kt.size(1);
  TORCH_CHECK(C >= 1 && C <= cvf::kAttnPoolMaxC, op, ": the width C must be in [1, ",
              cvf::kAttnPoolMaxC, "], got ", C);
  TORCH_CHECK(H >= 1 && H <= cvf::kAttnPoolMaxH, op, ": the number of heads H (kt.size(1)) must be in [1, ",
              cvf::kAttnPoolMaxH, "], got ", H);
  check_int_range(op, "B", B);
  check_int_range(op, "N + 1", N + 1);
  check_shape(op, "gamma", gamma, {C});
  check_shape(op, "beta", beta, {C});
  activation_dtype(op, "x0", x0);
  check_same_dtype(op, "patches", patches, "x0", x0);
  check_unit_last_stride(op, "x0", x0);
  check_unit_last_stride(op, "patches", patches);
  check_floating(op, "kt", kt);
  check_floating(op, "gamma", gamma);
  check_floating(op, "beta", beta);

  PoolInputs in{{}, as_f32(kt), as_f32(gamma), as_f32(beta), B, N, C, H};
  cvf::AttnPoolArgs& a = in.args;
  a.dtype = activation_dtype(op, "x0", x0);
  a.x0 = x0.data_ptr();
  a.x0_stride_b = row_stride(x0);
  a.patches = patches.data_ptr();
  a.p_stride_b = patches.stride(0);
  a.p_stride_n = patches.stride(1);
  a.kt = in.kt.data_ptr<float>();
  a.gamma = in.gamma.data_ptr<float>();
  a.beta = in.beta.data_ptr<float>();
  a.B = static_cast<int>(B);
  a.N = static_cast<int>(N);
  a.C = static_cast<int>(C);
  a.H = static_cast<int>(H);
  a.eps = static_cast<float>(eps);
  return in;
}

std::tuple<Tensor, Tensor> attn_pool_fwd(const Tensor& x0, const Tensor& patches, const Tensor& kt,
                                         const Tensor& gamma, const Tensor& beta, double eps) {
  constexpr const char* op = "crossvit_fast_cuda::attn_pool_fwd";
  const c10::DeviceGuard guard(x0.device());
  const PoolInputs in = pool_inputs(op, x0, patches, kt, gamma, beta, eps);
  const auto f32 = x0.options().dtype(at::kFloat);
  Tensor z = at::empty({in.B, in.H, in.C}, f32), lse = at::empty({in.B, in.H}, f32);
  if (in.B == 0) return {z, lse};

  const cvf::AttnPoolPlan plan = cvf::attn_pool_fwd_plan(in.args);
  check_plan(op, plan, in.C, in.H);
  Tensor ws_acc, ws_m, ws_l;
  if (plan.splits > 1) {
    ws_acc = at::empty({in.B, plan.splits, in.H, in.C}, f32);
    ws_m = at::empty({in.B, plan.splits, in.H}, f32);
    ws_l = at::empty({in.B, plan.splits, in.H}, f32);
  }
  check_launch(op, cvf::attn_pool_fwd(
                       in.args, plan, z.data_ptr<float>(), lse.data_ptr<float>(),
                       plan.splits > 1 ? ws_acc.data_ptr<float>() : nullptr,
                       plan.splits > 1 ? ws_m.data_ptr<float>() : nullptr,
                       plan.splits > 1 ? ws_l.data_ptr<float>() : nullptr,
                       current_stream(x0.device())));
  return {z, lse};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> attn_pool_bwd(
    const Tensor& dz, const Tensor& x0, const Tensor& patches, const Tensor& kt,
    const Tensor& gamma, const Tensor& beta, const Tensor& z, const Tensor& lse, double eps) {
  constexpr const char* op = "crossvit_fast_cuda::attn_pool_bwd";
  const c10::DeviceGuard guard(x0.device());
  const PoolInputs in = pool_inputs(op, x0, patches, kt, gamma, beta, eps);
  check_device(op, "dz", dz, x0.device());
  check_device(op, "z", z, x0.device());
  check_device(op, "lse", lse, x0.device());
  check_shape(op, "dz", dz, {in.B, in.H, in.C});
  check_shape(op, "z", z, {in.B, in.H, in.C});
  check_shape(op, "lse", lse, {in.B, in.H});
  check_floating(op, "dz", dz);
  check_floating(op, "z", z);
  check_floating(op, "lse", lse);

  const auto f32 = x0.options().dtype(at::kFloat);
  Tensor dx0 = at::empty({in.B, in.C}, x0.options());
  Tensor dpatches = at::empty({in.B, in.N, in.C}, x0.options());
  if (in.B == 0)
    return {dx0, dpatches, at::zeros({0, in.H, in.C}, f32), at::zeros({in.C}, f32),
            at::zeros({in.C}, f32)};

  const cvf::AttnPoolPlan plan = cvf::attn_pool_bwd_plan(in.args);
  check_plan(op, plan, in.C, in.H);
  const Tensor dz32 = as_f32(dz), z32 = as_f32(z), lse32 = as_f32(lse);
  Tensor dkt = at::empty({in.B, plan.splits, in.H, in.C}, f32);
  Tensor dgamma = at::empty({in.B * plan.splits, in.C}, f32);
  Tensor dbeta = at::empty({in.B * plan.splits, in.C}, f32);
  Tensor workspace = at::empty({plan.workspace_floats}, f32);  // the operand rows kt ⊙ γ, dz ⊙ γ
  check_launch(op, cvf::attn_pool_bwd(in.args, plan, z32.data_ptr<float>(), dz32.data_ptr<float>(),
                                      lse32.data_ptr<float>(), workspace.data_ptr<float>(),
                                      dx0.data_ptr(), dpatches.data_ptr(), dkt.data_ptr<float>(),
                                      dgamma.data_ptr<float>(), dbeta.data_ptr<float>(),
                                      current_stream(x0.device())));
  return {dx0, dpatches, plan.splits == 1 ? dkt.squeeze(1) : dkt.sum(1), dgamma.sum(0),
          dbeta.sum(0)};
}

Tensor attn_weights(const Tensor& x0, const Tensor& patches, const Tensor& kt,
                    const Tensor& gamma, const Tensor& beta, const Tensor& lse, double eps) {
  constexpr const char* op = "crossvit_fast_cuda::attn_weights";
  const c10::DeviceGuard guard(x0.device());
  const PoolInputs in = pool_inputs(op, x0, patches, kt, gamma, beta, eps);
  check_device(op, "lse", lse, x0.device());
  check_shape(op, "lse", lse, {in.B, in.H});
  check_floating(op, "lse", lse);
  Tensor a = at::empty({in.B, in.H, in.N + 1}, x0.options().dtype(at::kFloat));
  const Tensor lse32 = as_f32(lse);
  check_launch(op, cvf::attn_weights(in.args, lse32.data_ptr<float>(), a.data_ptr<float>(),
                                     current_stream(x0.device())));
  return a;
}

// What decides whether the token-pass kernels take width C with H heads on GPU `device`:
// [widest C, most heads, forward's and backward's bytes of shared memory per block (0 beyond
// those limits), the bytes a block may have there]. The cuda backend asks it once per shape and
// runs the torch backend, with a warning, where the kernels cannot (cuda_backend.py).
std::vector<int64_t> attn_pool_limits(int64_t C, int64_t H, int64_t device) {
  constexpr const char* op = "crossvit_fast_cuda::attn_pool_limits";
  check_int_range(op, "device", device);
  int limit = 0;
  check_launch(op, cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin,
                                          static_cast<int>(device)));
  const bool in_range = C >= 1 && C <= cvf::kAttnPoolMaxC && H >= 1 && H <= cvf::kAttnPoolMaxH;
  namespace plan = cvf::attn_pool_plan;
  const int c = static_cast<int>(C), h = static_cast<int>(H);
  return {cvf::kAttnPoolMaxC, cvf::kAttnPoolMaxH,
          in_range ? static_cast<int64_t>(plan::fwd_smem_bytes(c, h)) : 0,
          in_range ? static_cast<int64_t>(plan::bwd_smem_bytes(c, h)) : 0, limit};
}

// ---- LayerNorm with an optional residual add --------------------------------------------------

void check_rows(const char* op, const char* name, const Tensor& t) {
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be [M, C], got shape ", t.sizes());
  check_unit_last_stride(op, name, t);
  check_int_range(op, "M", t.size(0));
  TORCH_CHECK(t.size(1) >= 1 && t.size(1) <= INT_MAX, op, ": ", name,
              " must have a non-empty last dim, got shape ", t.sizes());
}

// The row kernels keep whole rows in shared memory: a width whose row (forward) or four rows
// (backward) need more than the GPU grants a block is refused here, by name.
void check_row_width(const char* op, cvf::DType dtype, int64_t C, bool backward,
                     const at::Device& device) {
  int limit = 0;
  check_launch(op, cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin,
                                          device.index()));
  const size_t need = cvf::row_norm_smem_bytes(dtype, static_cast<int>(C), backward);
  TORCH_CHECK(need <= static_cast<size_t>(limit), op, ": a width C = ", C, " needs ", need,
              " bytes of shared memory per block; this GPU allows ", limit,
              ". Use the triton or torch backend for this width.");
}

std::tuple<Tensor, Tensor, Tensor, Tensor> layer_norm_fwd(
    const Tensor& x, const std::optional<Tensor>& residual, const Tensor& weight,
    const Tensor& bias, double eps, std::optional<at::ScalarType> out_dtype) {
  constexpr const char* op = "crossvit_fast_cuda::layer_norm_fwd";
  const at::Device device = x.device();
  check_device(op, "x", x, device);
  check_device(op, "weight", weight, device);
  check_device(op, "bias", bias, device);
  check_rows(op, "x", x);
  const int64_t M = x.size(0), C = x.size(1);
  const cvf::DType dtype = activation_dtype(op, "x", x);
  const bool has_res = residual.has_value() && residual->defined();
  if (has_res) {
    check_device(op, "residual", *residual, device);
    check_shape(op, "residual", *residual, x.sizes());
    check_same_dtype(op, "residual", *residual, "x", x);
    check_unit_last_stride(op, "residual", *residual);
  }
  check_shape(op, "weight", weight, {C});
  check_shape(op, "bias", bias, {C});
  check_floating(op, "weight", weight);
  check_floating(op, "bias", bias);

  check_row_width(op, dtype, C, false, device);
  const c10::DeviceGuard guard(device);
  const Tensor w = as_f32(weight), b = as_f32(bias);
  const auto f32 = x.options().dtype(at::kFloat);
  const at::ScalarType y_dtype = out_dtype.value_or(x.scalar_type());
  TORCH_CHECK(y_dtype == at::kFloat || y_dtype == at::kHalf || y_dtype == at::kBFloat16, op,
              ": out_dtype must be float32, float16 or bfloat16, got ", y_dtype);
  Tensor y = at::empty({M, C}, x.options().dtype(y_dtype));
  Tensor h = has_res ? at::empty({M, C}, x.options()) : at::empty({0}, x.options());
  Tensor mean = at::empty({M}, f32), rstd = at::empty({M}, f32);
  cvf::LayerNormFwdArgs a{};
  a.dtype = dtype;
  a.out_dtype = activation_dtype(op, "out_dtype", y);
  a.x = x.data_ptr();
  a.x_stride = row_stride(x);
  a.residual = has_res ? residual->data_ptr() : nullptr;
  a.r_stride = has_res ? row_stride(*residual) : 0;
  a.weight = w.data_ptr<float>();
  a.bias = b.data_ptr<float>();
  a.y = y.data_ptr();
  a.h = has_res ? h.data_ptr() : nullptr;
  a.mean = mean.data_ptr<float>();
  a.rstd = rstd.data_ptr<float>();
  a.M = static_cast<int>(M);
  a.C = static_cast<int>(C);
  a.eps = static_cast<float>(eps);
  check_launch(op, cvf::layer_norm_fwd(a, current_stream(device)));
  return {y, h, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor> layer_norm_bwd(const Tensor& dy, const std::optional<Tensor>& dh,
                                                  const Tensor& h, const Tensor& weight,
                                                  const Tensor& mean, const Tensor& rstd) {
  constexpr const char* op = "crossvit_fast_cuda::layer_norm_bwd";
  const at::Device device = h.device();
  check_device(op, "h", h, device);
  check_device(op, "dy", dy, device);
  check_device(op, "weight", weight, device);
  check_device(op, "mean", mean, device);
  check_device(op, "rstd", rstd, device);
  check_rows(op, "h", h);
  const int64_t M = h.size(0), C = h.size(1);
  const cvf::DType dtype = activation_dtype(op, "h", h);
  check_shape(op, "dy", dy, h.sizes());
  check_same_dtype(op, "dy", dy, "h", h);
  check_unit_last_stride(op, "dy", dy);
  const bool has_dh = dh.has_value() && dh->defined();
  if (has_dh) {
    check_device(op, "dh", *dh, device);
    check_shape(op, "dh", *dh, h.sizes());
    check_same_dtype(op, "dh", *dh, "h", h);
    check_unit_last_stride(op, "dh", *dh);
  }
  check_shape(op, "weight", weight, {C});
  check_shape(op, "mean", mean, {M});
  check_shape(op, "rstd", rstd, {M});
  check_floating(op, "weight", weight);
  check_floating(op, "mean", mean);
  check_floating(op, "rstd", rstd);

  check_row_width(op, dtype, C, true, device);
  const c10::DeviceGuard guard(device);
  const Tensor w = as_f32(weight), mean32 = as_f32(mean), rstd32 = as_f32(rstd);
  const auto f32 = h.options().dtype(at::kFloat);
  Tensor dx = at::empty({M, C}, h.options());
  const int partials = cvf::layer_norm_bwd_partials(static_cast<int>(M), static_cast<int>(C));
  Tensor dw = at::empty({partials, C}, f32), db = at::empty({partials, C}, f32);
  cvf::LayerNormBwdArgs a{};
  a.dtype = dtype;
  a.dy = dy.data_ptr();
  a.dy_stride = row_stride(dy);
  a.dh = has_dh ? dh->data_ptr() : nullptr;
  a.dh_stride = has_dh ? row_stride(*dh) : 0;
  a.h = h.data_ptr();
  a.h_stride = row_stride(h);
  a.weight = w.data_ptr<float>();
  a.mean = mean32.data_ptr<float>();
  a.rstd = rstd32.data_ptr<float>();
  a.dx = dx.data_ptr();
  a.M = static_cast<int>(M);
  a.C = static_cast<int>(C);
  check_launch(op, cvf::layer_norm_bwd(a, dw.data_ptr<float>(), db.data_ptr<float>(), partials,
                                       current_stream(device)));
  return {dx, dw.sum(0), db.sum(0)};
}

// ---- CLS projection: LayerNorm -> GELU -> Linear ----------------------------------------------

void check_proj_params(const char* op, const at::Device& device, int64_t Cin,
                       const Tensor& ln_weight, const Tensor& ln_bias, const Tensor& weight) {
  check_device(op, "ln_weight", ln_weight, device);
  check_device(op, "ln_bias", ln_bias, device);
  check_device(op, "weight", weight, device);
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == Cin, op, ": weight must be [C_out, ", Cin,
              "] to match x, got shape ", weight.sizes());
  check_shape(op, "ln_weight", ln_weight, {Cin});
  check_shape(op, "ln_bias", ln_bias, {Cin});
  check_floating(op, "ln_weight", ln_weight);
  check_floating(op, "ln_bias", ln_bias);
  check_floating(op, "weight", weight);
}

std::tuple<Tensor, Tensor, Tensor> cls_proj_fwd(const Tensor& x, const Tensor& ln_weight,
                                                const Tensor& ln_bias, const Tensor& weight,
                                                const Tensor& bias, double eps) {
  constexpr const char* op = "crossvit_fast_cuda::cls_proj_fwd";
  const at::Device device = x.device();
  check_device(op, "x", x, device);
  check_rows(op, "x", x);
  const int64_t M = x.size(0), Cin = x.size(1);
  const cvf::DType dtype = activation_dtype(op, "x", x);
  check_proj_params(op, device, Cin, ln_weight, ln_bias, weight);
  check_device(op, "bias", bias, device);
  check_shape(op, "bias", bias, {weight.size(0)});
  check_floating(op, "bias", bias);

  check_row_width(op, dtype, Cin, false, device);
  const c10::DeviceGuard guard(device);
  const Tensor lnw = as_f32(ln_weight), lnb = as_f32(ln_bias);
  const auto f32 = x.options().dtype(at::kFloat);
  Tensor act = at::empty({M, Cin}, f32), mean = at::empty({M}, f32), rstd = at::empty({M}, f32);
  cvf::ClsProjFwdArgs a{};
  a.dtype = dtype;
  a.x = x.data_ptr();
  a.x_stride = row_stride(x);
  a.ln_weight = lnw.data_ptr<float>();
  a.ln_bias = lnb.data_ptr<float>();
  a.act = act.data_ptr<float>();
  a.mean = mean.data_ptr<float>();
  a.rstd = rstd.data_ptr<float>();
  a.M = static_cast<int>(M);
  a.C = static_cast<int>(Cin);
  a.eps = static_cast<float>(eps);
  check_launch(op, cvf::cls_proj_ln_gelu_fwd(a, current_stream(device)));
  // The Linear in fp32 (cuBLAS): the activation never rounds to the activation dtype.
  const Tensor y = at::addmm(as_f32(bias), act, as_f32(weight).t());
  return {y.to(x.scalar_type()), mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> cls_proj_bwd(
    const Tensor& dy, const Tensor& x, const Tensor& ln_weight, const Tensor& ln_bias,
    const Tensor& weight, const Tensor& mean, const Tensor& rstd) {
  constexpr const char* op = "crossvit_fast_cuda::cls_proj_bwd";
  const at::Device device = x.device();
  check_device(op, "x", x, device);
  check_rows(op, "x", x);
  const int64_t M = x.size(0), Cin = x.size(1);
  const cvf::DType dtype = activation_dtype(op, "x", x);
  check_proj_params(op, device, Cin, ln_weight, ln_bias, weight);
  check_device(op, "dy", dy, device);
  check_shape(op, "dy", dy, {M, weight.size(0)});
  check_floating(op, "dy", dy);
  check_device(op, "mean", mean, device);
  check_device(op, "rstd", rstd, device);
  check_shape(op, "mean", mean, {M});
  check_shape(op, "rstd", rstd, {M});
  check_floating(op, "mean", mean);
  check_floating(op, "rstd", rstd);

  check_row_width(op, dtype, Cin, true, device);
  const c10::DeviceGuard guard(device);
  const Tensor lnw = as_f32(ln_weight), lnb = as_f32(ln_bias), w = as_f32(weight);
  const Tensor mean32 = as_f32(mean), rstd32 = as_f32(rstd), dy32 = as_f32(dy);
  const auto f32 = x.options().dtype(at::kFloat);
  const Tensor dact = at::mm(dy32, w);  // gradient reaching GELU's output, [M, Cin]
  Tensor dx = at::empty({M, Cin}, x.options()), act = at::empty({M, Cin}, f32);
  const int partials = cvf::layer_norm_bwd_partials(static_cast<int>(M), static_cast<int>(Cin));
  Tensor dlnw = at::empty({partials, Cin}, f32), dlnb = at::empty({partials, Cin}, f32);
  cvf::ClsProjBwdArgs a{};
  a.dtype = dtype;
  a.dact = dact.data_ptr<float>();
  a.x = x.data_ptr();
  a.x_stride = row_stride(x);
  a.ln_weight = lnw.data_ptr<float>();
  a.ln_bias = lnb.data_ptr<float>();
  a.mean = mean32.data_ptr<float>();
  a.rstd = rstd32.data_ptr<float>();
  a.dx = dx.data_ptr();
  a.act = act.data_ptr<float>();
  a.M = static_cast<int>(M);
  a.C = static_cast<int>(Cin);
  check_launch(op, cvf::cls_proj_ln_gelu_bwd(a, dlnw.data_ptr<float>(), dlnb.data_ptr<float>(),
                                             partials, current_stream(device)));
  return {dx, dlnw.sum(0), dlnb.sum(0), at::mm(dy32.t(), act), dy32.sum(0)};
}

}  // namespace

TORCH_LIBRARY(crossvit_fast_cuda, m) {
  m.def("attn_pool_fwd(Tensor x0, Tensor patches, Tensor kt, Tensor gamma, Tensor beta, "
        "float eps) -> (Tensor, Tensor)");
  m.def("attn_pool_bwd(Tensor dz, Tensor x0, Tensor patches, Tensor kt, Tensor gamma, "
        "Tensor beta, Tensor z, Tensor lse, float eps) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("attn_weights(Tensor x0, Tensor patches, Tensor kt, Tensor gamma, Tensor beta, "
        "Tensor lse, float eps) -> Tensor");
  m.def("layer_norm_fwd(Tensor x, Tensor? residual, Tensor weight, Tensor bias, float eps, "
        "ScalarType? out_dtype=None) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("layer_norm_bwd(Tensor dy, Tensor? dh, Tensor h, Tensor weight, Tensor mean, "
        "Tensor rstd) -> (Tensor, Tensor, Tensor)");
  m.def("cls_proj_fwd(Tensor x, Tensor ln_weight, Tensor ln_bias, Tensor weight, Tensor bias, "
        "float eps) -> (Tensor, Tensor, Tensor)");
  m.def("cls_proj_bwd(Tensor dy, Tensor x, Tensor ln_weight, Tensor ln_bias, Tensor weight, "
        "Tensor mean, Tensor rstd) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("attn_pool_limits(int C, int H, int device) -> int[]", &attn_pool_limits);
}

// CUDA tensors run the kernels. The same functions serve CPU so that a call with CPU tensors
// fails on the device check with a message naming the argument, not in the dispatcher.
#define CROSSVIT_FAST_IMPLS(m)                   \
  m.impl("attn_pool_fwd", &attn_pool_fwd);       \
  m.impl("attn_pool_bwd", &attn_pool_bwd);       \
  m.impl("attn_weights", &attn_weights);         \
  m.impl("layer_norm_fwd", &layer_norm_fwd);     \
  m.impl("layer_norm_bwd", &layer_norm_bwd);     \
  m.impl("cls_proj_fwd", &cls_proj_fwd);         \
  m.impl("cls_proj_bwd", &cls_proj_bwd)

TORCH_LIBRARY_IMPL(crossvit_fast_cuda, CUDA, m) { CROSSVIT_FAST_IMPLS(m); }
TORCH_LIBRARY_IMPL(crossvit_fast_cuda, CPU, m) { CROSSVIT_FAST_IMPLS(m); }
