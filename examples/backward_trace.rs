//! Where a training step's memory peaks, node by node through backward: after each node, the
//! live bytes above the step's start, the highest point inside that node, the context not yet
//! freed and the gradients waiting in the frontier. The node whose peak is the step's is
//! marked; that is the one to shrink for a bigger max batch.
//!
//! `cargo run --release --example backward_trace [-- --model resnet18-cifar --batch 128 --level L3
//! --allocator variance]` (the variance allocator's first estimate runs first, as in `max-batch`)

use actrain::allocate::{policy_for, Allocator};
use actrain::compress::policy::{CompressConfig, Level};
use actrain::memory::counting::{current_bytes, peak_bytes, reset_peak};
use actrain::model::Model;
use actrain::ops::loss::CrossEntropyOptions;
use actrain::tape::Tape;
use anyhow::{anyhow, Result};
use common::arg;

mod common;

fn mib(b: usize) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

fn main() -> Result<()> {
    let setup = common::setup("128")?;
    let (model_name, batch) = (&setup.model_name, setup.batch);
    let (x, y) = (setup.x.clone(), setup.y.clone());
    let level: Level = arg("--level", "L3")
        .parse()
        .map_err(|e| anyhow!("--level: {e}"))?;
    let mut model = Model::build(&setup.def, &setup.spec, 1)?;
    let allocator: Allocator = arg("--allocator", "variance")
        .parse()
        .map_err(|e| anyhow!("--allocator: {e}"))?;
    let cfg = CompressConfig {
        level,
        seed: 1,
        ..Default::default()
    };
    let (policy, _plan) = policy_for(cfg, allocator, &mut model, &x, &y)?;
    let mut tape = Tape::new(Box::new(policy));
    tape.begin_step();
    let base = current_bytes();
    reset_peak();
    let logits = model.forward(&mut tape, &x, None)?;
    let loss = tape.cross_entropy(&logits, &y, CrossEntropyOptions::default())?;
    drop(logits);
    let forward_peak = peak_bytes() - base;
    println!(
        "{model_name} batch {batch} {}: forward peak {:.2} MiB, after forward {:.2} MiB (context {:.2} MiB)\n",
        level.name(),
        mib(forward_peak),
        mib(current_bytes() - base),
        mib(tape.live_context_bytes())
    );
    let mut rows = Vec::new();
    reset_peak();
    tape.backward_with(&loss, &mut model.params, |p| {
        rows.push((
            p.op,
            p.nodes_left,
            current_bytes().saturating_sub(base),
            peak_bytes().saturating_sub(base),
            p.live_context_bytes,
            p.frontier_bytes,
        ));
        reset_peak();
    })?;
    let top = rows.iter().map(|r| r.3).max().unwrap_or(0);
    println!("| node | op | live after | peak inside | context left | frontier |");
    println!("|---|---|---|---|---|---|");
    for (op, left, live, peak, ctx, front) in &rows {
        let mark = if *peak == top { " **peak**" } else { "" };
        println!(
            "| {left} | {op} | {:.2} | {:.2}{mark} | {:.2} | {:.2} |",
            mib(*live),
            mib(*peak),
            mib(*ctx),
            mib(*front)
        );
    }
    println!(
        "\nbackward peak {:.2} MiB above the step's start (parameter gradients included)",
        mib(top)
    );
    Ok(())
}
