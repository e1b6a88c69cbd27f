//! Batch-chunked convolution (bounded im2col workspace) gives the same forward and gradients
//! as one call over the whole batch, and is gradient-checked itself. Its own test binary:
//! the workspace setting is process-wide.

mod common;
use actrain::compress::policy::{CompressConfig, CompressPolicy, Level};
use actrain::ops::conv::{set_workspace_bytes, Conv2dParams, DEFAULT_WORKSPACE_BYTES};
use actrain::tape::{ParamStore, Tape};
use candle_core::{Device, Tensor};
use common::{rand, run_cases, Case};
use std::sync::Mutex;

static SERIAL: Mutex<()> = Mutex::new(());

/// Output and (x, w, b) gradients of sum(sigmoid(conv(x)) * r) under `policy`.
fn run(x: &Tensor, w: &Tensor, b: &Tensor, p: Conv2dParams, level: Level) -> Vec<Vec<f32>> {
    let mut store = ParamStore::new();
    let ids = [
        store.add("x", x.clone()).unwrap(),
        store.add("w", w.clone()).unwrap(),
        store.add("b", b.clone()).unwrap(),
    ];
    let mut tape = Tape::new(Box::new(CompressPolicy::new(CompressConfig {
        level,
        seed: 9,
        min_elements: 0,
        ..Default::default()
    })));
    tape.begin_step();
    let v: Vec<_> = ids.iter().map(|&i| tape.param(&store, i)).collect();
    let y = tape.conv2d(&v[0], &v[1], Some(&v[2]), p).unwrap();
    let r = tape.constant(
        Tensor::randn(0f32, 1.0, y.dims(), &Device::Cpu)
            .unwrap()
            .affine(0.0, 0.5)
            .unwrap(),
    );
    let out = y.tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    // Through a sigmoid, whose backward hands the conv an owned gradient (so the input
    // gradient may be written into it).
    let s = tape.sigmoid(&y).unwrap();
    let m = tape.mul(&s, &r).unwrap();
    let loss = tape.sum_all(&m).unwrap();
    tape.backward(&loss, &mut store).unwrap();
    let mut res = vec![out];
    for id in ids {
        res.push(
            store
                .grad(id)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
        );
    }
    res
}

#[test]
fn chunked_convolution_equals_one_call() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dev = Device::Cpu;
    for (p, cin, cout, k, hw) in [
        (
            Conv2dParams {
                padding: 1,
                ..Default::default()
            },
            4,
            6,
            3,
            9,
        ),
        (
            Conv2dParams {
                stride: 2,
                padding: 1,
                ..Default::default()
            },
            3,
            5,
            3,
            11,
        ),
        (
            Conv2dParams {
                groups: 2,
                dilation: 2,
                padding: 2,
                ..Default::default()
            },
            4,
            6,
            3,
            8,
        ),
        // Input and output of one per-sample size: the input gradient goes into the owned
        // output gradient's rows, chunk by chunk.
        (
            Conv2dParams {
                padding: 1,
                ..Default::default()
            },
            5,
            5,
            3,
            7,
        ),
        (
            Conv2dParams {
                groups: 3,
                padding: 1,
                ..Default::default()
            },
            6,
            6,
            3,
            5,
        ),
    ] {
        let x = Tensor::randn(0f32, 1.0, (7, cin, hw, hw), &dev).unwrap();
        let w = Tensor::randn(0f32, 0.3, (cout, cin / p.groups, k, k), &dev).unwrap();
        let b = Tensor::randn(0f32, 0.1, cout, &dev).unwrap();
        for level in [Level::L0, Level::L3] {
            set_workspace_bytes(usize::MAX);
            let whole = run(&x, &w, &b, p, level);
            // A workspace of one byte: every sample is its own chunk.
            set_workspace_bytes(1);
            let chunked = run(&x, &w, &b, p, level);
            set_workspace_bytes(DEFAULT_WORKSPACE_BYTES);
            for (i, (a, c)) in whole.iter().zip(&chunked).enumerate() {
                let scale = a.iter().fold(0f32, |m, u| m.max(u.abs())).max(1e-6);
                let worst = a
                    .iter()
                    .zip(c)
                    .map(|(u, v)| (u - v).abs())
                    .fold(0f32, f32::max)
                    / scale;
                // Chunks change only the f32 summation order of the weight gradient: differences
                // are rounding noise relative to the tensor's scale; a wrong chunk would be O(1).
                assert!(
                    worst < 1e-5,
                    "{p:?} {level:?} output/grad #{i}: chunked differs by {worst} of the max"
                );
            }
        }
    }
}

#[test]
fn chunked_convolution_gradient_check() {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    set_workspace_bytes(1);
    let cases = vec![
        Case::new(
            "conv2d (chunked)",
            vec![
                rand(&[5, 2, 6, 6], 1),
                rand(&[3, 2, 3, 3], 2),
                rand(&[3], 3),
            ],
            |t, x| {
                t.conv2d(
                    &x[0],
                    &x[1],
                    Some(&x[2]),
                    Conv2dParams {
                        padding: 1,
                        ..Default::default()
                    },
                )
            },
        ),
        Case::new(
            "conv2d (chunked, stride 2)",
            vec![
                rand(&[3, 2, 7, 7], 4),
                rand(&[4, 2, 3, 3], 5),
                rand(&[4], 6),
            ],
            |t, x| {
                t.conv2d(
                    &x[0],
                    &x[1],
                    Some(&x[2]),
                    Conv2dParams {
                        stride: 2,
                        ..Default::default()
                    },
                )
            },
        ),
        Case::new(
            "conv2d (chunked, input gradient in place)",
            vec![
                rand(&[4, 3, 5, 5], 7),
                rand(&[3, 3, 3, 3], 8),
                rand(&[3], 9),
            ],
            |t, x| {
                let y = t.conv2d(
                    &x[0],
                    &x[1],
                    Some(&x[2]),
                    Conv2dParams {
                        padding: 1,
                        ..Default::default()
                    },
                )?;
                // Sigmoid's backward hands the conv an owned gradient.
                t.sigmoid(&y)
            },
        ),
    ];
    run_cases("conv chunked", cases);
    set_workspace_bytes(DEFAULT_WORKSPACE_BYTES);
}

/// A stride-1 3x3 convolution with as many output channels as input channels, its batch in
/// several chunks, writes the input gradient into its (owned) output gradient: its backward
/// node allocates well under one more layer-sized tensor.
#[test]
fn same_size_input_gradient_is_written_in_place() {
    use actrain::memory::{current_bytes, peak_bytes, reset_peak};
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (n, c, hw) = (32, 16, 32);
    let layer = n * c * hw * hw * 4; // 2 MiB
    let x = Tensor::randn(0f32, 1.0, (n, c, hw, hw), &Device::Cpu).unwrap();
    let w = Tensor::randn(0f32, 0.1, (c, c, 3, 3), &Device::Cpu).unwrap();
    let mut store = ParamStore::new();
    let wid = store.add("w", w).unwrap();
    let xid = store.add("x", x).unwrap();
    // 1 MiB of im2col workspace: a few samples per chunk.
    set_workspace_bytes(1 << 20);
    let mut tape = Tape::new(Box::new(CompressPolicy::new(CompressConfig {
        level: Level::L0,
        ..Default::default()
    })));
    tape.begin_step();
    let xv = tape.param(&store, xid);
    let xin = tape.scale(&xv, 1.0).unwrap();
    let wv = tape.param(&store, wid);
    let p = Conv2dParams {
        padding: 1,
        ..Default::default()
    };
    let y = tape.conv2d(&xin, &wv, None, p).unwrap();
    // ReLU's backward hands the conv an owned gradient.
    let y = tape.relu(&y).unwrap();
    let loss = tape.sum_all(&y).unwrap();
    let mut last = current_bytes();
    let mut conv_extra = None;
    reset_peak();
    tape.backward_with(&loss, &mut store, |prog| {
        if prog.op == "conv2d" {
            conv_extra = Some(peak_bytes().saturating_sub(last));
        }
        last = current_bytes();
        reset_peak();
    })
    .unwrap();
    set_workspace_bytes(DEFAULT_WORKSPACE_BYTES);
    let extra = conv_extra.expect("the conv node ran");
    assert!(
        extra < layer * 3 / 4,
        "conv backward allocated {extra} bytes beyond its output gradient (layer {layer})"
    );
}
