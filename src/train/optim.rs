//! Optimizers (SGD with momentum/Nesterov, AdamW) and the gradient utilities the training loop
//! runs before each step (global-norm clipping, a NaN/Inf check).
//!
//! The update rules follow PyTorch's `torch.optim.SGD` (dampening 0) and `torch.optim.AdamW`
//! exactly, so hyper-parameters from the literature transfer unchanged. Everything is written
//! with candle tensor ops (never host loops) so the same code runs on CPU and CUDA; the only
//! host transfers are the few scalars that `clip_grad_norm` and `grads_finite` must look at.
//!
//! Memory: the optimizer state is its own bucket in the memory report (`state_bytes`). A step
//! replaces each parameter through [`ParamStore::set_value`] and removes the old state of a
//! parameter before computing its new state, so at most one parameter's old and new tensors
//! are alive at the same time.

use crate::tape::{ParamId, ParamStore};
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use std::collections::{BTreeMap, HashMap};

/// Which optimizer to run, with its hyper-parameters (the learning rate comes from the
/// schedule, per step).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum OptimizerConfig {
    /// PyTorch SGD with dampening 0: `d = g + wd·p`; with momentum `b = μ·b + d` (first step
    /// `b = d`) and `d = b`, or `d = d + μ·b` with Nesterov; then `p -= lr·d`.
    Sgd {
        momentum: f64,
        nesterov: bool,
        weight_decay: f64,
    },
    /// PyTorch AdamW: decoupled decay `p -= lr·wd·p`, then the bias-corrected Adam step.
    AdamW {
        beta1: f64,
        beta2: f64,
        eps: f64,
        weight_decay: f64,
    },
}

impl OptimizerConfig {
    /// Rejects hyper-parameters PyTorch would reject, so a typo in a config fails before the
    /// first step instead of producing NaNs later.
    pub fn validate(&self) -> Result<()> {
        fn non_negative(what: &str, x: f64) -> Result<()> {
            if !(x.is_finite() && x >= 0.0) {
                bail!("{what} must be a finite number >= 0, got {x}");
            }
            Ok(())
        }
        match *self {
            OptimizerConfig::Sgd {
                momentum,
                nesterov,
                weight_decay,
            } => {
                non_negative("SGD momentum", momentum)?;
                non_negative("SGD weight_decay", weight_decay)?;
                if nesterov && momentum == 0.0 {
                    bail!("SGD with nesterov = true needs a momentum > 0");
                }
            }
            OptimizerConfig::AdamW {
                beta1,
                beta2,
                eps,
                weight_decay,
            } => {
                for (what, b) in [("AdamW beta1", beta1), ("AdamW beta2", beta2)] {
                    if !(0.0..1.0).contains(&b) {
                        bail!("{what} must be in [0, 1), got {b}");
                    }
                }
                non_negative("AdamW eps", eps)?;
                non_negative("AdamW weight_decay", weight_decay)?;
            }
        }
        Ok(())
    }

    /// Short name for messages.
    pub fn kind_name(&self) -> &'static str {
        match self {
            OptimizerConfig::Sgd { .. } => "SGD",
            OptimizerConfig::AdamW { .. } => "AdamW",
        }
    }

    /// Checkpoint name prefixes of the per-parameter state this configuration keeps, in the
    /// order `ParamState::tensors` returns them. Plain SGD keeps none.
    fn state_kinds(&self) -> &'static [&'static str] {
        match self {
            OptimizerConfig::Sgd { momentum, .. } if *momentum == 0.0 => &[],
            OptimizerConfig::Sgd { .. } => &[SGD_MOMENTUM],
            OptimizerConfig::AdamW { .. } => &[ADAMW_M, ADAMW_V],
        }
    }
}

const SGD_MOMENTUM: &str = "sgd.momentum";
const ADAMW_M: &str = "adamw.m";
const ADAMW_V: &str = "adamw.v";

/// The state of one parameter. A parameter that never had a gradient has none, which is
/// equivalent to all-zero state (dampening 0 makes the first momentum step `b = g`; Adam's
/// moments start at zero).
enum ParamState {
    Momentum { buf: Tensor },
    Adam { m: Tensor, v: Tensor },
}

impl ParamState {
    fn tensors(&self) -> Vec<&Tensor> {
        match self {
            ParamState::Momentum { buf } => vec![buf],
            ParamState::Adam { m, v } => vec![m, v],
        }
    }

    fn from_tensors(cfg: &OptimizerConfig, mut ts: Vec<Tensor>) -> Option<Self> {
        match cfg {
            OptimizerConfig::Sgd { .. } if ts.len() == 1 => {
                ts.pop().map(|buf| ParamState::Momentum { buf })
            }
            OptimizerConfig::AdamW { .. } if ts.len() == 2 => {
                let v = ts.pop()?;
                let m = ts.pop()?;
                Some(ParamState::Adam { m, v })
            }
            _ => None,
        }
    }
}

/// An optimizer: its configuration, the per-parameter state and the number of steps taken.
pub struct Optimizer {
    cfg: OptimizerConfig,
    /// Keyed by parameter id; ordered so checkpoints and errors are deterministic.
    state: BTreeMap<ParamId, ParamState>,
    steps: u64,
}

impl Optimizer {
    pub fn new(cfg: OptimizerConfig) -> Self {
        Self {
            cfg,
            state: BTreeMap::new(),
            steps: 0,
        }
    }

    pub fn config(&self) -> &OptimizerConfig {
        &self.cfg
    }

    /// Number of completed `step` calls (AdamW's bias correction uses it; checkpoints store
    /// it as `optimizer_steps`).
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Applies one update with learning rate `lr` to every trainable parameter that has a
    /// gradient. Buffers and parameters without a gradient are left alone (and their state is
    /// not advanced). Gradients are not cleared: the caller owns that decision.
    ///
    /// Gradient shapes, dtypes and devices are checked for every parameter before any is
    /// changed, so a mismatch leaves the store untouched. An error from a tensor op in the
    /// middle of the update (e.g. out of device memory) leaves the step half-applied: treat it
    /// as fatal.
    ///
    /// The bias correction of AdamW uses the optimizer's global step count, which equals
    /// PyTorch's per-parameter count whenever every parameter gets a gradient every step.
    pub fn step(&mut self, params: &mut ParamStore, lr: f64) -> Result<()> {
        self.cfg.validate()?;
        if !(lr.is_finite() && lr >= 0.0) {
            bail!("learning rate must be a finite number >= 0, got {lr}");
        }
        let mut work = Vec::new();
        for (id, p) in params.iter() {
            if !p.trainable {
                continue;
            }
            let Some(g) = &p.grad else { continue };
            if g.dims() != p.value.dims() {
                bail!(
                    "gradient of `{}` has shape {:?} but the parameter has shape {:?}",
                    p.name,
                    g.dims(),
                    p.value.dims()
                );
            }
            if g.dtype() != p.value.dtype() {
                bail!(
                    "gradient of `{}` is {:?} but the parameter is {:?}",
                    p.name,
                    g.dtype(),
                    p.value.dtype()
                );
            }
            if !g.device().same_device(p.value.device()) {
                bail!(
                    "gradient of `{}` is on {:?} but the parameter is on {:?}",
                    p.name,
                    g.device(),
                    p.value.device()
                );
            }
            if let Some(st) = self.state.get(&id) {
                if let Some(t) = st
                    .tensors()
                    .into_iter()
                    .find(|t| t.dims() != p.value.dims())
                {
                    bail!(
                        "optimizer state of `{}` has shape {:?} but the parameter now has shape {:?}",
                        p.name,
                        t.dims(),
                        p.value.dims()
                    );
                }
            }
            work.push((id, p.value.clone(), g.clone()));
        }
        let t = self.steps + 1;
        for (id, value, grad) in work {
            // Taking the old state out of the map lets it be freed as soon as the new state
            // has been computed from it.
            let old = self.state.remove(&id);
            let (new_value, new_state) = match self.cfg {
                OptimizerConfig::Sgd {
                    momentum,
                    nesterov,
                    weight_decay,
                } => sgd_update(&value, &grad, old, lr, momentum, nesterov, weight_decay)?,
                OptimizerConfig::AdamW {
                    beta1,
                    beta2,
                    eps,
                    weight_decay,
                } => {
                    let (m, v) = match old {
                        Some(ParamState::Adam { m, v }) => (Some(m), Some(v)),
                        _ => (None, None),
                    };
                    let hp = AdamHyper {
                        lr,
                        beta1,
                        beta2,
                        eps,
                        weight_decay,
                        t,
                    };
                    adamw_update(&value, &grad, m, v, &hp)?
                }
            };
            drop(value);
            params.set_value(id, new_value);
            if let Some(st) = new_state {
                self.state.insert(id, st);
            }
        }
        self.steps = t;
        Ok(())
    }

    /// Bytes held by the optimizer state (momentum buffers, Adam moments).
    pub fn state_bytes(&self) -> usize {
        self.state
            .values()
            .flat_map(|s| s.tensors())
            .map(|t| t.elem_count() * t.dtype().size_in_bytes())
            .sum()
    }

    /// The state as named tensors for a checkpoint, in parameter order: `sgd.momentum.<param>`
    /// or `adamw.m.<param>` and `adamw.v.<param>`. Parameters without state are omitted.
    pub fn state_tensors(&self, params: &ParamStore) -> Vec<(String, Tensor)> {
        let kinds = self.cfg.state_kinds();
        let mut out = Vec::new();
        for (id, p) in params.iter() {
            let Some(st) = self.state.get(&id) else {
                continue;
            };
            for (kind, t) in kinds.iter().zip(st.tensors()) {
                out.push((format!("{kind}.{}", p.name), t.clone()));
            }
        }
        out
    }

    /// Replaces the state with the checkpointed `tensors` (as written by `state_tensors`) and
    /// the step count with `steps`. Every entry must name a trainable parameter of `params`
    /// with the parameter's shape and dtype and belong to this optimizer kind; a parameter's
    /// entries come all together or not at all (no entries: it never had a gradient). Tensors
    /// are moved to the parameter's device. On error the optimizer is unchanged.
    pub fn load_state(
        &mut self,
        params: &ParamStore,
        tensors: &HashMap<String, Tensor>,
        steps: u64,
    ) -> Result<()> {
        let kinds = self.cfg.state_kinds();
        let expected = if kinds.is_empty() {
            format!(
                "{} with these settings keeps no state",
                self.cfg.kind_name()
            )
        } else {
            let forms: Vec<String> = kinds.iter().map(|k| format!("`{k}.<param>`")).collect();
            format!("expected entries named {}", forms.join(" and "))
        };
        let mut keys: Vec<&String> = tensors.keys().collect();
        keys.sort();
        let mut found: BTreeMap<ParamId, Vec<Option<Tensor>>> = BTreeMap::new();
        for key in keys {
            let t = &tensors[key];
            let parsed = kinds.iter().enumerate().find_map(|(i, k)| {
                key.strip_prefix(k)
                    .and_then(|rest| rest.strip_prefix('.'))
                    .map(|name| (i, name))
            });
            let Some((kind, name)) = parsed else {
                bail!(
                    "optimizer state entry `{key}` does not belong to {} ({expected})",
                    self.cfg.kind_name()
                );
            };
            let Some(id) = params.id(name) else {
                bail!("optimizer state entry `{key}` is for parameter `{name}`, which the model does not have");
            };
            let p = params.get(id);
            if !p.trainable {
                bail!("optimizer state entry `{key}` is for `{name}`, a buffer, which has no optimizer state");
            }
            if t.dims() != p.value.dims() {
                bail!(
                    "optimizer state entry `{key}` has shape {:?} but parameter `{name}` has shape {:?}",
                    t.dims(),
                    p.value.dims()
                );
            }
            if t.dtype() != p.value.dtype() {
                bail!(
                    "optimizer state entry `{key}` is {:?} but parameter `{name}` is {:?}",
                    t.dtype(),
                    p.value.dtype()
                );
            }
            let t = t.to_device(p.value.device())?;
            found.entry(id).or_insert_with(|| vec![None; kinds.len()])[kind] = Some(t);
        }
        let mut state = BTreeMap::new();
        for (id, slots) in found {
            let name = &params.get(id).name;
            if let Some(i) = slots.iter().position(Option::is_none) {
                bail!(
                    "optimizer state entry `{}.{name}` is missing (other state of `{name}` is present)",
                    kinds[i]
                );
            }
            let ts: Vec<Tensor> = slots.into_iter().flatten().collect();
            let Some(st) = ParamState::from_tensors(&self.cfg, ts) else {
                bail!(
                    "optimizer state of `{name}` does not fit {}",
                    self.cfg.kind_name()
                );
            };
            state.insert(id, st);
        }
        if steps == 0 && !state.is_empty() {
            bail!("optimizer state is present but the step count is 0; the checkpoint metadata does not match its optimizer state");
        }
        if steps > 0 && state.is_empty() && !kinds.is_empty() {
            if let Some((_, p)) = params.iter().find(|(_, p)| p.trainable) {
                bail!(
                    "optimizer state is missing after {steps} steps: expected `{}.{}` and the like",
                    kinds[0],
                    p.name
                );
            }
        }
        self.state = state;
        self.steps = steps;
        Ok(())
    }
}

/// SGD for one parameter: returns the new value and the new state (None without momentum).
fn sgd_update(
    p: &Tensor,
    g: &Tensor,
    old: Option<ParamState>,
    lr: f64,
    momentum: f64,
    nesterov: bool,
    weight_decay: f64,
) -> Result<(Tensor, Option<ParamState>)> {
    // `d` aliases the gradient when there is no weight decay.
    let (d, fresh) = if weight_decay != 0.0 {
        ((p.affine(weight_decay, 0.0)? + g)?, true)
    } else {
        (g.clone(), false)
    };
    let (dir, state) = if momentum != 0.0 {
        let buf = match old {
            Some(ParamState::Momentum { buf }) => (buf.affine(momentum, 0.0)? + &d)?,
            // First step: `b = d`. Copy when `d` is the gradient itself so the buffer never
            // shares storage with a tensor the caller owns.
            _ if fresh => d.clone(),
            _ => d.copy()?,
        };
        let dir = if nesterov {
            (d + buf.affine(momentum, 0.0)?)?
        } else {
            drop(d);
            buf.clone()
        };
        (dir, Some(ParamState::Momentum { buf }))
    } else {
        (d, None)
    };
    let new = (p - dir.affine(lr, 0.0)?)?;
    Ok((new, state))
}

struct AdamHyper {
    lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
    /// 1-based step number for the bias correction.
    t: u64,
}

/// AdamW for one parameter; `m`/`v` are None on the parameter's first step (zero moments).
fn adamw_update(
    p: &Tensor,
    g: &Tensor,
    m: Option<Tensor>,
    v: Option<Tensor>,
    h: &AdamHyper,
) -> Result<(Tensor, Option<ParamState>)> {
    let m = match m {
        Some(m) => (m.affine(h.beta1, 0.0)? + g.affine(1.0 - h.beta1, 0.0)?)?,
        None => g.affine(1.0 - h.beta1, 0.0)?,
    };
    let g2 = g.sqr()?;
    let v = match v {
        Some(v) => (v.affine(h.beta2, 0.0)? + g2.affine(1.0 - h.beta2, 0.0)?)?,
        None => g2.affine(1.0 - h.beta2, 0.0)?,
    };
    drop(g2);
    // Exponents above i32::MAX saturate; by then beta^t is 0 anyway.
    let t = i32::try_from(h.t).unwrap_or(i32::MAX);
    let bc1 = 1.0 - h.beta1.powi(t);
    let bc2_sqrt = (1.0 - h.beta2.powi(t)).sqrt();
    let step_size = h.lr / bc1;
    let denom = v.sqrt()?.affine(1.0 / bc2_sqrt, h.eps)?;
    let upd = (&m / denom)?.affine(step_size, 0.0)?;
    let decayed = if h.weight_decay != 0.0 {
        p.affine(1.0 - h.lr * h.weight_decay, 0.0)?
    } else {
        p.clone()
    };
    let new = (decayed - upd)?;
    Ok((new, Some(ParamState::Adam { m, v })))
}

/// Trainable parameters that have a gradient, with it.
fn grads(params: &ParamStore) -> Vec<(ParamId, &str, &Tensor)> {
    params
        .iter()
        .filter(|(_, p)| p.trainable)
        .filter_map(|(id, p)| p.grad.as_ref().map(|g| (id, p.name.as_str(), g)))
        .collect()
}

/// Per-tensor scalars gathered into one f64 vector so the host waits on the device once.
fn gather_scalars(scalars: Vec<Tensor>) -> Result<Vec<f64>> {
    if scalars.is_empty() {
        return Ok(Vec::new());
    }
    let scalars = scalars
        .into_iter()
        .map(|s| s.to_dtype(DType::F64))
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(Tensor::stack(&scalars, 0)?.to_vec1::<f64>()?)
}

/// Clips the gradients of the trainable parameters to a global L2 norm of `max_norm`, like
/// PyTorch's `clip_grad_norm_`: when the norm exceeds `max_norm`, every gradient is scaled by
/// `max_norm / (norm + 1e-6)`. Returns the norm before clipping. A non-finite norm is returned
/// without scaling (scaling would turn every gradient into NaN); check `grads_finite`.
pub fn clip_grad_norm(params: &mut ParamStore, max_norm: f64) -> Result<f64> {
    if !(max_norm.is_finite() && max_norm > 0.0) {
        bail!("max gradient norm must be a finite number > 0, got {max_norm}");
    }
    let gs = grads(params);
    let mut sums = Vec::with_capacity(gs.len());
    for (_, _, g) in &gs {
        // Half-precision squares overflow early; sum in at least f32.
        let g = match g.dtype() {
            DType::F32 | DType::F64 => (*g).clone(),
            _ => g.to_dtype(DType::F32)?,
        };
        sums.push(g.sqr()?.sum_all()?);
    }
    let ids: Vec<ParamId> = gs.iter().map(|(id, _, _)| *id).collect();
    let norm = gather_scalars(sums)?.iter().sum::<f64>().sqrt();
    if norm.is_finite() && norm > max_norm {
        let coef = max_norm / (norm + 1e-6);
        for id in ids {
            if let Some(g) = params.take_grad(id) {
                params.accumulate_grad(id, g.affine(coef, 0.0)?)?;
            }
        }
    }
    Ok(norm)
}

/// `None` when every gradient of a trainable parameter is finite, else the name of the first
/// parameter (in store order) whose gradient holds a NaN or an infinity. Uses `sum(g - g)`,
/// which is 0 exactly for finite values and NaN otherwise, so large finite gradients cannot be
/// mistaken for overflow.
pub fn grads_finite(params: &ParamStore) -> Result<Option<String>> {
    let gs = grads(params);
    let mut sums = Vec::with_capacity(gs.len());
    for (_, _, g) in &gs {
        sums.push(g.sub(g)?.sum_all()?);
    }
    let vals = gather_scalars(sums)?;
    Ok(vals
        .iter()
        .zip(&gs)
        .find(|(v, _)| !v.is_finite())
        .map(|(_, (_, name, _))| (*name).to_string()))
}
