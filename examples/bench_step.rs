//! One fp32 training step (forward + backward) of an MLP and a small CNN on CPU, in actrain
//! (its own tape, L0 = contexts kept as they are) and in plain candle (candle-nn layers, `Var`,
//! candle's `backward()`), interleaved in one run so both see the same machine state.
//!
//! `cargo run --release --example bench_step [-- --reps 20]`

use actrain::ops::conv::Conv2dParams;
use actrain::ops::loss::CrossEntropyOptions;
use actrain::tape::{ParamId, ParamStore, Tape};
use anyhow::Result;
use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder, VarMap};
use std::time::Instant;

/// One engine's training step: (tape, params, x, labels) -> loss.
type ActrainStep =
    Box<dyn Fn(&mut Tape, &ParamStore, &Tensor, &Tensor) -> Result<actrain::tape::Value>>;
type CandleForward = Box<dyn Fn(&Tensor) -> candle_core::Result<Tensor>>;

struct Model {
    name: &'static str,
    batch: usize,
    input: Vec<usize>,
    actrain: ActrainStep,
    store: ParamStore,
    candle: CandleForward,
    varmap: VarMap,
}

fn mlp() -> Result<Model> {
    let dims = [784usize, 512, 512, 10];
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let layers: Vec<candle_nn::Linear> = (0..3)
        .map(|i| candle_nn::linear(dims[i], dims[i + 1], vb.pp(format!("l{i}"))))
        .collect::<candle_core::Result<_>>()?;
    // Same initial weights in both engines.
    let mut store = ParamStore::new();
    let mut ids: Vec<(ParamId, ParamId)> = Vec::new();
    for (i, l) in layers.iter().enumerate() {
        let w = store.add(format!("l{i}.w"), l.weight().copy()?)?;
        let b = store.add(format!("l{i}.b"), l.bias().expect("bias").copy()?)?;
        ids.push((w, b));
    }
    let candle = move |x: &Tensor| {
        let mut h = x.clone();
        for (i, l) in layers.iter().enumerate() {
            h = l.forward(&h)?;
            if i + 1 < layers.len() {
                h = h.relu()?;
            }
        }
        Ok(h)
    };
    let actrain = move |t: &mut Tape, s: &ParamStore, x: &Tensor, y: &Tensor| {
        let mut h = t.constant(x.clone());
        for (i, &(w, b)) in ids.iter().enumerate() {
            let (w, b) = (t.param(s, w), t.param(s, b));
            h = t.linear(&h, &w, Some(&b))?;
            if i + 1 < ids.len() {
                h = t.relu(&h)?;
            }
        }
        t.cross_entropy(&h, y, CrossEntropyOptions::default())
    };
    Ok(Model {
        name: "MLP 784-512-512-10, batch 128",
        batch: 128,
        input: vec![784],
        actrain: Box::new(actrain),
        store,
        candle: Box::new(candle),
        varmap,
    })
}

fn cnn() -> Result<Model> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let cfg = Conv2dConfig {
        padding: 1,
        ..Default::default()
    };
    let c1 = candle_nn::conv2d(1, 16, 3, cfg, vb.pp("c1"))?;
    let c2 = candle_nn::conv2d(16, 32, 3, cfg, vb.pp("c2"))?;
    let fc = candle_nn::linear(32 * 7 * 7, 10, vb.pp("fc"))?;
    let mut store = ParamStore::new();
    let mut add = |n: &str, t: &Tensor| store.add(n, t.copy().expect("copy"));
    let ids = [
        add("c1.w", c1.weight())?,
        add("c1.b", c1.bias().expect("bias"))?,
        add("c2.w", c2.weight())?,
        add("c2.b", c2.bias().expect("bias"))?,
        add("fc.w", fc.weight())?,
        add("fc.b", fc.bias().expect("bias"))?,
    ];
    let candle = move |x: &Tensor| {
        let h = c1.forward(x)?.relu()?.max_pool2d(2)?;
        let h = c2.forward(&h)?.relu()?.max_pool2d(2)?;
        fc.forward(&h.flatten_from(1)?)
    };
    let actrain = move |t: &mut Tape, s: &ParamStore, x: &Tensor, y: &Tensor| {
        let p: Vec<_> = ids.iter().map(|&id| t.param(s, id)).collect();
        let pad1 = Conv2dParams {
            padding: 1,
            ..Default::default()
        };
        let x = t.constant(x.clone());
        let h = t.conv2d(&x, &p[0], Some(&p[1]), pad1)?;
        let h = t.relu(&h)?;
        let h = t.max_pool2d(&h, 2, 2, 0)?;
        let h = t.conv2d(&h, &p[2], Some(&p[3]), pad1)?;
        let h = t.relu(&h)?;
        let h = t.max_pool2d(&h, 2, 2, 0)?;
        let h = t.flatten(&h, 1)?;
        let h = t.linear(&h, &p[4], Some(&p[5]))?;
        t.cross_entropy(&h, y, CrossEntropyOptions::default())
    };
    Ok(Model {
        name: "CNN conv16-conv32-fc on 1x28x28, batch 64",
        batch: 64,
        input: vec![1, 28, 28],
        actrain: Box::new(actrain),
        store,
        candle: Box::new(candle),
        varmap,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() -> Result<()> {
    let reps: usize = std::env::args()
        .skip_while(|a| a != "--reps")
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(20);
    println!("| model | actrain step (ms) | candle step (ms) | ratio actrain/candle |");
    println!("|---|---|---|---|");
    for mut m in [mlp()?, cnn()?] {
        let mut shape = vec![m.batch];
        shape.extend(&m.input);
        let x = Tensor::randn(0f32, 1.0, shape, &Device::Cpu)?;
        let labels: Vec<u32> = (0..m.batch as u32).map(|i| i % 10).collect();
        let y = Tensor::from_vec(labels, m.batch, &Device::Cpu)?;
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        for r in 0..reps + 2 {
            let t0 = Instant::now();
            let mut tape = Tape::default();
            let loss = (m.actrain)(&mut tape, &m.store, &x, &y)?;
            tape.backward(&loss, &mut m.store)?;
            m.store.zero_grad();
            let a = t0.elapsed().as_secs_f64();

            let t0 = Instant::now();
            let logits = (m.candle)(&x)?;
            let loss = candle_nn::loss::cross_entropy(&logits, &y)?;
            let grads = loss.backward()?;
            drop(grads);
            let c = t0.elapsed().as_secs_f64();
            if r >= 2 {
                ours.push(a * 1e3);
                theirs.push(c * 1e3);
            }
        }
        let _ = &m.varmap;
        let (a, c) = (median(ours), median(theirs));
        println!("| {} | {a:.2} | {c:.2} | {:.2} |", m.name, a / c);
    }
    Ok(())
}
