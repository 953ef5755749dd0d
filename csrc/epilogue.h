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
// The margin family (§1.5), per class: c = the max of its K sub-centre cosines, clamped to
//   ±lim; z = s·n(c) (n: curricular, inter-class filter) or s·f(c; a_i, d_i) (per-row margins,
//   no fallback, angle clip); ∂/∂c = s·p·n'(c) | s·(p − 1)·f'(c) (family_z, family_kappa).
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
#include "stats.h"  // margin_row

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
// where the clamp to [−lim, lim] passes its gradient: not where it is active, and at a NaN
// (whose gradient, NaN, must reach ∂W of every column the row meets, reference.clamp_sym)
template <typename T>
UF_HOST_DEVICE bool clamp_inactive(T c, T lim) {
  return !((c < -lim) | (c > lim));
}
template <typename T>
UF_HOST_DEVICE bool clamp_unit_inactive(T c) {
  return clamp_inactive<T>(c, T(1));
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
  T m3;                   // additive cosine margin d (CosFace; a row's d_i under row_margins)
  T cos_m2;               // cos a (ArcFace angular margin a = m2, or a row's a_i)
  T sin_m2;
  T m2_sin_m2;            // a·sin a, insightface's fallback
  bool arc;               // a ≠ 0 (always under row_margins, as the reference's tensor a)
  bool straight_through;  // arcface_grad="straight_through"
  bool easy;              // easy_margin
  // The margin family (docs/design.md §1.5); CosFace/ArcFace: the defaults of softmax_params.
  bool row_margins;       // a, d per row (margin_rows; row_terms)
  bool fallback;          // insightface's fallback applies: exact ArcFace only (not with
                          // straight-through, easy margin, no_fallback or angle_clip)
  T lim;                  // every cosine clamped to [−lim, lim] (angle_clip: 1 − ε)
  bool angle_clip;        // the target's θ + a clipped to [ε, π − ε] ...
  T clip_top, clip_bot;   // ... which, in cosine space, is c > clip_top or c < clip_bot
  T cos_eps;              // cos ε, the clipped target's value (±)
  bool curricular;        // negatives above a row's HARD become c·(T + c)
  bool filter;            // τ > 0: negatives above τ get logit 0 and no gradient
  T tau;
};

// The angle clip of θ + a to [ε, π − ε] in cosine space (θ = arccos c, decreasing in c):
// θ + a < ε ⇔ ε − a > 0 and c > cos(ε − a); θ + a > π − ε ⇔ a > −ε and c < −cos(ε + a). A
// threshold outside [−1, 1] (±2) makes a side never (or always) active.
template <typename T>
UF_HOST_DEVICE void set_angle_clip(SoftmaxParams<T>& p, T a) {
  const T eps = static_cast<T>(kAngleEps), pi = static_cast<T>(3.14159265358979323846);
  const T lo = eps - a, hi = eps + a;  // θ < lo clips up; θ > π − hi clips down
  p.clip_top = lo <= T(0) ? T(2) : (lo >= pi ? T(-2) : std::cos(lo));
  p.clip_bot = hi <= T(0) ? T(-2) : (hi >= pi ? T(2) : -std::cos(hi));
}

// The target's margins a, d (m2, m3; a row's a_i, d_i under row_margins).
template <typename T>
UF_HOST_DEVICE void set_target_margins(SoftmaxParams<T>& p, T a, T d, bool arc) {
  p.m3 = d;
  p.cos_m2 = std::cos(a);
  p.sin_m2 = std::sin(a);
  p.m2_sin_m2 = a * p.sin_m2;
  p.arc = arc;
  if (p.angle_clip) set_angle_clip<T>(p, a);
}

template <typename T>
inline SoftmaxParams<T> softmax_params(const UnitsfaceOptions& o) {
  SoftmaxParams<T> p{};
  p.scale = static_cast<T>(o.scale);
  p.straight_through = o.arcface_straight_through;
  p.easy = o.easy_margin;
  p.row_margins = o.row_margins;
  p.fallback = !(o.arcface_straight_through || o.easy_margin || o.no_fallback || o.angle_clip);
  p.lim = static_cast<T>(o.cos_limit());
  p.angle_clip = o.angle_clip;
  p.cos_eps = static_cast<T>(std::cos(kAngleEps));
  p.curricular = o.curricular;
  p.filter = o.interclass_threshold > 0.0;
  p.tau = static_cast<T>(o.interclass_threshold);
  // (m2's cos and sin in double, then rounded: the same constants as before the family)
  const double m2 = o.margin_arc;
  set_target_margins<T>(p, static_cast<T>(m2), static_cast<T>(o.margin_cos), m2 != 0.0);
  p.cos_m2 = static_cast<T>(std::cos(m2));
  p.sin_m2 = static_cast<T>(std::sin(m2));
  p.m2_sin_m2 = static_cast<T>(m2 * std::sin(m2));
  return p;
}

// The per-row inputs of the margin family (margin_rows [4, B], csrc/stats.h margin_row):
// the row's target margins (row_margins) into its params, its curricular HARD and T.
template <typename T>
struct RowTerms {
  SoftmaxParams<T> p;
  T hard, t;
};
template <typename T>
UF_HOST_DEVICE RowTerms<T> row_terms(const SoftmaxParams<T>& p, const T* margin_rows, int64_t B,
                                     int64_t i) {
  RowTerms<T> r{p, T(0), T(0)};
  if (p.row_margins) {
    set_target_margins<T>(r.p, margin_rows[margin_row::kA * B + i],
                          margin_rows[margin_row::kD * B + i], true);
  }
  if (p.curricular) {
    r.hard = margin_rows[margin_row::kHard * B + i];
    r.t = margin_rows[margin_row::kT * B + i];
  }
  return r;
}

// Folds sub-centre r's cosine v into its class's running maximum (best, arg): the first
// arg-max wins a tie, and a NaN is the maximum (the first NaN), so that NaN propagates.
template <typename T>
UF_HOST_DEVICE void sub_centre_max(T& best, int32_t& arg, T v, int32_t r) {
  const bool take = (v > best) | ((v != v) & (best == best));
  best = take ? v : best;
  arg = take ? r : arg;
}

// sin θ = sqrt(max(1 − c², floor)): floor 1e-12 for the exact gradient (f' stays finite at
// c = ±1), 0 under straight-through (whose f' does not involve sin θ).
template <typename T>
UF_HOST_DEVICE T sin_theta(T c, const SoftmaxParams<T>& p) {
  const T floor = p.straight_through ? T(0) : T(1e-12);
  const T om = T(1) - c * c;
  return std::sqrt(om > floor ? om : floor);
}

// Whether the angle clip is active at c (angle_clip).
template <typename T>
UF_HOST_DEVICE bool angle_clipped(T c, const SoftmaxParams<T>& p) {
  return p.angle_clip & ((c > p.clip_top) | (c < p.clip_bot));
}

// f(c) of the target class, docs/design.md §1.2, §1.5 (reference.target_logit):
//   f = cos(θ + a) − d = c·cos a − sin θ·sin a − d;
//   exact: insightface's fallback c − a·sin a − d where θ + a > π (c ≤ −cos a);
//   straight-through, easy margin, no_fallback, angle_clip: no fallback;
//   angle_clip: cos(clip(θ + a, ε, π − ε)) − d, i.e. ±cos ε − d where the clip is active;
//   easy margin: f = c where c ≤ 0 (no margin there, the CosFace d included).
template <typename T>
UF_HOST_DEVICE T target_logit(T c, const SoftmaxParams<T>& p) {
  T f = c - p.m3;
  if (p.arc) {
    const T margin = c * p.cos_m2 - sin_theta<T>(c, p) * p.sin_m2;
    const bool fallback = p.fallback & !(c > -p.cos_m2);
    T g = fallback ? c - p.m2_sin_m2 : margin;
    if (p.angle_clip) g = c > p.clip_top ? p.cos_eps : (c < p.clip_bot ? -p.cos_eps : g);
    f = g - p.m3;
  }
  return (p.easy & !(c > T(0))) ? c : f;
}

// f'(c), the factor of the target's ∂L/∂cos = s·(p − 1)·f'(c): 1 under straight-through
// (insightface computes the margin under no_grad); else the derivative of the branch of f
// that applies: cos a + sin a·c / sin θ on the margin (cos a where 1 − c² ≤ 1e-12, the
// floor of sin θ), 0 where the angle clip is active, 1 on the fallback and on the easy
// margin's c ≤ 0.
template <typename T>
UF_HOST_DEVICE T target_slope(T c, const SoftmaxParams<T>& p) {
  if (p.straight_through | !p.arc) return T(1);
  const T om = T(1) - c * c;
  const T slope = om > T(1e-12) ? p.cos_m2 + p.sin_m2 * c / sin_theta<T>(c, p) : p.cos_m2;
  const bool on_margin = p.easy ? c > T(0) : (!p.fallback | (c > -p.cos_m2));
  return on_margin ? (angle_clipped<T>(c, p) ? T(0) : slope) : T(1);
}

// n(c) of a negative class (reference.negative_cosines): c·(T + c) where curricular and
// c > HARD, else c; then 0 where τ > 0 and c > τ.
template <typename T>
UF_HOST_DEVICE T negative_logit(T c, T hard, T t, const SoftmaxParams<T>& p) {
  const T n = (p.curricular & (c > hard)) ? c * (t + c) : c;
  return (p.filter & (c > p.tau)) ? T(0) : n;
}
// n'(c): T + 2c on a curricular hard negative, 1 on the others, 0 where the filter is active
template <typename T>
UF_HOST_DEVICE T negative_slope(T c, T hard, T t, const SoftmaxParams<T>& p) {
  const T d = (p.curricular & (c > hard)) ? t + T(2) * c : T(1);
  return (p.filter & (c > p.tau)) ? T(0) : d;
}

// the logit of a raw cosine: s·clamp(cos) (non-target) or s·f(clamp(cos)) (target)
template <typename T>
UF_HOST_DEVICE T softmax_z(T cos_raw, bool target, const SoftmaxParams<T>& p) {
  const T c = clamp_unit<T>(cos_raw);
  return p.scale * (target ? target_logit<T>(c, p) : c);
}
// ∂L_i/∂cos_ic of a non-target class given the row's final lse: s·p (zero where the
// [−1, 1] clamp is active; NaN at a NaN cosine). The CPU loops call it for every column but
// the target.
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

// The margin family's logit and κ of a class cosine c_raw (its sub-centres' maximum, before
// the clamp to ±lim), with the row's terms r: z = s·f(clamp c) (target) or s·n(clamp c);
// κ = ∂(z/s)/∂c_raw = f' | n' inside the clamp, 0 outside. ∂L_i/∂c = s·(p − [target])·κ.
template <typename T>
UF_HOST_DEVICE T family_z(T cos_raw, bool target, const RowTerms<T>& r) {
  const T c = clamp_sym<T>(cos_raw, r.p.lim);
  return r.p.scale * (target ? target_logit<T>(c, r.p) : negative_logit<T>(c, r.hard, r.t, r.p));
}
template <typename T>
UF_HOST_DEVICE T family_kappa(T cos_raw, bool target, const RowTerms<T>& r) {
  const T c = clamp_sym<T>(cos_raw, r.p.lim);
  const T slope = target ? target_slope<T>(c, r.p) : negative_slope<T>(c, r.hard, r.t, r.p);
  return clamp_inactive<T>(cos_raw, r.p.lim) ? slope : T(0);
}
// ∂L_i/∂c of a class given the row's final lse: s·(p − [target])·κ
template <typename T>
UF_HOST_DEVICE T family_grad(T cos_raw, bool target, T lse, const RowTerms<T>& r) {
  const T p = uf_exp<T>(family_z<T>(cos_raw, target, r) - lse);
  return r.p.scale * (target ? p - T(1) : p) * family_kappa<T>(cos_raw, target, r);
}

}  // namespace epi
}  // namespace unitsface
