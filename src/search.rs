//! `actrain max-batch`: the largest batch that trains in a given memory, per compression level.
//!
//! A **probe** builds the model, makes a worst-case batch (the full sample shape, random
//! values) and runs at least two full training steps (forward, cross-entropy, backward, SGD
//! with momentum, zero-grad) under a memory budget: the counting allocator's peak above the
//! probe's own baseline may not pass it. It *fits* if no step hit the budget; an
//! out-of-memory is the typed [`crate::memory::OutOfMemory`], never a string match, and every
//! other error propagates. Everything the probe allocated is dropped before it returns (or, with
//! `--isolate`, the probe runs in a fresh process).
//!
//! The **search** per level (rules from the peers' bug trackers, DESIGN.md §6): double from
//! `start` until a probe fails or `max` is reached, bisect between the last fit and the first
//! failure to the exact edge (in multiples of `multiple_of`), search downward when the very first
//! probe fails, re-verify the winner with one more probe (stepping down if it no longer fits),
//! and only ever report a size that was probed and fitted. The budget handed to probes is
//! `(1 − margin) · memory`.

use crate::allocate::{policy_for, Allocator};
use crate::compress::policy::{CompressConfig, Level};
use crate::data::{self, Dataset, LoadOptions, Spec, Task};
use crate::memory::{self, human_bytes};
use crate::model::{self, InputSpec, Model, ModelDef};
use crate::ops::loss::CrossEntropyOptions;
use crate::tape::Tape;
use crate::train::optim::{Optimizer, OptimizerConfig};
use anyhow::{anyhow, bail, Context as _, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The levels `--levels` defaults to.
pub const ALL_LEVELS: [Level; 5] = [Level::L0, Level::L1, Level::L2, Level::L3, Level::L4];

/// Key of the one JSON line a `--probe-only` child prints on stdout.
pub const PROBE_MARKER: &str = "actrain_probe";

/// Learning rate of the probe's optimizer steps (the values do not matter, the memory does).
const PROBE_LR: f64 = 1e-3;

// ---------------------------------------------------------------------------------------------
// Probe
// ---------------------------------------------------------------------------------------------

/// What one probe found.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum ProbeOutcome {
    /// Every step ran within the budget.
    Fits {
        /// Highest live bytes above the probe's baseline (model, optimizer state, batch,
        /// activations, temporaries).
        peak_bytes: usize,
        /// Samples per second over the steps after the first.
        samples_per_second: f64,
    },
    /// A step passed the budget; `at_bytes` is the peak above the baseline when it stopped.
    OutOfMemory { at_bytes: usize },
}

impl ProbeOutcome {
    pub fn fits(&self) -> bool {
        matches!(self, ProbeOutcome::Fits { .. })
    }
}

/// The model's input for a dataset (the trainer's mapping). Graph data (GCN) is full-batch and
/// has no batch size to search, so it is rejected.
pub fn input_spec(ds: &Dataset) -> Result<InputSpec> {
    let spec = crate::train::trainer::input_spec(ds);
    if spec.graph || matches!(ds.task, Task::NodeClassification { .. }) {
        bail!(graph_rejection(&ds.name));
    }
    Ok(spec)
}

fn graph_rejection(data: &str) -> String {
    format!(
        "--data {data}: graph data (GCN node classification) trains full-batch on the whole graph; \
         there is no batch size to search"
    )
}

/// Loads just enough of `--data` (a few samples) to know the sample shape and the number of
/// classes or the vocabulary; graphs are rejected before anything is read.
pub fn load_input_spec(data_spec: &str, seq_len: usize, seed: u64) -> Result<InputSpec> {
    let parsed = data::spec::parse(data_spec).context("--data")?;
    if matches!(parsed, Spec::Graph(_) | Spec::GraphSynthetic) {
        bail!(graph_rejection(data_spec.trim()));
    }
    let opts = LoadOptions {
        seed,
        seq_len,
        limit: Some(8),
        ..LoadOptions::default()
    };
    let ds = data::load(data_spec, &opts).with_context(|| format!("--data {data_spec}"))?;
    input_spec(&ds)
}

/// Bytes of a batch's inputs and labels (both 4-byte elements).
fn batch_bytes(input: &InputSpec, batch: usize) -> usize {
    let sample: usize = input.sample_shape.iter().product();
    let label = if input.tokens { sample } else { 1 };
    batch.saturating_mul(sample + label).saturating_mul(4)
}

/// The probe's training steps; returns samples per second over the steps after the first.
/// Everything it allocates lives in this frame and is dropped when it returns, OOM or not.
fn probe_steps(
    def: &ModelDef,
    input: &InputSpec,
    level: Level,
    allocator: Allocator,
    batch: usize,
    steps: usize,
    seed: u64,
) -> Result<f64> {
    let (x, y) = crate::model::random_batch(input, batch, seed)?;
    let mut model = Model::build(def, input, seed)?;
    // With the variance allocator the plan's first estimate runs here, inside the budget, as
    // it does before `fit`'s first step; its bits (up to the level's average) are what the
    // steps store.
    let cfg = CompressConfig {
        level,
        seed,
        ..CompressConfig::default()
    };
    let (policy, _plan) = policy_for(cfg, allocator, &mut model, &x, &y)?;
    let mut tape = Tape::new(Box::new(policy)).with_seed(seed);
    tape.train_mode();
    let mut opt = Optimizer::new(OptimizerConfig::Sgd {
        momentum: 0.9,
        nesterov: false,
        weight_decay: 0.0,
    });
    let mut timed_from = Instant::now();
    for step in 0..steps {
        if step == 1 {
            timed_from = Instant::now();
        }
        tape.begin_step();
        let logits = model.forward(&mut tape, &x, None)?;
        let loss = tape.cross_entropy(&logits, &y, CrossEntropyOptions::default())?;
        drop(logits);
        tape.backward(&loss, &mut model.params)?;
        drop(loss);
        // The optimizer records no ops: check the budget after its step ourselves, so a peak
        // reached while updating (momentum buffers appear at step 1) is not missed.
        memory::check_budget()?;
        opt.step(&mut model.params, PROBE_LR)?;
        memory::check_budget()?;
        model.params.zero_grad();
    }
    let secs = timed_from.elapsed().as_secs_f64().max(1e-9);
    Ok(((steps - 1) * batch) as f64 / secs)
}

/// One probe: builds `def` (seeded), runs `steps` (≥ 2) full training steps at `batch` under
/// `budget_bytes` of live memory above the baseline taken before anything is built, and
/// reports whether it fitted. Out-of-memory is an outcome; any other error is returned.
/// The budget is cleared and everything the probe allocated is dropped before it returns.
pub fn probe(
    def: &ModelDef,
    input: &InputSpec,
    level: Level,
    batch: usize,
    budget_bytes: usize,
    steps: usize,
    seed: u64,
) -> Result<ProbeOutcome> {
    probe_with(
        def,
        input,
        level,
        Allocator::Uniform,
        batch,
        budget_bytes,
        steps,
        seed,
    )
}

/// [`probe`] with the bits of `allocator` (the variance allocator runs its first estimate
/// inside the probe's budget).
#[allow(clippy::too_many_arguments)]
pub fn probe_with(
    def: &ModelDef,
    input: &InputSpec,
    level: Level,
    allocator: Allocator,
    batch: usize,
    budget_bytes: usize,
    steps: usize,
    seed: u64,
) -> Result<ProbeOutcome> {
    if batch == 0 {
        bail!("probe: the batch size must be at least 1");
    }
    if steps < 2 {
        bail!("probe: at least 2 steps are needed (optimizer state exists from the second)");
    }
    if input.graph {
        bail!("probe: graph inputs are full-batch; there is no batch size to probe");
    }
    if budget_bytes == 0 {
        bail!("probe: the memory budget must be positive");
    }
    // The batch alone would not fit: certain, and not worth allocating.
    let data_bytes = batch_bytes(input, batch);
    if data_bytes > budget_bytes {
        return Ok(ProbeOutcome::OutOfMemory {
            at_bytes: data_bytes,
        });
    }
    let baseline = memory::current_bytes();
    memory::set_budget(Some(baseline.saturating_add(budget_bytes)));
    memory::reset_peak();
    let result = probe_steps(def, input, level, allocator, batch, steps, seed);
    let peak = memory::peak_bytes().saturating_sub(baseline);
    memory::set_budget(None);
    match result {
        // A peak past the budget after the last check (dropping can't raise it, but be exact).
        Ok(_) if peak > budget_bytes => Ok(ProbeOutcome::OutOfMemory { at_bytes: peak }),
        Ok(samples_per_second) => Ok(ProbeOutcome::Fits {
            peak_bytes: peak,
            samples_per_second,
        }),
        Err(e) if memory::is_oom(&e) => Ok(ProbeOutcome::OutOfMemory { at_bytes: peak }),
        Err(e) => Err(e.context(format!("{} batch {batch}: the probe failed", level.name()))),
    }
}

/// A probe with what it left behind.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ProbeReport {
    pub outcome: ProbeOutcome,
    /// Live bytes after the probe minus before it (in-process probes only): ~0 when the probe
    /// freed everything.
    pub residual_bytes: Option<i64>,
}

/// Runs probes for the search: in this process, in a fresh subprocess, or (tests) a fake.
pub trait Prober {
    fn probe(&mut self, level: Level, batch: usize) -> Result<ProbeReport>;
}

/// A probe that left at least this much allocated is repeated (up to
/// [`InProcessProber::MAX_REPEATS`] times per prober): what stays behind is one-time process
/// state (a worker thread's first matmul scratch, ~1 MiB) that was charged to that probe's peak.
pub const REPEAT_THRESHOLD: usize = 64 << 10;

/// Probes in this process, dropping everything between probes.
pub struct InProcessProber {
    pub def: ModelDef,
    pub input: InputSpec,
    pub budget_bytes: usize,
    pub steps: usize,
    pub seed: u64,
    /// Bits at L3/L4 (uniform unless set; `max-batch` sets its `--allocator`).
    pub allocator: Allocator,
    warmed: bool,
    repeats_left: usize,
}

impl InProcessProber {
    pub const MAX_REPEATS: usize = 8;

    pub fn new(
        def: ModelDef,
        input: InputSpec,
        budget_bytes: usize,
        steps: usize,
        seed: u64,
    ) -> Self {
        Self {
            def,
            input,
            budget_bytes,
            steps,
            seed,
            allocator: Allocator::Uniform,
            warmed: false,
            repeats_left: Self::MAX_REPEATS,
        }
    }

    /// Two unmeasured steps at batch 1 without a budget, so that one-time process state
    /// (thread pools, kernel scratch) is not charged to the first probe.
    fn warm_up(&mut self) -> Result<()> {
        if !self.warmed {
            self.warmed = true;
            probe(
                &self.def,
                &self.input,
                Level::L0,
                1,
                usize::MAX / 4,
                2,
                self.seed,
            )
            .context("warm-up at batch 1 (no memory limit)")?;
        }
        Ok(())
    }
}

impl Prober for InProcessProber {
    fn probe(&mut self, level: Level, batch: usize) -> Result<ProbeReport> {
        self.warm_up()?;
        loop {
            let before = memory::current_bytes();
            let outcome = probe_with(
                &self.def,
                &self.input,
                level,
                self.allocator,
                batch,
                self.budget_bytes,
                self.steps,
                self.seed,
            )?;
            // A GPU pool keeps freed blocks cached: hand them back so the next probe starts
            // from the same device state (no-op on the host).
            memory::trim_cache();
            let residual = memory::current_bytes() as i64 - before as i64;
            if residual >= REPEAT_THRESHOLD as i64 && self.repeats_left > 0 {
                self.repeats_left -= 1;
                continue;
            }
            return Ok(ProbeReport {
                outcome,
                residual_bytes: Some(residual),
            });
        }
    }
}

/// Runs each probe as `PROGRAM PREFIX.. max-batch --probe-only ...` in a fresh process and
/// reads the one JSON line it prints: nothing a probe allocated can survive into the next.
pub struct SubprocessProber {
    /// `std::env::current_exe()` for the real binary.
    pub program: PathBuf,
    /// Arguments before `max-batch` (empty for the real binary).
    pub prefix_args: Vec<String>,
    pub model: String,
    pub data: String,
    pub seq_len: usize,
    pub budget_bytes: usize,
    pub steps: usize,
    pub seed: u64,
    pub allocator: Allocator,
    /// `--device` of the children.
    pub device: String,
}

impl SubprocessProber {
    /// The child's arguments after the prefix: the probe budget goes in as `--memory` with a
    /// zero margin.
    pub fn child_args(&self, level: Level, batch: usize) -> Vec<String> {
        let mut a: Vec<String> = vec!["max-batch".into(), "--probe-only".into()];
        let mut kv = |k: &str, v: String| {
            a.push(k.into());
            a.push(v);
        };
        kv("--model", self.model.clone());
        kv("--data", self.data.clone());
        kv("--seq-len", self.seq_len.to_string());
        kv("--memory", self.budget_bytes.to_string());
        kv("--margin", "0".into());
        kv("--levels", level.name());
        kv("--batch", batch.to_string());
        kv("--steps", self.steps.to_string());
        kv("--seed", self.seed.to_string());
        kv("--allocator", self.allocator.name().into());
        kv("--device", self.device.clone());
        a
    }
}

impl Prober for SubprocessProber {
    fn probe(&mut self, level: Level, batch: usize) -> Result<ProbeReport> {
        let out = std::process::Command::new(&self.program)
            .args(&self.prefix_args)
            .args(self.child_args(level, batch))
            .stdin(std::process::Stdio::null())
            .output()
            .with_context(|| format!("starting the probe process {}", self.program.display()))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let tail: Vec<&str> = stderr.lines().rev().take(12).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!(
                "{} batch {batch}: the probe process failed ({}):\n{}",
                level.name(),
                out.status,
                tail.join("\n")
            );
        }
        let outcome = parse_probe_line(&stdout).with_context(|| {
            format!(
                "{} batch {batch}: no result line from the probe process",
                level.name()
            )
        })?;
        Ok(ProbeReport {
            outcome,
            residual_bytes: None,
        })
    }
}

#[derive(Serialize, Deserialize)]
struct ProbeLine {
    actrain_probe: ProbeOutcome,
}

/// The line a `--probe-only` child prints (one JSON object).
pub fn probe_line(outcome: &ProbeOutcome) -> String {
    serde_json::to_string(&ProbeLine {
        actrain_probe: *outcome,
    })
    .expect("a probe outcome serialises")
}

/// Finds and parses the probe line in a child's stdout (other output around it is ignored).
pub fn parse_probe_line(stdout: &str) -> Result<ProbeOutcome> {
    let key = format!("{{\"{PROBE_MARKER}\"");
    for line in stdout.lines().rev() {
        if let Some(i) = line.find(&key) {
            let line: ProbeLine = serde_json::from_str(line[i..].trim())
                .with_context(|| format!("malformed probe line `{}`", &line[i..]))?;
            return Ok(line.actrain_probe);
        }
    }
    bail!("expected a line starting with {key}")
}

/// The `--probe-only` child: one probe of `model` on `data`'s input shape, returned as the
/// line to print on stdout.
#[allow(clippy::too_many_arguments)]
pub fn probe_only(
    model_spec: &str,
    data_spec: &str,
    seq_len: usize,
    level: Level,
    batch: usize,
    budget_bytes: usize,
    steps: usize,
    seed: u64,
    allocator: Allocator,
) -> Result<String> {
    let def = model::load_def(model_spec)?;
    let input = load_input_spec(data_spec, seq_len, seed)?;
    // Warmed up and repeated like an in-process probe, so a fresh process is not charged for
    // its one-time state.
    let mut p = InProcessProber::new(def, input, budget_bytes, steps, seed);
    p.allocator = allocator;
    let rep = Prober::probe(&mut p, level, batch)?;
    Ok(probe_line(&rep.outcome))
}

// ---------------------------------------------------------------------------------------------
// Search
// ---------------------------------------------------------------------------------------------

/// The search knobs (`--start`, `--max`, `--multiple-of`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SearchConfig {
    pub start: usize,
    pub max: Option<usize>,
    pub multiple_of: usize,
}

impl Default for SearchConfig {
    fn default() -> Self {
        Self {
            start: 8,
            max: None,
            multiple_of: 1,
        }
    }
}

impl SearchConfig {
    pub fn validate(&self) -> Result<()> {
        if self.multiple_of == 0 {
            bail!("--multiple-of must be at least 1");
        }
        if self.start == 0 {
            bail!("--start must be at least 1");
        }
        if let Some(m) = self.max {
            if m < self.multiple_of {
                bail!(
                    "--max {m} is below --multiple-of {}: no batch size to search",
                    self.multiple_of
                );
            }
        }
        Ok(())
    }
}

/// Why a probe ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Purpose {
    Search,
    Verify,
}

/// One probe of the search, in the order it ran.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ProbeRecord {
    #[serde(skip)]
    pub level: String,
    pub batch: usize,
    pub purpose: Purpose,
    #[serde(flatten)]
    pub outcome: ProbeOutcome,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub residual_bytes: Option<i64>,
}

impl ProbeRecord {
    /// The stderr line: `L3 batch 256: fits, peak 1.23 GiB, 812 samples/s`.
    pub fn line(&self) -> String {
        let what = match self.purpose {
            Purpose::Search => String::new(),
            Purpose::Verify => " (re-verify)".into(),
        };
        let mut s = match self.outcome {
            ProbeOutcome::Fits {
                peak_bytes,
                samples_per_second,
            } => format!(
                "{} batch {}{what}: fits, peak {}, {} samples/s",
                self.level,
                self.batch,
                human_bytes(peak_bytes),
                fmt_rate(samples_per_second)
            ),
            ProbeOutcome::OutOfMemory { at_bytes } => format!(
                "{} batch {}{what}: out of memory (passed the budget at {})",
                self.level,
                self.batch,
                human_bytes(at_bytes)
            ),
        };
        if let Some(r) = self.residual_bytes {
            if r >= REPEAT_THRESHOLD as i64 {
                s.push_str(&format!(
                    " [warning: {} still allocated after the probe]",
                    human_bytes(r as usize)
                ));
            }
        }
        s
    }
}

fn fmt_rate(r: f64) -> String {
    if r >= 100.0 {
        format!("{r:.0}")
    } else if r >= 10.0 {
        format!("{r:.1}")
    } else {
        format!("{r:.2}")
    }
}

/// The answer for one level.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LevelResult {
    pub level: String,
    /// Largest batch that was probed and fitted, re-verified; 0 if not even the smallest did.
    pub max_batch: usize,
    /// Measured at `max_batch` (the re-verification probe).
    pub samples_per_second: Option<f64>,
    pub peak_bytes: Option<usize>,
    /// `max_batch` over L0's (when L0 was searched and fitted something).
    pub ratio_vs_l0: Option<f64>,
    /// The search stopped at `--max`: the real limit may be higher.
    pub capped: bool,
    /// What the search had to say (downward search, nondeterminism, cap, nothing fits).
    pub notes: Vec<String>,
    /// Every probe, in order.
    pub probes: Vec<ProbeRecord>,
}

/// Searches one level. `on_line` gets one line per probe and per note, as they happen.
pub fn search_level(
    level: Level,
    cfg: &SearchConfig,
    prober: &mut dyn Prober,
    on_line: &mut dyn FnMut(&str),
) -> Result<LevelResult> {
    cfg.validate()?;
    let name = level.name();
    let k = cfg.multiple_of;
    let max_u = cfg.max.map(|m| m / k);
    let mut probes: Vec<ProbeRecord> = Vec::new();
    let mut notes: Vec<String> = Vec::new();
    // Sizes are counted in units of k.
    let mut run = |u: usize,
                   purpose: Purpose,
                   probes: &mut Vec<ProbeRecord>,
                   on_line: &mut dyn FnMut(&str)|
     -> Result<ProbeOutcome> {
        let rep = prober.probe(level, u * k)?;
        let rec = ProbeRecord {
            level: name.clone(),
            batch: u * k,
            purpose,
            outcome: rep.outcome,
            residual_bytes: rep.residual_bytes,
        };
        on_line(&rec.line());
        probes.push(rec);
        Ok(rep.outcome)
    };
    let note = |msg: String, notes: &mut Vec<String>, on_line: &mut dyn FnMut(&str)| {
        on_line(&format!("{name}: {msg}"));
        notes.push(msg);
    };

    let mut u = cfg.start.div_ceil(k).max(1);
    if let Some(m) = max_u {
        u = u.min(m);
    }
    let mut fit: Option<usize> = None;
    let mut fail: Option<usize> = None;
    let mut capped = false;
    if run(u, Purpose::Search, &mut probes, on_line)?.fits() {
        fit = Some(u);
        loop {
            if Some(u) == max_u {
                capped = true;
                break;
            }
            let next = max_u.map_or(2 * u, |m| (2 * u).min(m));
            if run(next, Purpose::Search, &mut probes, on_line)?.fits() {
                fit = Some(next);
                u = next;
            } else {
                fail = Some(next);
                break;
            }
        }
    } else {
        fail = Some(u);
        if u > 1 {
            note(
                format!(
                    "the first probe (batch {}) does not fit: searching downward",
                    u * k
                ),
                &mut notes,
                on_line,
            );
        }
        while u > 1 {
            u /= 2;
            if run(u, Purpose::Search, &mut probes, on_line)?.fits() {
                fit = Some(u);
                break;
            }
            fail = Some(u);
        }
    }
    // Bisect between the last fit and the first failure.
    if let (Some(mut lo), Some(mut hi)) = (fit, fail) {
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if run(mid, Purpose::Search, &mut probes, on_line)?.fits() {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        fit = Some(lo);
    }
    // Re-verify the winner; if it no longer fits (nondeterministic memory use), step down.
    let mut winner: Option<(usize, ProbeOutcome)> = None;
    if let Some(mut w) = fit {
        let mut step = 1;
        loop {
            let out = run(w, Purpose::Verify, &mut probes, on_line)?;
            if out.fits() {
                winner = Some((w, out));
                break;
            }
            let down = w.saturating_sub(step);
            note(
                format!(
                    "batch {} fitted once but not when re-verified (memory use varies between runs); \
                     stepping down to {}",
                    w * k,
                    down * k
                ),
                &mut notes,
                on_line,
            );
            if down == 0 {
                break;
            }
            w = down;
            step *= 2;
        }
    }
    let result = match winner {
        Some((
            w,
            ProbeOutcome::Fits {
                peak_bytes,
                samples_per_second,
            },
        )) => {
            if capped && fit == Some(w) {
                note(
                    format!(
                        "stopped at --max {}: the real limit may be higher",
                        cfg.max.unwrap_or(w * k)
                    ),
                    &mut notes,
                    on_line,
                );
            }
            LevelResult {
                level: name.clone(),
                max_batch: w * k,
                samples_per_second: Some(samples_per_second),
                peak_bytes: Some(peak_bytes),
                ratio_vs_l0: None,
                capped: capped && fit == Some(w),
                notes,
                probes,
            }
        }
        _ => {
            note(
                format!(
                    "not even batch {k} fits in the probe budget: max batch 0 (the model, its \
                     gradients and optimizer state may already be too large)"
                ),
                &mut notes,
                on_line,
            );
            LevelResult {
                level: name.clone(),
                max_batch: 0,
                samples_per_second: None,
                peak_bytes: None,
                ratio_vs_l0: None,
                capped: false,
                notes,
                probes,
            }
        }
    };
    Ok(result)
}

/// Searches every level in turn and fills in the ratios to L0.
pub fn search_levels(
    levels: &[Level],
    cfg: &SearchConfig,
    prober: &mut dyn Prober,
    on_line: &mut dyn FnMut(&str),
) -> Result<Vec<LevelResult>> {
    let mut out = Vec::with_capacity(levels.len());
    for &l in levels {
        out.push(search_level(l, cfg, prober, on_line)?);
    }
    let l0 = out
        .iter()
        .find(|r| r.level == Level::L0.name())
        .map(|r| r.max_batch)
        .filter(|&b| b > 0);
    if let Some(b0) = l0 {
        for r in &mut out {
            r.ratio_vs_l0 = Some(r.max_batch as f64 / b0 as f64);
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Flags, the whole run, and its outputs
// ---------------------------------------------------------------------------------------------

/// `--memory`: required; errors name the flag.
pub fn parse_memory_flag(value: Option<&str>) -> Result<usize> {
    let v = value.ok_or_else(|| {
        anyhow!("--memory is required: the memory to fit in, e.g. --memory 2GiB or 512MiB")
    })?;
    memory::parse_bytes(v).map_err(|e| anyhow!("--memory: {e}"))
}

/// `--levels L0,L3`: errors name the flag and the bad level; duplicates are dropped.
pub fn parse_levels_flag(value: &str) -> Result<Vec<Level>> {
    let mut out: Vec<Level> = Vec::new();
    for part in value.split(',') {
        let part = part.trim();
        if part.is_empty() {
            continue;
        }
        let l: Level = part.parse().map_err(|_| {
            anyhow!("--levels: unknown level `{part}` (expected L0, L1, L2, L3 or L4)")
        })?;
        if !out.contains(&l) {
            out.push(l);
        }
    }
    if out.is_empty() {
        bail!("--levels: no level given (expected e.g. L0,L3)");
    }
    Ok(out)
}

/// Runs each probe in a fresh process: `program prefix_args.. max-batch --probe-only ...`.
#[derive(Clone, Debug)]
pub struct Isolation {
    pub program: PathBuf,
    pub prefix_args: Vec<String>,
}

/// Everything `max-batch` needs, checked.
#[derive(Clone, Debug)]
pub struct MaxBatchConfig {
    pub model: String,
    pub data: String,
    pub seq_len: usize,
    pub memory_bytes: usize,
    /// Fraction of `memory_bytes` held back: probes get `(1 − margin) · memory`.
    pub margin: f64,
    pub levels: Vec<Level>,
    pub search: SearchConfig,
    pub steps: usize,
    pub seed: u64,
    /// Bits at L3/L4: the probes run what `fit --allocator` would.
    pub allocator: Allocator,
    pub isolate: Option<Isolation>,
    /// `cpu` or `cuda:N` (the probes run on [`crate::device::current`]; isolated children get
    /// this flag).
    pub device: String,
}

impl MaxBatchConfig {
    pub fn validate(&self) -> Result<()> {
        if !(self.margin.is_finite() && (0.0..1.0).contains(&self.margin)) {
            bail!(
                "--margin {}: expected a fraction in [0, 1), e.g. 0.05",
                self.margin
            );
        }
        if self.steps < 2 {
            bail!(
                "--steps {}: a probe needs at least 2 training steps (optimizer state exists from the second)",
                self.steps
            );
        }
        if self.memory_bytes == 0 {
            bail!("--memory must be positive");
        }
        if self.levels.is_empty() {
            bail!("--levels: no level given");
        }
        self.search.validate()?;
        if self.probe_budget() == 0 {
            bail!(
                "--memory with --margin {} leaves no memory to probe",
                self.margin
            );
        }
        Ok(())
    }

    /// The budget each probe gets.
    pub fn probe_budget(&self) -> usize {
        ((1.0 - self.margin) * self.memory_bytes as f64).floor() as usize
    }
}

/// The whole run's answer.
#[derive(Clone, Debug)]
pub struct MaxBatchReport {
    pub model: String,
    pub data: String,
    pub input: InputSpec,
    pub memory_bytes: usize,
    pub margin: f64,
    pub probe_budget: usize,
    pub steps: usize,
    pub isolated: bool,
    pub results: Vec<LevelResult>,
}

/// The first stderr line of a run.
pub fn describe_run(cfg: &MaxBatchConfig, input: &InputSpec) -> String {
    let what = if input.tokens {
        format!(
            "{} tokens per sample, vocab {}",
            input.sample_shape.iter().product::<usize>(),
            input.num_outputs
        )
    } else {
        format!(
            "sample {:?}, {} classes",
            input.sample_shape, input.num_outputs
        )
    };
    format!(
        "max-batch: model {}, data {} ({what}); memory {} of the {} minus a {:.0}% margin = {} per probe; \
         {} training steps per probe, {} bits at L3/L4{}",
        cfg.model,
        cfg.data,
        human_bytes(cfg.memory_bytes),
        memory::describe(),
        cfg.margin * 100.0,
        human_bytes(cfg.probe_budget()),
        cfg.steps,
        cfg.allocator.name(),
        if cfg.isolate.is_some() {
            ", one process per probe"
        } else {
            ""
        }
    )
}

/// Runs the search for every level of `cfg`; `on_line` receives the stderr lines.
pub fn run_max_batch(
    cfg: &MaxBatchConfig,
    on_line: &mut dyn FnMut(&str),
) -> Result<MaxBatchReport> {
    cfg.validate()?;
    let def = model::load_def(&cfg.model)?;
    let input = load_input_spec(&cfg.data, cfg.seq_len, cfg.seed)?;
    // Catch definition/shape errors before any probe, with no budget in force.
    Model::build(&def, &input, cfg.seed)
        .with_context(|| format!("--model {} on --data {}", cfg.model, cfg.data))?;
    on_line(&describe_run(cfg, &input));
    let budget = cfg.probe_budget();
    let results = match &cfg.isolate {
        None => {
            let mut p = InProcessProber::new(def, input.clone(), budget, cfg.steps, cfg.seed);
            p.allocator = cfg.allocator;
            search_levels(&cfg.levels, &cfg.search, &mut p, on_line)?
        }
        Some(iso) => {
            let mut p = SubprocessProber {
                program: iso.program.clone(),
                prefix_args: iso.prefix_args.clone(),
                model: cfg.model.clone(),
                data: cfg.data.clone(),
                seq_len: cfg.seq_len,
                budget_bytes: budget,
                steps: cfg.steps,
                seed: cfg.seed,
                allocator: cfg.allocator,
                device: cfg.device.clone(),
            };
            search_levels(&cfg.levels, &cfg.search, &mut p, on_line)?
        }
    };
    Ok(MaxBatchReport {
        model: cfg.model.clone(),
        data: cfg.data.clone(),
        input,
        memory_bytes: cfg.memory_bytes,
        margin: cfg.margin,
        probe_budget: budget,
        steps: cfg.steps,
        isolated: cfg.isolate.is_some(),
        results,
    })
}

impl MaxBatchReport {
    /// The final table (stdout).
    pub fn table(&self) -> String {
        let mut rows: Vec<[String; 5]> = vec![[
            "level".into(),
            "max batch".into(),
            "samples/s".into(),
            "peak".into(),
            "x vs L0".into(),
        ]];
        for r in &self.results {
            rows.push([
                r.level.clone(),
                format!("{}{}", r.max_batch, if r.capped { " (cap)" } else { "" }),
                r.samples_per_second.map_or("-".into(), fmt_rate),
                r.peak_bytes.map_or("-".into(), human_bytes),
                r.ratio_vs_l0.map_or("-".into(), |x| format!("{x:.2}x")),
            ]);
        }
        let mut w = [0usize; 5];
        for row in &rows {
            for (i, c) in row.iter().enumerate() {
                w[i] = w[i].max(c.chars().count());
            }
        }
        let mut s = format!(
            "{} on {}: memory {} (probes {} after a {:.0}% margin), {} steps per probe\n",
            self.model,
            self.data,
            human_bytes(self.memory_bytes),
            human_bytes(self.probe_budget),
            self.margin * 100.0,
            self.steps
        );
        for (n, row) in rows.iter().enumerate() {
            let line = format!(
                "{:<w0$}  {:>w1$}  {:>w2$}  {:>w3$}  {:>w4$}",
                row[0],
                row[1],
                row[2],
                row[3],
                row[4],
                w0 = w[0],
                w1 = w[1],
                w2 = w[2],
                w3 = w[3],
                w4 = w[4]
            );
            s.push_str(line.trim_end());
            s.push('\n');
            if n == 0 {
                s.push_str(&"-".repeat(w.iter().sum::<usize>() + 8));
                s.push('\n');
            }
        }
        for r in &self.results {
            for n in &r.notes {
                s.push_str(&format!("note: {}: {n}\n", r.level));
            }
        }
        s
    }

    /// One JSON object per level (`--json`).
    pub fn json_lines(&self) -> Vec<String> {
        self.results
            .iter()
            .map(|r| serde_json::to_string(r).expect("a level result serialises"))
            .collect()
    }

    /// The plot title.
    pub fn title(&self) -> String {
        format!(
            "actrain max-batch: {} on {}, memory {}",
            self.model,
            self.data,
            human_bytes(self.memory_bytes)
        )
    }

    pub fn svg(&self) -> String {
        render_svg(&self.results, &self.title())
    }
}

// ---------------------------------------------------------------------------------------------
// SVG plot
// ---------------------------------------------------------------------------------------------

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A "nice" axis top and tick step (1, 2 or 5 times a power of ten), at most ~6 ticks.
fn nice_axis(max: f64) -> (f64, f64) {
    if !(max.is_finite() && max > 0.0) {
        return (1.0, 0.2);
    }
    let raw = max / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| max / s <= 6.0)
        .unwrap_or(10.0 * mag);
    ((max / step).ceil() * step, step)
}

fn fmt_tick(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if v >= 1e4 {
        format!("{:.0}k", v / 1e3)
    } else if v.fract().abs() < 1e-9 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

/// Bars of max batch per level (left axis) and throughput at that batch as a line with points
/// (right axis). Hand-written SVG.
pub fn render_svg(results: &[LevelResult], title: &str) -> String {
    let (w, h) = (760.0f64, 440.0f64);
    let (left, right, top, bottom) = (80.0, 90.0, 70.0, 60.0);
    let pw = w - left - right;
    let ph = h - top - bottom;
    let n = results.len().max(1) as f64;
    let max_b = results.iter().map(|r| r.max_batch).max().unwrap_or(0) as f64;
    let max_t = results
        .iter()
        .filter_map(|r| r.samples_per_second)
        .fold(0.0f64, f64::max);
    let (b_top, b_step) = nice_axis(max_b);
    let (t_top, t_step) = nice_axis(max_t);
    let y_b = |v: f64| top + ph - v / b_top * ph;
    let y_t = |v: f64| top + ph - v / t_top * ph;
    let slot = pw / n;
    let cx = |i: usize| left + slot * (i as f64 + 0.5);
    let bar_color = "#4c72b0";
    let line_color = "#dd8452";

    let mut s = String::new();
    s.push_str(&format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" \
         font-family=\"sans-serif\" font-size=\"12\">\n"
    ));
    s.push_str(&format!("<title>{}</title>\n", xml_escape(title)));
    s.push_str(&format!(
        "<rect x=\"0\" y=\"0\" width=\"{w}\" height=\"{h}\" fill=\"white\"/>\n"
    ));
    s.push_str(&format!(
        "<text x=\"{}\" y=\"24\" text-anchor=\"middle\" font-size=\"15\" font-weight=\"bold\">{}</text>\n",
        w / 2.0,
        xml_escape(title)
    ));
    // Legend.
    s.push_str(&format!(
        "<rect x=\"{}\" y=\"38\" width=\"14\" height=\"10\" fill=\"{bar_color}\"/>\
         <text x=\"{}\" y=\"47\">max batch</text>\n",
        left,
        left + 20.0
    ));
    s.push_str(&format!(
        "<line x1=\"{}\" y1=\"43\" x2=\"{}\" y2=\"43\" stroke=\"{line_color}\" stroke-width=\"2\"/>\
         <circle cx=\"{}\" cy=\"43\" r=\"3.5\" fill=\"{line_color}\"/>\
         <text x=\"{}\" y=\"47\">samples/s at max batch</text>\n",
        left + 110.0,
        left + 134.0,
        left + 122.0,
        left + 140.0
    ));
    // Grid and left axis (max batch).
    let mut v = 0.0;
    while v <= b_top + b_step * 1e-6 {
        let y = y_b(v);
        s.push_str(&format!(
            "<line x1=\"{left}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{y:.1}\" stroke=\"#e5e5e5\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\n",
            left + pw,
            left - 6.0,
            y + 4.0,
            fmt_tick(v)
        ));
        v += b_step;
    }
    // Right axis (samples/s).
    let mut v = 0.0;
    while v <= t_top + t_step * 1e-6 {
        s.push_str(&format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" fill=\"{line_color}\">{}</text>\n",
            left + pw + 6.0,
            y_t(v) + 4.0,
            fmt_tick(v)
        ));
        v += t_step;
    }
    s.push_str(&format!(
        "<line x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{:.1}\" stroke=\"black\"/>\n\
         <line x1=\"{:.1}\" y1=\"{top}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"{line_color}\"/>\n\
         <line x1=\"{left}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"black\"/>\n",
        top + ph,
        left + pw,
        left + pw,
        top + ph,
        top + ph,
        left + pw,
        top + ph
    ));
    // Axis labels.
    s.push_str(&format!(
        "<text x=\"18\" y=\"{:.1}\" text-anchor=\"middle\" transform=\"rotate(-90 18 {:.1})\">max batch size</text>\n",
        top + ph / 2.0,
        top + ph / 2.0
    ));
    let rx = w - 16.0;
    s.push_str(&format!(
        "<text x=\"{rx}\" y=\"{:.1}\" text-anchor=\"middle\" fill=\"{line_color}\" \
         transform=\"rotate(90 {rx} {:.1})\">samples/s at max batch</text>\n",
        top + ph / 2.0,
        top + ph / 2.0
    ));
    s.push_str(&format!(
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">compression level</text>\n",
        left + pw / 2.0,
        h - 14.0
    ));
    // Bars.
    let bw = slot * 0.55;
    for (i, r) in results.iter().enumerate() {
        let x = cx(i) - bw / 2.0;
        let y = y_b(r.max_batch as f64);
        s.push_str(&format!(
            "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{bw:.1}\" height=\"{:.1}\" fill=\"{bar_color}\">\
             <title>{}: max batch {}</title></rect>\n",
            (top + ph - y).max(0.0),
            xml_escape(&r.level),
            r.max_batch
        ));
        s.push_str(&format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>\n",
            cx(i),
            y - 5.0,
            r.max_batch
        ));
        s.push_str(&format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>\n",
            cx(i),
            top + ph + 18.0,
            xml_escape(&r.level)
        ));
    }
    // Throughput line and points.
    let pts: Vec<(f64, f64, f64)> = results
        .iter()
        .enumerate()
        .filter_map(|(i, r)| r.samples_per_second.map(|t| (cx(i), y_t(t), t)))
        .collect();
    if pts.len() > 1 {
        let path: Vec<String> = pts
            .iter()
            .map(|(x, y, _)| format!("{x:.1},{y:.1}"))
            .collect();
        s.push_str(&format!(
            "<polyline points=\"{}\" fill=\"none\" stroke=\"{line_color}\" stroke-width=\"2\"/>\n",
            path.join(" ")
        ));
    }
    for (x, y, t) in &pts {
        s.push_str(&format!(
            "<circle cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"4\" fill=\"{line_color}\"><title>{} samples/s</title></circle>\n",
            fmt_rate(*t)
        ));
    }
    s.push_str("</svg>\n");
    s
}

/// Writes `text` to `path` atomically: a temporary file beside it, then a rename.
pub fn write_atomic(path: &Path, text: &str) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| anyhow!("--plot {}: not a file name", path.display()))?
        .to_string_lossy()
        .into_owned();
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()));
    }
    Ok(())
}
