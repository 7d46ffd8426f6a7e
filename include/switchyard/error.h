// Errors: every failure a caller can cause throws switchyard::Error with a message that
// says what was expected and what was found ("top_k must be >= 1, got 0").
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace switchyard {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

namespace detail {

template <class... Args>
std::string str_cat(const Args&... args) {
  std::ostringstream os;
  if constexpr (sizeof...(Args) > 0) (os << ... << args);
  return os.str();
}

[[noreturn]] void throw_error(const std::string& message);
[[noreturn]] void throw_internal(const char* file, int line, const char* condition,
                                 const std::string& message);

}  // namespace detail
}  // namespace switchyard

// Input checks: the message is the user's to read. SY_CHECK(k >= 1, "top_k must be >= 1, got ", k)
#define SY_CHECK(cond, ...)                                                                     \
  do {                                                                                          \
    if (!(cond)) ::switchyard::detail::throw_error(::switchyard::detail::str_cat(__VA_ARGS__)); \
  } while (0)

// SY_CHECK_EQ(x.size(1), d, "x columns vs model_dim") prints both sides.
#define SY_CHECK_EQ(a, b, what)                                                        \
  do {                                                                                 \
    const auto& sy_a_ = (a);                                                           \
    const auto& sy_b_ = (b);                                                           \
    if (!(sy_a_ == sy_b_))                                                             \
      ::switchyard::detail::throw_error(                                               \
          ::switchyard::detail::str_cat(what, ": expected ", sy_b_, ", got ", sy_a_)); \
  } while (0)

// Internal invariants only (a failure is a bug in switchyard, not in the caller's input).
#define SY_ASSERT(cond, ...)                                                            \
  do {                                                                                  \
    if (!(cond))                                                                        \
      ::switchyard::detail::throw_internal(__FILE__, __LINE__, #cond,                   \
                                           ::switchyard::detail::str_cat(__VA_ARGS__)); \
  } while (0)
