// The scalar settings of the two op families, as the ops receive them: one `float[] options`
// argument packed by unitsface_kernels/options.py (UssOptions.pack / UnitsfaceOptions.pack).
// Each struct below lists its fields once more in its field table, fields(): (the Python
// dataclass field's name, the member), in the dataclasses' order; unpack() reads the packed
// values through that table (booleans packed as 0.0 / 1.0) and _C.option_fields() hands its
// names to the tests, which compare them with the dataclasses' fields. A new setting is a new
// field in both places and nothing else changes in any op signature.
#pragma once

#include <cstddef>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

namespace unitsface {

// AdaFace's ε (options.ANGLE_EPS): the cosines' clamp to ±(1 − ε) and the clip of θ + a to
// [ε, π − ε] under angle_clip.
constexpr double kAngleEps = 1e-3;

// One entry of a field table: the packed field's name and the member it is read into.
template <typename S, typename M>
struct Field {
  const char* name;
  M S::*member;
};
template <typename S, typename M>
constexpr Field<S, M> field(const char* name, M S::*member) {
  return {name, member};
}

namespace options_detail {

// v[i] into the field: a double as it is, a bool from exactly 0.0 or 1.0 (anything else means
// the packing went wrong)
template <typename S, typename M>
void read(S& out, const Field<S, M>& f, const char* what, double v) {
  if constexpr (std::is_same_v<M, bool>) {
    TORCH_CHECK_VALUE(v == 0.0 || v == 1.0, what, ".", f.name,
                      " is a flag and must be packed as 0.0 or 1.0, got ", v);
    out.*(f.member) = v == 1.0;
  } else {
    out.*(f.member) = v;
  }
}

}  // namespace options_detail

// The settings struct S from its packed values, through S::fields().
template <typename S>
S unpack_options(c10::ArrayRef<double> v) {
  constexpr auto table = S::fields();
  constexpr size_t n = std::tuple_size_v<decltype(table)>;
  TORCH_CHECK_VALUE(v.size() == n, S::kName, " has ", n, " fields, got ", v.size(),
                    " option values (csrc/options.h and unitsface_kernels/options.py must "
                    "declare the same fields)");
  S out{};
  size_t i = 0;
  std::apply([&](const auto&... f) { (options_detail::read(out, f, S::kName, v[i++]), ...); },
             table);
  return out;
}

// The names of S's fields, in packing order.
template <typename S>
std::vector<std::string> option_field_names() {
  std::vector<std::string> names;
  std::apply([&](const auto&... f) { (names.emplace_back(f.name), ...); }, S::fields());
  return names;
}

// USS (docs/design.md §1.1): z⁺ = b − s(cos − m), z⁻ = s·cos − b.
struct UssOptions {
  static constexpr const char* kName = "UssOptions";
  double scale;   // s
  double margin;  // m, the positive margin
  bool lse;       // the log-sum-exp form (else "pairs")
  bool clamp;     // the official clamp of every softplus argument to [−s, s]
  bool in_batch;  // the reference set is the batch itself (pairs j ≠ i)
  double eps;     // the normalisation eps: x̂ = x / max(‖x‖, eps)

  static constexpr auto fields() {
    return std::make_tuple(field("scale", &UssOptions::scale),
                           field("margin", &UssOptions::margin), field("lse", &UssOptions::lse),
                           field("clamp", &UssOptions::clamp),
                           field("in_batch", &UssOptions::in_batch),
                           field("eps", &UssOptions::eps));
  }
  static UssOptions unpack(c10::ArrayRef<double> v) { return unpack_options<UssOptions>(v); }
};

// The margin softmax over class centres (§1.2), plus λ·USS on the bank rows of the same
// classes (§1.3) when the op is given a bank.
struct UnitsfaceOptions {
  static constexpr const char* kName = "UnitsfaceOptions";
  double scale;                   // s, shared by both parts
  double margin_arc;              // m2 (ArcFace)
  double margin_cos;              // m3 (CosFace)
  bool arcface_straight_through;  // insightface ≥ 2022-12: no fallback, f' taken as 1
  bool easy_margin;               // the margin only where cos > 0
  double uss_margin;              // m of the USS part
  double uss_weight;              // λ
  bool uss_lse;
  bool uss_clamp;                 // the official clamp in the USS part
  double eps;                     // the normalisation eps: x̂ = x / max(‖x‖, eps)
  // The margin family (docs/design.md §1.5); CosFace/ArcFace leave them at these values.
  bool row_margins = false;       // a_i, d_i from margin_rows (MarginRow kA, kD), not m2, m3
  bool no_fallback = false;       // cos(θ + a) − d everywhere (ElasticFace-Arc)
  bool angle_clip = false;        // AdaFace: cosines in ±(1 − ε), cos(clip(θ + a, ε, π − ε)) − d
  bool curricular = false;        // negatives c > HARD_i become c·(T_i + c)
  double interclass_threshold = 0.0;  // τ > 0: negatives with c > τ get logit 0, no gradient
  double sub_centers = 1.0;       // K rows per class in centres (row c·K + k)
  // The triton forward's budget in bytes for the stored exponentials of the W tiles
  // (docs/design.md §2); the native backend keeps none and ignores it.
  double saved_exp_bytes = 0.0;

  static constexpr auto fields() {
    using O = UnitsfaceOptions;
    return std::make_tuple(
        field("scale", &O::scale), field("margin_arc", &O::margin_arc),
        field("margin_cos", &O::margin_cos),
        field("arcface_straight_through", &O::arcface_straight_through),
        field("easy_margin", &O::easy_margin), field("uss_margin", &O::uss_margin),
        field("uss_weight", &O::uss_weight), field("uss_lse", &O::uss_lse),
        field("uss_clamp", &O::uss_clamp), field("eps", &O::eps),
        field("row_margins", &O::row_margins), field("no_fallback", &O::no_fallback),
        field("angle_clip", &O::angle_clip), field("curricular", &O::curricular),
        field("interclass_threshold", &O::interclass_threshold),
        field("sub_centers", &O::sub_centers), field("saved_exp_bytes", &O::saved_exp_bytes));
  }
  static UnitsfaceOptions unpack(c10::ArrayRef<double> v) {
    return unpack_options<UnitsfaceOptions>(v);
  }

  // K, the sub-centres per class.
  int64_t k() const { return static_cast<int64_t>(sub_centers); }
  // Whether the ops read margin_rows [4, B] (the margin family's per-row inputs).
  bool needs_margin_rows() const { return row_margins || curricular; }
  // Every cosine is clamped to [−lim, lim] before the logits (AdaFace: 1 − ε).
  double cos_limit() const { return angle_clip ? 1.0 - kAngleEps : 1.0; }
  // Whether any setting beyond CosFace/ArcFace is on.
  bool margin_family() const {
    return needs_margin_rows() || no_fallback || angle_clip || interclass_threshold > 0.0 ||
           sub_centers != 1.0;
  }

  // The USS part's settings, as the USS family's ops take them (never in-batch).
  UssOptions uss() const { return {scale, uss_margin, uss_lse, uss_clamp, false, eps}; }
};

}  // namespace unitsface
