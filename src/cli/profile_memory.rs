//! `actrain profile-memory`: one table per level — a row per saved context (layer, op, shape,
//! representation, bits, stored and uncompressed bytes), the memory buckets, the peak and its
//! phase — then a comparison across levels.

use crate::allocate::Allocator;
use crate::compress::policy::Level;
use crate::memory::human_bytes;
use crate::memory::profile::{profile_step_with, MemoryProfile};
use crate::model::{load_def, random_batch, Model};
use anyhow::{bail, Context as _, Result};
use clap::Args;

#[derive(Args, Debug)]
pub struct ProfileArgs {
    /// Model preset or definition file.
    #[arg(long, default_value = "cnn")]
    pub model: String,
    /// Dataset whose sample shape and classes the model is built for (a random batch of that
    /// shape is profiled).
    #[arg(long, default_value = "digits")]
    pub data: String,
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Levels to profile, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "L0,L3")]
    pub levels: Vec<String>,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Sequence length for text data.
    #[arg(long, default_value_t = 64)]
    pub seq_len: usize,
    /// cpu or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Bit allocation at L3/L4: variance (per-tensor bits, as `fit` uses by default) or
    /// uniform.
    #[arg(long, default_value = "variance")]
    pub allocator: String,
    /// Print the profiles as JSON (one array) instead of tables.
    #[arg(long)]
    pub json: bool,
}

pub fn parse_levels(levels: &[String]) -> Result<Vec<Level>> {
    if levels.is_empty() {
        bail!("--levels: give at least one level (e.g. L0,L3)");
    }
    levels
        .iter()
        .map(|l| {
            l.parse::<Level>()
                .with_context(|| format!("--levels: `{l}`"))
        })
        .collect()
}

pub fn run(args: &ProfileArgs) -> Result<()> {
    super::check_device(&args.device)?;
    let levels = parse_levels(&args.levels)?;
    crate::device::select_flag(&args.device)?;
    let allocator: Allocator = args.allocator.parse()?;
    if args.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let spec = crate::search::load_input_spec(&args.data, args.seq_len, args.seed)?;
    let def = load_def(&args.model)?;
    let (x, y) = random_batch(&spec, args.batch_size, args.seed)?;
    let mut profiles = Vec::new();
    for level in levels {
        let mut model = Model::build(&def, &spec, args.seed)?;
        let p = profile_step_with(&mut model, level, allocator, &x, &y, args.seed)
            .with_context(|| format!("profiling level {}", level.name()))?;
        if !args.json {
            print_profile(&def.name, &p);
        }
        profiles.push(p);
    }
    if args.json {
        println!("{}", serde_json::to_string(&profiles)?);
    } else {
        print_comparison(&profiles);
    }
    Ok(())
}

fn ratio(a: usize, b: usize) -> f64 {
    a as f64 / b.max(1) as f64
}

fn print_profile(model: &str, p: &MemoryProfile) {
    let how = match p.allocator {
        Allocator::Variance => ", bits per tensor from the variance allocator",
        Allocator::Uniform => "",
    };
    println!(
        "\n## {model}, level {}{how}, batch {} ({})\n",
        p.level, p.batch_size, p.measured_on
    );
    println!("| layer | op | shape | stored as | bits/elem | stored | uncompressed | ratio |");
    println!("|---|---|---|---|---|---|---|---|");
    for r in &p.rows {
        println!(
            "| {} | {} | {:?} | {} | {:.2} | {} | {} | {} |",
            r.layer,
            r.op,
            r.shape,
            r.repr,
            r.bits,
            human_bytes(r.stored_bytes),
            human_bytes(r.uncompressed_bytes),
            if r.stored_bytes > 0 {
                format!("{:.1}x", ratio(r.uncompressed_bytes, r.stored_bytes))
            } else {
                "-".into()
            }
        );
    }
    println!(
        "| **total** | | | | | **{}** | **{}** | **{:.1}x** |",
        human_bytes(p.activations),
        human_bytes(p.activations_uncompressed),
        ratio(p.activations_uncompressed, p.activations)
    );
    println!("\n| bucket | bytes |\n|---|---|");
    println!("| parameters | {} |", human_bytes(p.parameters));
    println!(
        "| buffers (batch-norm statistics) | {} |",
        human_bytes(p.buffers)
    );
    println!("| gradients | {} |", human_bytes(p.gradients));
    println!("| optimizer state | {} |", human_bytes(p.optimizer_state));
    println!("| input batch | {} |", human_bytes(p.batch_bytes));
    println!(
        "| activations (saved context) | {} |",
        human_bytes(p.activations)
    );
    for ph in &p.phases {
        println!(
            "| peak above steady state during {} | {} |",
            ph.phase,
            human_bytes(ph.peak_bytes)
        );
    }
    println!(
        "| transient at the peak | {} |",
        human_bytes(p.transient_at_peak)
    );
    println!(
        "| **peak** ({}) | **{}** |",
        p.peak_phase,
        human_bytes(p.peak_bytes)
    );
}

fn print_comparison(profiles: &[MemoryProfile]) {
    let base = profiles.iter().find(|p| p.level == "L0");
    println!("\n| level | activations | vs L0 | peak | peak phase | peak vs L0 |\n|---|---|---|---|---|---|");
    for p in profiles {
        let (a, k) = match base {
            Some(b) => (
                format!("{:.1}x", ratio(b.activations, p.activations)),
                format!("{:.2}x", ratio(b.peak_bytes, p.peak_bytes)),
            ),
            None => ("-".into(), "-".into()),
        };
        println!(
            "| {} | {} | {a} | {} | {} | {k} |",
            p.level,
            human_bytes(p.activations),
            human_bytes(p.peak_bytes),
            p.peak_phase
        );
    }
}
