//! Does the variance allocator pay for itself? For a small CNN on digits, a ResNet-18 on
//! synthetic images and a small GPT on synthetic text, at an average budget (default 2 bits):
//!
//! * the gradient variance `E‖g − g*‖²` over many rounding seeds (`g*` the exact L0
//!   gradient) of uniform bits (`UniformPlan`: the best rung within the budget) vs the
//!   variance allocator: with the default estimator (per-slot at the operating point, first
//!   sweep then rotating rounds), with the randomized all-slots estimator, and with the
//!   analytic one;
//! * the allocator's cost (estimation + solve) against a training step, amortised over the
//!   re-allocation interval.
//!
//! `cargo run --release --example allocator_eval [-- --draws 16 --every 200 --bits 2]`
//! (also `--only cnn|resnet|gpt`, `--rounds N`, `--per-round M`, `--probe-bits B`,
//! `--passes K`, `--sub-batch S`, `--text FILE` for a real character corpus instead of synthetic
//! text, `--warmup N` to train N AdamW steps before measuring). Runs in ~6 minutes on 2 CPU cores.

use actrain::allocate::{
    flat_grad, Estimator, NumericalConfig, Sampling, SlotReport, VariancePlan,
};
use actrain::compress::policy::{CompressConfig, CompressPolicy, Level};
use actrain::data::{load, LoadOptions};
use actrain::model::{load_def, InputSpec, Model};
use actrain::ops::loss::CrossEntropyOptions;
use actrain::tape::{ContextPolicy, KeepPolicy, Tape};
use actrain::train::optim::{Optimizer, OptimizerConfig};
use anyhow::{bail, Context, Result};
use candle_core::Tensor;
use std::time::Instant;

struct Args {
    draws: usize,
    every: u64,
    bits: f32,
    only: Option<String>,
    rounds: Option<usize>,
    cfg: NumericalConfig,
    /// Character corpus for the GPT case (`text:FILE`) instead of synthetic text.
    text: Option<String>,
    /// Training steps (AdamW, fp32 context) before measuring: sensitivities of a model that
    /// has learnt something, not of its initialisation.
    warmup: usize,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        draws: 32,
        every: 200,
        bits: 2.0,
        only: None,
        rounds: None,
        cfg: NumericalConfig::default(),
        text: None,
        warmup: 0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let val = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--draws" => a.draws = val.parse()?,
            "--every" => a.every = val.parse()?,
            "--bits" => a.bits = val.parse()?,
            "--only" => a.only = Some(val),
            "--rounds" => a.rounds = Some(val.parse()?),
            "--per-round" => a.cfg.slots_per_round = Some(val.parse()?),
            "--probe-bits" => a.cfg.probe_bits = val.parse()?,
            "--passes" => a.cfg.sign_passes = val.parse()?,
            "--sub-batch" => a.cfg.sub_batch = val.parse()?,
            "--text" => a.text = Some(val),
            "--warmup" => a.warmup = val.parse()?,
            other => bail!("unknown flag {other} (expected --draws, --every, --bits, --only, --text, --warmup, ...)"),
        }
    }
    Ok(a)
}

/// `steps` AdamW steps at fp32 context on consecutive `batch`-sized windows of `(xs, ys)`.
fn warm_up(model: &mut Model, xs: &Tensor, ys: &Tensor, batch: usize, steps: usize) -> Result<()> {
    if steps == 0 {
        return Ok(());
    }
    let n = xs.dims()[0];
    let batch = batch.min(n);
    let mut opt = Optimizer::new(OptimizerConfig::AdamW {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
    });
    let mut tape = Tape::new(Box::new(KeepPolicy));
    let mut last = f32::NAN;
    for step in 0..steps {
        let start = (step * batch) % (n - batch + 1);
        let (x, y) = (xs.narrow(0, start, batch)?, ys.narrow(0, start, batch)?);
        tape.begin_step();
        model.params.zero_grad();
        let logits = model.forward(&mut tape, &x, None)?;
        let loss = tape.cross_entropy(&logits, &y, CrossEntropyOptions::default())?;
        drop(logits);
        last = loss.tensor().to_scalar::<f32>()?;
        tape.backward(&loss, &mut model.params)?;
        opt.step(&mut model.params, 1e-3)?;
    }
    model.params.zero_grad();
    eprintln!("  warm-up: {steps} AdamW steps at batch {batch}, last loss {last:.3}");
    Ok(())
}

/// One forward+backward with `policy`; the flattened parameter gradient.
fn gradient(
    model: &mut Model,
    policy: Box<dyn ContextPolicy>,
    seed: u64,
    x: &Tensor,
    y: &Tensor,
) -> Result<Vec<f32>> {
    let mut tape = Tape::new(policy).with_seed(seed);
    tape.begin_step();
    grad_on(model, &mut tape, x, y)
}

fn grad_on(model: &mut Model, tape: &mut Tape, x: &Tensor, y: &Tensor) -> Result<Vec<f32>> {
    model.params.zero_grad();
    let logits = model.forward(tape, x, None)?;
    let loss = tape.cross_entropy(&logits, y, CrossEntropyOptions::default())?;
    drop(logits);
    tape.backward(&loss, &mut model.params)?;
    flat_grad(&model.params)
}

fn config(bits: f32, seed: u64) -> CompressConfig {
    CompressConfig {
        level: Level::Bits(bits),
        seed,
        ..Default::default()
    }
}

/// Mean of `‖g − g*‖²` over `draws` rounding seeds, with the plan built by `plan` (a fresh
/// plan handle per draw shares the state, so every draw sees the same bits).
fn variance(
    model: &mut Model,
    x: &Tensor,
    y: &Tensor,
    exact: &[f32],
    draws: usize,
    bits: f32,
    plan: Option<&VariancePlan>,
) -> Result<f64> {
    let mut total = 0.0;
    for d in 0..draws {
        let cfg = config(bits, 1000 + d as u64);
        let policy = match plan {
            Some(p) => CompressPolicy::with_plan(cfg, p.boxed()),
            None => CompressPolicy::new(cfg),
        };
        let g = gradient(model, Box::new(policy), 7, x, y)?;
        total += g
            .iter()
            .zip(exact)
            .map(|(a, b)| ((a - b) as f64).powi(2))
            .sum::<f64>();
    }
    Ok(total / draws as f64)
}

/// A plan that has seen one training step (so it knows the slots and their sizes).
fn registered_plan(
    model: &mut Model,
    x: &Tensor,
    y: &Tensor,
    bits: f32,
    every: u64,
    cfg: NumericalConfig,
) -> Result<VariancePlan> {
    let plan = VariancePlan::new(bits, every, Estimator::Numerical(cfg))?;
    let policy = CompressPolicy::with_plan(config(bits, 1), plan.boxed());
    gradient(model, Box::new(policy), 7, x, y)?;
    Ok(plan)
}

struct Row {
    name: String,
    batch: usize,
    slots: usize,
    exact_norm: f64,
    uniform: f64,
    rotating: f64,
    first_sweep: f64,
    randomized: f64,
    analytic: f64,
    sweep_passes: usize,
    round_passes: usize,
    rounds: usize,
    sweep_s: f64,
    round_s: f64,
    randomized_passes: usize,
    randomized_s: f64,
    solve_s: f64,
    step_s: f64,
    bits_hist: String,
}

fn squared_distance(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum()
}

fn evaluate(name: &str, mut model: Model, x: Tensor, y: Tensor, args: &Args) -> Result<Row> {
    let batch = x.dims()[0];
    eprintln!(
        "{name}: batch {batch}, {} parameters",
        model.num_parameters()
    );
    let exact = gradient(&mut model, Box::new(KeepPolicy), 7, &x, &y)?;
    let exact_norm = squared_distance(&exact, &vec![0.0; exact.len()]);

    // Training-step time at the uniform plan (forward + backward, as the trainer runs it);
    // the fastest of 5, like the estimation rounds.
    let mut step_s = f64::INFINITY;
    for i in 0..5 {
        let t0 = Instant::now();
        let policy = CompressPolicy::new(config(args.bits, i));
        gradient(&mut model, Box::new(policy), 7, &x, &y)?;
        step_s = step_s.min(t0.elapsed().as_secs_f64());
    }
    let uniform = variance(&mut model, &x, &y, &exact, args.draws, args.bits, None)?;

    // Default estimator: per-slot at the operating point, rotating. The first estimate
    // measures every slot; the following rounds refresh a tenth-of-GACT subset each, and
    // see the compounding of the slots the plan has pushed to low bits.
    let mut cfg = args.cfg.clone();
    cfg.sampling = Sampling::Rotating;
    let plan = registered_plan(&mut model, &x, &y, args.bits, args.every, cfg.clone())?;
    plan.estimate(&mut model, &x, &y)?;
    let sweep = plan.stats();
    let first_sweep = variance(
        &mut model,
        &x,
        &y,
        &exact,
        args.draws,
        args.bits,
        Some(&plan),
    )?;
    let l = plan.slots().len();
    let per_round = cfg.round_size(l);
    let rounds = args.rounds.unwrap_or(2 * l.div_ceil(per_round));
    // Fastest round: the machine is shared, and every round does the same work.
    let mut round_s = f64::INFINITY;
    let mut round_passes = 0;
    for _ in 0..rounds {
        plan.estimate(&mut model, &x, &y)?;
        let st = plan.stats();
        round_s = round_s.min(st.last_estimate_seconds);
        round_passes = st.passes_per_estimate;
    }
    let rotating = variance(
        &mut model,
        &x,
        &y,
        &exact,
        args.draws,
        args.bits,
        Some(&plan),
    )?;
    let solve_s = plan.stats().last_solve_seconds;
    let slots = plan.slots();
    let mut hist = std::collections::BTreeMap::<u8, usize>::new();
    for s in &slots {
        *hist.entry(s.bits).or_default() += 1;
    }
    let bits_hist = hist
        .iter()
        .rev()
        .map(|(b, n)| format!("{n}×{b}"))
        .collect::<Vec<_>>()
        .join(" ");

    // The randomized all-slots estimator (1 + K passes).
    let mut rcfg = args.cfg.clone();
    rcfg.sampling = Sampling::Randomized;
    let rplan = registered_plan(&mut model, &x, &y, args.bits, args.every, rcfg)?;
    rplan.estimate(&mut model, &x, &y)?;
    let rstats = rplan.stats();
    let randomized = variance(
        &mut model,
        &x,
        &y,
        &exact,
        args.draws,
        args.bits,
        Some(&rplan),
    )?;
    print_sensitivities(name, &slots, &rplan.slots());

    // Analytic: the plan gathers noise energies during a step and solves at the next.
    let analytic_plan = VariancePlan::new(args.bits, args.every, Estimator::analytic())?;
    for step in [0, 10 * args.every] {
        let policy = CompressPolicy::with_plan(config(args.bits, 1), analytic_plan.boxed());
        let mut tape = Tape::new(Box::new(policy)).with_seed(7);
        tape.set_step(step);
        tape.begin_step();
        grad_on(&mut model, &mut tape, &x, &y)?;
    }
    let analytic = variance(
        &mut model,
        &x,
        &y,
        &exact,
        args.draws,
        args.bits,
        Some(&analytic_plan),
    )?;

    Ok(Row {
        name: name.to_string(),
        batch,
        slots: l,
        exact_norm,
        uniform,
        rotating,
        first_sweep,
        randomized,
        analytic,
        sweep_passes: sweep.passes_per_estimate,
        round_passes,
        rounds,
        sweep_s: sweep.last_estimate_seconds,
        round_s,
        randomized_passes: rstats.passes_per_estimate,
        randomized_s: rstats.last_estimate_seconds,
        solve_s,
        step_s,
        bits_hist,
    })
}

fn print_sensitivities(name: &str, slots: &[SlotReport], randomized: &[SlotReport]) {
    eprintln!("{name}: slot, op, elements, bits, c (per-slot, rotating), c (randomized)");
    for s in slots {
        let r = randomized
            .iter()
            .find(|r| r.slot == s.slot)
            .and_then(|r| r.sensitivity)
            .unwrap_or(f64::NAN);
        eprintln!(
            "  {:>3} {:<14} {:>9} {:>2} {:>10.3e} {:>10.3e}",
            s.slot,
            s.op,
            s.elements,
            s.bits,
            s.sensitivity.unwrap_or(f64::NAN),
            r
        );
    }
}

fn image_spec(shape: &[usize], classes: usize) -> InputSpec {
    InputSpec {
        sample_shape: shape.to_vec(),
        tokens: false,
        vocab: None,
        num_outputs: classes,
        graph: false,
    }
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let opts = LoadOptions::default();
    let mut rows = Vec::new();

    let digits = load("digits", &opts)?;
    let (x, y) = (
        digits.train.x.narrow(0, 0, 64)?,
        digits.train.y.narrow(0, 0, 64)?,
    );
    let mut cnn = Model::build(
        &load_def("cnn")?,
        &image_spec(&digits.sample_shape, digits.task.num_outputs()),
        1,
    )?;
    let want = |n: &str| args.only.as_deref().is_none_or(|o| n.contains(o));
    if want("cnn") {
        warm_up(&mut cnn, &digits.train.x, &digits.train.y, 64, args.warmup)?;
        rows.push(evaluate("cnn / digits", cnn, x, y, &args)?);
    }

    let synth = load("synthetic:3x16x16:10:256", &opts)?;
    let (x, y) = (
        synth.train.x.narrow(0, 0, 32)?,
        synth.train.y.narrow(0, 0, 32)?,
    );
    let mut resnet = Model::build(
        &load_def("resnet18-cifar")?,
        &image_spec(&synth.sample_shape, 10),
        1,
    )?;
    if want("resnet") {
        warm_up(&mut resnet, &synth.train.x, &synth.train.y, 32, args.warmup)?;
        rows.push(evaluate(
            "resnet18-cifar / synthetic 3x16x16",
            resnet,
            x,
            y,
            &args,
        )?);
    }

    let text_spec = match &args.text {
        Some(f) => format!("text:{f}"),
        None => "synthetic-text:65:64:512".to_string(),
    };
    let text = load(&text_spec, &opts)?;
    let (x, y) = (
        text.train.x.narrow(0, 0, 16)?,
        text.train.y.narrow(0, 0, 16)?,
    );
    let vocab = text.task.num_outputs();
    let mut gpt = Model::build(
        &load_def("gpt-char")?,
        &InputSpec {
            sample_shape: text.sample_shape.clone(),
            tokens: true,
            vocab: Some(vocab),
            num_outputs: vocab,
            graph: false,
        },
        1,
    )?;
    if want("gpt") {
        warm_up(&mut gpt, &text.train.x, &text.train.y, 16, args.warmup)?;
        let name = format!("gpt-char / {}", text_spec.replace(":512", ""));
        rows.push(evaluate(&name, gpt, x, y, &args)?);
    }

    println!(
        "\nGradient variance E‖g − g*‖² at {} bits average, mean over {} rounding seeds (g* = exact \
         L0 gradient, Var shown relative to ‖g*‖²). Ratio = uniform / allocator: > 1 means the \
         allocator's gradient is less noisy.\n",
        args.bits, args.draws
    );
    println!(
        "| model / data | batch | quantized tensors | uniform {b}-bit | variance allocator | ratio | ratio after 1st sweep | ratio, randomized est. | ratio, analytic est. | allocator's bits (count×bits) |",
        b = args.bits
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {:.3e} | {:.3e} | **{:.2}x** | {:.2}x | {:.2}x | {:.2}x | {} |",
            r.name,
            r.batch,
            r.slots,
            r.uniform / r.exact_norm,
            r.rotating / r.exact_norm,
            r.uniform / r.rotating,
            r.uniform / r.first_sweep,
            r.uniform / r.randomized,
            r.uniform / r.analytic,
            r.bits_hist
        );
    }
    println!(
        "\nAllocator cost: estimation on {} samples of the batch; GACT spends 3 passes per tensor \
         per re-allocation. Times: fastest of the rounds / of 5 steps. Amortised = (round + \
         solve) / ({} steps × step time).\n",
        args.cfg.sub_batch, args.every
    );
    println!(
        "| model | 1st sweep: passes, s | later rounds (run): passes (GACT 3L), s | randomized: passes, s | solve s | training step s | amortised per step |"
    );
    println!("|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {}, {:.2} | ({}) {} ({}), {:.3} | {}, {:.3} | {:.5} | {:.3} | {:.2}% |",
            r.name,
            r.sweep_passes,
            r.sweep_s,
            r.rounds,
            r.round_passes,
            3 * r.slots,
            r.round_s,
            r.randomized_passes,
            r.randomized_s,
            r.solve_s,
            r.step_s,
            100.0 * (r.round_s + r.solve_s) / (args.every as f64 * r.step_s)
        );
    }
    Ok(())
}
