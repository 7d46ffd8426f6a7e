// The math mode of the CUDA matrix products issued by the calling thread.
#pragma once

namespace switchyard {

// Whether f32 matrix products may run on TF32 tensor cores (Tutel's use_tensorcore; cuBLAS's
// CUBLAS_COMPUTE_32F_FAST_TF32): false, true FP32, unless a Tf32Scope on this thread allows it.
// Other dtypes and the CPU backend ignore it.
bool tf32_allowed();

// Sets tf32_allowed() for the calling thread until destruction; scopes nest.
class Tf32Scope {
 public:
  explicit Tf32Scope(bool allow);
  ~Tf32Scope();
  Tf32Scope(const Tf32Scope&) = delete;
  Tf32Scope& operator=(const Tf32Scope&) = delete;

 private:
  bool previous_;
};

}  // namespace switchyard
