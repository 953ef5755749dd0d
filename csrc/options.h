// The scalar settings of the two op families, as the ops receive them: one `float[] options`
// argument packed by unitsface_kernels/options.py (UssOptions.pack / UnitsfaceOptions.pack).
// The structs below mirror those dataclasses field for field, in the same order (booleans
// packed as 0.0 / 1.0); a new setting is a new field in both places and nothing else changes
// in any op signature.
#pragma once

#include <cstddef>

#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

namespace unitsface {
namespace options_detail {

inline void check_count(const char* what, c10::ArrayRef<double> v, size_t expected) {
  TORCH_CHECK_VALUE(v.size() == expected, what, " has ", expected, " fields, got ", v.size(),
                    " option values (csrc/options.h and unitsface_kernels/options.py must "
                    "declare the same fields)");
}

// A boolean field: exactly 0.0 or 1.0 (anything else means the packing went wrong).
inline bool flag(const char* what, c10::ArrayRef<double> v, size_t i) {
  TORCH_CHECK_VALUE(v[i] == 0.0 || v[i] == 1.0, what, ": option ", i,
                    " is a flag and must be 0.0 or 1.0, got ", v[i]);
  return v[i] == 1.0;
}

}  // namespace options_detail

// USS (docs/design.md §1.1): z⁺ = b − s(cos − m), z⁻ = s·cos − b.
struct UssOptions {
  double scale;   // s
  double margin;  // m, the positive margin
  bool lse;       // the log-sum-exp form (else "pairs")
  bool clamp;     // the official clamp of every softplus argument to [−s, s]
  bool in_batch;  // the reference set is the batch itself (pairs j ≠ i)
  double eps;     // the normalisation eps: x̂ = x / max(‖x‖, eps)

  static UssOptions unpack(c10::ArrayRef<double> v) {
    using namespace options_detail;
    check_count("UssOptions", v, 6);
    return {v[0], v[1], flag("UssOptions", v, 2), flag("UssOptions", v, 3),
            flag("UssOptions", v, 4), v[5]};
  }
};

// The margin softmax over class centres (§1.2), plus λ·USS on the bank rows of the same
// classes (§1.3) when the op is given a bank.
struct UnitsfaceOptions {
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

  static UnitsfaceOptions unpack(c10::ArrayRef<double> v) {
    using namespace options_detail;
    const char* what = "UnitsfaceOptions";
    check_count(what, v, 10);
    return {v[0], v[1], v[2], flag(what, v, 3), flag(what, v, 4), v[5], v[6], flag(what, v, 7),
            flag(what, v, 8), v[9]};
  }

  // The USS part's settings, as the USS family's ops take them (never in-batch).
  UssOptions uss() const { return {scale, uss_margin, uss_lse, uss_clamp, false, eps}; }
};

}  // namespace unitsface
