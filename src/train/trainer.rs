//! The training loop behind `actrain fit`: data → model → tape (with the compression policy)
//! → loss → backward → clip → optimizer, with evaluation each epoch, JSONL metrics, atomic
//! checkpoints and exact resumption.

use super::checkpoint::{self, CheckpointMeta};
use super::optim::{clip_grad_norm, grads_finite, Optimizer, OptimizerConfig};
use super::schedule::{Schedule, ScheduleKind};
use crate::allocate::plan::{Estimator, PlanState, VariancePlan};
use crate::compress::policy::{CompressConfig, CompressPolicy, Level};
use crate::data::{self, Batcher, Dataset, LoadOptions, Task};
use crate::device::to_current;
use crate::memory;
use crate::model::{load_def, InputSpec, Model};
use crate::ops::loss::{accuracy, CrossEntropyOptions};
use crate::ops::sparse::CsrMatrix;
use crate::tape::{Tape, Value};
use anyhow::{bail, Context as _, Result};
use candle_core::{DType, Tensor};
use serde::Serialize;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// Everything a run depends on; printed at start and saved as `config.json` beside outputs.
#[derive(Clone, Debug, Serialize)]
pub struct FitConfig {
    pub model: String,
    pub data: String,
    #[serde(serialize_with = "level_name")]
    pub level: Level,
    pub epochs: u64,
    pub batch_size: usize,
    pub lr: f64,
    pub optimizer: OptimizerConfig,
    pub schedule: ScheduleKind,
    pub warmup_steps: u64,
    pub clip_grad_norm: Option<f64>,
    pub label_smoothing: f64,
    pub seed: u64,
    pub max_steps: Option<u64>,
    pub limit: Option<usize>,
    pub seq_len: usize,
    pub test_fraction: f32,
    pub group_size: usize,
    pub min_compress_elements: usize,
    pub exclude_ops: Vec<String>,
    /// Bits per saved tensor from the gradient-variance allocator (the default; else every
    /// tensor gets the same ladder rung). Only below 8 average bits (L3, L4, `--bits`).
    pub variance_allocator: bool,
    /// Steps between re-allocations.
    pub reallocate_every: u64,
    /// Where the allocator's sensitivities come from (numerical GACT-style passes, or the
    /// analytic ActNN model read off the training step itself).
    #[serde(serialize_with = "estimator_name")]
    pub estimator: Estimator,
    pub out: Option<PathBuf>,
    pub resume: Option<PathBuf>,
    /// `cpu` or `cuda:N`: the device [`fit`] selects (the CLI's `--device`).
    pub device: String,
}

fn level_name<S: serde::Serializer>(l: &Level, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&l.name())
}

fn estimator_name<S: serde::Serializer>(e: &Estimator, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(e.name())
}

impl Default for FitConfig {
    fn default() -> Self {
        Self {
            model: "cnn".into(),
            data: "digits".into(),
            level: Level::L3,
            epochs: 8,
            batch_size: 64,
            lr: 0.05,
            optimizer: OptimizerConfig::Sgd {
                momentum: 0.9,
                nesterov: true,
                weight_decay: 5e-4,
            },
            schedule: ScheduleKind::Cosine { min_lr: 0.0 },
            warmup_steps: 20,
            clip_grad_norm: Some(5.0),
            label_smoothing: 0.0,
            seed: 42,
            max_steps: None,
            limit: None,
            seq_len: 64,
            test_fraction: 0.2,
            group_size: crate::compress::DEFAULT_GROUP,
            min_compress_elements: 1024,
            exclude_ops: Vec::new(),
            variance_allocator: true,
            reallocate_every: 200,
            estimator: Estimator::numerical(),
            out: None,
            resume: None,
            device: "cpu".into(),
        }
    }
}

/// What a run reports at the end (`--json` prints it).
#[derive(Clone, Debug, Serialize)]
pub struct FitSummary {
    pub model: String,
    /// Where it ran (`cpu`, `cuda:0`).
    pub device: String,
    pub data: String,
    pub level: String,
    pub parameters: usize,
    pub epochs: u64,
    pub steps: u64,
    pub train_loss: f64,
    pub test_loss: f64,
    pub test_accuracy: f64,
    pub seconds: f64,
    pub samples_per_second: f64,
    /// Saved context of the last training step, as stored at this level.
    pub context_bytes: usize,
    /// The same context uncompressed (what L0 stores).
    pub context_bytes_uncompressed: usize,
    pub peak_bytes: usize,
    /// Time spent estimating sensitivities for the bit allocator (0 without it).
    pub allocator_seconds: f64,
    /// Bits of each saved tensor (by save slot) under the variance allocator.
    pub bits_per_tensor: Option<Vec<u8>>,
    /// Sensitivity estimates the allocator has made since the run began (a resumed run
    /// continues the count from its checkpoint); 0 without it.
    pub allocator_estimates: u64,
    /// Loss of every training step run in this invocation, in order (resume tests use it).
    #[serde(skip)]
    pub step_losses: Vec<(u64, f32)>,
}

/// Progress callbacks so the CLI can draw bars without the loop knowing about terminals.
pub trait Progress {
    fn start_epoch(&mut self, _epoch: u64, _batches: u64, _done: u64) {}
    fn step(&mut self, _loss: f32) {}
    fn end_epoch(&mut self, _line: &str) {}
}
pub struct NoProgress;
impl Progress for NoProgress {}

/// The pieces a step needs, bundled so eval and train share them.
struct Run {
    model: Model,
    data: Dataset,
    graph: Option<Arc<CsrMatrix>>,
    train_nodes: Option<Tensor>,
    test_nodes: Option<Tensor>,
    ce: CrossEntropyOptions,
}

impl Run {
    fn logits(&mut self, tape: &mut Tape, x: &Tensor, rows: Option<&Tensor>) -> Result<Value> {
        let out = self.model.forward(tape, x, self.graph.as_ref())?;
        match rows {
            Some(r) => tape.select_rows(&out, r),
            None => Ok(out),
        }
    }

    /// Test loss and accuracy, in eval mode (nothing recorded, batch norm uses running stats).
    fn evaluate(&mut self, batch_size: usize) -> Result<(f64, f64)> {
        let mut tape = Tape::default();
        tape.eval_mode();
        let (mut loss_sum, mut correct, mut count) = (0.0, 0usize, 0usize);
        if self.graph.is_some() {
            let x = to_current(&self.data.test.x)?;
            let rows = self.test_nodes.clone();
            let logits = self.logits(&mut tape, &x, rows.as_ref())?;
            let y = to_current(&self.data.test.y)?;
            let loss = tape.cross_entropy(&logits, &y, CrossEntropyOptions::default())?;
            let (c, n) = accuracy(logits.tensor(), &y)?;
            return Ok((scalar(&loss)?, c as f64 / n.max(1) as f64));
        }
        let batcher = Batcher::new(&self.data.test, batch_size, 0)?.shuffle(false);
        for batch in batcher.epoch(0) {
            let (x, y) = batch?;
            let (x, y) = (to_current(&x)?, to_current(&y)?);
            let logits = self.logits(&mut tape, &x, None)?;
            let loss = tape.cross_entropy(&logits, &y, CrossEntropyOptions::default())?;
            let (c, n) = accuracy(logits.tensor(), &y)?;
            loss_sum += scalar(&loss)? * n as f64;
            correct += c;
            count += n;
        }
        Ok((
            loss_sum / count.max(1) as f64,
            correct as f64 / count.max(1) as f64,
        ))
    }
}

fn scalar(v: &Value) -> Result<f64> {
    Ok(v.tensor().to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

/// The model's input description from the dataset.
pub fn input_spec(data: &Dataset) -> InputSpec {
    match &data.task {
        Task::Classification { num_classes } => InputSpec {
            sample_shape: data.sample_shape.clone(),
            tokens: false,
            vocab: None,
            num_outputs: *num_classes,
            graph: false,
        },
        Task::LanguageModel { vocab_size, .. } => InputSpec {
            sample_shape: data.sample_shape.clone(),
            tokens: true,
            vocab: Some(*vocab_size),
            num_outputs: *vocab_size,
            graph: false,
        },
        Task::NodeClassification { num_classes } => InputSpec {
            sample_shape: data.sample_shape.clone(),
            tokens: false,
            vocab: None,
            num_outputs: *num_classes,
            graph: true,
        },
    }
}

fn compress_config(cfg: &FitConfig) -> CompressConfig {
    CompressConfig {
        level: cfg.level,
        group: cfg.group_size,
        min_elements: cfg.min_compress_elements,
        exclude_ops: cfg.exclude_ops.clone(),
        seed: cfg.seed,
    }
}

/// Whether this run allocates bits by gradient variance: asked for, and a budget below 8 bits
/// (L3, L4, `--bits`), where tensors compete for bits; L1/L2 are uniform by definition.
fn uses_allocator(cfg: &FitConfig, graph: bool) -> bool {
    cfg.variance_allocator && cfg.level.avg_bits() < 8.0 && !graph
}

/// The allocator's state for a checkpoint's `extra` (`{"allocator": PlanState}`), so a resumed
/// run is a bit-exact continuation; `null` without the allocator.
fn allocator_extra(plan: Option<&VariancePlan>) -> Result<serde_json::Value> {
    Ok(match plan {
        Some(p) => serde_json::json!({ "allocator": p.export_state()? }),
        None => serde_json::Value::Null,
    })
}

/// Restores the allocator from a checkpoint's `extra`. A checkpoint written with the allocator
/// must be resumed with it (and vice versa): the bits would differ from the original run.
fn restore_allocator(plan: Option<&VariancePlan>, extra: &serde_json::Value) -> Result<()> {
    let saved = extra.get("allocator").filter(|v| !v.is_null());
    match (plan, saved) {
        (Some(p), Some(v)) => {
            let st: PlanState = serde_json::from_value(v.clone())
                .context("reading the allocator state in state.json")?;
            p.import_state(&st)
        }
        (None, None) => Ok(()),
        (Some(_), None) => bail!(
            "the checkpoint was written without the variance allocator; resume with --allocator uniform (as the original run)"
        ),
        (None, Some(_)) => bail!(
            "the checkpoint was written with the variance allocator; resume with --allocator variance (as the original run)"
        ),
    }
}

fn metrics_line(file: &mut Option<std::fs::File>, v: serde_json::Value) -> Result<()> {
    if let Some(f) = file {
        writeln!(f, "{v}").context("writing metrics.jsonl")?;
    }
    Ok(())
}

/// `--exclude-ops` names must be ops that save context in this model: a misspelt name would
/// otherwise silently exclude nothing. Checked against the first step's context log.
fn check_excluded_ops(excluded: &[String], log: &[crate::tape::ContextRecord]) -> Result<()> {
    let mut seen: Vec<&str> = log.iter().map(|r| r.op).collect();
    seen.sort_unstable();
    seen.dedup();
    for name in excluded {
        if !seen.contains(&name.as_str()) {
            bail!(
                "--exclude-ops `{name}`: no op of this model saves context under that name (ops that do: {})",
                seen.join(", ")
            );
        }
    }
    Ok(())
}

/// Writes `config.json` atomically.
fn write_config(dir: &Path, cfg: &FitConfig) -> Result<()> {
    let tmp = dir.join("config.json.tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(cfg)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, dir.join("config.json"))
        .with_context(|| format!("writing config in {}", dir.display()))?;
    Ok(())
}

/// Trains according to `cfg`.
pub fn fit(cfg: &FitConfig, progress: &mut dyn Progress) -> Result<FitSummary> {
    if cfg.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    if !(cfg.lr > 0.0 && cfg.lr.is_finite()) {
        bail!("--lr {} must be a positive number", cfg.lr);
    }
    let dev = crate::device::select_flag(&cfg.device)?;
    let opts = LoadOptions {
        seed: cfg.seed,
        test_fraction: cfg.test_fraction,
        seq_len: cfg.seq_len,
        limit: cfg.limit,
    };
    let dataset =
        data::load(&cfg.data, &opts).with_context(|| format!("loading --data {}", cfg.data))?;
    let def = load_def(&cfg.model)?;
    let spec = input_spec(&dataset);
    let model = Model::build(&def, &spec, cfg.seed)?;
    let (graph, train_nodes, test_nodes) = match &dataset.graph {
        Some(g) => {
            let a = &g.adjacency;
            let csr = CsrMatrix::new(
                g.num_nodes,
                g.num_nodes,
                a.row_ptr.clone(),
                a.col.clone(),
                a.val.clone(),
            )?;
            (
                Some(Arc::new(csr)),
                Some(Tensor::new(g.train_nodes.as_slice(), &dev)?),
                Some(Tensor::new(g.test_nodes.as_slice(), &dev)?),
            )
        }
        None => (None, None, None),
    };
    let ce = CrossEntropyOptions {
        label_smoothing: cfg.label_smoothing,
        ignore_index: None,
    };
    let mut run = Run {
        model,
        data: dataset,
        graph,
        train_nodes,
        test_nodes,
        ce,
    };

    let batcher = if run.graph.is_some() {
        None
    } else {
        Some(Batcher::new(&run.data.train, cfg.batch_size, cfg.seed)?)
    };
    let batches_per_epoch = batcher.as_ref().map_or(1, |b| b.num_batches()) as u64;
    let total_steps = cfg.epochs * batches_per_epoch;
    let schedule = Schedule {
        kind: cfg.schedule.clone(),
        base_lr: cfg.lr,
        warmup_steps: cfg.warmup_steps,
        total_steps,
    };
    let mut opt = Optimizer::new(cfg.optimizer.clone());
    let plan = if uses_allocator(cfg, run.graph.is_some()) {
        Some(VariancePlan::new(
            cfg.level.avg_bits(),
            cfg.reallocate_every,
            cfg.estimator.clone(),
        )?)
    } else {
        None
    };
    let policy = match &plan {
        Some(p) => CompressPolicy::with_plan(compress_config(cfg), p.boxed()),
        None => CompressPolicy::new(compress_config(cfg)),
    };
    let mut tape = Tape::new(Box::new(policy)).with_seed(cfg.seed);
    let mut allocator_seconds = 0.0;

    let mut meta = CheckpointMeta {
        step: 0,
        epoch: 0,
        batch_in_epoch: 0,
        optimizer_steps: 0,
        best_metric: None,
        extra: serde_json::Value::Null,
    };
    if let Some(dir) = &cfg.resume {
        meta = checkpoint::load(dir, &mut run.model.params, &mut opt)
            .with_context(|| format!("resuming from {}", dir.display()))?;
        restore_allocator(plan.as_ref(), &meta.extra)
            .with_context(|| format!("resuming from {}", dir.display()))?;
    }
    let mut metrics = match &cfg.out {
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating --out directory {}", dir.display()))?;
            write_config(dir, cfg)?;
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join("metrics.jsonl"))
                .with_context(|| format!("opening {}", dir.join("metrics.jsonl").display()))?;
            Some(f)
        }
        None => None,
    };

    let started = Instant::now();
    memory::reset_peak();
    let mut step = meta.step;
    let mut step_losses = Vec::new();
    let (mut last_ctx, mut last_unc) = (0usize, 0usize);
    let (mut test_loss, mut test_acc, mut train_loss) = (f64::NAN, f64::NAN, f64::NAN);
    let mut samples = 0usize;
    let mut epoch = meta.epoch;
    let mut first_batch = meta.batch_in_epoch as usize;
    'epochs: while epoch < cfg.epochs {
        progress.start_epoch(epoch, batches_per_epoch, first_batch as u64);
        let (mut loss_sum, mut loss_n) = (0.0f64, 0usize);
        let epoch_iter: Box<dyn Iterator<Item = Result<(Tensor, Tensor)>>> = match &batcher {
            Some(b) => Box::new(b.epoch_from(epoch, first_batch)),
            None => Box::new(std::iter::once(Ok((
                run.data.train.x.clone(),
                run.data.train.y.clone(),
            )))),
        };
        for (batch_in_epoch, batch) in (first_batch as u64 + 1..).zip(epoch_iter) {
            let (x, y) = batch?;
            let (x, y) = (to_current(&x)?, to_current(&y)?);
            if let Some(p) = &plan {
                let ta = Instant::now();
                p.maybe_estimate(&mut run.model, &x, &y)?;
                allocator_seconds += ta.elapsed().as_secs_f64();
            }
            let t0 = Instant::now();
            tape.set_step(step);
            tape.begin_step();
            let rows = run.train_nodes.clone();
            let logits = run.logits(&mut tape, &x, rows.as_ref())?;
            let loss = tape.cross_entropy(&logits, &y, run.ce)?;
            drop(logits);
            let loss_v = scalar(&loss)? as f32;
            if !loss_v.is_finite() {
                bail!(
                    "the loss became {loss_v} at step {step} (epoch {epoch}); stopping.{} Try a lower --lr or --clip-grad-norm.",
                    match &cfg.out {
                        Some(d) => format!(" The last good checkpoint is in {}.", d.display()),
                        None => String::new(),
                    }
                );
            }
            if step == meta.step {
                check_excluded_ops(&cfg.exclude_ops, tape.context_log())?;
            }
            last_ctx = tape.live_context_bytes();
            last_unc = tape
                .context_log()
                .iter()
                .map(|r| r.uncompressed_bytes)
                .sum();
            tape.backward(&loss, &mut run.model.params)?;
            if let Some(name) = grads_finite(&run.model.params)? {
                bail!("the gradient of `{name}` became NaN/Inf at step {step}; stopping (checkpoints, if any, are from before this step)");
            }
            if let Some(max) = cfg.clip_grad_norm {
                clip_grad_norm(&mut run.model.params, max)?;
            }
            let lr = schedule.lr(step);
            opt.step(&mut run.model.params, lr)?;
            run.model.params.zero_grad();
            step += 1;
            let n = y.dims()[0];
            samples += n;
            loss_sum += loss_v as f64;
            loss_n += 1;
            step_losses.push((step, loss_v));
            progress.step(loss_v);
            metrics_line(
                &mut metrics,
                serde_json::json!({
                    "kind": "step", "step": step, "epoch": epoch, "loss": loss_v, "lr": lr,
                    "samples_per_s": n as f64 / t0.elapsed().as_secs_f64(),
                    "context_bytes": last_ctx, "context_bytes_uncompressed": last_unc,
                }),
            )?;
            if cfg.max_steps.is_some_and(|m| step >= m) {
                if let Some(dir) = &cfg.out {
                    let meta = CheckpointMeta {
                        step,
                        epoch,
                        batch_in_epoch,
                        optimizer_steps: opt.steps(),
                        best_metric: None,
                        extra: allocator_extra(plan.as_ref())?,
                    };
                    checkpoint::save(dir, &run.model.params, &opt, &meta)?;
                }
                train_loss = loss_sum / loss_n.max(1) as f64;
                break 'epochs;
            }
        }
        train_loss = loss_sum / loss_n.max(1) as f64;
        (test_loss, test_acc) = run.evaluate(cfg.batch_size)?;
        let line = format!(
            "epoch {}/{}: train loss {train_loss:.4}, test loss {test_loss:.4}, test accuracy {:.2}%",
            epoch + 1,
            cfg.epochs,
            test_acc * 100.0
        );
        progress.end_epoch(&line);
        metrics_line(
            &mut metrics,
            serde_json::json!({
                "kind": "epoch", "epoch": epoch, "step": step, "train_loss": train_loss,
                "test_loss": test_loss, "test_accuracy": test_acc,
                "bits_per_tensor": plan.as_ref().map(|p| p.bits()),
            }),
        )?;
        epoch += 1;
        first_batch = 0;
        if let Some(dir) = &cfg.out {
            let meta = CheckpointMeta {
                step,
                epoch,
                batch_in_epoch: 0,
                optimizer_steps: opt.steps(),
                best_metric: Some(test_acc),
                extra: allocator_extra(plan.as_ref())?,
            };
            checkpoint::save(dir, &run.model.params, &opt, &meta)?;
        }
    }
    if test_acc.is_nan() {
        (test_loss, test_acc) = run.evaluate(cfg.batch_size)?;
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(FitSummary {
        model: run.model.name.clone(),
        device: crate::device::name(&dev),
        data: run.data.name.clone(),
        level: cfg.level.name(),
        parameters: run.model.num_parameters(),
        epochs: epoch,
        steps: step,
        train_loss,
        test_loss,
        test_accuracy: test_acc,
        seconds,
        samples_per_second: samples as f64 / seconds.max(1e-9),
        context_bytes: last_ctx,
        context_bytes_uncompressed: last_unc,
        peak_bytes: memory::peak_bytes(),
        allocator_seconds,
        bits_per_tensor: plan.as_ref().map(|p| p.bits()),
        allocator_estimates: plan.as_ref().map_or(0, |p| p.stats().estimates),
        step_losses,
    })
}
