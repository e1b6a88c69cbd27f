//! Cross-entropy (against candle, a hand-written reference, and finite differences, with label
//! smoothing and an ignore index) and accuracy.

mod common;
use actrain::ops::activation::set_fused_cpu_kernels;
use actrain::ops::loss::{accuracy, CrossEntropyOptions};
use actrain::tape::{ParamStore, Tape};
use candle_core::{DType, Device, Tensor};
use common::{compare_with_candle, rand, run_cases, Case};

fn targets(v: &[u32], dims: &[usize]) -> Tensor {
    Tensor::from_vec(v.to_vec(), dims, &Device::Cpu).unwrap()
}

/// Deterministic targets in `0..classes`, with every `ignore_every`-th one set to `ignore`.
fn make_targets(dims: &[usize], classes: usize, ignore: Option<(u32, usize)>) -> Tensor {
    let n: usize = dims.iter().product();
    let v: Vec<u32> = (0..n)
        .map(|i| match ignore {
            Some((ix, every)) if i % every == 1 => ix,
            _ => ((i * 7 + 3) % classes) as u32,
        })
        .collect();
    targets(&v, dims)
}

fn opts(ls: f64, ignore: Option<u32>) -> CrossEntropyOptions {
    CrossEntropyOptions {
        label_smoothing: ls,
        ignore_index: ignore,
    }
}

/// PyTorch's definition, straight from the formula in f64:
/// `Σ_{i counted} [(1-ε)(-log p_i[t_i]) + ε/C Σ_c (-log p_i[c])] / count`.
fn reference(logits: &[Vec<f64>], t: &[u32], o: CrossEntropyOptions) -> f64 {
    let (mut sum, mut count) = (0.0, 0usize);
    for (row, &ti) in logits.iter().zip(t) {
        if Some(ti) == o.ignore_index {
            continue;
        }
        let c = row.len() as f64;
        let lse = row.iter().map(|v| v.exp()).sum::<f64>().ln();
        let nll = lse - row[ti as usize];
        let smooth: f64 = row.iter().map(|v| lse - v).sum::<f64>() / c;
        sum += (1.0 - o.label_smoothing) * nll + o.label_smoothing * smooth;
        count += 1;
    }
    if count == 0 {
        0.0
    } else {
        sum / count as f64
    }
}

fn run_both(cases: impl Fn() -> Vec<Case>) {
    set_fused_cpu_kernels(true);
    run_cases("cross_entropy, fused cpu", cases());
    set_fused_cpu_kernels(false);
    run_cases("cross_entropy, portable", cases());
    set_fused_cpu_kernels(true);
}

#[test]
fn cross_entropy_gradients() {
    run_both(|| {
        let mut cases = Vec::new();
        for (dims, classes) in [
            (vec![5usize], 7usize),
            (vec![1], 3),
            (vec![3, 4], 5),
            (vec![2], 1),
            (vec![9], 10),
        ] {
            let mut ldims = dims.clone();
            ldims.push(classes);
            let x = (rand(&ldims, 1) * 3.0).unwrap();
            for (ls, ignore) in [
                (0.0, None),
                (0.1, None),
                (0.0, Some(0u32)),
                (0.2, Some(99u32)),
            ] {
                let t = match ignore {
                    Some(99) => make_targets(&dims, classes, Some((99, 3))),
                    _ => make_targets(&dims, classes, None),
                };
                let name = match (ls > 0.0, ignore.is_some()) {
                    (false, false) => "ce",
                    (true, false) => "ce(smooth .1)",
                    (false, true) => "ce(ignore 0)",
                    (true, true) => "ce(smooth .2, ignore)",
                };
                let o = opts(ls, ignore);
                cases.push(Case::new(name, vec![x.clone()], move |tp, v| {
                    tp.cross_entropy(&v[0], &t, o)
                }));
            }
        }
        // Strided logits, and a loss that is not the last op (scaled, plus a second term).
        let t = make_targets(&[5], 3, None);
        cases.push(Case::new(
            "ce strided",
            vec![rand(&[3, 5], 2).t().unwrap()],
            move |tp, v| tp.cross_entropy(&v[0], &t, opts(0.1, None)),
        ));
        let t = make_targets(&[4], 6, None);
        cases.push(Case::new(
            "ce(tanh x) * 3",
            vec![rand(&[4, 6], 3)],
            move |tp, v| {
                let h = tp.tanh(&v[0])?;
                let l = tp.cross_entropy(&h, &t, opts(0.05, None))?;
                tp.scale(&l, 3.0)
            },
        ));
        cases
    });
}

#[test]
fn cross_entropy_agrees_with_candle() {
    for fused in [true, false] {
        set_fused_cpu_kernels(fused);
        for (n, c) in [(5usize, 7usize), (1, 3), (16, 10), (7, 1)] {
            let t = make_targets(&[n], c, None);
            let tc = t.clone();
            let d = compare_with_candle(
                &[(rand(&[n, c], 4) * 5.0).unwrap()],
                move |tp, v| tp.cross_entropy(&v[0], &tc, CrossEntropyOptions::default()),
                move |v| Ok(candle_nn::loss::cross_entropy(&v[0], &t)?),
            )
            .unwrap();
            println!(
                "cross_entropy [{n}, {c}] vs candle_nn (fused={fused}): worst rel. diff {d:.1e}"
            );
            assert!(d < 1e-5, "[{n}, {c}]: {d}");
        }
        // [N, T, C] against candle on the flattened [N*T, C].
        let t = make_targets(&[2, 3], 4, None);
        let (tc, tf) = (t.clone(), t.flatten_all().unwrap());
        let d = compare_with_candle(
            &[rand(&[2, 3, 4], 5)],
            move |tp, v| tp.cross_entropy(&v[0], &tc, CrossEntropyOptions::default()),
            move |v| Ok(candle_nn::loss::cross_entropy(&v[0].reshape((6, 4))?, &tf)?),
        )
        .unwrap();
        assert!(d < 1e-5, "[2, 3, 4]: {d}");
    }
    set_fused_cpu_kernels(true);
}

#[test]
fn cross_entropy_forward_matches_the_reference() {
    for fused in [true, false] {
        set_fused_cpu_kernels(fused);
        for (n, c) in [(6usize, 5usize), (3, 2), (10, 1)] {
            let x = (rand(&[n, c], 6) * 4.0).unwrap();
            let rows = x.to_vec2::<f64>().unwrap();
            for (ls, ignore) in [(0.0, None), (0.1, None), (0.3, Some(7u32)), (1.0, Some(7))] {
                let t = make_targets(&[n], c, ignore.map(|i| (i, 2)));
                let tv = t.to_vec1::<u32>().unwrap();
                let o = opts(ls, ignore);
                let mut tape = Tape::default();
                let v = tape.constant(x.clone());
                let loss = tape.cross_entropy(&v, &t, o).unwrap();
                assert!(
                    loss.dims().is_empty(),
                    "loss must be a scalar, got {:?}",
                    loss.dims()
                );
                let ours = loss.tensor().to_scalar::<f64>().unwrap();
                let want = reference(&rows, &tv, o);
                assert!(
                    (ours - want).abs() < 1e-12 * (1.0 + want.abs()),
                    "[{n},{c}] {o:?}: {ours} vs {want}"
                );
            }
        }
    }
    set_fused_cpu_kernels(true);
}

#[test]
fn cross_entropy_all_ignored_is_zero_not_nan() {
    for fused in [true, false] {
        set_fused_cpu_kernels(fused);
        let mut store = ParamStore::new();
        let id = store
            .add("x", rand(&[3, 4], 1).to_dtype(DType::F32).unwrap())
            .unwrap();
        let mut tape = Tape::default();
        let x = tape.param(&store, id);
        let t = targets(&[5, 5, 5], &[3]);
        let loss = tape.cross_entropy(&x, &t, opts(0.1, Some(5))).unwrap();
        assert_eq!(loss.tensor().to_scalar::<f32>().unwrap(), 0.0);
        tape.backward(&loss, &mut store).unwrap();
        let g = store
            .grad(id)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(g.iter().all(|&v| v == 0.0), "{g:?}");
    }
    set_fused_cpu_kernels(true);
}

#[test]
fn cross_entropy_context_is_probabilities_and_exact_targets() {
    let mut store = ParamStore::new();
    let id = store
        .add("x", rand(&[2, 3, 5], 1).to_dtype(DType::F32).unwrap())
        .unwrap();
    let mut tape = Tape::default();
    let x = tape.param(&store, id);
    let _ = tape
        .cross_entropy(
            &x,
            &make_targets(&[2, 3], 5, None),
            CrossEntropyOptions::default(),
        )
        .unwrap();
    let log: Vec<(String, Vec<usize>)> = tape
        .context_log()
        .iter()
        .map(|r| (r.repr.clone(), r.shape.clone()))
        .collect();
    assert_eq!(
        log,
        vec![
            ("f32".to_string(), vec![6, 5]),
            ("u32".to_string(), vec![6])
        ]
    );
}

#[test]
fn cross_entropy_errors() {
    let mut tape = Tape::default();
    let x = tape.constant(rand(&[4, 3], 1));
    let err = format!(
        "{:#}",
        tape.cross_entropy(&x, &targets(&[0, 1, 3, 2], &[4]), opts(0.0, None))
            .unwrap_err()
    );
    assert!(
        err.contains("target 3") && err.contains("3 classes"),
        "{err}"
    );
    // An out-of-range value equal to the ignore index is fine.
    assert!(tape
        .cross_entropy(&x, &targets(&[0, 1, 300, 2], &[4]), opts(0.0, Some(300)))
        .is_ok());
    let err = format!(
        "{:#}",
        tape.cross_entropy(&x, &targets(&[0, 1, 2], &[3]), opts(0.0, None))
            .unwrap_err()
    );
    assert!(err.contains("[4, 3]") && err.contains("[3]"), "{err}");
    let err = format!(
        "{:#}",
        tape.cross_entropy(&x, &targets(&[0, 1, 2, 0], &[2, 2]), opts(0.0, None))
            .unwrap_err()
    );
    assert!(err.contains("[4, 3]") && err.contains("[2, 2]"), "{err}");
    let f = Tensor::new(&[0f32, 1., 2., 0.], &Device::Cpu).unwrap();
    let err = format!(
        "{:#}",
        tape.cross_entropy(&x, &f, opts(0.0, None)).unwrap_err()
    );
    assert!(err.contains("U32"), "{err}");
    let err = format!(
        "{:#}",
        tape.cross_entropy(&x, &targets(&[0, 1, 2, 0], &[4]), opts(1.5, None))
            .unwrap_err()
    );
    assert!(err.contains("label_smoothing"), "{err}");
    let x4 = tape.constant(rand(&[2, 2, 2, 3], 1));
    let err = format!(
        "{:#}",
        tape.cross_entropy(&x4, &targets(&[0; 8], &[2, 2, 2]), opts(0.0, None))
            .unwrap_err()
    );
    assert!(err.contains("[2, 2, 2, 3]"), "{err}");
}

#[test]
fn accuracy_counts_top1() {
    let logits = Tensor::new(
        &[
            [0.1f32, 0.9, 0.0],
            [2.0, 1.0, 0.0],
            [0.0, 0.0, 5.0],
            [1.0, 3.0, 2.0],
        ],
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(
        accuracy(&logits, &targets(&[1, 0, 1, 1], &[4])).unwrap(),
        (3, 4)
    );
    let l3 = logits.reshape((2, 2, 3)).unwrap();
    assert_eq!(
        accuracy(&l3, &targets(&[1, 1, 2, 1], &[2, 2])).unwrap(),
        (3, 4)
    );
    let err = format!(
        "{:#}",
        accuracy(&logits, &targets(&[1, 0], &[2])).unwrap_err()
    );
    assert!(
        err.contains("accuracy") && err.contains("[4, 3]") && err.contains("[2]"),
        "{err}"
    );
}
