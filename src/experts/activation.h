// Expert activations and their derivatives, for any arithmetic type (f32, f64).
#pragma once

#include <cmath>

#include "switchyard/config.h"
#include "switchyard/index.h"  // SY_HOST_DEVICE

namespace switchyard {

// The activation applied to a gate value: relu, gelu (erf), gelu (tanh), silu. Gated kinds use
// silu (SwiGLU) or gelu (GeGLU) on the gate half.
SY_HOST_DEVICE inline Activation base_activation(Activation a) {
  if (a == Activation::kSwiGLU) return Activation::kSilu;
  if (a == Activation::kGeGLU) return Activation::kGelu;
  return a;
}

template <class A>
SY_HOST_DEVICE inline A activate(Activation act, A x) {
  switch (act) {
    case Activation::kRelu:
      return x > A(0) ? x : A(0);
    case Activation::kGelu:
      return A(0.5) * x * (A(1) + std::erf(x * A(M_SQRT1_2)));
    case Activation::kGeluTanh: {
      const A c = A(0.7978845608028654);  // sqrt(2/pi)
      return A(0.5) * x * (A(1) + std::tanh(c * (x + A(0.044715) * x * x * x)));
    }
    case Activation::kSilu:
      return x / (A(1) + std::exp(-x));
    default:
      return activate(base_activation(act), x);
  }
}

// d activate(x) / dx
template <class A>
SY_HOST_DEVICE inline A activate_grad(Activation act, A x) {
  switch (act) {
    case Activation::kRelu:
      return x > A(0) ? A(1) : A(0);
    case Activation::kGelu: {
      const A pdf = std::exp(A(-0.5) * x * x) * A(0.3989422804014327);  // 1/sqrt(2 pi)
      return A(0.5) * (A(1) + std::erf(x * A(M_SQRT1_2))) + x * pdf;
    }
    case Activation::kGeluTanh: {
      const A c = A(0.7978845608028654);
      const A t = std::tanh(c * (x + A(0.044715) * x * x * x));
      return A(0.5) * (A(1) + t) +
             A(0.5) * x * (A(1) - t * t) * c * (A(1) + A(3 * 0.044715) * x * x);
    }
    case Activation::kSilu: {
      const A s = A(1) / (A(1) + std::exp(-x));
      return s * (A(1) + x * (A(1) - s));
    }
    default:
      return activate_grad(base_activation(act), x);
  }
}

}  // namespace switchyard
