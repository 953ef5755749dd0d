// The CPU row kernels of the USS epilogue (csrc/uss.cpp). NO include guard: uss.cpp includes
// this file once per instruction set (AVX-512, AVX2, baseline), each time inside its own
// namespace and `#pragma GCC target` region, and picks one at run time (cpu_loops.h): the
// `#pragma omp simd` loops below must be compiled for the target they run on to vectorise.
// Needs UssRows<T> and epi:: in scope; includes nothing itself. Masks combine with & and |
// (not && / ||, whose branches keep GCC from vectorising the omp simd loops).

// Forward: fold the chunk into the row's running statistics.
template <typename T>
UF_ALWAYS_INLINE void fwd_rows(const UssRows<T> a, int64_t r0, int64_t r1) {
  const int64_t c = a.c;
  const T neg_big = static_cast<T>(epi::kNegBig);
  for (int64_t i = r0; i < r1; ++i) {
    T* d = a.dots + i * c;
    const T ix = a.inv_x[i];
    const int64_t yi = a.y[i];
    const int64_t self = a.in_batch ? i - a.col0 : -1;  // in-batch: j = i is no pair
    if (!a.p.lse) {
      T acc = 0;
#pragma omp simd reduction(+ : acc)
      for (int64_t j = 0; j < c; ++j) {
        const T cos = d[j] * ix * a.inv_r[j];
        const bool same = a.l[j] == yi;
        const bool pos = (a.valid[j] != T(0)) & same & (j != self);
        const bool neg = (a.valid[j] != T(0)) & !same;
        const T v = epi::uss_pair_loss<T>(epi::uss_z<T>(cos, a.bias[j], pos, a.p), a.p);
        acc += (pos | neg) ? v : T(0);
      }
      a.state[i] += acc;
      continue;
    }
    // lse: chunk maxima of P and N (z written over the dots), then Σ e^{z − max}
    T mp = neg_big, mn = neg_big;
#pragma omp simd reduction(max : mp, mn)
    for (int64_t j = 0; j < c; ++j) {
      const T cos = d[j] * ix * a.inv_r[j];
      const bool same = a.l[j] == yi;
      const bool pos = (a.valid[j] != T(0)) & same & (j != self);
      const bool neg = (a.valid[j] != T(0)) & !same;
      const T z = epi::uss_z<T>(cos, a.bias[j], pos, a.p);
      d[j] = z;
      const T zp = pos ? z : neg_big;
      const T zn = neg ? z : neg_big;
      mp = zp > mp ? zp : mp;
      mn = zn > mn ? zn : mn;
    }
    T* st = a.state;
    const T mp_new = mp > st[i] ? mp : st[i];
    const T mn_new = mn > st[2 * a.B + i] ? mn : st[2 * a.B + i];
    T sp = 0, sn = 0;
#pragma omp simd reduction(+ : sp, sn)
    for (int64_t j = 0; j < c; ++j) {
      const bool same = a.l[j] == yi;
      const bool pos = (a.valid[j] != T(0)) & same & (j != self);
      const bool neg = (a.valid[j] != T(0)) & !same;
      const T e = epi::uf_exp<T>(d[j] - (pos ? mp_new : mn_new));
      sp += pos ? e : T(0);
      sn += neg ? e : T(0);
    }
    st[a.B + i] = st[a.B + i] * epi::uf_exp<T>(st[i] - mp_new) + sp;
    st[i] = mp_new;
    st[3 * a.B + i] = st[3 * a.B + i] * epi::uf_exp<T>(st[2 * a.B + i] - mn_new) + sn;
    st[2 * a.B + i] = mn_new;
  }
}

// Backward of row i: g_ij = go_i·∂L_i/∂cos_ij; grads ← g·inv_r_j; hs += (Σ g·cos, Σ g).
// The form is a template parameter: each instantiation's loop vectorises with no branch on it.
template <typename T, bool Lse>
UF_ALWAYS_INLINE void bwd_row(const UssRows<T>& a, int64_t i) {
  const int64_t c = a.c;
  const T* d = a.dots + i * c;
  T* g_out = a.grads + i * c;
  const T ix = a.inv_x[i];
  const T go = a.go[i];
  const int64_t yi = a.y[i];
  const int64_t self = a.in_batch ? i - a.col0 : -1;
  const T sa = a.stats[i], fa = a.stats[a.B + i];
  const T sb = a.stats[2 * a.B + i], fb = a.stats[3 * a.B + i];
  T h = 0, gs = 0;
#pragma omp simd reduction(+ : h, gs)
  for (int64_t j = 0; j < c; ++j) {
    const T cos = d[j] * ix * a.inv_r[j];
    const bool same = a.l[j] == yi;
    const bool pos = (a.valid[j] != T(0)) & same & (j != self);
    const bool neg = (a.valid[j] != T(0)) & !same;
    const T z = epi::uss_z<T>(cos, a.bias[j], pos, a.p);
    T g0;
    if constexpr (Lse) {
      g0 = epi::uss_lse_grad<T>(z, pos, pos ? sa : sb, pos ? fa : fb, a.p) * go;
    } else {
      g0 = epi::uss_pair_grad<T>(z, pos, a.p) * go;
    }
    const T g = (pos | neg) ? g0 : T(0);
    h += g * cos;
    gs += g;
    g_out[j] = g * a.inv_r[j];
  }
  a.hs[i] += h;
  a.hs[a.B + i] += gs;
}

template <typename T>
UF_ALWAYS_INLINE void bwd_rows(const UssRows<T> a, int64_t r0, int64_t r1) {
  for (int64_t i = r0; i < r1; ++i) {
    if (a.p.lse) {
      bwd_row<T, true>(a, i);
    } else {
      bwd_row<T, false>(a, i);
    }
  }
}

template <typename T>
void fwd(const UssRows<T>& a, int64_t r0, int64_t r1) {
  fwd_rows<T>(a, r0, r1);
}
template <typename T>
void bwd(const UssRows<T>& a, int64_t r0, int64_t r1) {
  bwd_rows<T>(a, r0, r1);
}
template void fwd<float>(const UssRows<float>&, int64_t, int64_t);
template void bwd<float>(const UssRows<float>&, int64_t, int64_t);
template void fwd<double>(const UssRows<double>&, int64_t, int64_t);
template void bwd<double>(const UssRows<double>&, int64_t, int64_t);
