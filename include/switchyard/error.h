// Errors: every failure a caller can cause throws switchyard::Error with a message that
// says what was expected and what was found ("top_k must be >= 1, got 0").
#pragma once

#include <charconv>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>

namespace switchyard {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

namespace detail {

// Appends text as it is and numbers as iostreams print them by default (bool as 1/0, floating
// point as %g). No iostreams: the messages must not depend on locale state, which a library
// loaded into another program (the PyTorch extension) need not share with it.
template <class T>
void append_to(std::string& s, const T& v) {
  if constexpr (std::is_same_v<T, char>) {
    s += v;
  } else if constexpr (std::is_same_v<T, bool>) {
    s += v ? '1' : '0';
  } else if constexpr (std::is_integral_v<T>) {
    char b[24];
    s.append(b, std::to_chars(b, b + sizeof b, v).ptr);
  } else if constexpr (std::is_floating_point_v<T>) {
    char b[48];
    s.append(b, std::to_chars(b, b + sizeof b, v, std::chars_format::general, 6).ptr);
  } else {
    s += std::string_view(v);
  }
}

template <class... Args>
std::string str_cat(const Args&... args) {
  std::string s;
  (append_to(s, args), ...);
  return s;
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
