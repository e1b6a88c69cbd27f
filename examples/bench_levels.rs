//! Training-step time (forward, backward, optimizer) per compression level, levels interleaved
//! so they share the machine's state. Reports the median and the ratio to L0.
//!
//! `cargo run --release --example bench_levels [-- --model resnet18-cifar --batch 32 --reps 5]`
//! (a language model: `-- --model gpt-char --shape 64 --vocab 65`)

use actrain::compress::policy::{CompressConfig, CompressPolicy, Level};
use actrain::model::Model;
use actrain::ops::loss::CrossEntropyOptions;
use actrain::tape::Tape;
use actrain::train::optim::{Optimizer, OptimizerConfig};
use anyhow::Result;
use common::arg;

mod common;
use std::time::Instant;

fn main() -> Result<()> {
    let setup = common::setup("32")?;
    let (model_name, batch) = (&setup.model_name, setup.batch);
    let (x, y) = (setup.x.clone(), setup.y.clone());
    let reps: usize = arg("--reps", "5").parse()?;
    let levels = [Level::L0, Level::L1, Level::L2, Level::L3, Level::L4];
    let mut models: Vec<(Model, Optimizer)> = levels
        .iter()
        .map(|_| -> Result<_> {
            Ok((
                Model::build(&setup.def, &setup.spec, 1)?,
                Optimizer::new(OptimizerConfig::Sgd {
                    momentum: 0.9,
                    nesterov: false,
                    weight_decay: 0.0,
                }),
            ))
        })
        .collect::<Result<_>>()?;
    let mut times = vec![Vec::new(); levels.len()];
    for r in 0..reps + 1 {
        for (i, &level) in levels.iter().enumerate() {
            let (model, opt) = &mut models[i];
            let policy = CompressPolicy::new(CompressConfig {
                level,
                seed: 1,
                ..Default::default()
            });
            let t0 = Instant::now();
            let mut tape = Tape::new(Box::new(policy));
            tape.begin_step();
            let logits = model.forward(&mut tape, &x, None)?;
            let loss = tape.cross_entropy(&logits, &y, CrossEntropyOptions::default())?;
            drop(logits);
            tape.backward(&loss, &mut model.params)?;
            opt.step(&mut model.params, 0.01)?;
            model.params.zero_grad();
            if r > 0 {
                times[i].push(t0.elapsed().as_secs_f64() * 1e3);
            }
        }
    }
    println!("{model_name}, batch {batch}, median of {reps} steps\n");
    println!("| level | step (ms) | vs L0 |\n|---|---|---|");
    let med = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let base = med(&mut times[0].clone());
    for (i, level) in levels.iter().enumerate() {
        let m = med(&mut times[i]);
        println!("| {} | {m:.1} | {:.3}x |", level.name(), m / base);
    }
    Ok(())
}
