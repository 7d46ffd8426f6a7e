#include "switchyard/index.h"

#include "switchyard/error.h"

namespace switchyard {

index_t checked_mul(index_t a, index_t b) {
  index_t r;
  SY_CHECK(!__builtin_mul_overflow(a, b, &r), "element count overflows int64: ", a, " * ", b);
  return r;
}

index_t checked_numel(const std::vector<index_t>& sizes) {
  index_t n = 1;
  for (index_t s : sizes) {
    SY_CHECK(s >= 0, "tensor sizes must be >= 0, got ", s);
    n = checked_mul(n, s);
  }
  return n;
}

}  // namespace switchyard
