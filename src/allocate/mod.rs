//! The gradient-variance bit allocator (DESIGN.md §4).
//!
//! Compressing saved tensor `l` at `b_l` bits adds about `c_l · S(b_l)` to the gradient
//! variance, `S(b) = 1/(2^b − 1)^2`. The allocator estimates the sensitivities `c_l`
//! ([`sensitivity`]: numerical, GACT-style, randomized so one estimate costs `1 + K` passes
//! whatever the number of tensors; [`analytic`]: ActNN-style noise energy, free), then
//! minimises the total variance under the average-bits budget exactly ([`solver`]), and
//! serves the result to the compression policy as a [`BitPlan`](crate::compress::policy::BitPlan)
//! ([`plan::VariancePlan`]).

pub mod analytic;
pub mod plan;
pub mod sensitivity;
pub mod solver;

pub use plan::{Estimator, PlanStats, SlotReport, VariancePlan};
pub use sensitivity::{
    estimate_per_slot, estimate_randomized, estimate_slots, flat_grad, NumericalConfig, ProbeMode,
    ProbePolicy, Sampling, Sensitivities, SlotProbe,
};
pub use solver::{allocate, allocate_greedy, solve, variance_factor, Allocation, TensorCost};
