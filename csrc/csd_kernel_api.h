// What the device-independent op layer (csd_ops.cpp) hands to a backend.
//
// Both backends receive validated 2-D [N, V] logits whose last dimension is
// contiguous (rows may be strided, e.g. a vocabulary slice of wider logits),
// and write into outputs allocated here, so allocation and argument checking
// live in one place.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>

#include "csd_math.h"

namespace csd {

struct LossConfig {
  Mixture<double> w1;
  Mixture<double> w2;
  double inv_temperature;
};

// Parses and checks the op arguments (raises ValueError with the argument's
// name) and returns the weight mixtures.
LossConfig make_config(const std::string& weighting, double alpha, double temperature);

// Checks logits, the optional row mask and the saved statistics; shared by
// every backend so that a direct call of the op gets the same errors as the
// Python wrapper.
void check_logits(const at::Tensor& student, const at::Tensor& teacher);
void check_row_mask(const std::optional<at::Tensor>& row_mask, const at::Tensor& student);
// csd_loss_grad's labels: an optional integer [N] tensor on the logits' device.
void check_labels(const std::optional<at::Tensor>& labels, const at::Tensor& student);
// csd_loss_grad's reduction: true for "mean", false for "sum"; else ValueError.
bool reduction_is_mean(c10::string_view reduction);
at::ScalarType accumulate_type_of(const at::Tensor& student, const at::Tensor& teacher);
// Checks csd_backward's grad_loss [N] and stats [N, kNumStats] (contiguous,
// of the accumulation type) against the logits, including their device.
void check_backward_inputs(const at::Tensor& grad_loss, const at::Tensor& stats,
                           const at::Tensor& student, const at::Tensor& teacher);

}  // namespace csd
