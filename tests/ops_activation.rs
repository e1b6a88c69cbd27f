//! Gradient checks and reference comparisons for activations, dropout, softmax/log-softmax
//! and embedding. Every gradient check runs twice: with the fused CPU kernels and with the
//! portable candle-ops path (the one CUDA takes), switched by `set_fused_cpu_kernels`.

mod common;
use actrain::ops::activation::{set_fused_cpu_kernels, GeluApprox};
use actrain::tape::gradcheck::max_rel_diff;
use actrain::tape::{ParamStore, Tape, Value};
use candle_core::{DType, Device, Tensor};
use common::{compare_with_candle, rand, run_cases, Case};

/// Shifts every element 0.1 away from 0 (keeps its sign): ReLU-type ops are not
/// differentiable at 0, and a finite difference straddling the kink would be meaningless.
fn away_from_zero(t: &Tensor) -> Tensor {
    let shift = t
        .ge(0.0)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .affine(0.2, -0.1)
        .unwrap();
    (t + shift).unwrap()
}

/// Runs the case table with the fused kernels on, then off.
fn run_both(family: &str, cases: impl Fn() -> Vec<Case>) {
    set_fused_cpu_kernels(true);
    run_cases(&format!("{family}, fused cpu"), cases());
    set_fused_cpu_kernels(false);
    run_cases(&format!("{family}, portable"), cases());
    set_fused_cpu_kernels(true);
}

const SHAPES: [&[usize]; 4] = [&[3, 5], &[2, 3, 7], &[1], &[4, 1, 5]];

#[test]
fn activation_gradients() {
    run_both("activation", || {
        let mut cases = Vec::new();
        for (k, dims) in SHAPES.iter().enumerate() {
            let s = k as u64 * 10;
            let kinked = away_from_zero(&rand(dims, s + 1));
            cases.push(Case::new("relu", vec![kinked.clone()], |t, x| {
                t.relu(&x[0])
            }));
            for slope in [0.01, 0.2, -0.5, 1.5] {
                cases.push(Case::new(
                    "leaky_relu",
                    vec![kinked.clone()],
                    move |t, x| t.leaky_relu(&x[0], slope),
                ));
            }
            // Wider range (-3, 3) so the curved parts of each function are exercised.
            let wide = (rand(dims, s + 2) * 3.0).unwrap();
            cases.push(Case::new("gelu(tanh)", vec![wide.clone()], |t, x| {
                t.gelu(&x[0], GeluApprox::Tanh)
            }));
            cases.push(Case::new("gelu(erf)", vec![wide.clone()], |t, x| {
                t.gelu(&x[0], GeluApprox::Erf)
            }));
            cases.push(Case::new("silu", vec![wide.clone()], |t, x| t.silu(&x[0])));
            cases.push(Case::new("sigmoid", vec![wide.clone()], |t, x| {
                t.sigmoid(&x[0])
            }));
            cases.push(Case::new("tanh", vec![wide], |t, x| t.tanh(&x[0])));
        }
        // A strided (transposed) input: the saved context is non-contiguous.
        let strided = (rand(&[5, 3], 99) * 3.0).unwrap().t().unwrap();
        cases.push(Case::new(
            "gelu(erf) strided",
            vec![strided.clone()],
            |t, x| t.gelu(&x[0], GeluApprox::Erf),
        ));
        cases.push(Case::new("silu strided", vec![strided], |t, x| {
            t.silu(&x[0])
        }));
        // Two activations in a chain, so the upstream gradient is not the harness's own.
        cases.push(Case::new(
            "tanh(sigmoid(x)*gelu(x))",
            vec![rand(&[3, 7], 5)],
            |t, x| {
                let a = t.sigmoid(&x[0])?;
                let b = t.gelu(&x[0], GeluApprox::Tanh)?;
                let c = t.mul(&a, &b)?;
                t.tanh(&c)
            },
        ));
        cases
    });
}

#[test]
fn activations_agree_with_candle() {
    let x = (rand(&[6, 7], 1) * 3.0).unwrap();
    let xk = away_from_zero(&rand(&[6, 7], 2));
    type Build = fn(&[Tensor]) -> candle_core::Result<Tensor>;
    type Ours = Box<dyn Fn(&mut Tape, &Value) -> anyhow::Result<Value>>;
    let table: Vec<(&str, &Tensor, Ours, Build)> = vec![
        ("relu", &xk, Box::new(|t, v| t.relu(v)), |v| v[0].relu()),
        (
            "leaky_relu",
            &xk,
            Box::new(|t, v| t.leaky_relu(v, 0.1)),
            |v| candle_nn::ops::leaky_relu(&v[0], 0.1),
        ),
        (
            "gelu(tanh)",
            &x,
            Box::new(|t, v| t.gelu(v, GeluApprox::Tanh)),
            |v| v[0].gelu(),
        ),
        (
            "gelu(erf)",
            &x,
            Box::new(|t, v| t.gelu(v, GeluApprox::Erf)),
            |v| v[0].gelu_erf(),
        ),
        ("silu", &x, Box::new(|t, v| t.silu(v)), |v| v[0].silu()),
        ("sigmoid", &x, Box::new(|t, v| t.sigmoid(v)), |v| {
            candle_nn::ops::sigmoid(&v[0])
        }),
        ("tanh", &x, Box::new(|t, v| t.tanh(v)), |v| v[0].tanh()),
    ];
    for fused in [true, false] {
        set_fused_cpu_kernels(fused);
        for (name, input, ours, theirs) in &table {
            let d = compare_with_candle(
                &[(*input).clone()],
                |t, v| ours(t, &v[0]),
                |v| Ok(theirs(v)?),
            )
            .unwrap();
            println!("{name} vs candle (fused={fused}): worst rel. diff {d:.1e}");
            // candle's own gelu backward uses 6-digit constants, hence 1e-4 rather than 1e-5.
            assert!(d < 1e-4, "{name} vs candle (fused={fused}): {d}");
        }
    }
    set_fused_cpu_kernels(true);
}

#[test]
fn relu_saves_a_sign_mask_and_sigmoid_shares_its_output() {
    let mut store = ParamStore::new();
    let id = store
        .add("x", rand(&[4, 5], 1).to_dtype(DType::F32).unwrap())
        .unwrap();
    let mut tape = Tape::default();
    let x = tape.param(&store, id);
    let _r = tape.relu(&x).unwrap();
    let s = tape.sigmoid(&x).unwrap();
    let _m = tape.mul(&s, &x).unwrap(); // saves s (and x) for its backward: s must be shared
    let log = tape.context_log();
    let ops: Vec<(&str, bool)> = log.iter().map(|r| (r.op, r.shared)).collect();
    assert_eq!(ops[0], ("relu", false));
    assert_eq!(ops[1], ("sigmoid", false));
    assert!(
        log.iter().any(|r| r.op == "mul" && r.shared),
        "sigmoid output not shared: {ops:?}"
    );
}

#[test]
fn leaky_relu_and_gelu_forward_match_formulas() {
    let x = Tensor::new(&[-2.0f64, -0.5, 0.5, 3.0], &Device::Cpu).unwrap();
    let mut tape = Tape::default();
    let v = tape.constant(x.clone());
    let y = tape
        .leaky_relu(&v, 0.1)
        .unwrap()
        .into_tensor()
        .to_vec1::<f64>()
        .unwrap();
    assert_eq!(y, vec![-0.2, -0.05, 0.5, 3.0]);
    let y = tape
        .leaky_relu(&v, 2.0)
        .unwrap()
        .into_tensor()
        .to_vec1::<f64>()
        .unwrap();
    assert_eq!(y, vec![-4.0, -1.0, 0.5, 3.0]);
    // gelu(erf)(1) = Φ(1) = 0.841344746...; gelu(tanh)(1) = 0.841191990...
    let one = tape.constant(Tensor::new(&[1.0f64], &Device::Cpu).unwrap());
    let e = tape
        .gelu(&one, GeluApprox::Erf)
        .unwrap()
        .into_tensor()
        .to_vec1::<f64>()
        .unwrap()[0];
    let t = tape
        .gelu(&one, GeluApprox::Tanh)
        .unwrap()
        .into_tensor()
        .to_vec1::<f64>()
        .unwrap()[0];
    assert!((e - 0.841_344_746_068_543).abs() < 1e-12, "{e}");
    assert!((t - 0.841_191_990_607_477).abs() < 1e-9, "{t}");
    assert!(tape.leaky_relu(&v, f64::NAN).is_err());
}

// ----------------------------------------------------------------------------------- dropout

/// `dropout(x)` and its gradient for `loss = Σ dropout(x)`, in f32.
fn dropout_fwd_bwd(tape: &mut Tape, x: &Tensor, p: f64) -> (Vec<f32>, Vec<f32>) {
    let mut store = ParamStore::new();
    let id = store.add("x", x.clone()).unwrap();
    let xv = tape.param(&store, id);
    let y = tape.dropout(&xv, p).unwrap();
    let loss = tape.sum_all(&y).unwrap();
    let yv = y.tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    tape.backward(&loss, &mut store).unwrap();
    let g = store
        .grad(id)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    (yv, g)
}

#[test]
fn dropout_backward_regenerates_the_forward_mask() {
    for fused in [true, false] {
        set_fused_cpu_kernels(fused);
        let p = 0.3;
        let x = (rand(&[64, 33], 1).abs().unwrap() + 0.5)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mut tape = Tape::default().with_seed(11);
        let (y, g) = dropout_fwd_bwd(&mut tape, &x, p);
        let scale = (1.0 / (1.0 - p)) as f32;
        for i in 0..xs.len() {
            // Gradient is mask/(1-p), and forward is x * that same mask/(1-p).
            assert!(
                g[i] == 0.0 || (g[i] - scale).abs() < 1e-6,
                "grad {i} = {}",
                g[i]
            );
            assert!(
                (y[i] - xs[i] * g[i]).abs() < 1e-5,
                "element {i}: y {} x {} g {}",
                y[i],
                xs[i],
                g[i]
            );
        }
        let kept = g.iter().filter(|&&v| v != 0.0).count() as f64 / g.len() as f64;
        assert!((kept - 0.7).abs() < 0.05, "kept {kept}");
        // Context: a seed, no tensor bytes.
        assert!(tape
            .context_log()
            .iter()
            .all(|r| r.op != "dropout" || (r.repr == "seed" && r.stored_bytes == 0)));
    }
    set_fused_cpu_kernels(true);
}

#[test]
fn dropout_keep_fraction_and_fresh_masks() {
    let n = 200_000usize;
    let x = Tensor::ones(n, DType::F32, &Device::Cpu).unwrap();
    for p in [0.1, 0.3, 0.5, 0.9] {
        let mut tape = Tape::default().with_seed(3);
        let v = tape.constant(x.clone());
        let y = tape
            .dropout(&v, p)
            .unwrap()
            .into_tensor()
            .to_vec1::<f32>()
            .unwrap();
        let kept = y.iter().filter(|&&v| v != 0.0).count() as f64 / n as f64;
        let sd = (p * (1.0 - p) / n as f64).sqrt();
        println!(
            "dropout p={p}: kept {kept:.4} (expected {:.4} ± {:.4})",
            1.0 - p,
            5.0 * sd
        );
        assert!((kept - (1.0 - p)).abs() < 5.0 * sd, "p={p}: kept {kept}");
        let mean = y.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
        assert!(
            (mean - 1.0).abs() < 0.02,
            "p={p}: mean {mean} (inverted dropout keeps E[y] = x)"
        );
    }
    // Masks differ between calls of one step and between steps; a fresh tape with the same
    // seed reproduces them.
    let small = Tensor::ones(4096, DType::F32, &Device::Cpu).unwrap();
    let masks = |tape: &mut Tape| -> Vec<Vec<f32>> {
        let v = tape.constant(small.clone());
        let a = tape
            .dropout(&v, 0.5)
            .unwrap()
            .into_tensor()
            .to_vec1::<f32>()
            .unwrap();
        let b = tape
            .dropout(&v, 0.5)
            .unwrap()
            .into_tensor()
            .to_vec1::<f32>()
            .unwrap();
        vec![a, b]
    };
    let mut tape = Tape::default().with_seed(5);
    let step1 = masks(&mut tape);
    tape.begin_step();
    let step2 = masks(&mut tape);
    assert_ne!(step1[0], step1[1], "two calls in one step share a mask");
    assert_ne!(step1[0], step2[0], "two steps share a mask");
    let mut again = Tape::default().with_seed(5);
    assert_eq!(
        masks(&mut again),
        step1,
        "same seed and step must reproduce the masks"
    );
    let mut other = Tape::default().with_seed(6);
    assert_ne!(
        masks(&mut other)[0],
        step1[0],
        "the tape seed must change the mask"
    );
}

#[test]
fn dropout_fused_and_portable_masks_agree() {
    for dims in [vec![7usize], vec![3, 5], vec![70_001]] {
        for dtype in [DType::F32, DType::F64] {
            let x = rand(&dims, 4).to_dtype(dtype).unwrap();
            let run = |fused: bool| {
                set_fused_cpu_kernels(fused);
                let mut tape = Tape::default().with_seed(9);
                let v = tape.constant(x.clone());
                tape.dropout(&v, 0.25).unwrap().into_tensor()
            };
            let (a, b) = (run(true), run(false));
            assert_eq!(max_rel_diff(&a, &b).unwrap(), 0.0, "{dims:?} {dtype:?}");
        }
    }
    set_fused_cpu_kernels(true);
}

#[test]
fn dropout_identity_cases_and_errors() {
    let x = rand(&[3, 4], 1);
    let mut tape = Tape::default();
    let v = tape.constant(x.clone());
    let y = tape.dropout(&v, 0.0).unwrap();
    assert_eq!(max_rel_diff(y.tensor(), &x).unwrap(), 0.0);
    tape.eval_mode();
    let y = tape.dropout(&v, 0.7).unwrap();
    assert_eq!(
        max_rel_diff(y.tensor(), &x).unwrap(),
        0.0,
        "eval mode must not drop"
    );
    for p in [1.0, -0.1, f64::NAN, 1.5] {
        let err = format!("{:#}", tape.dropout(&v, p).unwrap_err());
        assert!(err.contains("dropout") && err.contains("[0, 1)"), "{err}");
    }
}

#[test]
fn dropout_gradients() {
    run_both("dropout", || {
        let mut cases = Vec::new();
        for dims in SHAPES {
            for p in [0.3, 0.5] {
                cases.push(Case::new("dropout", vec![rand(dims, 7)], move |t, x| {
                    t.dropout(&x[0], p)
                }));
            }
        }
        cases.push(Case::new(
            "dropout twice",
            vec![rand(&[5, 7], 8)],
            |t, x| {
                let a = t.dropout(&x[0], 0.3)?;
                let b = t.tanh(&a)?;
                t.dropout(&b, 0.2)
            },
        ));
        cases
    });
}

// ----------------------------------------------------------------------------------- softmax

#[test]
fn softmax_gradients() {
    run_both("softmax", || {
        let mut cases = Vec::new();
        for (dims, dim) in [
            (vec![3, 5], 1),
            (vec![3, 5], 0),
            (vec![2, 3, 7], 2),
            (vec![2, 3, 7], 1),
            (vec![4, 1, 5], 1),
            (vec![1, 7], 1),
            (vec![5], 0),
        ] {
            let x = (rand(&dims, 3) * 4.0).unwrap();
            cases.push(Case::new("softmax", vec![x.clone()], move |t, x| {
                t.softmax(&x[0], dim)
            }));
            cases.push(Case::new("log_softmax", vec![x], move |t, x| {
                t.log_softmax(&x[0], dim)
            }));
        }
        let strided = rand(&[7, 3], 4).t().unwrap();
        cases.push(Case::new(
            "softmax strided",
            vec![strided.clone()],
            |t, x| t.softmax(&x[0], 1),
        ));
        cases.push(Case::new("log_softmax strided", vec![strided], |t, x| {
            t.log_softmax(&x[0], 1)
        }));
        cases
    });
}

#[test]
fn softmax_agrees_with_candle() {
    for fused in [true, false] {
        set_fused_cpu_kernels(fused);
        for (dims, dim) in [(vec![6, 7], 1usize), (vec![2, 5, 3], 1), (vec![4, 9], 0)] {
            let x = (rand(&dims, 1) * 3.0).unwrap();
            let d = compare_with_candle(
                std::slice::from_ref(&x),
                |t, v| t.softmax(&v[0], dim),
                |v| Ok(candle_nn::ops::softmax(&v[0], dim)?),
            )
            .unwrap();
            assert!(d < 1e-4, "softmax {dims:?} dim {dim}: {d}");
            let d = compare_with_candle(
                &[x],
                |t, v| t.log_softmax(&v[0], dim),
                |v| Ok(candle_nn::ops::log_softmax(&v[0], dim)?),
            )
            .unwrap();
            assert!(d < 1e-4, "log_softmax {dims:?} dim {dim}: {d}");
        }
    }
    set_fused_cpu_kernels(true);
}

#[test]
fn softmax_is_stable_for_large_logits_and_checks_dims() {
    for fused in [true, false] {
        set_fused_cpu_kernels(fused);
        let mut tape = Tape::default();
        let x = tape.constant(
            Tensor::new(
                &[[1000.0f32, 1001.0, 1002.0], [-1e4, 0.0, 1e4]],
                &Device::Cpu,
            )
            .unwrap(),
        );
        let y = tape
            .softmax(&x, 1)
            .unwrap()
            .into_tensor()
            .to_vec2::<f32>()
            .unwrap();
        let e = [0.090_030_57f32, 0.244_728_48, 0.665_240_94];
        for j in 0..3 {
            assert!((y[0][j] - e[j]).abs() < 1e-6, "{y:?}");
        }
        assert_eq!(y[1], vec![0.0, 0.0, 1.0]);
        let l = tape
            .log_softmax(&x, 1)
            .unwrap()
            .into_tensor()
            .to_vec2::<f32>()
            .unwrap();
        assert!(
            (l[0][2] - e[2].ln()).abs() < 1e-5 && l[1][2] == 0.0 && l[1][0] == -2e4,
            "{l:?}"
        );
        let err = format!("{:#}", tape.softmax(&x, 2).unwrap_err());
        assert!(err.contains("softmax") && err.contains("[2, 3]"), "{err}");
        let err = format!("{:#}", tape.log_softmax(&x, 5).unwrap_err());
        assert!(
            err.contains("log_softmax") && err.contains("dim 5"),
            "{err}"
        );
    }
    set_fused_cpu_kernels(true);
}

// --------------------------------------------------------------------------------- embedding

fn ids(v: &[u32], dims: &[usize]) -> Tensor {
    Tensor::from_vec(v.to_vec(), dims, &Device::Cpu).unwrap()
}

#[test]
fn embedding_gradients() {
    let mut cases = Vec::new();
    // Repeated ids (3 appears three times, 0 twice): their gradient rows must accumulate.
    for (idv, dims, vocab) in [
        (vec![3u32, 0, 3, 1, 3, 0], vec![2, 3], 5usize),
        (vec![4, 4, 4, 4, 4], vec![5], 7),
        (vec![0], vec![1], 1),
        (vec![2, 0, 1, 2, 6, 5, 2, 0, 3, 1, 1, 4], vec![2, 2, 3], 7),
    ] {
        let i = ids(&idv, &dims);
        cases.push(Case::new(
            "embedding",
            vec![rand(&[vocab, 3], 2)],
            move |t, x| t.embedding(&i, &x[0]),
        ));
    }
    let i = ids(&[1, 1, 0], &[3]);
    cases.push(Case::new(
        "embedding→tanh",
        vec![rand(&[2, 5], 3)],
        move |t, x| {
            let e = t.embedding(&i, &x[0])?;
            t.tanh(&e)
        },
    ));
    run_cases("embedding", cases);
}

#[test]
fn embedding_agrees_with_candle_and_checks_ids() {
    let i = ids(&[3, 0, 3, 1, 3, 0, 2], &[7]);
    let table = rand(&[5, 4], 1);
    let ic = i.clone();
    let d = compare_with_candle(
        &[table],
        move |t, v| t.embedding(&ic, &v[0]),
        move |v| Ok(v[0].index_select(&i, 0)?),
    )
    .unwrap();
    assert!(d < 1e-5, "embedding vs candle: {d}");

    let mut tape = Tape::default();
    let mut store = ParamStore::new();
    let pid = store.add("table", rand(&[5, 4], 2)).unwrap();
    let tv = tape.param(&store, pid);
    let y = tape
        .embedding(&ids(&[1, 2, 3, 4, 0, 1], &[2, 3]), &tv)
        .unwrap();
    assert_eq!(y.dims(), &[2, 3, 4]);
    let rec = tape
        .context_log()
        .iter()
        .find(|r| r.op == "embedding")
        .unwrap();
    assert_eq!((rec.repr.as_str(), rec.shape.clone()), ("u32", vec![6]));
    let err = format!(
        "{:#}",
        tape.embedding(&ids(&[1, 9, 2], &[3]), &tv).unwrap_err()
    );
    assert!(err.contains("id 9") && err.contains("5 rows"), "{err}");
    let err = format!(
        "{:#}",
        tape.embedding(&Tensor::new(&[1i64], &Device::Cpu).unwrap(), &tv)
            .unwrap_err()
    );
    assert!(err.contains("U32"), "{err}");
    let bad = tape.constant(rand(&[5], 3));
    let err = format!("{:#}", tape.embedding(&ids(&[1], &[1]), &bad).unwrap_err());
    assert!(err.contains("[V, D]") && err.contains("[5]"), "{err}");
}

// ------------------------------------------------------------------------------------ timing

/// Forward + backward time of each op through the tape against candle's own autograd, in f32,
/// at training sizes. `cargo test --release --test ops_activation -- --ignored --nocapture`.
#[test]
#[ignore]
fn timing_against_candle() {
    use candle_core::Var;
    use std::time::Instant;
    // The minimum over repetitions: the least disturbed run on a shared machine.
    fn best(v: Vec<f64>) -> f64 {
        v.into_iter().fold(f64::INFINITY, f64::min)
    }
    type Ours = Box<dyn Fn(&mut Tape, &Value) -> anyhow::Result<Value>>;
    type Theirs = Box<dyn Fn(&Tensor) -> candle_core::Result<Tensor>>;
    let x = (rand(&[512, 3072], 1) * 3.0)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let ids_t = Tensor::from_vec(
        (0..2048u32).map(|i| (i * 7919) % 512).collect::<Vec<_>>(),
        2048,
        &Device::Cpu,
    )
    .unwrap();
    let (ia, ib) = (ids_t.clone(), ids_t.clone());
    let table: Vec<(&str, Ours, Theirs)> = vec![
        ("relu", Box::new(|t, v| t.relu(v)), Box::new(|v| v.relu())),
        (
            "gelu(tanh)",
            Box::new(|t, v| t.gelu(v, GeluApprox::Tanh)),
            Box::new(|v| v.gelu()),
        ),
        (
            "gelu(erf)",
            Box::new(|t, v| t.gelu(v, GeluApprox::Erf)),
            Box::new(|v| v.gelu_erf()),
        ),
        ("silu", Box::new(|t, v| t.silu(v)), Box::new(|v| v.silu())),
        (
            "sigmoid",
            Box::new(|t, v| t.sigmoid(v)),
            Box::new(candle_nn::ops::sigmoid),
        ),
        ("tanh", Box::new(|t, v| t.tanh(v)), Box::new(|v| v.tanh())),
        (
            "softmax(last)",
            Box::new(|t, v| t.softmax(v, 1)),
            Box::new(|v| candle_nn::ops::softmax(v, 1)),
        ),
        (
            "log_softmax(last)",
            Box::new(|t, v| t.log_softmax(v, 1)),
            Box::new(|v| candle_nn::ops::log_softmax(v, 1)),
        ),
        (
            "dropout(0.1)",
            Box::new(|t, v| t.dropout(v, 0.1)),
            Box::new(|v| candle_nn::ops::dropout(v, 0.1)),
        ),
        (
            "embedding",
            Box::new(move |t, v| t.embedding(&ia, v)),
            Box::new(move |v| v.embedding(&ib)),
        ),
    ];
    println!("\n| op (f32, [512, 3072]) | ours fwd+bwd ms (min of 11) | candle fwd+bwd ms | ratio |\n|---|---|---|---|");
    for (name, ours, theirs) in &table {
        let mut a = Vec::new();
        let mut b = Vec::new();
        for _ in 0..11 {
            let mut store = ParamStore::new();
            let id = store.add("x", x.clone()).unwrap();
            let t0 = Instant::now();
            let mut tape = Tape::default();
            let xv = tape.param(&store, id);
            let y = ours(&mut tape, &xv).unwrap();
            let loss = tape.sum_all(&y).unwrap();
            drop(y);
            tape.backward(&loss, &mut store).unwrap();
            a.push(t0.elapsed().as_secs_f64() * 1e3);
        }
        for _ in 0..11 {
            let var = Var::from_tensor(&x).unwrap();
            let t0 = Instant::now();
            let y = theirs(var.as_tensor()).unwrap();
            let grads = y.sum_all().unwrap().backward().unwrap();
            drop(y);
            assert!(grads.get(var.as_tensor()).is_some());
            b.push(t0.elapsed().as_secs_f64() * 1e3);
        }
        let (a, b) = (best(a), best(b));
        println!("| {name} | {a:.2} | {b:.2} | {:.2} |", a / b);
    }
    // Cross-entropy at a classifier's size.
    let logits = (rand(&[4096, 1000], 2) * 3.0)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let tg = Tensor::from_vec(
        (0..4096u32).map(|i| (i * 31) % 1000).collect::<Vec<_>>(),
        4096,
        &Device::Cpu,
    )
    .unwrap();
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for _ in 0..11 {
        let mut store = ParamStore::new();
        let id = store.add("x", logits.clone()).unwrap();
        let t0 = Instant::now();
        let mut tape = Tape::default();
        let xv = tape.param(&store, id);
        let loss = tape.cross_entropy(&xv, &tg, Default::default()).unwrap();
        tape.backward(&loss, &mut store).unwrap();
        a.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    for _ in 0..11 {
        let var = Var::from_tensor(&logits).unwrap();
        let t0 = Instant::now();
        let grads = candle_nn::loss::cross_entropy(var.as_tensor(), &tg)
            .unwrap()
            .backward()
            .unwrap();
        assert!(grads.get(var.as_tensor()).is_some());
        b.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    let (a, b) = (best(a), best(b));
    println!(
        "| cross_entropy [4096, 1000] | {a:.2} | {b:.2} | {:.2} |",
        a / b
    );
}

/// `linear_gelu`, and the pointwise backwards writing into an owned output gradient (the
/// next op is a linear layer) while reading their context in row chunks (one row per chunk
/// here): gradient-checked with the fused kernels and on the portable path.
#[test]
fn fused_linear_gelu_and_in_place_gradients() {
    actrain::ops::set_context_chunk_bytes(Some(8));
    run_both("activation, in place", || {
        let mut cases = Vec::new();
        let (x, w, b) = (rand(&[2, 3, 4], 1), rand(&[5, 4], 2), rand(&[5], 3));
        let w2 = rand(&[3, 5], 4);
        for approx in [GeluApprox::Tanh, GeluApprox::Erf] {
            cases.push(Case::new(
                "linear_gelu→linear",
                vec![x.clone(), w.clone(), b.clone(), w2.clone()],
                move |t, v| {
                    let h = t.linear_gelu(&v[0], &v[1], Some(&v[2]), approx)?;
                    t.linear(&h, &v[3], None)
                },
            ));
            cases.push(Case::new(
                "linear_gelu",
                vec![x.clone(), w.clone(), b.clone()],
                move |t, v| t.linear_gelu(&v[0], &v[1], Some(&v[2]), approx),
            ));
        }
        type Act = fn(&mut Tape, &Value) -> anyhow::Result<Value>;
        let acts: [(&'static str, Act); 7] = [
            ("relu→linear", |t, x| t.relu(x)),
            ("leaky_relu→linear", |t, x| t.leaky_relu(x, 0.2)),
            ("gelu(tanh)→linear", |t, x| t.gelu(x, GeluApprox::Tanh)),
            ("gelu(erf)→linear", |t, x| t.gelu(x, GeluApprox::Erf)),
            ("silu→linear", |t, x| t.silu(x)),
            ("sigmoid→linear", |t, x| t.sigmoid(x)),
            ("tanh→linear", |t, x| t.tanh(x)),
        ];
        let input = away_from_zero(&(rand(&[3, 2, 4], 5) * 2.0).unwrap());
        for (name, act) in acts {
            cases.push(Case::new(
                name,
                vec![input.clone(), rand(&[4, 4], 6)],
                move |t, v| {
                    let h = act(t, &v[0])?;
                    t.linear(&h, &v[1], None)
                },
            ));
        }
        cases
    });
    actrain::ops::set_context_chunk_bytes(None);
}
