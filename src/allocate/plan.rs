//! [`VariancePlan`]: the gradient-variance bit allocator as a [`BitPlan`].
//!
//! The plan is a cheap handle (`Clone` shares the state): the trainer keeps one and gives a
//! clone to the compression policy, so it can run the estimator and read the bits while the
//! tape owns the policy.
//!
//! ```ignore
//! let plan = VariancePlan::new(avg_bits, 100, Estimator::numerical())?;
//! let mut tape = Tape::new(Box::new(CompressPolicy::with_plan(cfg, plan.boxed())));
//! loop {
//!     plan.maybe_estimate(&mut model, &x, &y)?; // every 100 steps, on 8 samples of the batch
//!     tape.begin_step();                        // re-plans here once sizes/sensitivities are new
//!     /* forward, loss, backward, optimizer step */
//! }
//! ```
//!
//! The default estimator is GACT's per-slot reseeding at the current plan's operating point
//! on 8 samples, on every slot at the first estimate and on a rotating tenth-of-GACT subset
//! (`⌊0.3·L⌋ − 1` slots, at least 1) at each later one; estimates are smoothed (weight 0.5).
//!
//! Slots are the positions of saves within a step (stable for a static graph). The plan
//! learns which slots the policy quantizes and their sizes from `bits_for`; a slot without a
//! plan (never seen, or before the first estimate) gets the uniform rung of the budget. The
//! allocation is re-solved at `begin_step` whenever the sensitivities or the set/sizes of the
//! quantized slots changed, so the budget always holds for the step's actual tensors.

use super::analytic::{amplification, analytic_sensitivity, noise_energy_per_sample};
use super::sensitivity::{
    estimate_randomized, estimate_slots, NumericalConfig, ParamGrads, Sampling, SlotProbe,
};
use super::solver::{solve, TensorCost};
use super::Allocator;
use crate::compress::policy::{BitPlan, CompressConfig, CompressPolicy, LADDER};
use crate::compress::DEFAULT_GROUP;
use crate::model::Model;
use crate::ops::loss::CrossEntropyOptions;
use crate::tape::{GradObservation, ParamId, SaveRequest, Tape};
use anyhow::{anyhow, bail, Result};
use candle_core::Tensor;
use std::cell::RefCell;
use std::collections::HashSet;
use std::rc::Rc;
use std::time::Instant;

/// Where the sensitivities come from.
#[derive(Clone, Debug, PartialEq)]
pub enum Estimator {
    /// GACT-style numerical estimate on a sub-batch every `reallocate_every` steps, run by
    /// [`VariancePlan::maybe_estimate`]: per-slot reseeding at the current plan's operating
    /// point on a rotating subset of slots ([`estimate_slots`]; every slot the first time),
    /// or the randomized all-slots estimate ([`estimate_randomized`]).
    Numerical(NumericalConfig),
    /// ActNN-style noise energy ([`super::analytic`]) gathered during a normal training step
    /// every `reallocate_every` steps: no extra passes, no trainer call needed.
    Analytic { group: usize },
}

impl Estimator {
    pub fn numerical() -> Self {
        Estimator::Numerical(NumericalConfig::default())
    }
    pub fn analytic() -> Self {
        Estimator::Analytic {
            group: DEFAULT_GROUP,
        }
    }
    pub fn name(&self) -> &'static str {
        match self {
            Estimator::Numerical(_) => "numerical",
            Estimator::Analytic { .. } => "analytic",
        }
    }
}

impl std::str::FromStr for Estimator {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "numerical" | "gact" => Ok(Estimator::numerical()),
            "analytic" | "actnn" => Ok(Estimator::analytic()),
            other => {
                bail!("unknown sensitivity estimator `{other}` (expected numerical or analytic)")
            }
        }
    }
}

/// One quantized slot as the plan sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct SlotReport {
    pub slot: usize,
    pub op: &'static str,
    /// Elements at the last training step that saved it.
    pub elements: usize,
    /// Bits it gets now.
    pub bits: u8,
    /// Latest (smoothed) sensitivity `c_l`, if estimated.
    pub sensitivity: Option<f64>,
}

/// What the allocator cost so far (for the metrics and `allocator_eval`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PlanStats {
    pub estimates: u64,
    /// Forward+backward passes of the last estimate, and samples per pass.
    pub passes_per_estimate: usize,
    pub samples_per_pass: usize,
    pub last_estimate_seconds: f64,
    pub total_estimate_seconds: f64,
    pub solves: u64,
    pub last_solve_seconds: f64,
    pub total_solve_seconds: f64,
    /// Modelled variance `Σ c_l S(b_l)` of the current plan, and whether it is proven optimal.
    pub modelled_variance: f64,
    pub optimal: bool,
}

#[derive(Clone, Debug, Default)]
struct Slot {
    op: &'static str,
    /// Elements when the training policy last asked (0 = never asked).
    elements: usize,
    /// Step of that request.
    seen_step: u64,
    /// Size guessed from a probe pass (batch-scaled) before any training step saw the slot.
    probe_elements: usize,
    sensitivity: Option<f64>,
    /// Analytic: per-sample rounding-noise energy gathered at save time this step.
    energy: Option<Vec<f64>>,
    /// Analytic: `factor · Σ_n ‖dY_n‖² E_n` accumulated over this step's backward (a context
    /// read by several nodes adds up), see [`super::analytic`].
    grad: Option<f64>,
    bits: Option<u8>,
}

struct State {
    avg_bits: f64,
    every: u64,
    estimator: Estimator,
    /// Weight of the previous estimate when a new one arrives (smooths estimator noise).
    smoothing: f64,
    uniform: u8,
    slots: Vec<Slot>,
    step: u64,
    last_estimate: Option<u64>,
    rounds: u64,
    /// Rotating estimator: index (into the active slots) of the next slot to measure.
    cursor: usize,
    dirty: bool,
    gather_energy: bool,
    /// `(slot, elements)` the current plan was solved for.
    solved_for: Vec<(usize, usize)>,
    stats: PlanStats,
}

/// The gradient-variance allocator (module docs). `Clone` shares the state.
#[derive(Clone)]
pub struct VariancePlan {
    state: Rc<RefCell<State>>,
}

impl VariancePlan {
    /// `avg_bits` in `[1, 32]` per compressed element; re-estimates every `reallocate_every`
    /// steps (≥ 1).
    pub fn new(avg_bits: f32, reallocate_every: u64, estimator: Estimator) -> Result<Self> {
        if !avg_bits.is_finite() || !(1.0..=32.0).contains(&avg_bits) {
            bail!("the average bit budget must be between 1 and 32, got {avg_bits}");
        }
        if reallocate_every == 0 {
            bail!("the re-allocation interval must be at least 1 step");
        }
        match &estimator {
            Estimator::Numerical(cfg) => cfg.validate()?,
            Estimator::Analytic { group } => {
                if *group == 0 || !group.is_multiple_of(8) {
                    bail!("quantization group {group} must be a positive multiple of 8");
                }
            }
        }
        Ok(Self {
            state: Rc::new(RefCell::new(State {
                avg_bits: avg_bits as f64,
                every: reallocate_every,
                estimator,
                smoothing: 0.5,
                uniform: uniform_rung(avg_bits),
                slots: Vec::new(),
                step: 0,
                last_estimate: None,
                rounds: 0,
                cursor: 0,
                dirty: false,
                gather_energy: false,
                solved_for: Vec::new(),
                stats: PlanStats::default(),
            })),
        })
    }

    /// Weight in `[0, 1)` of the previous sensitivity when a new estimate arrives (default
    /// 0.5; 0 = use the newest estimate alone).
    pub fn with_smoothing(self, weight: f64) -> Result<Self> {
        if !(0.0..1.0).contains(&weight) {
            bail!("smoothing weight must be in [0, 1), got {weight}");
        }
        self.state_mut()?.smoothing = weight;
        Ok(self)
    }

    /// A boxed clone for `CompressPolicy::with_plan`.
    pub fn boxed(&self) -> Box<dyn BitPlan> {
        Box::new(self.clone())
    }

    fn state_mut(&self) -> Result<std::cell::RefMut<'_, State>> {
        self.state
            .try_borrow_mut()
            .map_err(|_| anyhow!("the bit plan is in use (re-entrant call)"))
    }
    fn state(&self) -> Result<std::cell::Ref<'_, State>> {
        self.state
            .try_borrow()
            .map_err(|_| anyhow!("the bit plan is in use (re-entrant call)"))
    }

    /// True when the numerical estimator should run before the next step.
    pub fn due(&self) -> bool {
        let Ok(s) = self.state() else { return false };
        matches!(s.estimator, Estimator::Numerical(_))
            && s.last_estimate
                .is_none_or(|l| s.step >= l.saturating_add(s.every))
    }

    /// Runs the numerical estimate on the first `sub_batch` samples of `(x, y)` if it is due
    /// (see [`VariancePlan::due`]); returns whether it ran. Call once per step, before
    /// `tape.begin_step()`. Classification and language-model batches (cross-entropy on the
    /// model's logits); for other losses use [`VariancePlan::estimate_with`].
    pub fn maybe_estimate(&self, model: &mut Model, x: &Tensor, y: &Tensor) -> Result<bool> {
        if !self.due() {
            return Ok(false);
        }
        self.estimate(model, x, y)?;
        Ok(true)
    }

    /// Runs the numerical estimate now. The model's parameters, gradients and buffers (batch
    /// norm running statistics) are as before when it returns, even on error.
    pub fn estimate(&self, model: &mut Model, x: &Tensor, y: &Tensor) -> Result<()> {
        let cfg = self.numerical_config()?;
        let batch = x.dims().first().copied().unwrap_or(1).max(1);
        let n = cfg.sub_batch.min(batch);
        let (xs, ys) = if n < batch {
            (x.narrow(0, 0, n)?, y.narrow(0, 0, n)?)
        } else {
            (x.clone(), y.clone())
        };
        let snapshot = Snapshot::take(model);
        let result = self.estimate_inner(&cfg, batch as f64 / n as f64, n, |tape: &mut Tape| {
            model.params.zero_grad();
            let logits = model.forward(tape, &xs, None)?;
            let loss = tape.cross_entropy(&logits, &ys, CrossEntropyOptions::default())?;
            drop(logits);
            tape.backward(&loss, &mut model.params)?;
            Ok(ParamGrads::of(&model.params))
        });
        snapshot.restore(model);
        result
    }

    /// The numerical estimate with a caller-supplied pass: `grad_fn` runs forward, loss and
    /// backward on the given tape (already begun: do not call `begin_step`) and returns the
    /// parameter gradients ([`ParamGrads::of`]). The caller restores anything the passes change
    /// (batch-norm statistics, gradients). `batch_scale` = training batch / probe batch,
    /// used to size slots the training policy has not reported yet.
    pub fn estimate_with(
        &self,
        batch_scale: f64,
        grad_fn: impl FnMut(&mut Tape) -> Result<ParamGrads>,
    ) -> Result<()> {
        let cfg = self.numerical_config()?;
        self.estimate_inner(&cfg, batch_scale, 0, grad_fn)
    }

    fn numerical_config(&self) -> Result<NumericalConfig> {
        match &self.state()?.estimator {
            Estimator::Numerical(cfg) => Ok(cfg.clone()),
            Estimator::Analytic { .. } => {
                bail!("the analytic estimator runs inside training steps: nothing to estimate")
            }
        }
    }

    fn estimate_inner(
        &self,
        cfg: &NumericalConfig,
        batch_scale: f64,
        samples: usize,
        grad_fn: impl FnMut(&mut Tape) -> Result<ParamGrads>,
    ) -> Result<()> {
        let est = {
            let s = self.state()?;
            let active = s.active_slots();
            let eligible = if active.is_empty() {
                None
            } else {
                Some(active.iter().copied().collect::<HashSet<usize>>())
            };
            match cfg.sampling {
                Sampling::Randomized => {
                    let round = s.rounds;
                    drop(s);
                    estimate_randomized(cfg, eligible.as_ref(), round, grad_fn)?
                }
                Sampling::Rotating => {
                    let mut probe = SlotProbe::new(
                        cfg.probe_bits,
                        cfg.group,
                        cfg.seed ^ s.rounds.wrapping_mul(0x9E37_79B9),
                    );
                    probe.eligible = eligible;
                    probe.operating_point = active
                        .iter()
                        .map(|&i| (i, s.slots[i].bits.unwrap_or(s.uniform)))
                        .collect();
                    let missing: Vec<usize> = active
                        .iter()
                        .copied()
                        .filter(|&i| s.slots[i].sensitivity.is_none())
                        .collect();
                    probe.targets = if active.is_empty() {
                        None
                    } else if !missing.is_empty() {
                        Some(missing)
                    } else {
                        // Round robin from the cursor.
                        let m = cfg.round_size(active.len());
                        let start = s.cursor % active.len();
                        Some((0..m).map(|k| active[(start + k) % active.len()]).collect())
                    };
                    let advance = match (&probe.targets, active.is_empty()) {
                        (Some(t), false) if t.len() < active.len() => t.len(),
                        _ => 0,
                    };
                    drop(s);
                    let est = estimate_slots(&probe, grad_fn)?;
                    self.state_mut()?.cursor += advance;
                    est
                }
            }
        };
        let mut s = self.state_mut()?;
        let w = s.smoothing;
        for (p, c) in &est.slots {
            if s.slots.len() <= p.slot {
                s.slots.resize_with(p.slot + 1, Slot::default);
            }
            let slot = &mut s.slots[p.slot];
            slot.op = p.op;
            let n: usize = p.shape.iter().product();
            slot.probe_elements = (n as f64 * batch_scale).round() as usize;
            slot.sensitivity = Some(match slot.sensitivity {
                Some(old) if w > 0.0 => w * old + (1.0 - w) * c,
                _ => *c,
            });
        }
        s.last_estimate = Some(s.step);
        s.rounds += 1;
        s.stats.estimates += 1;
        s.stats.passes_per_estimate = est.passes;
        s.stats.samples_per_pass = samples;
        s.stats.last_estimate_seconds = est.seconds;
        s.stats.total_estimate_seconds += est.seconds;
        s.solve();
        Ok(())
    }

    /// Current bits per slot (index = slot; 0 for slots the policy did not quantize in its
    /// last step: masks, indices, exact or small tensors).
    pub fn bits(&self) -> Vec<u8> {
        let Ok(s) = self.state() else {
            return Vec::new();
        };
        let mut out = vec![0u8; s.slots.len()];
        for i in s.listed_slots() {
            out[i] = s.slots[i].bits.unwrap_or(s.uniform);
        }
        out
    }

    /// The slots the policy quantized in its last step (before any step: the probed ones),
    /// with their bits and sensitivities — what metrics and `profile-memory` show.
    pub fn slots(&self) -> Vec<SlotReport> {
        let Ok(s) = self.state() else {
            return Vec::new();
        };
        s.listed_slots()
            .into_iter()
            .map(|i| {
                let sl = &s.slots[i];
                SlotReport {
                    slot: i,
                    op: sl.op,
                    elements: if sl.elements > 0 {
                        sl.elements
                    } else {
                        sl.probe_elements
                    },
                    bits: sl.bits.unwrap_or(s.uniform),
                    sensitivity: sl.sensitivity,
                }
            })
            .collect()
    }

    /// Achieved average bits over the slots of the last training step (elements-weighted).
    pub fn average_bits(&self) -> f64 {
        let Ok(s) = self.state() else { return 0.0 };
        let (mut used, mut total) = (0f64, 0f64);
        for &i in &s.active_slots() {
            let sl = &s.slots[i];
            used += sl.elements as f64 * sl.bits.unwrap_or(s.uniform) as f64;
            total += sl.elements as f64;
        }
        if total > 0.0 {
            used / total
        } else {
            0.0
        }
    }

    pub fn stats(&self) -> PlanStats {
        self.state().map(|s| s.stats.clone()).unwrap_or_default()
    }

    /// Overrides the sensitivities (e.g. from an external estimator) and re-plans.
    pub fn set_sensitivities(&self, sens: &[(usize, f64)]) -> Result<()> {
        let mut s = self.state_mut()?;
        for &(slot, c) in sens {
            if s.slots.len() <= slot {
                s.slots.resize_with(slot + 1, Slot::default);
            }
            s.slots[slot].sensitivity = Some(c);
        }
        s.solve();
        Ok(())
    }
}

/// The compression policy a one-off step at `cfg.level` runs under (`profile-memory`, the
/// `max-batch` probes): with [`Allocator::Variance`] below 8 average bits, a fresh plan that
/// has made its first estimate on `(x, y)` (what `fit` does before its first step), else the
/// uniform policy. Returns the plan too, to report its bits.
pub fn policy_for(
    cfg: CompressConfig,
    allocator: Allocator,
    model: &mut Model,
    x: &Tensor,
    y: &Tensor,
) -> Result<(CompressPolicy, Option<VariancePlan>)> {
    if allocator == Allocator::Uniform || cfg.level.avg_bits() >= 8.0 {
        return Ok((CompressPolicy::new(cfg), None));
    }
    let plan = VariancePlan::new(cfg.level.avg_bits(), u64::MAX, Estimator::numerical())?;
    plan.estimate(model, x, y)?;
    Ok((CompressPolicy::with_plan(cfg, plan.boxed()), Some(plan)))
}

/// The plan's learned state as written into a checkpoint, so a resumed run allocates exactly
/// as the uninterrupted one would (same sensitivities, bits, estimate schedule and rotation).
/// f64s round-trip exactly through JSON (serde_json prints the shortest exact form).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PlanState {
    pub avg_bits: f64,
    pub every: u64,
    pub estimator: String,
    pub smoothing: f64,
    pub step: u64,
    pub last_estimate: Option<u64>,
    pub rounds: u64,
    pub cursor: usize,
    pub dirty: bool,
    pub gather_energy: bool,
    pub solved_for: Vec<(usize, usize)>,
    pub slots: Vec<SlotState>,
    pub estimates: u64,
    pub solves: u64,
}

/// One slot of [`PlanState`].
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SlotState {
    pub op: String,
    pub elements: usize,
    pub seen_step: u64,
    pub probe_elements: usize,
    pub sensitivity: Option<f64>,
    pub energy: Option<Vec<f64>>,
    pub grad: Option<f64>,
    pub bits: Option<u8>,
}

impl VariancePlan {
    /// The state to checkpoint ([`PlanState`]).
    pub fn export_state(&self) -> Result<PlanState> {
        let s = self.state()?;
        Ok(PlanState {
            avg_bits: s.avg_bits,
            every: s.every,
            estimator: s.estimator.name().to_string(),
            smoothing: s.smoothing,
            step: s.step,
            last_estimate: s.last_estimate,
            rounds: s.rounds,
            cursor: s.cursor,
            dirty: s.dirty,
            gather_energy: s.gather_energy,
            solved_for: s.solved_for.clone(),
            slots: s
                .slots
                .iter()
                .map(|sl| SlotState {
                    op: sl.op.to_string(),
                    elements: sl.elements,
                    seen_step: sl.seen_step,
                    probe_elements: sl.probe_elements,
                    sensitivity: sl.sensitivity,
                    energy: sl.energy.clone(),
                    grad: sl.grad,
                    bits: sl.bits,
                })
                .collect(),
            estimates: s.stats.estimates,
            solves: s.stats.solves,
        })
    }

    /// Restores a checkpointed state. The plan must have been built with the same budget,
    /// interval and estimator (a resumed run with different flags is refused, naming them).
    pub fn import_state(&self, st: &PlanState) -> Result<()> {
        let mut s = self.state_mut()?;
        if (s.avg_bits - st.avg_bits).abs() > 1e-9 {
            bail!(
                "the checkpoint's allocator ran at {} average bits, this run asks for {} (--level/--bits must match the original run)",
                st.avg_bits,
                s.avg_bits
            );
        }
        if s.every != st.every {
            bail!(
                "the checkpoint's allocator re-allocated every {} steps, this run asks for {} (--reallocate-every must match the original run)",
                st.every,
                s.every
            );
        }
        if s.estimator.name() != st.estimator {
            bail!(
                "the checkpoint's allocator used the {} estimator, this run the {}",
                st.estimator,
                s.estimator.name()
            );
        }
        if let Some(b) = st
            .slots
            .iter()
            .filter_map(|sl| sl.bits)
            .find(|b| !LADDER.contains(b))
        {
            bail!("the checkpoint's allocator state has {b} bits for a tensor, not a rung of the ladder {LADDER:?}");
        }
        s.smoothing = st.smoothing;
        s.step = st.step;
        s.last_estimate = st.last_estimate;
        s.rounds = st.rounds;
        s.cursor = st.cursor;
        s.dirty = st.dirty;
        s.gather_energy = st.gather_energy;
        s.solved_for = st.solved_for.clone();
        s.slots = st
            .slots
            .iter()
            .map(|sl| Slot {
                op: intern_op(&sl.op),
                elements: sl.elements,
                seen_step: sl.seen_step,
                probe_elements: sl.probe_elements,
                sensitivity: sl.sensitivity,
                energy: sl.energy.clone(),
                grad: sl.grad,
                bits: sl.bits,
            })
            .collect();
        s.stats.estimates = st.estimates;
        s.stats.solves = st.solves;
        Ok(())
    }
}

/// Op names are `&'static str` everywhere else (they come from the ops); a restored name is
/// interned once per distinct name, so resuming never leaks more than the set of op names.
fn intern_op(name: &str) -> &'static str {
    use std::sync::{Mutex, OnceLock};
    static NAMES: OnceLock<Mutex<HashSet<&'static str>>> = OnceLock::new();
    let mut set = NAMES
        .get_or_init(|| Mutex::new(HashSet::new()))
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(&n) = set.get(name) {
        return n;
    }
    let leaked: &'static str = Box::leak(name.to_string().into_boxed_str());
    set.insert(leaked);
    leaked
}

/// `(slot, elements)` pairs.
type SlotSizes = Vec<(usize, usize)>;

/// Ops whose saved input the analytic (ActNN) model covers: its noise enters the weight
/// gradient through `dY` directly ([`super::analytic::amplification`]).
fn has_analytic_model(op: &str) -> bool {
    matches!(op, "conv2d" | "linear" | "matmul")
}

/// The most precise rung within the budget (what `UniformPlan` gives every tensor).
fn uniform_rung(avg_bits: f32) -> u8 {
    LADDER
        .iter()
        .copied()
        .find(|&b| b as f32 <= avg_bits + 1e-6)
        .unwrap_or(LADDER[LADDER.len() - 1])
}

impl State {
    /// Slots the training policy asked about in its most recent step.
    fn active_slots(&self) -> Vec<usize> {
        let last = self.slots.iter().map(|s| s.seen_step).max().unwrap_or(0);
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.elements > 0 && s.seen_step == last)
            .map(|(i, _)| i)
            .collect()
    }

    /// Active slots, or before any training step the probed ones.
    fn listed_slots(&self) -> Vec<usize> {
        let active = self.active_slots();
        if !active.is_empty() {
            return active;
        }
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.sensitivity.is_some() && s.probe_elements > 0)
            .map(|(i, _)| i)
            .collect()
    }

    /// Re-solves the allocation for the active slots (or, before any training step, for the
    /// probed ones at their batch-scaled sizes).
    fn solve(&mut self) {
        let t0 = Instant::now();
        self.dirty = false;
        let set: Vec<(usize, usize)> = self
            .listed_slots()
            .into_iter()
            .map(|i| {
                let s = &self.slots[i];
                (
                    i,
                    if s.elements > 0 {
                        s.elements
                    } else {
                        s.probe_elements
                    },
                )
            })
            .collect();
        let known: Vec<f64> = set
            .iter()
            .filter_map(|&(i, _)| self.slots[i].sensitivity)
            .collect();
        if known.is_empty() {
            return;
        }
        // A slot the estimator has not seen yet (it appeared after the estimate) counts as
        // average: neither starved nor favoured until the next estimate.
        let mean = known.iter().sum::<f64>() / known.len() as f64;
        // The analytic model covers linear/conv contexts only (ActNN's derivation); every
        // other tensor keeps the uniform rung and the rest of the budget goes to those.
        let analytic = matches!(self.estimator, Estimator::Analytic { .. });
        let (free, fixed): (SlotSizes, SlotSizes) = set
            .iter()
            .partition(|&&(i, _)| !analytic || has_analytic_model(self.slots[i].op));
        let total: f64 = set.iter().map(|&(_, d)| d as f64).sum();
        let fixed_bits: f64 = fixed
            .iter()
            .map(|&(_, d)| d as f64 * self.uniform as f64)
            .sum();
        let free_elems: f64 = free.iter().map(|&(_, d)| d as f64).sum();
        let free_avg = if free_elems > 0.0 {
            (self.avg_bits * total - fixed_bits) / free_elems
        } else {
            self.avg_bits
        };
        let costs: Vec<TensorCost> = free
            .iter()
            .map(|&(i, d)| TensorCost {
                elements: d,
                sensitivity: self.slots[i].sensitivity.unwrap_or(mean),
            })
            .collect();
        let alloc = solve(&costs, free_avg);
        for (&(i, _), &b) in free.iter().zip(&alloc.bits) {
            self.slots[i].bits = Some(b);
        }
        for &(i, _) in &fixed {
            self.slots[i].bits = Some(self.uniform);
        }
        self.solved_for = set;
        let dt = t0.elapsed().as_secs_f64();
        self.stats.solves += 1;
        self.stats.last_solve_seconds = dt;
        self.stats.total_solve_seconds += dt;
        self.stats.modelled_variance = alloc.variance;
        self.stats.optimal = alloc.optimal;
    }

    /// True when the slots (or sizes) of the last step differ from what the plan was solved
    /// for: the budget must hold for the tensors actually saved.
    fn stale(&self) -> bool {
        if !self.slots.iter().any(|s| s.sensitivity.is_some()) {
            return false;
        }
        let active = self.active_slots();
        active.len() != self.solved_for.len()
            || active
                .iter()
                .zip(&self.solved_for)
                .any(|(&i, &(j, d))| i != j || self.slots[i].elements != d)
    }
}

impl BitPlan for VariancePlan {
    fn bits_for(&mut self, req: &SaveRequest) -> u8 {
        // Never panic on the save path: a busy plan (cannot happen in a single-threaded step)
        // falls back to the uniform rung.
        let Ok(mut s) = self.state.try_borrow_mut() else {
            return LADDER[LADDER.len() - 1];
        };
        if s.slots.len() <= req.slot {
            s.slots.resize_with(req.slot + 1, Slot::default);
        }
        let elements = req.tensor.elem_count();
        let (step, gather) = (s.step, s.gather_energy);
        let group = match s.estimator {
            Estimator::Analytic { group } => group,
            Estimator::Numerical(ref c) => c.group,
        };
        let energy = if gather {
            let t0 = Instant::now();
            let e = noise_energy_per_sample(req.tensor, group).ok();
            let dt = t0.elapsed().as_secs_f64();
            s.stats.last_estimate_seconds += dt;
            s.stats.total_estimate_seconds += dt;
            e
        } else {
            None
        };
        let uniform = s.uniform;
        let slot = &mut s.slots[req.slot];
        slot.op = req.op;
        slot.elements = elements;
        slot.seen_step = step;
        if gather {
            slot.energy = energy;
        }
        slot.bits.unwrap_or(uniform)
    }

    fn bits_for_rows(&mut self, op: &'static str, slot: usize, elements: usize) -> Option<u8> {
        let Ok(mut s) = self.state.try_borrow_mut() else {
            return Some(LADDER[LADDER.len() - 1]);
        };
        // An analytic estimate reads every saved tensor whole: gather it this step.
        if s.gather_energy {
            return None;
        }
        if s.slots.len() <= slot {
            s.slots.resize_with(slot + 1, Slot::default);
        }
        let (step, uniform) = (s.step, s.uniform);
        let slot = &mut s.slots[slot];
        slot.op = op;
        slot.elements = elements;
        slot.seen_step = step;
        Some(slot.bits.unwrap_or(uniform))
    }

    fn wants_output_grads(&self) -> bool {
        self.state.try_borrow().is_ok_and(|s| s.gather_energy)
    }

    fn observe_output_grad(&mut self, obs: &GradObservation) {
        let Ok(mut s) = self.state.try_borrow_mut() else {
            return;
        };
        let t0 = Instant::now();
        if let Some(sl) = s.slots.get_mut(obs.slot) {
            if let Some(energy) = &sl.energy {
                let factor = amplification(obs.op, obs.saved_shape, obs.input_shapes);
                let c = analytic_sensitivity(energy, obs.per_sample_sq, factor);
                sl.grad = Some(sl.grad.unwrap_or(0.0) + c);
            }
        }
        let dt = t0.elapsed().as_secs_f64();
        s.stats.last_estimate_seconds += dt;
        s.stats.total_estimate_seconds += dt;
    }

    fn begin_step(&mut self, step: u64) {
        let Ok(mut s) = self.state.try_borrow_mut() else {
            return;
        };
        if s.gather_energy {
            // The analytic estimate gathered during the previous step becomes the plan.
            let w = s.smoothing;
            for sl in &mut s.slots {
                if sl.energy.take().is_some() {
                    // No output gradient reached the node: its noise cannot reach the
                    // parameter gradient either.
                    let e = sl.grad.take().unwrap_or(0.0);
                    sl.sensitivity = Some(match sl.sensitivity {
                        Some(old) if w > 0.0 => w * old + (1.0 - w) * e,
                        _ => e,
                    });
                }
            }
            s.gather_energy = false;
            s.dirty = true;
        }
        s.step = step;
        if matches!(s.estimator, Estimator::Analytic { .. })
            && s.last_estimate
                .is_none_or(|l| step >= l.saturating_add(s.every))
        {
            s.gather_energy = true;
            s.last_estimate = Some(step);
            s.stats.estimates += 1;
            s.stats.last_estimate_seconds = 0.0;
        }
        if s.dirty || s.stale() {
            s.solve();
        }
    }
}

/// Model state the estimation passes touch: gradients and non-trainable buffers.
struct Snapshot {
    grads: Vec<(ParamId, Tensor)>,
    buffers: Vec<(ParamId, Tensor)>,
}

impl Snapshot {
    fn take(model: &Model) -> Self {
        let mut grads = Vec::new();
        let mut buffers = Vec::new();
        for (id, p) in model.params.iter() {
            if let Some(g) = &p.grad {
                grads.push((id, g.clone()));
            }
            if !p.trainable {
                buffers.push((id, p.value.clone()));
            }
        }
        Self { grads, buffers }
    }

    fn restore(self, model: &mut Model) {
        model.params.zero_grad();
        for (id, g) in self.grads {
            // Into an empty slot: cannot fail (no addition happens).
            let _ = model.params.accumulate_grad(id, g);
        }
        for (id, v) in self.buffers {
            model.params.set_value(id, v);
        }
    }
}
