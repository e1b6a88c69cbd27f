//! `actrain max-batch`: the largest batch that trains in `--memory`, per compression level.
//! The search itself lives in `crate::search`; this file maps flags to it and prints.

use crate::compress::policy::Level;
use crate::device::DeviceSpec;
use crate::search::{self, Isolation, MaxBatchConfig, SearchConfig};
use anyhow::{bail, Context as _, Result};
use clap::Args;
use std::io::Write as _;
use std::path::PathBuf;

#[derive(Args, Debug, Clone)]
pub struct MaxBatchArgs {
    /// Model: a preset (mlp, cnn, resnet18-cifar, resnet18, resnet50-cifar, resnet50, vit-tiny,
    /// gpt-char) or a path to a definition file.
    #[arg(long, default_value = "cnn")]
    pub model: String,
    /// Data whose sample shape and classes/vocabulary the probes use (the batches themselves are
    /// random): digits, mnist:DIR, cifar10:DIR, text:FILE, synthetic:CxHxW:CLASSES, ...
    /// Graph data is full-batch and rejected.
    #[arg(long, default_value = "digits")]
    pub data: String,
    /// Memory to fit in, e.g. 2GiB, 512MiB: required on the CPU; on a GPU it emulates a
    /// smaller card and defaults to what the card has free.
    #[arg(long)]
    pub memory: Option<String>,
    /// Levels to search, comma separated.
    #[arg(long, default_value = "L0,L1,L2,L3,L4")]
    pub levels: String,
    /// Fraction of --memory held back: probes get (1 - margin) x memory.
    #[arg(long, default_value_t = 0.05)]
    pub margin: f64,
    /// Never probe a batch larger than this.
    #[arg(long)]
    pub max: Option<usize>,
    /// First batch size probed (doubling from there).
    #[arg(long, default_value_t = 8)]
    pub start: usize,
    /// Only probe and report multiples of this.
    #[arg(long, default_value_t = 1)]
    pub multiple_of: usize,
    /// Full training steps per probe (at least 2: optimizer state exists from the second).
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
    /// Sequence length for text data.
    #[arg(long, default_value_t = 64)]
    pub seq_len: usize,
    /// Run every probe in a fresh process.
    #[arg(long)]
    pub isolate: bool,
    /// Print one JSON object per level on stdout instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Write an SVG plot of max batch and throughput per level.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// cpu or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Bit allocation at L3/L4, as in `fit`: variance (the default; each probe first runs the
    /// allocator's estimate, inside the budget) or uniform.
    #[arg(long, default_value = "variance")]
    pub allocator: String,
    /// No per-probe lines on stderr.
    #[arg(long)]
    pub quiet: bool,
    /// Internal (--isolate): run one probe of --batch at the single --levels level with a
    /// budget of (1 - margin) x --memory and print its outcome as one JSON line.
    #[arg(long, hide = true)]
    pub probe_only: bool,
    /// Internal: the batch size of a --probe-only run.
    #[arg(long, hide = true)]
    pub batch: Option<usize>,
}

impl MaxBatchArgs {
    /// Checks the flags and builds the search configuration (without `--isolate`'s program,
    /// which [`run`] fills in).
    pub fn to_config(&self) -> Result<MaxBatchConfig> {
        let spec = super::check_device(&self.device)?;
        let memory_bytes = match (&self.memory, spec) {
            (None, DeviceSpec::Cuda(_)) => gpu_free_bytes(&self.device)?,
            (m, _) => search::parse_memory_flag(m.as_deref())?,
        };
        let levels = search::parse_levels_flag(&self.levels)?;
        if self.seq_len == 0 {
            bail!("--seq-len must be at least 1");
        }
        let cfg = MaxBatchConfig {
            model: self.model.clone(),
            data: self.data.clone(),
            seq_len: self.seq_len,
            memory_bytes,
            margin: self.margin,
            levels,
            search: SearchConfig {
                start: self.start,
                max: self.max,
                multiple_of: self.multiple_of,
            },
            steps: self.steps,
            seed: self.seed,
            allocator: self.allocator.parse()?,
            isolate: None,
            device: spec.name(),
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

/// What a GPU has free for this process (opens the device): `max-batch`'s default `--memory`.
fn gpu_free_bytes(flag: &str) -> Result<usize> {
    crate::device::select_flag(flag)?;
    crate::memory::available_bytes()
        .with_context(|| format!("--device {flag}: the device reports no free memory"))
}

pub fn run(args: &MaxBatchArgs) -> Result<()> {
    let mut cfg = args.to_config()?;
    crate::device::select_flag(&cfg.device)?;
    if let Some(avail) = crate::memory::available_bytes() {
        if cfg.memory_bytes > avail {
            bail!(
                "--memory {}: the device has only {} free; ask for at most that",
                crate::memory::human_bytes(cfg.memory_bytes),
                crate::memory::human_bytes(avail)
            );
        }
    }
    if args.probe_only {
        return run_probe_only(args, &cfg);
    }
    if args.batch.is_some() {
        bail!("--batch is only meaningful with --probe-only (max-batch searches the batch size)");
    }
    if args.isolate {
        let program = std::env::current_exe().context("--isolate: locating the actrain binary")?;
        cfg.isolate = Some(Isolation {
            program,
            prefix_args: Vec::new(),
        });
    }
    let quiet = args.quiet;
    let mut on_line = |line: &str| {
        if !quiet {
            eprintln!("{line}");
        }
    };
    let report = search::run_max_batch(&cfg, &mut on_line)?;
    let mut out = std::io::stdout().lock();
    if args.json {
        for l in report.json_lines() {
            writeln!(out, "{l}")?;
        }
    } else {
        write!(out, "{}", report.table())?;
    }
    out.flush()?;
    if let Some(path) = &args.plot {
        search::write_atomic(path, &report.svg())
            .with_context(|| format!("--plot {}", path.display()))?;
        if !quiet {
            eprintln!("wrote {}", path.display());
        }
    }
    Ok(())
}

/// The child side of `--isolate`.
fn run_probe_only(args: &MaxBatchArgs, cfg: &MaxBatchConfig) -> Result<()> {
    let batch = args
        .batch
        .context("--probe-only needs --batch N (it is an internal flag of --isolate)")?;
    let level: Level = match cfg.levels.as_slice() {
        [l] => *l,
        _ => bail!("--probe-only needs exactly one level in --levels"),
    };
    let line = search::probe_only(
        &cfg.model,
        &cfg.data,
        cfg.seq_len,
        level,
        batch,
        cfg.probe_budget(),
        cfg.steps,
        cfg.seed,
        cfg.allocator,
    )?;
    println!("{line}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: MaxBatchArgs,
    }

    fn parse(argv: &[&str]) -> MaxBatchArgs {
        let mut v = vec!["max-batch"];
        v.extend_from_slice(argv);
        Cli::try_parse_from(v).expect("flags parse").args
    }

    #[test]
    fn defaults_and_flag_errors() {
        let a = parse(&["--memory", "2GiB"]);
        let cfg = a.to_config().unwrap();
        assert_eq!(cfg.memory_bytes, 2 << 30);
        assert_eq!(cfg.levels.len(), 5);
        assert_eq!(cfg.search, SearchConfig::default());
        assert_eq!(cfg.model, "cnn");
        let e = parse(&[]).to_config().unwrap_err().to_string();
        assert!(e.contains("--memory"), "{e}");
        let e = parse(&["--memory", "2XB"])
            .to_config()
            .unwrap_err()
            .to_string();
        assert!(e.contains("--memory"), "{e}");
        let e = parse(&["--memory", "1GiB", "--levels", "L0,L7"])
            .to_config()
            .unwrap_err()
            .to_string();
        assert!(e.contains("--levels") && e.contains("L7"), "{e}");
        let e = parse(&["--memory", "1GiB", "--steps", "1"])
            .to_config()
            .unwrap_err()
            .to_string();
        assert!(e.contains("--steps"), "{e}");
        let e = parse(&["--memory", "1GiB", "--device", "tpu"])
            .to_config()
            .unwrap_err()
            .to_string();
        assert!(e.contains("--device"), "{e}");
    }

    #[test]
    fn child_args_round_trip() {
        let p = search::SubprocessProber {
            program: "actrain".into(),
            prefix_args: vec![],
            model: "mlp".into(),
            data: "digits".into(),
            seq_len: 64,
            budget_bytes: 3 << 20,
            steps: 2,
            seed: 7,
            allocator: crate::allocate::Allocator::Variance,
            device: "cpu".into(),
        };
        let argv = p.child_args(Level::L3, 96);
        let mut v = vec!["actrain".to_string()];
        v.extend(argv.into_iter().skip(1));
        let a = Cli::try_parse_from(v).unwrap().args;
        assert!(a.probe_only);
        assert_eq!(a.batch, Some(96));
        let cfg = a.to_config().unwrap();
        assert_eq!(cfg.probe_budget(), 3 << 20);
        assert_eq!(cfg.levels, vec![Level::L3]);
    }
}
