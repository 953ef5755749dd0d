// The elementwise loss maths of docs/design.md §1, written once for the CPU row kernels
// (csrc/cpu/uss_rows.h, csrc/cpu/softmax_rows.h) and the CUDA epilogue kernels (csrc/cuda/*.cu).
//
// The native backend computes a chunk of raw dot products x_i · r_j with one ATen GEMM and
// then runs ONE epilogue pass over the chunk; every function the epilogues call is here, as
// an inline UF_HOST_DEVICE function, so the CPU tests exercise the arithmetic the GPU runs.
//
//   cos_ij = (x_i · r_j) · inv_x_i · inv_r_j,   inv_t = 1 / max(||t||, eps)  (the options' eps)
//
// USS (§1.1), per reference pair:
//   z⁺ = b_j − s·(cos − m)  (j ∈ P_i),         z⁻ = s·cos − b_j  (j ∈ N_i)
//   pairs: loss softplus(z) (z clamped to [−s, s] by the official clamp),
//          ∂/∂cos = ∓s·σ(z)  (0 where the clamp is active)
//   lse:   A = lse_P z⁺, B = lse_N z⁻; ∂/∂cos = ∓s·e^{z − A|B}·σ(A|B)
// Margin softmax (§1.2), per class column:
//   z = s·clamp(cos, −1, 1) (non-target),  z_iy = s·f(clamp(cos_iy))  (target)
//   ∂/∂cos = s·p (non-target), s·(p − 1)·f'(c) (target),  0 where the [−1, 1] clamp is active
//            (NaN at a NaN cosine: it reaches ∂W of every column the row meets)
//
// Transcendentals: uf_exp / uf_log1p. Device code and float64 use the C library; float on
// the host uses the branch-free polynomial versions below (1–2 ulp), which the compiler
// vectorises inside the CPU row loops (libm's expf is a scalar call).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "common.h"  // UF_HOST_DEVICE
#include "options.h"

namespace unitsface {
namespace epi {

// The running max of an empty set: finite, so exp(m_old − m_new) stays defined (the Triton
// kernels use the same value).
constexpr double kNegBig = -1.0e30;

// ------------------------------------------------------------------------ host float math
#if !defined(__CUDA_ARCH__)
inline float bits_as_float(int32_t b) {
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
}

// e^x for float: x = n·ln2 + r, |r| ≤ ln2/2, e^r by Cephes' degree-6 polynomial, 2^n built
// in two halves so that denormal and near-overflow results are right. NaN stays NaN,
// −inf → 0, +inf → inf.
inline float fast_expf(float x) {
  const float xc = x < -104.0f ? -104.0f : (x > 88.8f ? 88.8f : x);
  // round(xc / ln2) with the 1.5·2^23 trick (exact, no libm call, vectorises)
  const float shifted = xc * 1.44269504088896341f + 12582912.0f;
  const float n = shifted - 12582912.0f;
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const int32_t ni = static_cast<int32_t>(n);
  const int32_t n1 = ni >> 1;
  const int32_t n2 = ni - n1;
  float out = y * bits_as_float((n1 + 127) << 23) * bits_as_float((n2 + 127) << 23);
  out = x > 88.72283905f ? std::numeric_limits<float>::infinity() : out;
  out = x < -103.97208f ? 0.0f : out;
  return x != x ? x : out;
}

// log(1 + u) for float u ≥ 0 (softplus calls it with u = e^{−|z|} ∈ (0, 1]): log(w) of
// w = 1 + u by Cephes' logf polynomial, times u / (w − 1) to undo the rounding of w
// (Goldberg's trick), so tiny u keep their full relative precision.
inline float fast_log1pf(float u) {
  const float w = 1.0f + u;
  const bool big = w > 1.41421356f;
  const float mant = big ? 0.5f * w : w;  // in [0.707, 1.414]
  const float e = big ? 1.0f : 0.0f;
  const float f = mant - 1.0f;
  const float z = f * f;
  float y = 7.0376836292e-2f;
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z;
  y = y + e * -2.12194440e-4f;
  y = y - 0.5f * z;
  const float logw = f + y + e * 0.693359375f;
  const float den = w - 1.0f;
  // (a division by a safe denominator and a select: no branch, so the loop vectorises)
  const float ratio = u / (den == 0.0f ? 1.0f : den);
  return den == 0.0f ? u : logw * ratio;
}
#endif  // !__CUDA_ARCH__

// ------------------------------------------------------------------------ dispatch
template <typename T>
UF_HOST_DEVICE T uf_exp(T x) {
  return std::exp(x);
}
template <typename T>
UF_HOST_DEVICE T uf_log1p(T x) {
  return std::log1p(x);
}

#if defined(__CUDA_ARCH__)
template <>
UF_HOST_DEVICE float uf_exp<float>(float x) { return ::expf(x); }
template <>
UF_HOST_DEVICE float uf_log1p<float>(float x) { return ::log1pf(x); }
#else
template <>
UF_HOST_DEVICE float uf_exp<float>(float x) { return fast_expf(x); }
template <>
UF_HOST_DEVICE float uf_log1p<float>(float x) { return fast_log1pf(x); }
#endif

// ------------------------------------------------------------------------ small helpers
// Comparisons are written so that NaN passes through the clamps (NaN is never hidden), and
// conditions combine with & / | rather than && / || (no branches: the CPU loops vectorise).
template <typename T>
UF_HOST_DEVICE T clamp_sym(T z, T s) {
  return z < -s ? -s : (z > s ? s : z);
}
template <typename T>
UF_HOST_DEVICE T clamp_unit(T c) {
  return c < T(-1) ? T(-1) : (c > T(1) ? T(1) : c);
}
// where the [−1, 1] clamp passes its gradient: not where it is active, and at a NaN (whose
// gradient, NaN, must reach ∂W of every column the row meets, reference.clamp_sym)
template <typename T>
UF_HOST_DEVICE bool clamp_unit_inactive(T c) {
  return !((c < T(-1)) | (c > T(1)));
}
template <typename T>
UF_HOST_DEVICE T inv_norm(T norm, T eps) {
  return T(1) / (norm < eps ? eps : norm);
}
// softplus(z) = log(1 + e^z) = max(z, 0) + log1p(e^{−|z|}), exact for every z
template <typename T>
UF_HOST_DEVICE T softplus(T z) {
  const T a = z < T(0) ? -z : z;
  return (z > T(0) ? z : T(0)) + uf_log1p<T>(uf_exp<T>(-a));
}
template <typename T>
UF_HOST_DEVICE T sigmoid(T z) {
  return T(1) / (T(1) + uf_exp<T>(-z));
}
// softplus(z) and σ(z) from one exponential u = e^{−|z|}: σ = 1/(1+u) (z ≥ 0), u/(1+u) (z < 0)
template <typename T>
UF_HOST_DEVICE void softplus_sigmoid(T z, T& sp, T& sig) {
  const T a = z < T(0) ? -z : z;
  const T u = uf_exp<T>(-a);
  sp = (z > T(0) ? z : T(0)) + uf_log1p<T>(u);
  const T r = T(1) / (T(1) + u);
  sig = z < T(0) ? u * r : r;
}

// ------------------------------------------------------------------------ online logsumexp
// Push one element into a running (max, Σ e^{z − max}) pair (one exp per element).
template <typename T>
UF_HOST_DEVICE void lse_push(T& m, T& s, T z) {
  if (z > m) {
    s = s * uf_exp<T>(m - z) + T(1);
    m = z;
  } else {
    s += uf_exp<T>(z - m);  // NaN z lands here and makes s NaN
  }
}
// Merge two running pairs (m, s) ← (m, s) ⊕ (m2, s2).
template <typename T>
UF_HOST_DEVICE void lse_merge(T& m, T& s, T m2, T s2) {
  const T mn = m2 > m ? m2 : m;
  s = s * uf_exp<T>(m - mn) + s2 * uf_exp<T>(m2 - mn);
  m = mn;
}

// ------------------------------------------------------------------------ USS (§1.1)
template <typename T>
struct UssParams {
  T scale;
  T margin;
  bool lse;    // the log-sum-exp form (else "pairs")
  bool clamp;  // official clamp of every softplus argument to [−s, s]
};

template <typename T>
inline UssParams<T> uss_params(const UssOptions& o) {
  return {static_cast<T>(o.scale), static_cast<T>(o.margin), o.lse, o.clamp};
}

// z⁺ = b − s(cos − m) for a positive pair, z⁻ = s·cos − b for a negative one
template <typename T>
UF_HOST_DEVICE T uss_z(T cos, T b, bool pos, const UssParams<T>& p) {
  return pos ? b - p.scale * (cos - p.margin) : p.scale * cos - b;
}
// "pairs": the pair's loss term
template <typename T>
UF_HOST_DEVICE T uss_pair_loss(T z, const UssParams<T>& p) {
  return softplus<T>(p.clamp ? clamp_sym<T>(z, p.scale) : z);
}
// "pairs": ∂(term)/∂cos = −s·σ(z⁺) | s·σ(z⁻), zero where the official clamp is active
template <typename T>
UF_HOST_DEVICE T uss_pair_grad(T z, bool pos, const UssParams<T>& p) {
  const T g = (pos ? -p.scale : p.scale) * sigmoid<T>(z);
  return (p.clamp & ((z < -p.scale) | (z > p.scale))) ? T(0) : g;
}
// "pairs": the pair's loss term and ∂(term)/∂cos from one exponential (the fused forward).
// Where the clamp is active its gradient is 0, and where it is not clamp(z) = z, so σ of the
// clamped argument is the σ(z) that the gradient needs.
template <typename T>
UF_HOST_DEVICE void uss_pair_loss_grad(T z, bool pos, const UssParams<T>& p, T& loss, T& grad) {
  T sig;
  softplus_sigmoid<T>(p.clamp ? clamp_sym<T>(z, p.scale) : z, loss, sig);
  const T g = (pos ? -p.scale : p.scale) * sig;
  grad = (p.clamp & ((z < -p.scale) | (z > p.scale))) ? T(0) : g;
}
// "lse": ∂L/∂cos = −s·e^{z⁺ − A}·σA | s·e^{z⁻ − B}·σB with stat = A|B and f = σ(stat)
// (f is zero where the clamp on the statistic is active)
template <typename T>
UF_HOST_DEVICE T uss_lse_grad(T z, bool pos, T stat, T f, const UssParams<T>& p) {
  return (pos ? -p.scale : p.scale) * uf_exp<T>(z - stat) * f;
}
// ∂L/∂cos of one member of P (pos) or N, either form
template <typename T>
UF_HOST_DEVICE T uss_grad(T z, bool pos, T a, T fa, T bn, T fb, const UssParams<T>& p) {
  return p.lse ? uss_lse_grad<T>(z, pos, pos ? a : bn, pos ? fa : fb, p)
               : uss_pair_grad<T>(z, pos, p);
}

// ------------------------------------------------------------------------ margin softmax (§1.2)
template <typename T>
struct SoftmaxParams {
  T scale;
  T m3;                   // additive cosine margin (CosFace)
  T cos_m2;               // cos m2 (ArcFace angular margin)
  T sin_m2;
  T m2_sin_m2;            // m2·sin m2, insightface's fallback
  bool arc;               // m2 ≠ 0
  bool straight_through;  // arcface_grad="straight_through"
  bool easy;              // easy_margin
};

template <typename T>
inline SoftmaxParams<T> softmax_params(const UnitsfaceOptions& o) {
  const double m2 = o.margin_arc;
  return {static_cast<T>(o.scale),
          static_cast<T>(o.margin_cos),
          static_cast<T>(std::cos(m2)),
          static_cast<T>(std::sin(m2)),
          static_cast<T>(m2 * std::sin(m2)),
          m2 != 0.0,
          o.arcface_straight_through,
          o.easy_margin};
}

// sin θ = sqrt(max(1 − c², floor)): floor 1e-12 for the exact gradient (f' stays finite at
// c = ±1), 0 under straight-through (whose f' does not involve sin θ).
template <typename T>
UF_HOST_DEVICE T sin_theta(T c, const SoftmaxParams<T>& p) {
  const T floor = p.straight_through ? T(0) : T(1e-12);
  const T om = T(1) - c * c;
  return std::sqrt(om > floor ? om : floor);
}

// f(c) of the target class, docs/design.md §1.2 (reference.target_logit):
//   f = cos(θ + m2) − m3 = c·cos m2 − sin θ·sin m2 − m3;
//   exact: insightface's fallback c − m2·sin m2 − m3 where θ + m2 > π (c ≤ −cos m2);
//   straight-through or easy margin: no fallback;
//   easy margin: f = c where c ≤ 0 (no margin there, the CosFace m3 included).
template <typename T>
UF_HOST_DEVICE T target_logit(T c, const SoftmaxParams<T>& p) {
  T f = c - p.m3;
  if (p.arc) {
    const T margin = c * p.cos_m2 - sin_theta<T>(c, p) * p.sin_m2;
    const bool fallback = !(p.straight_through | p.easy) & !(c > -p.cos_m2);
    f = (fallback ? c - p.m2_sin_m2 : margin) - p.m3;
  }
  return (p.easy & !(c > T(0))) ? c : f;
}

// f'(c), the factor of the target's ∂L/∂cos = s·(p − 1)·f'(c): 1 under straight-through
// (insightface computes the margin under no_grad); else the derivative of the branch of f
// that applies: cos m2 + sin m2·c / sin θ on the margin (cos m2 where 1 − c² ≤ 1e-12, the
// floor of sin θ), 1 on the fallback and on the easy margin's c ≤ 0.
template <typename T>
UF_HOST_DEVICE T target_slope(T c, const SoftmaxParams<T>& p) {
  if (p.straight_through | !p.arc) return T(1);
  const T om = T(1) - c * c;
  const T slope = om > T(1e-12) ? p.cos_m2 + p.sin_m2 * c / sin_theta<T>(c, p) : p.cos_m2;
  const bool on_margin = p.easy ? c > T(0) : c > -p.cos_m2;
  return on_margin ? slope : T(1);
}
// the logit of a raw cosine: s·clamp(cos) (non-target) or s·f(clamp(cos)) (target)
template <typename T>
UF_HOST_DEVICE T softmax_z(T cos_raw, bool target, const SoftmaxParams<T>& p) {
  const T c = clamp_unit<T>(cos_raw);
  return p.scale * (target ? target_logit<T>(c, p) : c);
}
// ∂L_i/∂cos_ic of a non-target class given the row's final lse: s·p (zero where the
// [−1, 1] clamp is active; NaN at a NaN cosine). The CPU loops call it for every column but the target.
template <typename T>
UF_HOST_DEVICE T softmax_grad_other(T cos_raw, T z, T lse, T scale) {
  const T g = scale * uf_exp<T>(z - lse);
  return clamp_unit_inactive<T>(cos_raw) ? g : T(0);
}
// κ = ∂(z_iy / s)/∂cos_raw of the target: f'(clamp(cos)) where the [−1, 1] clamp is
// inactive (a NaN cosine included), 0 where it is active
template <typename T>
UF_HOST_DEVICE T target_kappa(T cos_raw, const SoftmaxParams<T>& p) {
  const T slope = target_slope<T>(clamp_unit<T>(cos_raw), p);
  return clamp_unit_inactive<T>(cos_raw) ? slope : T(0);
}
// ∂L_i/∂cos_ic given the row's final lse: s·p (non-target), s·(p − 1)·κ (target)
template <typename T>
UF_HOST_DEVICE T softmax_grad(T cos_raw, T z, bool target, T lse, const SoftmaxParams<T>& p) {
  if (!target) return softmax_grad_other<T>(cos_raw, z, lse, p.scale);
  return p.scale * (uf_exp<T>(z - lse) - T(1)) * target_kappa<T>(cos_raw, p);
}

}  // namespace epi
}  // namespace unitsface
