//! `actrain fit`: train a model definition on a dataset at a compression level.

use crate::allocate::Allocator;
use crate::compress::policy::{bits_level, Level};
use crate::memory::human_bytes;
use crate::train::optim::OptimizerConfig;
use crate::train::schedule::ScheduleKind;
use crate::train::trainer::{fit, FitConfig, Progress};
use anyhow::{bail, Context as _, Result};
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum OptimizerName {
    Sgd,
    Adamw,
}

#[derive(Args, Debug)]
pub struct FitArgs {
    /// Model: a preset (mlp, cnn, resnet18-cifar, resnet18, resnet50-cifar, resnet50, vit-tiny,
    /// gpt-char, gcn) or a path to a definition file.
    #[arg(long, default_value = "cnn")]
    pub model: String,
    /// Data: digits (embedded), mnist:DIR, fashion-mnist:DIR, cifar10:DIR, text:FILE,
    /// graph:DIR, graph:synthetic, synthetic:CxHxW:CLASSES[:N], synthetic-text:VOCAB:SEQ[:N].
    #[arg(long, default_value = "digits")]
    pub data: String,
    /// Compression level: L0 (fp32 context), L1 (8-bit), L2 (4-bit), L3 (2-bit), L4 (1.5-bit).
    #[arg(long, default_value = "L3")]
    pub level: String,
    /// Average bits per saved element (overrides --level), e.g. 3.
    #[arg(long)]
    pub bits: Option<f32>,
    #[arg(long, default_value_t = 8)]
    pub epochs: u64,
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Learning rate (default 0.05 for SGD, 0.001 for AdamW).
    #[arg(long)]
    pub lr: Option<f64>,
    #[arg(long, value_enum, default_value = "sgd")]
    pub optimizer: OptimizerName,
    /// SGD momentum.
    #[arg(long, default_value_t = 0.9)]
    pub momentum: f64,
    /// Plain (not Nesterov) momentum for SGD.
    #[arg(long)]
    pub no_nesterov: bool,
    /// Weight decay (default 5e-4 for SGD, 0.01 for AdamW).
    #[arg(long)]
    pub weight_decay: Option<f64>,
    /// Learning-rate schedule: constant, step:EVERY:GAMMA, cosine or cosine:MIN_LR.
    #[arg(long, default_value = "cosine")]
    pub schedule: String,
    #[arg(long, default_value_t = 20)]
    pub warmup_steps: u64,
    /// Clip the global gradient norm to this value (0 disables).
    #[arg(long, default_value_t = 5.0)]
    pub clip_grad_norm: f64,
    #[arg(long, default_value_t = 0.0)]
    pub label_smoothing: f64,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Stop after this many optimizer steps in total (a checkpoint is written first).
    #[arg(long)]
    pub max_steps: Option<u64>,
    /// Use at most this many samples of each split (quick runs).
    #[arg(long)]
    pub limit: Option<usize>,
    /// Sequence length for text data.
    #[arg(long, default_value_t = 64)]
    pub seq_len: usize,
    #[arg(long, default_value_t = 0.2)]
    pub test_fraction: f32,
    /// Elements per quantization group.
    #[arg(long, default_value_t = 256)]
    pub group_size: usize,
    /// Saved tensors smaller than this stay uncompressed.
    #[arg(long, default_value_t = 1024)]
    pub min_compress_elements: usize,
    /// Ops whose context is never compressed, comma separated (e.g. softmax,layer_norm).
    #[arg(long, value_delimiter = ',')]
    pub exclude_ops: Vec<String>,
    /// Bit allocation for L3/L4/--bits: variance (the default: per-tensor bits minimising the
    /// gradient variance under the average-bits budget, re-estimated every
    /// --reallocate-every steps) or uniform (every tensor the same ladder rung).
    #[arg(long, default_value = "variance")]
    pub allocator: String,
    /// Steps between bit re-allocations (variance allocator).
    #[arg(long, default_value_t = 200)]
    pub reallocate_every: u64,
    /// Sensitivities for the variance allocator: numerical (GACT-style extra passes on 8
    /// samples, the default) or analytic (ActNN's model for linear/conv inputs, read off a
    /// training step at no extra passes; other tensors keep the uniform rung).
    #[arg(long, default_value = "numerical")]
    pub estimator: String,
    /// Directory for config.json, metrics.jsonl and checkpoints.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Continue a run from its --out directory (same flags as the original run).
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// cpu or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Print one JSON summary on stdout instead of the human summary.
    #[arg(long)]
    pub json: bool,
    /// No progress bars.
    #[arg(long)]
    pub quiet: bool,
}

impl FitArgs {
    pub fn to_config(&self) -> Result<FitConfig> {
        super::check_device(&self.device)?;
        let level = match self.bits {
            Some(b) => bits_level(b)?,
            None => self.level.parse::<Level>().context("--level")?,
        };
        let schedule: ScheduleKind = self.schedule.parse().context("--schedule")?;
        let optimizer = match self.optimizer {
            OptimizerName::Sgd => OptimizerConfig::Sgd {
                momentum: self.momentum,
                nesterov: !self.no_nesterov && self.momentum > 0.0,
                weight_decay: self.weight_decay.unwrap_or(5e-4),
            },
            OptimizerName::Adamw => OptimizerConfig::AdamW {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: self.weight_decay.unwrap_or(0.01),
            },
        };
        let lr = self.lr.unwrap_or(match self.optimizer {
            OptimizerName::Sgd => 0.05,
            OptimizerName::Adamw => 1e-3,
        });
        if !(0.0..1.0).contains(&self.label_smoothing) {
            bail!(
                "--label-smoothing {} must be in [0, 1)",
                self.label_smoothing
            );
        }
        if !(0.0..1.0).contains(&self.test_fraction) || self.test_fraction == 0.0 {
            bail!("--test-fraction {} must be in (0, 1)", self.test_fraction);
        }
        let variance_allocator = self.allocator.parse::<Allocator>()? == Allocator::Variance;
        if self.group_size == 0 || !self.group_size.is_multiple_of(8) {
            bail!(
                "--group-size {}: must be a positive multiple of 8 (groups start on byte boundaries)",
                self.group_size
            );
        }
        if self.reallocate_every == 0 {
            bail!("--reallocate-every must be at least 1");
        }
        let out = self.out.clone().or_else(|| self.resume.clone());
        Ok(FitConfig {
            model: self.model.clone(),
            data: self.data.clone(),
            level,
            epochs: self.epochs,
            batch_size: self.batch_size,
            lr,
            optimizer,
            schedule,
            warmup_steps: self.warmup_steps,
            clip_grad_norm: (self.clip_grad_norm > 0.0).then_some(self.clip_grad_norm),
            label_smoothing: self.label_smoothing,
            seed: self.seed,
            max_steps: self.max_steps,
            limit: self.limit,
            seq_len: self.seq_len,
            test_fraction: self.test_fraction,
            group_size: self.group_size,
            min_compress_elements: self.min_compress_elements,
            exclude_ops: self.exclude_ops.clone(),
            variance_allocator,
            reallocate_every: self.reallocate_every,
            estimator: self
                .estimator
                .parse()
                .with_context(|| format!("--estimator `{}`", self.estimator))?,
            out,
            resume: self.resume.clone(),
            device: self.device.clone(),
        })
    }
}

/// Draws one indicatif bar per epoch on stderr; prints epoch lines either way.
struct Bars {
    show: bool,
    quiet: bool,
    bar: Option<ProgressBar>,
}

impl Progress for Bars {
    fn start_epoch(&mut self, epoch: u64, batches: u64, done: u64) {
        if self.show {
            let bar = ProgressBar::new(batches);
            bar.set_style(
                ProgressStyle::with_template(
                    "epoch {prefix} [{bar:30}] {pos}/{len} {msg} ({per_sec})",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar.set_prefix(format!("{}", epoch + 1));
            bar.set_position(done);
            self.bar = Some(bar);
        }
    }
    fn step(&mut self, loss: f32) {
        if let Some(b) = &self.bar {
            b.set_message(format!("loss {loss:.4}"));
            b.inc(1);
        }
    }
    fn end_epoch(&mut self, line: &str) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
        if !self.quiet {
            eprintln!("{line}");
        }
    }
}

pub fn run(args: &FitArgs) -> Result<()> {
    let cfg = args.to_config()?;
    if let Some(dir) = &cfg.resume {
        check_resume_config(dir, &cfg)?;
    }
    if !args.quiet {
        eprintln!(
            "actrain fit: model {}, data {}, level {}, {} epochs, batch {}, lr {}, seed {}",
            cfg.model,
            cfg.data,
            cfg.level.name(),
            cfg.epochs,
            cfg.batch_size,
            cfg.lr,
            cfg.seed
        );
    }
    let mut bars = Bars {
        show: super::show_progress(args.quiet),
        quiet: args.quiet,
        bar: None,
    };
    let s = fit(&cfg, &mut bars)?;
    if args.json {
        println!("{}", serde_json::to_string(&s)?);
    } else {
        let ratio = s.context_bytes_uncompressed as f64 / s.context_bytes.max(1) as f64;
        println!(
            "model {} ({} parameters) on {}, level {}",
            s.model, s.parameters, s.data, s.level
        );
        println!(
            "test accuracy {:.2}%  test loss {:.4}  train loss {:.4}",
            s.test_accuracy * 100.0,
            s.test_loss,
            s.train_loss
        );
        println!(
            "activation memory per step: {} stored vs {} uncompressed (L0): {ratio:.1}x smaller",
            human_bytes(s.context_bytes),
            human_bytes(s.context_bytes_uncompressed)
        );
        println!(
            "{} steps in {:.1} s ({:.0} samples/s), peak heap {}",
            s.steps,
            s.seconds,
            s.samples_per_second,
            human_bytes(s.peak_bytes)
        );
        if let Some(bits) = &s.bits_per_tensor {
            println!(
                "variance allocator: bits per saved tensor {bits:?} ({} estimates, {:.1} s estimating, {:.1}% of the run)",
                s.allocator_estimates,
                s.allocator_seconds,
                100.0 * s.allocator_seconds / s.seconds.max(1e-9)
            );
        }
        if let Some(dir) = &cfg.out {
            println!(
                "checkpoint, config.json and metrics.jsonl in {}",
                dir.display()
            );
        }
    }
    Ok(())
}

/// A resumed run must use the settings it was started with, or the result is not a
/// continuation; compare against the saved config.json and name the first difference.
fn check_resume_config(dir: &std::path::Path, cfg: &FitConfig) -> Result<()> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "--resume {}: cannot read {} (is this an --out directory of an earlier run?)",
            dir.display(),
            path.display()
        )
    })?;
    let saved: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not valid JSON", path.display()))?;
    let now = serde_json::to_value(cfg)?;
    for key in [
        "model",
        "data",
        "level",
        "batch_size",
        "lr",
        "optimizer",
        "schedule",
        "variance_allocator",
        "warmup_steps",
        "seed",
        "limit",
        "seq_len",
        "test_fraction",
        "group_size",
    ] {
        if saved.get(key) != now.get(key) {
            bail!(
                "--resume {}: the run was started with {key} = {}, this invocation has {}; pass the original flags",
                dir.display(),
                saved.get(key).cloned().unwrap_or_default(),
                now.get(key).cloned().unwrap_or_default()
            );
        }
    }
    Ok(())
}
