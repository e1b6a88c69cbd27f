//! Normalisation: gradient checks (f64, central differences) for batch norm (training and
//! eval), layer norm and RMS norm on several shapes; agreement with candle-nn's fused forward
//! and with candle autograd through candle-nn's composed ("slow") versions and BatchNorm;
//! batch norm's running statistics and eval mode against hand-computed values; what each op
//! saves; error messages.

mod common;
use actrain::ops::norm::BatchNormStats;
use actrain::tape::{ContextPolicy, Packed, ParamStore, SaveAs, SaveRequest, Tape, Value};
use candle_core::{DType, Device, Tensor};
use common::{compare_with_candle, rand, run_cases, Case};
use std::cell::RefCell;
use std::rc::Rc;

fn stats(c: usize, dtype: DType) -> Rc<RefCell<BatchNormStats>> {
    Rc::new(RefCell::new(
        BatchNormStats::new(c, dtype, &Device::Cpu).unwrap(),
    ))
}

fn vec1(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn assert_close(a: &[f64], b: &[f64], tol: f64, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= tol,
            "{what}[{i}]: {x} vs {y}\n{a:?}\n{b:?}"
        );
    }
}

#[derive(Clone, Default)]
struct Spy(Rc<RefCell<Vec<Asked>>>);

/// (op, purpose, shape) of one save request.
type Asked = (&'static str, SaveAs, Vec<usize>);

impl ContextPolicy for Spy {
    fn pack(&mut self, req: &SaveRequest) -> anyhow::Result<Packed> {
        self.0
            .borrow_mut()
            .push((req.op, req.kind, req.tensor.dims().to_vec()));
        Ok(Packed::Full(req.tensor.clone()))
    }
}

#[test]
fn norm_gradients() {
    let mut cases = Vec::new();
    for (i, d) in [
        vec![5, 3],
        vec![4, 3, 7],
        vec![2, 3, 5, 7],
        vec![3, 1, 1, 5],
        vec![2, 4, 1],
    ]
    .into_iter()
    .enumerate()
    {
        let c = d[1];
        let inputs = vec![
            rand(&d, i as u64),
            (rand(&[c], 10 + i as u64) + 1.5).unwrap(),
            rand(&[c], 20 + i as u64),
        ];
        let run = stats(c, DType::F64);
        cases.push(Case::new(
            "batch_norm(train)",
            inputs.clone(),
            move |t, v| t.batch_norm(&v[0], &v[1], &v[2], &mut run.borrow_mut(), 0.1, 1e-5),
        ));
        // Eval mode with gradients on (frozen statistics, e.g. fine-tuning): running stats
        // of some earlier batches.
        let run = Rc::new(RefCell::new(BatchNormStats {
            mean: rand(&[c], 30 + i as u64),
            var: (rand(&[c], 40 + i as u64) + 1.2).unwrap(),
        }));
        cases.push(Case::new("batch_norm(eval)", inputs, move |t, v| {
            let rec = t.is_recording();
            t.eval_mode();
            t.set_recording(rec);
            t.batch_norm(&v[0], &v[1], &v[2], &mut run.borrow_mut(), 0.1, 1e-5)
        }));
    }
    for (i, d) in [vec![4, 7], vec![2, 3, 5], vec![1, 9], vec![6], vec![3, 2]]
        .into_iter()
        .enumerate()
    {
        let last = *d.last().unwrap();
        let (x, g, b) = (
            rand(&d, i as u64),
            rand(&[last], 50 + i as u64),
            rand(&[last], 60 + i as u64),
        );
        cases.push(Case::new(
            "layer_norm",
            vec![x.clone(), g.clone(), b.clone()],
            |t, v| t.layer_norm(&v[0], Some(&v[1]), Some(&v[2]), 1e-5),
        ));
        cases.push(Case::new(
            "layer_norm(gamma)",
            vec![x.clone(), g.clone()],
            |t, v| t.layer_norm(&v[0], Some(&v[1]), None, 1e-5),
        ));
        cases.push(Case::new("layer_norm(beta)", vec![x.clone(), b], |t, v| {
            t.layer_norm(&v[0], None, Some(&v[1]), 1e-5)
        }));
        cases.push(Case::new("layer_norm(plain)", vec![x.clone()], |t, v| {
            t.layer_norm(&v[0], None, None, 1e-5)
        }));
        cases.push(Case::new("rms_norm", vec![x.clone(), g], |t, v| {
            t.rms_norm(&v[0], Some(&v[1]), 1e-6)
        }));
        cases.push(Case::new("rms_norm(plain)", vec![x], |t, v| {
            t.rms_norm(&v[0], None, 1e-6)
        }));
    }
    // Normalisations inside a small graph (input is an op output, gamma shared by two uses).
    cases.push(Case::new(
        "rms_norm∘layer_norm",
        vec![rand(&[3, 5], 1), rand(&[5], 2)],
        |t, v| {
            let h = t.layer_norm(&v[0], Some(&v[1]), None, 1e-5)?;
            let h = t.affine(&h, 2.0, 0.5)?;
            t.rms_norm(&h, Some(&v[1]), 1e-6)
        },
    ));
    run_cases("norm", cases);
}

/// The candle-ops path (used off the CPU and for other float dtypes) checked the same way.
#[test]
fn norm_gradients_generic_path() {
    actrain::ops::norm::force_generic_norm_kernels(true);
    let mut cases = Vec::new();
    for (i, d) in [vec![5, 3], vec![2, 3, 5, 7]].into_iter().enumerate() {
        let c = d[1];
        let inputs = vec![
            rand(&d, i as u64),
            (rand(&[c], 10) + 1.5).unwrap(),
            rand(&[c], 20),
        ];
        let run = stats(c, DType::F64);
        cases.push(Case::new(
            "batch_norm(train,generic)",
            inputs.clone(),
            move |t, v| t.batch_norm(&v[0], &v[1], &v[2], &mut run.borrow_mut(), 0.1, 1e-5),
        ));
        let run = Rc::new(RefCell::new(BatchNormStats {
            mean: rand(&[c], 30),
            var: (rand(&[c], 40) + 1.2).unwrap(),
        }));
        cases.push(Case::new(
            "batch_norm(eval,generic)",
            inputs,
            move |t, v| {
                let rec = t.is_recording();
                t.eval_mode();
                t.set_recording(rec);
                t.batch_norm(&v[0], &v[1], &v[2], &mut run.borrow_mut(), 0.1, 1e-5)
            },
        ));
    }
    for (i, d) in [vec![4, 7], vec![2, 3, 5]].into_iter().enumerate() {
        let last = *d.last().unwrap();
        let (x, g, b) = (rand(&d, i as u64), rand(&[last], 50), rand(&[last], 60));
        cases.push(Case::new(
            "layer_norm(generic)",
            vec![x.clone(), g.clone(), b],
            |t, v| t.layer_norm(&v[0], Some(&v[1]), Some(&v[2]), 1e-5),
        ));
        cases.push(Case::new("rms_norm(generic)", vec![x, g], |t, v| {
            t.rms_norm(&v[0], Some(&v[1]), 1e-6)
        }));
    }
    run_cases("norm, candle-ops path", cases);
    actrain::ops::norm::force_generic_norm_kernels(false);
}

/// The CPU kernels and the candle-ops path agree in f32 on larger, odd shapes (lane
/// remainders, many rows per task), forward and every gradient.
#[test]
fn norm_kernels_agree_with_candle_ops_path() {
    type Build = fn(&mut Tape, &[Value], &RefCell<BatchNormStats>) -> anyhow::Result<Value>;
    let run_both = |inputs: &[Tensor], c: usize, f: Build| -> f64 {
        let mut outs = Vec::new();
        for generic in [false, true] {
            actrain::ops::norm::force_generic_norm_kernels(generic);
            let mut store = ParamStore::new();
            let ids: Vec<_> = inputs
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    store
                        .add(format!("p{i}"), t.to_dtype(DType::F32).unwrap())
                        .unwrap()
                })
                .collect();
            let run = RefCell::new(BatchNormStats::new(c, DType::F32, &Device::Cpu).unwrap());
            let mut tape = Tape::default();
            let vals: Vec<Value> = ids.iter().map(|&id| tape.param(&store, id)).collect();
            let y = f(&mut tape, &vals, &run).unwrap();
            let w = tape.constant(rand(y.dims(), 7).to_dtype(DType::F32).unwrap());
            let p = tape.mul(&y, &w).unwrap();
            let l = tape.sum_all(&p).unwrap();
            tape.backward(&l, &mut store).unwrap();
            let mut all = vec![
                y.tensor().clone(),
                run.borrow().mean.clone(),
                run.borrow().var.clone(),
            ];
            all.extend(ids.iter().map(|&id| store.grad(id).unwrap().clone()));
            outs.push(all);
        }
        actrain::ops::norm::force_generic_norm_kernels(false);
        let mut worst = 0.0f64;
        for (a, b) in outs[0].iter().zip(&outs[1]) {
            worst = worst.max(actrain::tape::gradcheck::max_rel_diff(a, b).unwrap());
        }
        worst
    };
    println!("\n| norm: CPU kernel vs candle-ops path (f32) | worst rel. diff |\n|---|---|");
    for d in [vec![9, 5, 3, 11], vec![37, 13], vec![3, 6, 19]] {
        let c = d[1];
        let dd = run_both(
            &[rand(&d, 1), rand(&[c], 2), rand(&[c], 3)],
            c,
            |t, v, r| t.batch_norm(&v[0], &v[1], &v[2], &mut r.borrow_mut(), 0.1, 1e-5),
        );
        let last = *d.last().unwrap();
        let dl = run_both(
            &[rand(&d, 4), rand(&[last], 5), rand(&[last], 6)],
            1,
            |t, v, _| t.layer_norm(&v[0], Some(&v[1]), Some(&v[2]), 1e-5),
        );
        let dr = run_both(&[rand(&d, 7), rand(&[last], 8)], 1, |t, v, _| {
            t.rms_norm(&v[0], Some(&v[1]), 1e-5)
        });
        println!("| batch_norm {d:?} | {dd:.1e} |\n| layer_norm {d:?} | {dl:.1e} |\n| rms_norm {d:?} | {dr:.1e} |");
        // Two f32 implementations, reductions in a different order; small gradient elements
        // are differences of O(1) terms (see norm_f32_accuracy_against_f64): 1e-3.
        assert!(
            dd < 1e-3 && dl < 1e-3 && dr < 1e-3,
            "{d:?}: bn {dd}, ln {dl}, rms {dr}"
        );
    }
}

#[test]
fn layer_and_rms_norm_match_candle() {
    let eps = 1e-5;
    println!("\n| norm vs candle (f32) | worst rel. diff |\n|---|---|");
    for d in [vec![4, 7], vec![2, 3, 5], vec![3, 64]] {
        let last = *d.last().unwrap();
        let (x, g, b) = (rand(&d, 1), rand(&[last], 2), rand(&[last], 3));
        // Forward against candle-nn's fused kernels (no backward there).
        let (xf, gf, bf) = (
            x.to_dtype(DType::F32).unwrap(),
            g.to_dtype(DType::F32).unwrap(),
            b.to_dtype(DType::F32).unwrap(),
        );
        let mut tape = Tape::default();
        let (xv, gv, bv) = (
            tape.constant(xf.clone()),
            tape.constant(gf.clone()),
            tape.constant(bf.clone()),
        );
        let ours = tape.layer_norm(&xv, Some(&gv), Some(&bv), eps).unwrap();
        let fused = candle_nn::ops::layer_norm(&xf, &gf, &bf, eps as f32).unwrap();
        assert_close(
            &vec1(ours.tensor()),
            &vec1(&fused),
            1e-5,
            "layer_norm vs fused",
        );
        let ours = tape.rms_norm(&xv, Some(&gv), eps).unwrap();
        let fused = candle_nn::ops::rms_norm(&xf, &gf, eps as f32).unwrap();
        assert_close(
            &vec1(ours.tensor()),
            &vec1(&fused),
            1e-5,
            "rms_norm vs fused",
        );

        // Forward and gradients against candle autograd through the composed versions.
        let dl = compare_with_candle(
            &[x.clone(), g.clone(), b.clone()],
            |t, v| t.layer_norm(&v[0], Some(&v[1]), Some(&v[2]), eps),
            |v| {
                Ok(candle_nn::ops::layer_norm_slow(
                    &v[0], &v[1], &v[2], eps as f32,
                )?)
            },
        )
        .unwrap();
        let dr = compare_with_candle(
            &[x.clone(), g.clone()],
            |t, v| t.rms_norm(&v[0], Some(&v[1]), eps),
            |v| Ok(candle_nn::ops::rms_norm_slow(&v[0], &v[1], eps as f32)?),
        )
        .unwrap();
        println!("| layer_norm {d:?} | {dl:.1e} |\n| rms_norm {d:?} | {dr:.1e} |");
        // f32 against f32 with reductions in a different order; layer norm's input gradient
        // is a difference of O(1) terms (see norm_f32_accuracy_against_f64): 1e-3.
        assert!(
            dl < 1e-3 && dr < 1e-3,
            "{d:?}: layer_norm {dl}, rms_norm {dr}"
        );
    }
}

#[test]
fn batch_norm_matches_candle_nn_training() {
    for d in [vec![6, 3], vec![4, 3, 5], vec![2, 3, 5, 4]] {
        let c = d[1];
        let inputs = [rand(&d, 1), (rand(&[c], 2) + 1.5).unwrap(), rand(&[c], 3)];
        let run = stats(c, DType::F32);
        let dd = compare_with_candle(
            &inputs,
            move |t, v| t.batch_norm(&v[0], &v[1], &v[2], &mut run.borrow_mut(), 0.1, 1e-5),
            move |v| {
                let bn = candle_nn::BatchNorm::new(
                    c,
                    Tensor::zeros(c, DType::F32, &Device::Cpu)?,
                    Tensor::ones(c, DType::F32, &Device::Cpu)?,
                    v[1].clone(),
                    v[2].clone(),
                    1e-5,
                )?;
                Ok(bn.forward_train(&v[0])?)
            },
        )
        .unwrap();
        println!("| batch_norm(train) {d:?} vs candle-nn | {dd:.1e} |");
        assert!(dd < 1e-4, "batch_norm {d:?} vs candle-nn: {dd}");
    }
}

#[test]
fn batch_norm_running_statistics_and_eval_by_hand() {
    let eps = 1e-5;
    // x: [N=4, C=2, L=1]; channel 0 = 1, 2, 3, 4; channel 1 = 0, 0, 2, 2.
    let x = Tensor::new(
        &[[[1f32], [0.]], [[2.], [0.]], [[3.], [2.]], [[4.], [2.]]],
        &Device::Cpu,
    )
    .unwrap();
    let gamma = Tensor::new(&[2f32, 0.5], &Device::Cpu).unwrap();
    let beta = Tensor::new(&[0.1f32, -1.0], &Device::Cpu).unwrap();
    let mut run = BatchNormStats::new(2, DType::F32, &Device::Cpu).unwrap();
    let mut tape = Tape::default();
    let (xv, gv, bv) = (
        tape.constant(x.clone()),
        tape.constant(gamma),
        tape.constant(beta),
    );
    let y = tape.batch_norm(&xv, &gv, &bv, &mut run, 0.1, eps).unwrap();
    // Batch: mean (2.5, 1), biased var (1.25, 1), unbiased (5/3, 4/3).
    let (s0, s1) = (1.0 / (1.25f64 + eps).sqrt(), 1.0 / (1.0f64 + eps).sqrt());
    let want: Vec<f64> = [1.0, 2.0, 3.0, 4.0]
        .iter()
        .zip([0.0, 0.0, 2.0, 2.0])
        .flat_map(|(&a, b)| [(a - 2.5) * s0 * 2.0 + 0.1, (b - 1.0) * s1 * 0.5 - 1.0])
        .collect();
    assert_close(&vec1(y.tensor()), &want, 1e-5, "training output");
    assert_close(&vec1(&run.mean), &[0.25, 0.1], 1e-6, "running mean");
    assert_close(
        &vec1(&run.var),
        &[0.9 + 0.1 * 5.0 / 3.0, 0.9 + 0.1 * 4.0 / 3.0],
        1e-6,
        "running var",
    );

    // A second step keeps averaging: mean = 0.9 * 0.25 + 0.1 * 2.5.
    tape.batch_norm(&xv, &gv, &bv, &mut run, 0.1, eps).unwrap();
    assert_close(
        &vec1(&run.mean),
        &[0.9 * 0.25 + 0.25, 0.9 * 0.1 + 0.1],
        1e-6,
        "running mean, step 2",
    );
    let rv = [
        0.9 * (0.9 + 0.5 / 3.0) + 0.5 / 3.0,
        0.9 * (0.9 + 0.4 / 3.0) + 0.4 / 3.0,
    ];
    assert_close(&vec1(&run.var), &rv, 1e-6, "running var, step 2");

    // Eval: the running statistics normalise, and are not updated.
    tape.eval_mode();
    let before = (vec1(&run.mean), vec1(&run.var));
    let y = tape.batch_norm(&xv, &gv, &bv, &mut run, 0.1, eps).unwrap();
    let rm = before.0.clone();
    let want: Vec<f64> = [1.0, 2.0, 3.0, 4.0]
        .iter()
        .zip([0.0, 0.0, 2.0, 2.0])
        .flat_map(|(&a, b)| {
            [
                (a - rm[0]) / (rv[0] + eps).sqrt() * 2.0 + 0.1,
                (b - rm[1]) / (rv[1] + eps).sqrt() * 0.5 - 1.0,
            ]
        })
        .collect();
    assert_close(&vec1(y.tensor()), &want, 1e-5, "eval output");
    assert_eq!(
        (vec1(&run.mean), vec1(&run.var)),
        before,
        "eval must not touch running stats"
    );
    assert!(tape.is_empty(), "eval records nothing");

    // 4-D input: statistics over N, H, W per channel; a constant channel normalises to beta.
    let x4 = Tensor::from_vec(
        (0..2 * 3 * 2 * 2)
            .map(|i| if (i / 4) % 3 == 1 { 7.0f32 } else { i as f32 })
            .collect::<Vec<_>>(),
        (2, 3, 2, 2),
        &Device::Cpu,
    )
    .unwrap();
    let mut tape = Tape::default();
    let mut run = BatchNormStats::new(3, DType::F32, &Device::Cpu).unwrap();
    let xv = tape.constant(x4);
    let g = tape.constant(Tensor::ones(3, DType::F32, &Device::Cpu).unwrap());
    let b = tape.constant(Tensor::new(&[0f32, 3.0, 0.0], &Device::Cpu).unwrap());
    let y = tape.batch_norm(&xv, &g, &b, &mut run, 0.5, eps).unwrap();
    // Channel 0 holds 0..4 and 12..16: mean 7.5; channel 2 holds 8..12, 20..24: mean 15.5.
    assert_close(
        &vec1(&run.mean),
        &[3.75, 3.5, 7.75],
        1e-5,
        "4-D running mean",
    );
    let y = vec1(y.tensor());
    for (i, v) in y.iter().enumerate() {
        if (i / 4) % 3 == 1 {
            assert!((v - 3.0).abs() < 1e-6, "constant channel -> beta, got {v}");
        }
    }
}

#[test]
fn norms_save_activation_and_exact_statistics() {
    let spy = Spy::default();
    let mut store = ParamStore::new();
    let (xi, gi, bi) = (
        store.add("x", rand(&[4, 3, 5, 5], 1)).unwrap(),
        store.add("g", rand(&[3], 2)).unwrap(),
        store.add("b", rand(&[3], 3)).unwrap(),
    );
    let mut tape = Tape::new(Box::new(spy.clone()));
    let (x, g, b) = (
        tape.param(&store, xi),
        tape.param(&store, gi),
        tape.param(&store, bi),
    );
    let mut run = BatchNormStats::new(3, DType::F64, &Device::Cpu).unwrap();
    let y = tape.batch_norm(&x, &g, &b, &mut run, 0.1, 1e-5).unwrap();
    let asked = spy.0.borrow().clone();
    // x is a parameter here (stored by reference, not asked); mean and invstd are exact.
    // (The tape stores Exact requests without asking the policy.)
    assert!(asked.is_empty(), "{asked:?}");
    let log: Vec<_> = tape.context_log().to_vec();
    let shapes: Vec<Vec<usize>> = log.iter().map(|r| r.shape.clone()).collect();
    assert_eq!(
        shapes,
        vec![vec![4, 3, 5, 5], vec![3], vec![3], vec![3]],
        "{log:?}"
    );
    assert_eq!(log[0].repr, "param");
    assert_eq!(log[1].repr, "f64");

    // On an op output, x goes through the policy as an Activation.
    let h = tape.affine(&y, 1.0, 0.0).unwrap();
    let h = tape.reshape(&h, &[4, 75]).unwrap();
    tape.layer_norm(&h, None, None, 1e-5).unwrap();
    tape.rms_norm(&h, None, 1e-6).unwrap();
    let asked = spy.0.borrow().clone();
    let ln: Vec<_> = asked
        .iter()
        .filter(|r| r.0 == "layer_norm" || r.0 == "rms_norm")
        .collect();
    // rms_norm saves the same tensor for the same purpose: stored once (shared).
    assert_eq!(ln.len(), 1, "{asked:?}");
    assert_eq!(
        (ln[0].0, ln[0].1, ln[0].2.clone()),
        ("layer_norm", SaveAs::Activation, vec![4, 75])
    );
    let log = tape.context_log();
    assert!(
        log.iter()
            .any(|r| r.op == "rms_norm" && r.shared && r.shape == vec![4, 75]),
        "{log:?}"
    );
    let stats: Vec<_> = log
        .iter()
        .filter(|r| (r.op == "layer_norm" || r.op == "rms_norm") && r.shape == vec![4, 1])
        .map(|r| r.op)
        .collect();
    assert_eq!(
        stats,
        vec!["layer_norm", "layer_norm", "rms_norm"],
        "mean + rstd, rrms"
    );
}

#[test]
fn norm_errors_name_the_op_and_shapes() {
    let mut tape = Tape::default();
    let msg = |r: anyhow::Result<Value>| format!("{:#}", r.unwrap_err());
    let x = tape.constant(rand(&[4, 3, 5], 1));
    let g3 = tape.constant(rand(&[3], 2));
    let g4 = tape.constant(rand(&[4], 2));
    let mut run = BatchNormStats::new(3, DType::F64, &Device::Cpu).unwrap();
    let m = msg(tape.batch_norm(&x, &g4, &g3, &mut run, 0.1, 1e-5));
    assert!(
        m.contains("batch_norm") && m.contains("gamma") && m.contains("[4]"),
        "{m}"
    );
    let x5 = tape.constant(rand(&[2, 3, 2, 2, 2], 1));
    let m = msg(tape.batch_norm(&x5, &g3, &g3, &mut run, 0.1, 1e-5));
    assert!(
        m.contains("batch_norm") && m.contains("[2, 3, 2, 2, 2]"),
        "{m}"
    );
    let x1 = tape.constant(rand(&[1, 3], 1));
    let m = msg(tape.batch_norm(&x1, &g3, &g3, &mut run, 0.1, 1e-5));
    assert!(m.contains("more than one value"), "{m}");
    let mut bad = BatchNormStats::new(4, DType::F64, &Device::Cpu).unwrap();
    let m = msg(tape.batch_norm(&x, &g3, &g3, &mut bad, 0.1, 1e-5));
    assert!(m.contains("running"), "{m}");
    let m = msg(tape.layer_norm(&x, Some(&g3), None, 1e-5));
    assert!(
        m.contains("layer_norm") && m.contains("[5]") && m.contains("[4, 3, 5]"),
        "{m}"
    );
    let m = msg(tape.rms_norm(&x, Some(&g4), 1e-5));
    assert!(m.contains("rms_norm") && m.contains("gamma"), "{m}");
    let s = tape.constant(Tensor::new(1f64, &Device::Cpu).unwrap());
    let m = msg(tape.rms_norm(&s, None, 1e-5));
    assert!(m.contains("rms_norm") && m.contains("scalar"), "{m}");
    let gf = tape.constant(rand(&[5], 2).to_dtype(DType::F32).unwrap());
    let m = msg(tape.layer_norm(&x, Some(&gf), None, 1e-5));
    assert!(m.contains("F32") && m.contains("F64"), "{m}");
}

/// Timing against candle's own forward + backward (f32, CPU). Not a pass/fail test:
/// `cargo test --release --test ops_norm -- --ignored --nocapture bench`.
#[test]
#[ignore]
fn bench_norms_vs_candle() {
    use candle_core::Var;
    use std::time::Instant;
    fn time(reps: usize, mut f: impl FnMut()) -> f64 {
        f();
        let t = Instant::now();
        for _ in 0..reps {
            f();
        }
        t.elapsed().as_secs_f64() / reps as f64 * 1e3
    }
    let f32t = |d: &[usize], s: u64| rand(d, s).to_dtype(DType::F32).unwrap();
    println!("\n| op (f32, fwd+bwd) | shape | actrain ms | candle ms |\n|---|---|---|---|");
    for d in [vec![32, 64, 32, 32], vec![128, 256, 8, 8], vec![256, 512]] {
        let c = d[1];
        let (x, g, b) = (f32t(&d, 1), f32t(&[c], 2), f32t(&[c], 3));
        let mut store = ParamStore::new();
        let ids = [
            store.add("x", x.clone()).unwrap(),
            store.add("g", g.clone()).unwrap(),
            store.add("b", b.clone()).unwrap(),
        ];
        let mut run = BatchNormStats::new(c, DType::F32, &Device::Cpu).unwrap();
        let ours = time(5, || {
            let mut tape = Tape::default();
            let v: Vec<Value> = ids.iter().map(|&i| tape.param(&store, i)).collect();
            let y = tape
                .batch_norm(&v[0], &v[1], &v[2], &mut run, 0.1, 1e-5)
                .unwrap();
            let l = tape.sum_all(&y).unwrap();
            tape.backward(&l, &mut store).unwrap();
        });
        let vars: Vec<Var> = [&x, &g, &b]
            .iter()
            .map(|t| Var::from_tensor(t).unwrap())
            .collect();
        let bn = candle_nn::BatchNorm::new(
            c,
            Tensor::zeros(c, DType::F32, &Device::Cpu).unwrap(),
            Tensor::ones(c, DType::F32, &Device::Cpu).unwrap(),
            vars[1].as_tensor().clone(),
            vars[2].as_tensor().clone(),
            1e-5,
        )
        .unwrap();
        let theirs = time(5, || {
            let y = bn.forward_train(vars[0].as_tensor()).unwrap();
            y.sum_all().unwrap().backward().unwrap();
        });
        println!("| batch_norm(train) | {d:?} | {ours:.1} | {theirs:.1} |");
    }
    for d in [vec![64, 128, 256], vec![4096, 768]] {
        let last = *d.last().unwrap();
        let (x, g, b) = (f32t(&d, 1), f32t(&[last], 2), f32t(&[last], 3));
        let mut store = ParamStore::new();
        let ids = [
            store.add("x", x.clone()).unwrap(),
            store.add("g", g.clone()).unwrap(),
            store.add("b", b.clone()).unwrap(),
        ];
        let vars: Vec<Var> = [&x, &g, &b]
            .iter()
            .map(|t| Var::from_tensor(t).unwrap())
            .collect();
        let ours = time(5, || {
            let mut tape = Tape::default();
            let v: Vec<Value> = ids.iter().map(|&i| tape.param(&store, i)).collect();
            let y = tape
                .layer_norm(&v[0], Some(&v[1]), Some(&v[2]), 1e-5)
                .unwrap();
            let l = tape.sum_all(&y).unwrap();
            tape.backward(&l, &mut store).unwrap();
        });
        let theirs = time(5, || {
            let y = candle_nn::ops::layer_norm_slow(
                vars[0].as_tensor(),
                vars[1].as_tensor(),
                vars[2].as_tensor(),
                1e-5,
            )
            .unwrap();
            y.sum_all().unwrap().backward().unwrap();
        });
        let fused = time(5, || {
            candle_nn::ops::layer_norm(&x, &g, &b, 1e-5).unwrap();
        });
        println!("| layer_norm | {d:?} | {ours:.1} | {theirs:.1} (fused fwd only {fused:.1}) |");
        let ours = time(5, || {
            let mut tape = Tape::default();
            let v: Vec<Value> = ids.iter().map(|&i| tape.param(&store, i)).collect();
            let y = tape.rms_norm(&v[0], Some(&v[1]), 1e-5).unwrap();
            let l = tape.sum_all(&y).unwrap();
            tape.backward(&l, &mut store).unwrap();
        });
        let theirs = time(5, || {
            let y = candle_nn::ops::rms_norm_slow(vars[0].as_tensor(), vars[1].as_tensor(), 1e-5)
                .unwrap();
            y.sum_all().unwrap().backward().unwrap();
        });
        println!("| rms_norm | {d:?} | {ours:.1} | {theirs:.1} |");
    }
}

/// f32 accuracy against the f64 result, as max |error| / max |value| per tensor: the CPU
/// kernels (statistics in f64, 8-lane sums) stay within a few f32 ulps. Element-wise
/// relative errors are a poor measure in f32 here: layer norm's input gradient sums to 0
/// per row and batch norm's output is `x̂ γ + β`, so small elements are differences of O(1)
/// terms and carry ~1e-7 absolute noise, ~1e-4 relative to the 1e-4 floor — which is why
/// the f32 comparisons between two implementations use 1e-3.
#[test]
fn norm_f32_accuracy_against_f64() {
    type Build = fn(&mut Tape, &[Value], &RefCell<BatchNormStats>) -> anyhow::Result<Value>;
    let d = vec![37usize, 13];
    let last = 13;
    let run_all = |inputs: &[Tensor], f: Build, name: &str| {
        let grads = |dtype: DType, generic: bool| -> Vec<Tensor> {
            actrain::ops::norm::force_generic_norm_kernels(generic);
            let mut store = ParamStore::new();
            let ids: Vec<_> = inputs
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    store
                        .add(format!("p{i}"), t.to_dtype(dtype).unwrap())
                        .unwrap()
                })
                .collect();
            let run = RefCell::new(BatchNormStats::new(last, dtype, &Device::Cpu).unwrap());
            let mut tape = Tape::default();
            let v: Vec<Value> = ids.iter().map(|&id| tape.param(&store, id)).collect();
            let y = f(&mut tape, &v, &run).unwrap();
            let w = tape.constant(rand(y.dims(), 7).to_dtype(dtype).unwrap());
            let p = tape.mul(&y, &w).unwrap();
            let l = tape.sum_all(&p).unwrap();
            tape.backward(&l, &mut store).unwrap();
            actrain::ops::norm::force_generic_norm_kernels(false);
            let mut all = vec![y.tensor().to_dtype(DType::F64).unwrap()];
            all.extend(
                ids.iter()
                    .map(|&id| store.grad(id).unwrap().to_dtype(DType::F64).unwrap()),
            );
            all
        };
        let truth = grads(DType::F64, false);
        let (k, g) = (grads(DType::F32, false), grads(DType::F32, true));
        // Error relative to each tensor's largest magnitude (f32 resolution is ~1.2e-7 of it).
        let err = |x: &[Tensor]| -> f64 {
            let max_abs = |t: &Tensor| vec1(t).iter().fold(0f64, |m, v| m.max(v.abs()));
            truth
                .iter()
                .zip(x)
                .map(|(a, b)| max_abs(&(a - b).unwrap()) / max_abs(a))
                .fold(0.0, f64::max)
        };
        let (ek, eg) = (err(&k), err(&g));
        println!("| {name} {d:?} | {ek:.1e} | {eg:.1e} |");
        assert!(ek < 2e-6, "{name}: f32 kernel error {ek} against f64");
    };
    println!(
        "\n| f32 vs f64, max abs err / max abs | CPU kernel | candle-ops path |\n|---|---|---|"
    );
    run_all(
        &[rand(&d, 4), rand(&[last], 5), rand(&[last], 6)],
        |t, v, _| t.layer_norm(&v[0], Some(&v[1]), Some(&v[2]), 1e-5),
        "layer_norm",
    );
    run_all(
        &[rand(&d, 4), rand(&[last], 5)],
        |t, v, _| t.rms_norm(&v[0], Some(&v[1]), 1e-5),
        "rms_norm",
    );
    run_all(
        &[rand(&d, 4), rand(&[last], 5), rand(&[last], 6)],
        |t, v, r| t.batch_norm(&v[0], &v[1], &v[2], &mut r.borrow_mut(), 0.1, 1e-5),
        "batch_norm",
    );
}

/// Batch norm's backward reading its saved input in row chunks (one sample per chunk here)
/// and writing into an owned output gradient (the next op is a linear layer) or into a new
/// tensor (after an add, whose gradient is shared): gradient-checked like the rest.
#[test]
fn batch_norm_chunked_and_in_place_gradients() {
    actrain::ops::set_context_chunk_bytes(Some(8));
    let mut cases = Vec::new();
    for (i, d) in [vec![3, 2, 5], vec![4, 3, 2, 5], vec![5, 2]]
        .into_iter()
        .enumerate()
    {
        let (c, last) = (d[1], *d.last().unwrap());
        let s = 70 + 10 * i as u64;
        let inputs = vec![
            rand(&d, s),
            (rand(&[c], s + 1) + 1.5).unwrap(),
            rand(&[c], s + 2),
            rand(&[last, last], s + 3),
        ];
        for training in [true, false] {
            let run = Rc::new(RefCell::new(BatchNormStats {
                mean: rand(&[c], s + 4),
                var: (rand(&[c], s + 5) + 1.2).unwrap(),
            }));
            let bn = move |t: &mut Tape, v: &[Value]| {
                if !training {
                    let rec = t.is_recording();
                    t.eval_mode();
                    t.set_recording(rec);
                }
                t.batch_norm(&v[0], &v[1], &v[2], &mut run.borrow_mut(), 0.1, 1e-5)
            };
            let bn2 = bn.clone();
            cases.push(Case::new(
                if training {
                    "batch_norm(train)→linear, chunked"
                } else {
                    "batch_norm(eval)→linear, chunked"
                },
                inputs.clone(),
                move |t, v| {
                    let y = bn(t, v)?;
                    t.linear(&y, &v[3], None)
                },
            ));
            cases.push(Case::new(
                if training {
                    "batch_norm(train)→add, chunked"
                } else {
                    "batch_norm(eval)→add, chunked"
                },
                inputs[..3].to_vec(),
                move |t, v| {
                    let y = bn2(t, v)?;
                    t.add(&y, &v[0])
                },
            ));
        }
    }
    run_cases("norm, chunked", cases);
    actrain::ops::set_context_chunk_bytes(None);
}
