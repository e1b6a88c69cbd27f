//! `profile-memory`: where every byte of a training step goes, at one compression level.
//!
//! One warm-up step first (so optimizer state, thread pools and gemm buffers exist), then a
//! measured step in three phases — forward, backward, optimizer — each with its own peak
//! window of the counting allocator. Buckets are exact tensor sizes; peaks are measured.

use super::{current_bytes, peak_bytes, reset_peak};
use crate::allocate::{policy_for, Allocator};
use crate::compress::policy::{CompressConfig, CompressPolicy, Level};
use crate::model::Model;
use crate::ops::loss::CrossEntropyOptions;
use crate::tape::Tape;
use crate::train::optim::{Optimizer, OptimizerConfig};
use anyhow::Result;
use candle_core::Tensor;
use serde::Serialize;

/// One saved context: which layer and op saved what, how, and what it costs.
#[derive(Clone, Debug, Serialize)]
pub struct ContextRow {
    pub layer: String,
    pub op: String,
    pub repr: String,
    pub shape: Vec<usize>,
    pub bits: f32,
    pub stored_bytes: usize,
    pub uncompressed_bytes: usize,
}

/// Peak of one phase, above the steady state (parameters, buffers, optimizer state, batch).
#[derive(Clone, Debug, Serialize)]
pub struct PhasePeak {
    pub phase: &'static str,
    pub peak_bytes: usize,
    /// Live bytes above the steady state when the phase ended.
    pub end_bytes: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct MemoryProfile {
    pub level: String,
    /// How the bits were chosen (the variance allocator only below 8 average bits).
    pub allocator: Allocator,
    /// What the byte counts measure ([`super::describe`]).
    pub measured_on: String,
    pub batch_size: usize,
    pub rows: Vec<ContextRow>,
    pub parameters: usize,
    pub buffers: usize,
    pub gradients: usize,
    pub optimizer_state: usize,
    pub batch_bytes: usize,
    /// Saved context after forward, as stored.
    pub activations: usize,
    /// The same context uncompressed (what L0 stores).
    pub activations_uncompressed: usize,
    pub phases: Vec<PhasePeak>,
    /// Steady state plus the highest phase peak.
    pub peak_bytes: usize,
    pub peak_phase: &'static str,
    /// At the peak, bytes that were neither steady state nor saved context: unpacked
    /// contexts, gradient buffers in flight, op workspaces.
    pub transient_at_peak: usize,
}

fn tensor_bytes(t: &Tensor) -> usize {
    t.elem_count() * t.dtype().size_in_bytes()
}

/// Profiles one training step of `model` at `level` on the batch `(x, y)`, every tensor at the
/// uniform rung of the level.
pub fn profile_step(
    model: &mut Model,
    level: Level,
    x: &Tensor,
    y: &Tensor,
    seed: u64,
) -> Result<MemoryProfile> {
    profile_step_with(model, level, Allocator::Uniform, x, y, seed)
}

/// Profiles one training step at `level` with the bits chosen by `allocator`: with the
/// variance allocator the plan first estimates its sensitivities on the batch (as `fit` does
/// before its first step), so the rows show the per-tensor bits a training run would use.
pub fn profile_step_with(
    model: &mut Model,
    level: Level,
    allocator: Allocator,
    x: &Tensor,
    y: &Tensor,
    seed: u64,
) -> Result<MemoryProfile> {
    let cfg = CompressConfig {
        level,
        seed,
        ..Default::default()
    };
    let (_, plan) = policy_for(cfg.clone(), allocator, model, x, y)?;
    let policy = || {
        Box::new(match &plan {
            Some(p) => CompressPolicy::with_plan(cfg.clone(), p.boxed()),
            None => CompressPolicy::new(cfg.clone()),
        })
    };
    let mut opt = Optimizer::new(OptimizerConfig::Sgd {
        momentum: 0.9,
        nesterov: false,
        weight_decay: 0.0,
    });
    let ce = CrossEntropyOptions::default();
    // Warm-up step: optimizer state and the allocator's steady state exist afterwards.
    {
        let mut tape = Tape::new(policy()).with_seed(seed);
        tape.begin_step();
        let logits = model.forward(&mut tape, x, None)?;
        let loss = tape.cross_entropy(&logits, y, ce)?;
        drop(logits);
        tape.backward(&loss, &mut model.params)?;
        opt.step(&mut model.params, 1e-6)?;
        model.params.zero_grad();
    }
    let mut tape = Tape::new(policy()).with_seed(seed);
    tape.begin_step();
    let base = current_bytes();
    let mut phases = Vec::new();

    reset_peak();
    let logits = model.forward(&mut tape, x, None)?;
    let loss = tape.cross_entropy(&logits, y, ce)?;
    drop(logits);
    phases.push(PhasePeak {
        phase: "forward",
        peak_bytes: peak_bytes().saturating_sub(base),
        end_bytes: current_bytes().saturating_sub(base),
    });
    let activations = tape.live_context_bytes();
    let rows: Vec<ContextRow> = tape
        .context_log()
        .iter()
        .map(|r| ContextRow {
            layer: r.scope.to_string(),
            op: r.op.to_string(),
            repr: r.repr.clone(),
            shape: r.shape.clone(),
            bits: r.bits,
            stored_bytes: r.stored_bytes,
            uncompressed_bytes: r.uncompressed_bytes,
        })
        .collect();
    let activations_uncompressed = rows.iter().map(|r| r.uncompressed_bytes).sum();

    reset_peak();
    tape.backward(&loss, &mut model.params)?;
    drop(loss);
    phases.push(PhasePeak {
        phase: "backward",
        peak_bytes: peak_bytes().saturating_sub(base),
        end_bytes: current_bytes().saturating_sub(base),
    });
    let (parameters, buffers, gradients) = model.params.bytes();

    reset_peak();
    opt.step(&mut model.params, 1e-6)?;
    model.params.zero_grad();
    phases.push(PhasePeak {
        phase: "optimizer",
        peak_bytes: peak_bytes().saturating_sub(base),
        end_bytes: current_bytes().saturating_sub(base),
    });

    let top = phases
        .iter()
        .max_by_key(|p| p.peak_bytes)
        .expect("three phases");
    let batch_bytes = tensor_bytes(x) + tensor_bytes(y);
    let steady = parameters + buffers + opt.state_bytes() + batch_bytes;
    let persistent_in_phase = match top.phase {
        "forward" => activations,
        "backward" => activations.max(gradients),
        _ => gradients,
    };
    Ok(MemoryProfile {
        level: level.name(),
        measured_on: super::describe(),
        allocator: if plan.is_some() {
            Allocator::Variance
        } else {
            Allocator::Uniform
        },
        batch_size: x.dims()[0],
        rows,
        parameters,
        buffers,
        gradients,
        optimizer_state: opt.state_bytes(),
        batch_bytes,
        activations,
        activations_uncompressed,
        peak_bytes: steady + top.peak_bytes,
        peak_phase: top.phase,
        transient_at_peak: top.peak_bytes.saturating_sub(persistent_in_phase),
        phases,
    })
}
