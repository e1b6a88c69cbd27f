//! Training on the GPU against the CPU reference: every preset's gradients, the compressed
//! contexts' accounting, `fit`'s loss curve, the CUDA memory meter (exact tensor bytes, peaks,
//! budgets, the driver's typed out-of-memory) and a max-batch search.
//!
//! Needs a GPU: build with `scripts/build-cuda.sh --tests`, run on the GPU machine with
//! `scripts/gpu-check.sh` (it runs this binary with `--test-threads=1`: the compute device and
//! the memory meter are process-wide).
#![cfg(feature = "cuda")]

use actrain::compress::policy::{CompressConfig, CompressPolicy, Level};
use actrain::device;
use actrain::memory::{self, profile::profile_step};
use actrain::model::{load_def, random_batch, InputSpec, Model};
use actrain::ops::loss::CrossEntropyOptions;
use actrain::search::{self, ProbeOutcome};
use actrain::tape::Tape;
use actrain::train::trainer::{fit, FitConfig, NoProgress};
use candle_core::{DType, Device, Tensor};
use std::sync::Mutex;

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn gpu() -> Device {
    Device::new_cuda(0).expect("CUDA device 0 (these tests need a GPU)")
}

fn image(c: usize, hw: usize, classes: usize) -> InputSpec {
    InputSpec {
        sample_shape: vec![c, hw, hw],
        tokens: false,
        vocab: None,
        num_outputs: classes,
        graph: false,
    }
}

fn tokens(len: usize, vocab: usize) -> InputSpec {
    InputSpec {
        sample_shape: vec![len],
        tokens: true,
        vocab: Some(vocab),
        num_outputs: vocab,
        graph: false,
    }
}

fn host_f64(t: &Tensor) -> Vec<f64> {
    let t = t.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    t.to_vec1().unwrap()
}

/// `(‖a − b‖, ‖b‖)` over all elements, in f64 on the host.
fn norm_diff(a: &Tensor, b: &Tensor) -> (f64, f64) {
    let (a, b) = (host_f64(a), host_f64(b));
    assert_eq!(a.len(), b.len());
    let num: f64 = a.iter().zip(&b).map(|(x, y)| (x - y) * (x - y)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    (num.sqrt(), den.sqrt())
}

/// One training step on the compute device: the loss and every parameter's gradient (host).
fn one_step(
    model_name: &str,
    spec: &InputSpec,
    batch: usize,
    level: Level,
) -> (f32, Vec<(String, Tensor)>, usize) {
    let def = load_def(model_name).unwrap();
    let mut model = Model::build(&def, spec, 7).unwrap();
    // The same batch on both devices: built on the host, then moved.
    let (x, y) = {
        let cur = device::current();
        device::select(&Device::Cpu).unwrap();
        let b = random_batch(spec, batch, 11).unwrap();
        device::select(&cur).unwrap();
        (
            device::to_current(&b.0).unwrap(),
            device::to_current(&b.1).unwrap(),
        )
    };
    let cfg = CompressConfig {
        level,
        seed: 5,
        ..CompressConfig::default()
    };
    let mut tape = Tape::new(Box::new(CompressPolicy::new(cfg))).with_seed(5);
    tape.train_mode();
    tape.begin_step();
    let logits = model.forward(&mut tape, &x, None).unwrap();
    let loss = tape
        .cross_entropy(&logits, &y, CrossEntropyOptions::default())
        .unwrap();
    drop(logits);
    let ctx = tape.live_context_bytes();
    let loss_v = loss
        .tensor()
        .to_dtype(DType::F32)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    tape.backward(&loss, &mut model.params).unwrap();
    let grads = model
        .params
        .iter()
        .filter_map(|(_, p)| {
            p.grad
                .as_ref()
                .map(|g| (p.name.clone(), g.to_device(&Device::Cpu).unwrap()))
        })
        .collect();
    (loss_v, grads, ctx)
}

fn compare_step(model_name: &str, spec: &InputSpec, batch: usize, level: Level, tol: f64) {
    device::select(&Device::Cpu).unwrap();
    let (l_cpu, g_cpu, ctx_cpu) = one_step(model_name, spec, batch, level);
    device::select(&gpu()).unwrap();
    let (l_gpu, g_gpu, ctx_gpu) = one_step(model_name, spec, batch, level);
    device::select(&Device::Cpu).unwrap();
    let dl = ((l_gpu - l_cpu) / l_cpu).abs();
    println!("{model_name} {level:?}: loss cpu {l_cpu:.6} gpu {l_gpu:.6} (rel {dl:.2e}); context cpu {ctx_cpu} gpu {ctx_gpu}");
    assert!(
        dl < 1e-4,
        "{model_name} {level:?}: loss cpu {l_cpu} vs gpu {l_gpu}"
    );
    assert_eq!(
        ctx_cpu, ctx_gpu,
        "{model_name} {level:?}: saved-context bytes differ"
    );
    assert_eq!(g_cpu.len(), g_gpu.len(), "{model_name}: gradient count");
    // ‖gpu − cpu‖ / ‖cpu‖ per parameter, with the denominator floored at 1e-3 of the largest
    // gradient norm: some gradients are zero in exact arithmetic (an attention key bias:
    // softmax ignores a per-query constant) and both devices return rounding noise there.
    let diffs: Vec<(String, f64, f64)> = g_gpu
        .iter()
        .zip(&g_cpu)
        .map(|((n, a), (_, b))| {
            let (d, nb) = norm_diff(a, b);
            (n.clone(), d, nb)
        })
        .collect();
    let floor = 1e-3 * diffs.iter().map(|d| d.2).fold(0.0, f64::max);
    let mut worst = (0.0f64, String::new());
    for (n, d, nb) in &diffs {
        let e = d / nb.max(floor).max(1e-30);
        if e > worst.0 {
            worst = (e, n.clone());
        }
    }
    println!("  worst gradient rel. err {:.2e} ({})", worst.0, worst.1);
    assert!(
        worst.0 < tol,
        "{model_name} {level:?}: gradient `{}` differs by {:.2e} (tolerance {tol:.0e})",
        worst.1,
        worst.0
    );
}

/// Every op family the presets use (dense, conv, batch norm, pooling, residual adds,
/// attention, layer norm, GELU, embeddings) gives the CPU's gradients on the GPU.
#[test]
fn every_preset_matches_the_cpu_at_l0() {
    let _g = serial();
    compare_step("mlp", &image(1, 8, 10), 32, Level::L0, 1e-4);
    compare_step("cnn", &image(1, 8, 10), 32, Level::L0, 1e-4);
    // Deep nets: batch-norm shifts sum gradients that nearly cancel (1.3e-3 seen on an H100).
    compare_step("resnet18-cifar", &image(3, 32, 10), 8, Level::L0, 5e-3);
    compare_step("vit-tiny", &image(3, 32, 10), 8, Level::L0, 5e-3);
    compare_step("gpt-char", &tokens(64, 65), 8, Level::L0, 5e-3);
}

/// Compressed contexts live on the GPU with the CPU's byte counts, and the gradients they give
/// are the CPU's up to the rounding decisions that float noise upstream can flip.
#[test]
fn compressed_steps_match_the_cpu() {
    let _g = serial();
    for level in [Level::L1, Level::L3, Level::L4] {
        compare_step("cnn", &image(1, 8, 10), 32, level, 2e-2);
    }
    compare_step("resnet18-cifar", &image(3, 32, 10), 8, Level::L3, 5e-2);
    compare_step("gpt-char", &tokens(64, 65), 8, Level::L3, 5e-2);
}

/// `profile-memory` on the GPU: the same per-op rows as on the CPU, measured by the pool.
#[test]
fn profile_rows_match_the_cpu() {
    let _g = serial();
    let spec = image(3, 32, 10);
    let def = load_def("resnet18-cifar").unwrap();
    let mut profiles = Vec::new();
    for dev in [Device::Cpu, gpu()] {
        device::select(&dev).unwrap();
        let (x, y) = random_batch(&spec, 16, 3).unwrap();
        let mut model = Model::build(&def, &spec, 1).unwrap();
        let p = profile_step(&mut model, Level::L3, &x, &y, 1).unwrap();
        println!(
            "{}: activations {} (fp32 {}), peak {} in {}",
            p.measured_on, p.activations, p.activations_uncompressed, p.peak_bytes, p.peak_phase
        );
        profiles.push(p);
    }
    device::select(&Device::Cpu).unwrap();
    let (c, g) = (&profiles[0], &profiles[1]);
    assert!(g.measured_on.contains("cuda"), "{}", g.measured_on);
    assert_eq!(c.rows.len(), g.rows.len());
    for (a, b) in c.rows.iter().zip(&g.rows) {
        assert_eq!(
            (&a.layer, &a.op, &a.repr, a.stored_bytes),
            (&b.layer, &b.op, &b.repr, b.stored_bytes)
        );
    }
    assert_eq!(c.activations, g.activations);
    assert_eq!(c.parameters, g.parameters);
    // The pool counts what lives on the card: at least the steady state plus the context.
    assert!(g.peak_bytes >= g.parameters + g.optimizer_state + g.activations);
}

/// The pool meter sees a tensor's exact bytes come and go, keeps the peak, and resets it.
#[test]
fn meter_counts_tensor_bytes() {
    let _g = serial();
    let dev = gpu();
    device::select(&dev).unwrap();
    dev.synchronize().unwrap();
    let before = memory::current_bytes();
    memory::reset_peak();
    let t = Tensor::zeros(16 << 20, DType::F32, &dev).unwrap();
    dev.synchronize().unwrap();
    let with = memory::current_bytes();
    println!(
        "{}: before {before}, with 64 MiB tensor {with}",
        memory::describe()
    );
    assert_eq!(with - before, 64 << 20, "a 64 MiB tensor");
    drop(t);
    dev.synchronize().unwrap();
    assert_eq!(memory::current_bytes(), before);
    assert!(memory::peak_bytes() >= before + (64 << 20));
    memory::reset_peak();
    assert_eq!(memory::peak_bytes(), memory::current_bytes());
    let cap = memory::capacity_bytes().unwrap();
    let avail = memory::available_bytes().unwrap();
    println!("capacity {cap}, available {avail}");
    assert!(avail > 0 && avail <= cap);
    device::select(&Device::Cpu).unwrap();
}

/// The driver's own out-of-memory is recognised (typed, not by its message) as an OOM.
#[test]
fn driver_out_of_memory_is_typed() {
    let _g = serial();
    let dev = gpu();
    device::select(&dev).unwrap();
    let cap = memory::capacity_bytes().unwrap();
    let too_big = (2 * cap / 4).max(1 << 30); // elements of f32: twice the card
    let e = Tensor::zeros(too_big, DType::F32, &dev).unwrap_err();
    let e = anyhow::Error::from(e).context("allocating twice the card");
    println!("{e:#}");
    assert!(memory::is_oom(&e), "not recognised as OOM: {e:#}");
    let other = anyhow::anyhow!("something else");
    assert!(!memory::is_oom(&other));
    device::select(&Device::Cpu).unwrap();
}

/// A budget on the GPU stops a probe with an out-of-memory outcome; a larger one fits.
#[test]
fn budget_and_max_batch_on_the_gpu() {
    let _g = serial();
    device::select(&gpu()).unwrap();
    let spec = image(1, 8, 10);
    let def = load_def("cnn").unwrap();
    let small = search::probe(&def, &spec, Level::L0, 64, 64 << 10, 2, 1).unwrap();
    assert!(
        matches!(small, ProbeOutcome::OutOfMemory { .. }),
        "{small:?}"
    );
    let big = search::probe(&def, &spec, Level::L0, 64, 1 << 30, 2, 1).unwrap();
    let ProbeOutcome::Fits { peak_bytes, .. } = big else {
        panic!("{big:?}")
    };
    println!("cnn batch 64 L0 peak {peak_bytes} B on the GPU");
    assert!(peak_bytes > 0);
    // A model whose saved activations dominate its memory (the digits CNN's do not on a GPU,
    // where candle's op temporaries are the peak).
    let cfg = search::MaxBatchConfig {
        model: "resnet18-cifar".into(),
        data: "synthetic:3x32x32:10:64".into(),
        seq_len: 64,
        memory_bytes: 256 << 20,
        margin: 0.05,
        levels: vec![Level::L0, Level::L3],
        search: search::SearchConfig {
            start: 8,
            max: Some(1 << 14),
            multiple_of: 8,
        },
        steps: 2,
        seed: 42,
        allocator: actrain::allocate::Allocator::Uniform,
        isolate: None,
        device: "cuda:0".into(),
    };
    let report = search::run_max_batch(&cfg, &mut |l: &str| println!("{l}")).unwrap();
    print!("{}", report.table());
    let b: Vec<usize> = report.results.iter().map(|r| r.max_batch).collect();
    // On the GPU candle's op temporaries (not yet fused or in place, unlike the CPU path) are
    // a large share of a small budget: an H100 gave L0 16, L3 32 here.
    assert!(2 * b[1] >= 3 * b[0], "L3 {} vs L0 {}", b[1], b[0]);
    device::select(&Device::Cpu).unwrap();
}

/// `fit` on the GPU follows the CPU's loss curve (same init, same batches, same rounding
/// noise): within float noise at L0, and close at L3.
#[test]
fn fit_follows_the_cpu_loss_curve() {
    let _g = serial();
    for (level, tol) in [(Level::L0, 2e-3f32), (Level::L3, 5e-2)] {
        let run = |dev: &str| {
            let cfg = FitConfig {
                level,
                epochs: 1,
                max_steps: Some(40),
                device: dev.into(),
                ..FitConfig::default()
            };
            fit(&cfg, &mut NoProgress).unwrap()
        };
        let c = run("cpu");
        let g = run("cuda:0");
        device::select(&Device::Cpu).unwrap();
        assert_eq!(g.device, "cuda:0");
        let worst = c
            .step_losses
            .iter()
            .zip(&g.step_losses)
            .map(|((_, a), (_, b))| (a - b).abs())
            .fold(0.0f32, f32::max);
        println!(
            "{level:?}: final loss cpu {:.4} gpu {:.4}, worst step diff {worst:.2e}; acc cpu {:.4} gpu {:.4}; {:.0} vs {:.0} samples/s",
            c.train_loss, g.train_loss, c.test_accuracy, g.test_accuracy,
            c.samples_per_second, g.samples_per_second
        );
        assert_eq!(c.step_losses.len(), g.step_losses.len());
        assert!(worst < tol, "{level:?}: loss curves differ by {worst}");
        assert_eq!(c.context_bytes, g.context_bytes, "{level:?}: context bytes");
    }
}
