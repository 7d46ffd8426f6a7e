#include <gtest/gtest.h>

#include <cstdint>
#include <string>

#include "switchyard/error.h"

namespace switchyard {
namespace {

// Messages print numbers as iostreams do by default (%g for floating point, bool as 1/0),
// without iostreams.
TEST(ErrorMessage, StrCatPrintsTextAndNumbers) {
  const std::string s = "s";
  EXPECT_EQ(detail::str_cat("k=", 3, ", n=", std::int64_t{-7}, ", sz=", std::size_t{12}, " ", s,
                            'c', " ", true, false),
            "k=3, n=-7, sz=12 sc 10");
  EXPECT_EQ(detail::str_cat(0.5, " ", 1.0, " ", 1e-7, " ", 123456789.0, " ", 2.5f, " ", -0.1),
            "0.5 1 1e-07 1.23457e+08 2.5 -0.1");
  EXPECT_EQ(detail::str_cat(), "");
}

TEST(ErrorMessage, SyCheckThrowsTheMessage) {
  try {
    SY_CHECK(1 > 2, "top_k must be >= 1, got ", 0);
    FAIL() << "no throw";
  } catch (const Error& e) {
    EXPECT_STREQ(e.what(), "top_k must be >= 1, got 0");
  }
}

}  // namespace
}  // namespace switchyard
