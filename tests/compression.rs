//! Compression end to end: L3 gradients are unbiased estimates of the exact (L0) gradient,
//! and L3 stores the context of a ResNet-18 ≥ 14x smaller than L0.

use actrain::compress::policy::{CompressConfig, CompressPolicy, Level};
use actrain::model::{load_def, InputSpec, Model, ModelDef};
use actrain::ops::loss::CrossEntropyOptions;
use actrain::tape::{ContextRecord, KeepPolicy, Tape};
use candle_core::{Device, Tensor};

fn policy(level: Level, seed: u64) -> Box<CompressPolicy> {
    Box::new(CompressPolicy::new(CompressConfig {
        level,
        seed,
        min_elements: 0,
        ..Default::default()
    }))
}

fn image(shape: &[usize], classes: usize) -> InputSpec {
    InputSpec {
        sample_shape: shape.to_vec(),
        tokens: false,
        vocab: None,
        num_outputs: classes,
        graph: false,
    }
}

/// Flattened gradient of every trainable parameter after one backward with `tape`.
fn gradient(model: &mut Model, mut tape: Tape, x: &Tensor, y: &Tensor) -> Vec<f32> {
    model.params.zero_grad();
    tape.begin_step();
    let logits = model.forward(&mut tape, x, None).unwrap();
    let loss = tape
        .cross_entropy(&logits, y, CrossEntropyOptions::default())
        .unwrap();
    drop(logits);
    tape.backward(&loss, &mut model.params).unwrap();
    let mut g = Vec::new();
    for id in model.params.ids().collect::<Vec<_>>() {
        if let Some(t) = model.params.grad(id) {
            g.extend(t.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        }
    }
    g
}

fn rel_dist(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}

/// A CNN whose backward uses quantized contexts only linearly (conv/linear weight gradients,
/// exact ReLU masks and max-pool indices), so the L3 gradient is exactly unbiased: the mean
/// over independent rounding draws must converge to the L0 gradient like 1/sqrt(draws).
#[test]
fn averaged_l3_gradients_converge_to_the_exact_gradient() {
    let def = ModelDef::parse(
        r#"
[[layer]]
name = "c1"
op = "conv2d"
out = 8
kernel = 3
padding = 1
[[layer]]
name = "r1"
op = "relu"
[[layer]]
name = "p1"
op = "max_pool"
kernel = 2
[[layer]]
name = "c2"
op = "conv2d"
out = 16
kernel = 3
padding = 1
[[layer]]
name = "r2"
op = "relu"
[[layer]]
name = "gap"
op = "global_avg_pool"
[[layer]]
name = "head"
op = "linear"
out = 10
"#,
        "test-cnn",
    )
    .unwrap();
    let mut model = Model::build(&def, &image(&[3, 12, 12], 10), 5).unwrap();
    let x = Tensor::randn(0f32, 1.0, (8, 3, 12, 12), &Device::Cpu).unwrap();
    let y = Tensor::new(&[0u32, 1, 2, 3, 4, 5, 6, 7], &Device::Cpu).unwrap();
    let exact = gradient(&mut model, Tape::default(), &x, &y);

    let draws = 64;
    let mut mean = vec![0f64; exact.len()];
    let mut single_errors = Vec::new();
    for s in 0..draws {
        let g = gradient(&mut model, Tape::new(policy(Level::L3, 1000 + s)), &x, &y);
        single_errors.push(rel_dist(&g, &exact));
        for (m, v) in mean.iter_mut().zip(&g) {
            *m += *v as f64 / draws as f64;
        }
    }
    let mean: Vec<f32> = mean.into_iter().map(|v| v as f32).collect();
    let single = single_errors.iter().sum::<f64>() / draws as f64;
    let averaged = rel_dist(&mean, &exact);
    println!(
        "L3 gradient: single draw rel. error {single:.4}, mean of {draws} draws {averaged:.4}"
    );
    assert!(
        single > 1e-4,
        "2-bit contexts should perturb the gradient at all ({single})"
    );
    // Unbiased: error of the mean ≈ single / sqrt(64) = single / 8. Allow up to single / 5.
    assert!(
        averaged < single / 5.0,
        "mean of {draws} draws {averaged} vs single {single}: biased?"
    );
}

fn context_totals(log: &[ContextRecord]) -> (usize, usize) {
    log.iter().fold((0, 0), |(s, u), r| {
        (s + r.stored_bytes, u + r.uncompressed_bytes)
    })
}

/// ResNet-18 at L3 stores 23.2x less context than L0 (18.1x while the conv after each
/// BN → ReLU stored its input instead of rebuilding it): at least 20x.
#[test]
fn resnet18_context_is_at_least_20x_smaller_at_l3() {
    let def = load_def("resnet18-cifar").unwrap();
    let mut model = Model::build(&def, &image(&[3, 32, 32], 10), 1).unwrap();
    let x = Tensor::randn(0f32, 1.0, (64, 3, 32, 32), &Device::Cpu).unwrap();
    let mut totals = Vec::new();
    for level in [Level::L0, Level::L3] {
        let mut tape = Tape::new(policy(level, 3));
        tape.begin_step();
        let out = model.forward(&mut tape, &x, None).unwrap();
        drop(out);
        let (stored, uncompressed) = context_totals(tape.context_log());
        assert_eq!(
            stored,
            tape.live_context_bytes(),
            "log and live counter agree"
        );
        if level == Level::L3 {
            println!(
                "| op | repr | shape | stored bytes | uncompressed bytes |\n|---|---|---|---|---|"
            );
            for r in tape
                .context_log()
                .iter()
                .filter(|r| r.stored_bytes > 0 || r.shared)
            {
                println!(
                    "| {} | {} | {:?} | {} | {} |",
                    r.op, r.repr, r.shape, r.stored_bytes, r.uncompressed_bytes
                );
            }
        }
        println!("{level:?}: stored {stored} B (uncompressed {uncompressed} B)");
        totals.push((stored, uncompressed));
    }
    let (l0, _) = totals[0];
    let (l3, l3_unc) = totals[1];
    assert_eq!(l0, l3_unc, "L0 stores exactly the uncompressed context");
    let ratio = l0 as f64 / l3 as f64;
    println!("ResNet-18 (CIFAR, batch 64): L0 {l0} B, L3 {l3} B, {ratio:.2}x smaller");
    assert!(ratio >= 20.0, "L3 context only {ratio:.2}x smaller than L0");
}

#[test]
fn keep_policy_and_l0_store_the_same() {
    let def = load_def("cnn").unwrap();
    let mut model = Model::build(&def, &image(&[1, 8, 8], 10), 1).unwrap();
    let x = Tensor::randn(0f32, 1.0, (16, 1, 8, 8), &Device::Cpu).unwrap();
    let mut a = Tape::new(Box::new(KeepPolicy));
    let mut b = Tape::new(policy(Level::L0, 0));
    let _ = model.forward(&mut a, &x, None).unwrap();
    let _ = model.forward(&mut b, &x, None).unwrap();
    assert_eq!(
        context_totals(a.context_log()),
        context_totals(b.context_log())
    );
}

#[test]
fn non_finite_activation_is_an_error_naming_the_op() {
    let def = load_def("mlp").unwrap();
    let mut model = Model::build(&def, &image(&[1, 8, 8], 10), 1).unwrap();
    let mut v = vec![0.5f32; 16 * 64];
    v[70] = f32::NAN;
    let x = Tensor::from_vec(v, (16, 1, 8, 8), &Device::Cpu).unwrap();
    let mut tape = Tape::new(policy(Level::L3, 0));
    let err = model.forward(&mut tape, &x, None).unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("linear") && msg.contains("non-finite"),
        "{msg}"
    );
}

/// A bit-packed sign mask read in row ranges (what ReLU's chunked backward does) gives the
/// same 0/1 rows as unpacking it whole, in f32 and as `U8` bytes, for sample sizes that are
/// not multiples of 8 or 64 (a row then starts mid-word), and rejects rows past the end.
#[test]
fn mask_rows_match_the_whole_unpack() {
    use actrain::tape::{ContextPolicy, Packed, SaveAs, SaveRequest};
    use candle_core::{DType, IndexOp};
    let dev = Device::Cpu;
    let mut pol = CompressPolicy::new(CompressConfig {
        level: Level::L3,
        min_elements: 0,
        ..Default::default()
    });
    let shapes: [&[usize]; 7] = [
        &[5, 7],
        &[9, 3, 5],
        &[4, 1],
        &[3, 65],
        &[6, 2, 2, 16],
        &[1, 13],
        &[11, 3, 7, 3],
    ];
    for (k, dims) in shapes.into_iter().enumerate() {
        let x = Tensor::randn(0f32, 1.0, dims, &dev).unwrap();
        let req = SaveRequest {
            op: "relu",
            kind: SaveAs::SignMask,
            tensor: &x,
            slot: k,
            step: 0,
            is_param: false,
        };
        let Packed::Compressed(c) = pol.pack(&req).unwrap() else {
            panic!("{dims:?}: the mask was not compressed");
        };
        assert_eq!(c.label(), "mask1");
        let shape = x.shape();
        let whole = c.unpack(shape, DType::F32, &dev).unwrap();
        let expect = x.gt(0.0).unwrap().to_dtype(DType::F32).unwrap();
        assert_eq!(
            whole.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            expect.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            "{dims:?}: whole unpack"
        );
        let n = dims[0];
        for first in 0..n {
            for count in 1..=n - first {
                let want = whole
                    .i(first..first + count)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                let rows = c
                    .unpack_rows(shape, DType::F32, &dev, first, count)
                    .unwrap();
                let mut rdims = dims.to_vec();
                rdims[0] = count;
                assert_eq!(rows.dims(), &rdims[..], "{dims:?} rows {first}+{count}");
                assert_eq!(
                    rows.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    want,
                    "{dims:?} rows {first}+{count} (f32)"
                );
                let bytes = c.unpack_rows(shape, DType::U8, &dev, first, count).unwrap();
                assert_eq!(bytes.dtype(), DType::U8);
                let bytes: Vec<f32> = bytes
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<u8>()
                    .unwrap()
                    .into_iter()
                    .map(f32::from)
                    .collect();
                assert_eq!(bytes, want, "{dims:?} rows {first}+{count} (u8)");
            }
        }
        assert!(c.unpack_rows(shape, DType::F32, &dev, n - 1, 2).is_err());
        assert!(c.unpack_rows(shape, DType::F32, &dev, n, 1).is_err());
    }
}
