// Switchyard: a Mixture-of-Experts layer library. Include this header for the whole C++ API.
#pragma once

#include "switchyard/comm.h"
#include "switchyard/config.h"
#include "switchyard/device.h"
#include "switchyard/dtype.h"
#include "switchyard/error.h"
#include "switchyard/extension.h"
#include "switchyard/index.h"
#include "switchyard/moe_layer.h"
#include "switchyard/rng.h"
#include "switchyard/tensor.h"
