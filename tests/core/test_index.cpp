#include <gtest/gtest.h>

#include "switchyard/error.h"
#include "switchyard/index.h"

namespace switchyard {
namespace {

TEST(Index, OffsetsPast2To31AreExact) {
  // An expert buffer of 70000 rows x 40000 columns has 2.8e9 > 2^31 elements.
  const index_t rows = 70000, cols = 40000;
  EXPECT_EQ(offset_of(rows - 1, cols), 2799960000LL);
  EXPECT_GT(offset_of(rows - 1, cols), index_t{1} << 31);
  EXPECT_EQ(offset_of(3, index_t{1} << 31, 5, 1), 3 * (index_t{1} << 31) + 5);
  EXPECT_EQ(offset_of(1, 1LL << 40, 2, 1LL << 20, 3, 1), (1LL << 40) + (2LL << 20) + 3);
}

TEST(Index, CheckedNumelDetectsOverflowAndNegativeSizes) {
  EXPECT_EQ(checked_numel({70000, 40000}), 2800000000LL);
  EXPECT_EQ(checked_numel({}), 1);
  EXPECT_EQ(checked_numel({5, 0, 7}), 0);
  EXPECT_THROW(checked_numel({1LL << 40, 1LL << 40}), Error);
  EXPECT_THROW(checked_numel({3, -1}), Error);
  EXPECT_THROW(checked_mul(index_t{1} << 62, 4), Error);
}

}  // namespace
}  // namespace switchyard
