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

pub use plan::{policy_for, Estimator, PlanState, PlanStats, SlotReport, SlotState, VariancePlan};
pub use sensitivity::{
    estimate_per_slot, estimate_randomized, estimate_slots, flat_grad, NumericalConfig, ParamGrads,
    ProbeMode, ProbePolicy, Sampling, Sensitivities, SlotProbe,
};
pub use solver::{allocate, allocate_greedy, solve, variance_factor, Allocation, TensorCost};

/// How a run at L3/L4/`--bits` gives saved tensors their bits (`--allocator`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Allocator {
    /// Every tensor the most precise ladder rung within the budget.
    Uniform,
    /// Per-tensor bits from [`VariancePlan`] (the default of the commands).
    Variance,
}

impl Allocator {
    pub fn name(self) -> &'static str {
        match self {
            Allocator::Uniform => "uniform",
            Allocator::Variance => "variance",
        }
    }
}

impl std::str::FromStr for Allocator {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "uniform" => Ok(Allocator::Uniform),
            "variance" => Ok(Allocator::Variance),
            other => anyhow::bail!("--allocator `{other}`: expected variance or uniform"),
        }
    }
}
