#include "core/math_mode.h"

namespace switchyard {
namespace {
thread_local bool tf32 = false;
}  // namespace

bool tf32_allowed() { return tf32; }

Tf32Scope::Tf32Scope(bool allow) : previous_(tf32) { tf32 = allow; }

Tf32Scope::~Tf32Scope() { tf32 = previous_; }

}  // namespace switchyard
