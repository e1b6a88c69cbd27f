//! Training-step time (forward, backward, optimizer) per compression level, levels interleaved
//! so they share the machine's state. Reports the median and the ratio to L0.
//!
//! `cargo run --release --example bench_levels [-- --model resnet18-cifar --batch 32 --reps 5]`
//! (a language model: `-- --model gpt-char --shape 64 --vocab 65`)

use actrain::compress::policy::{CompressConfig, CompressPolicy, Level};
use actrain::model::{load_def, random_batch, InputSpec, Model};
use actrain::ops::loss::CrossEntropyOptions;
use actrain::tape::Tape;
use actrain::train::optim::{Optimizer, OptimizerConfig};
use anyhow::Result;
use std::time::Instant;

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| default.to_string())
}

fn main() -> Result<()> {
    let model_name = arg("--model", "resnet18-cifar");
    let batch: usize = arg("--batch", "32").parse()?;
    let reps: usize = arg("--reps", "5").parse()?;
    let shape: Vec<usize> = arg("--shape", "3x32x32")
        .split('x')
        .map(|s| s.parse())
        .collect::<Result<_, _>>()?;
    // `--vocab N`: token ids below N in a sequence of `--shape` (e.g. `--shape 64 --vocab 65`
    // for gpt-char), predicted per position.
    let vocab: Option<usize> = match arg("--vocab", "") {
        v if v.is_empty() => None,
        v => Some(
            v.parse()
                .map_err(|e| anyhow::anyhow!("--vocab {v}: expected a number of tokens ({e})"))?,
        ),
    };
    let spec = InputSpec {
        sample_shape: shape,
        tokens: vocab.is_some(),
        vocab,
        num_outputs: vocab.unwrap_or(10),
        graph: false,
    };
    let def = load_def(&model_name)?;
    let (x, y) = random_batch(&spec, batch, 1)?;
    let levels = [Level::L0, Level::L1, Level::L2, Level::L3, Level::L4];
    let mut models: Vec<(Model, Optimizer)> = levels
        .iter()
        .map(|_| -> Result<_> {
            Ok((
                Model::build(&def, &spec, 1)?,
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
