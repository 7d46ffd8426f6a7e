#include "switchyard/error.h"

namespace switchyard::detail {

void throw_error(const std::string& message) { throw Error(message); }

void throw_internal(const char* file, int line, const char* condition, const std::string& message) {
  throw Error(str_cat("internal error (a bug in switchyard) at ", file, ":", line, ": ", condition,
                      message.empty() ? "" : ": ", message));
}

}  // namespace switchyard::detail
