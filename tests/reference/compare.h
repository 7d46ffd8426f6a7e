// Comparing tensors and value vectors in tests: relative L2 error and max absolute difference,
// as gtest assertions that print where and by how much two results disagree.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <sstream>
#include <string>
#include <vector>

#include "switchyard/tensor.h"

namespace sy_ref {

inline std::vector<double> values(const switchyard::Tensor& t) { return t.to_vector(); }

// ||got - want|| / ||want|| (absolute when want is all zeros). Sizes must match.
inline double rel_l2(const std::vector<double>& got, const std::vector<double>& want) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < want.size(); ++i) {
    num += (got[i] - want[i]) * (got[i] - want[i]);
    den += want[i] * want[i];
  }
  if (std::isnan(num)) return INFINITY;
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

inline double max_abs_diff(const std::vector<double>& got, const std::vector<double>& want) {
  double m = 0;
  for (std::size_t i = 0; i < want.size(); ++i) {
    const double dlt = std::abs(got[i] - want[i]);
    if (std::isnan(dlt)) return INFINITY;
    m = std::max(m, dlt);
  }
  return m;
}

// First index where |got - want| > atol + rtol * |want|, or -1.
inline long first_mismatch(const std::vector<double>& got, const std::vector<double>& want,
                           double atol, double rtol) {
  for (std::size_t i = 0; i < want.size(); ++i) {
    const double dlt = std::abs(got[i] - want[i]);
    if (!(dlt <= atol + rtol * std::abs(want[i]))) return static_cast<long>(i);
  }
  return -1;
}

// Elementwise |got - want| <= atol + rtol * |want|.
inline ::testing::AssertionResult all_close(const std::vector<double>& got,
                                            const std::vector<double>& want, double atol,
                                            double rtol) {
  if (got.size() != want.size())
    return ::testing::AssertionFailure() << "size " << got.size() << ", expected " << want.size();
  const long i = first_mismatch(got, want, atol, rtol);
  if (i < 0) return ::testing::AssertionSuccess();
  long bad = 0;
  for (std::size_t j = 0; j < want.size(); ++j)
    if (!(std::abs(got[j] - want[j]) <= atol + rtol * std::abs(want[j]))) ++bad;
  return ::testing::AssertionFailure()
         << bad << " of " << want.size() << " elements differ; first at [" << i << "]: got "
         << got[i] << ", expected " << want[i] << " (max abs diff " << max_abs_diff(got, want)
         << ", rel L2 " << rel_l2(got, want) << ")";
}

// Relative L2 error at most tol.
inline ::testing::AssertionResult rel_l2_within(const std::vector<double>& got,
                                                const std::vector<double>& want, double tol) {
  if (got.size() != want.size())
    return ::testing::AssertionFailure() << "size " << got.size() << ", expected " << want.size();
  const double e = rel_l2(got, want);
  if (e <= tol) return ::testing::AssertionSuccess();
  const long i = first_mismatch(got, want, 0.0, tol);
  std::ostringstream os;
  os << "rel L2 error " << e << " > " << tol << " (max abs diff " << max_abs_diff(got, want);
  if (i >= 0) os << "; e.g. [" << i << "] got " << got[i] << ", expected " << want[i];
  os << ")";
  return ::testing::AssertionFailure() << os.str();
}

// Bitwise equality of two results read back as doubles (exact for every stored dtype).
inline ::testing::AssertionResult bitwise_equal(const std::vector<double>& a,
                                                const std::vector<double>& b) {
  if (a.size() != b.size())
    return ::testing::AssertionFailure() << "size " << a.size() << " vs " << b.size();
  for (std::size_t i = 0; i < a.size(); ++i)
    if (!(a[i] == b[i]) && !(std::isnan(a[i]) && std::isnan(b[i])))
      return ::testing::AssertionFailure() << "differ at [" << i << "]: " << a[i] << " vs " << b[i];
  return ::testing::AssertionSuccess();
}

}  // namespace sy_ref
