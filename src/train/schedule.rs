//! Learning-rate schedules: a linear warmup followed by constant, step or cosine decay.
//!
//! The schedule is a pure function of the step number, so a resumed run gets exactly the
//! learning rates it would have had without the interruption; nothing about it needs to be
//! checkpointed beyond the step.

use std::fmt;
use std::str::FromStr;

/// The shape of the schedule after warmup.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum ScheduleKind {
    /// `base_lr` throughout.
    Constant,
    /// `base_lr · gamma^⌊s / every⌋`, `s` counted from the end of warmup.
    Step { every: u64, gamma: f64 },
    /// Half a cosine from `base_lr` down to `min_lr` over the steps after warmup.
    Cosine { min_lr: f64 },
}

/// A learning-rate schedule over `total_steps` optimizer steps (counted from 0).
#[derive(Clone, Debug, PartialEq)]
pub struct Schedule {
    pub kind: ScheduleKind,
    pub base_lr: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
}

impl Schedule {
    /// The learning rate for optimizer step `step` (0-based).
    ///
    /// During warmup (`step < warmup_steps`) it rises linearly, `base_lr · (step + 1) /
    /// warmup_steps`, so the first step already moves (`base_lr / warmup_steps`) and the last
    /// warmup step reaches `base_lr`. After warmup, `s = step - warmup_steps` runs the
    /// schedule over the remaining `total_steps - warmup_steps` steps; steps past the end keep
    /// the final value. `Step` with `every == 0` never decays (the CLI parser rejects it).
    pub fn lr(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.base_lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let s = step - self.warmup_steps;
        match self.kind {
            ScheduleKind::Constant => self.base_lr,
            ScheduleKind::Step { every, gamma } => {
                if every == 0 {
                    return self.base_lr;
                }
                let k = i32::try_from(s / every).unwrap_or(i32::MAX);
                self.base_lr * gamma.powi(k)
            }
            ScheduleKind::Cosine { min_lr } => {
                let span = self.total_steps.saturating_sub(self.warmup_steps).max(1);
                let progress = (s as f64 / span as f64).min(1.0);
                min_lr
                    + (self.base_lr - min_lr)
                        * 0.5
                        * (1.0 + (std::f64::consts::PI * progress).cos())
            }
        }
    }
}

const ACCEPTED: &str = "`constant`, `step:EVERY:GAMMA` (e.g. `step:1000:0.1`), `cosine` or `cosine:MIN_LR` (e.g. `cosine:1e-5`)";

/// A schedule string that does not parse; the message names the string and the accepted forms.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("invalid learning-rate schedule `{input}`: {reason}; accepted forms: {ACCEPTED}")]
pub struct ScheduleParseError {
    pub input: String,
    pub reason: String,
}

impl FromStr for ScheduleKind {
    type Err = ScheduleParseError;

    /// Parses the CLI form: `constant`, `step:EVERY:GAMMA`, `cosine` (min 0) or
    /// `cosine:MIN_LR`. The kind name is case-insensitive; surrounding spaces are ignored.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason: String| ScheduleParseError {
            input: s.to_string(),
            reason,
        };
        let parts: Vec<&str> = s.trim().split(':').map(str::trim).collect();
        let kind = parts[0].to_ascii_lowercase();
        match (kind.as_str(), &parts[1..]) {
            ("constant", []) => Ok(ScheduleKind::Constant),
            ("step", [every, gamma]) => {
                let every: u64 = every
                    .parse()
                    .map_err(|_| err(format!("EVERY `{every}` is not a whole number of steps")))?;
                if every == 0 {
                    return Err(err("EVERY must be at least 1".into()));
                }
                let g: f64 = gamma
                    .parse()
                    .map_err(|_| err(format!("GAMMA `{gamma}` is not a number")))?;
                if !(g.is_finite() && g > 0.0) {
                    return Err(err(format!("GAMMA must be a finite number > 0, got {g}")));
                }
                Ok(ScheduleKind::Step { every, gamma: g })
            }
            ("cosine", []) => Ok(ScheduleKind::Cosine { min_lr: 0.0 }),
            ("cosine", [min]) => {
                let m: f64 = min
                    .parse()
                    .map_err(|_| err(format!("MIN_LR `{min}` is not a number")))?;
                if !(m.is_finite() && m >= 0.0) {
                    return Err(err(format!("MIN_LR must be a finite number >= 0, got {m}")));
                }
                Ok(ScheduleKind::Cosine { min_lr: m })
            }
            ("constant" | "step" | "cosine", args) => Err(err(format!(
                "`{kind}` does not take {} argument{}",
                args.len(),
                if args.len() == 1 { "" } else { "s" }
            ))),
            _ => Err(err(format!("unknown schedule `{}`", parts[0]))),
        }
    }
}

/// The CLI form, so `to_string().parse()` round-trips.
impl fmt::Display for ScheduleKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ScheduleKind::Constant => write!(f, "constant"),
            ScheduleKind::Step { every, gamma } => write!(f, "step:{every}:{gamma}"),
            ScheduleKind::Cosine { min_lr } => write!(f, "cosine:{min_lr}"),
        }
    }
}
