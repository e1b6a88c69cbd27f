//! `actrain`: activation-compressed training from the command line.

use actrain::cli;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "actrain",
    version,
    about = "Train bigger batches in the same memory: activations saved for backward are stored at ~2 bits"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model definition on a dataset at a compression level.
    Fit(Box<cli::fit::FitArgs>),
    /// The largest batch that fits a memory budget, at every compression level.
    MaxBatch(Box<cli::max_batch::MaxBatchArgs>),
    /// Where the memory of a training step goes, per saved context and per bucket, at each level.
    ProfileMemory(cli::profile_memory::ProfileArgs),
}

fn main() {
    // candle's CPU barrier pool spins 25k iterations before yielding; beside rayon's threads
    // that starves the workers on small machines (2-4x slower steps on 2 cores). Set before
    // any candle op creates the pool, unless the user chose a value.
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "0");
    }
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Fit(a) => cli::fit::run(a),
        Command::ProfileMemory(a) => cli::profile_memory::run(a),
        Command::MaxBatch(a) => cli::max_batch::run(a),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
