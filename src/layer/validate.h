// Checks of a layer's configuration and per-call options, with messages that name the option,
// the value found and what was expected.
#pragma once

#include "switchyard/config.h"

namespace switchyard {

void validate_config(const MoEConfig& cfg);
// The k a call uses: the override or cfg.top_k, checked (>= 1 and the group rules), clamped to E.
int resolve_top_k(const MoEConfig& cfg, const ForwardOptions& opt);
double resolve_capacity_factor(const MoEConfig& cfg, const ForwardOptions& opt);
// The call's overlap_degree (capacity alignment; chunks of the expert-parallel pipeline).
int resolve_overlap_degree(const MoEConfig& cfg, const ForwardOptions& opt);
Layout resolve_layout(const MoEConfig& cfg, const ForwardOptions& opt, double capacity_factor);

}  // namespace switchyard
