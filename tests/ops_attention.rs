//! Attention (fused scaled dot-product attention, multi-head attention) and sparse (CSR
//! matrices, spmm) ops: gradient checks, agreement with candle's autograd, causality, the
//! exact context they keep, and their errors.

mod common;
use actrain::ops::attention::MultiHeadAttention;
use actrain::ops::sparse::CsrMatrix;
use actrain::tape::gradcheck::{max_rel_diff, random_tensor};
use actrain::tape::{ParamStore, Tape, Value};
use anyhow::Result;
use candle_core::{DType, Device, Tensor, D};
use common::{compare_with_candle, rand, run_cases, Case};
use std::sync::Arc;

// ---------------------------------------------------------------- references (plain candle)

/// Additive causal mask `[tq, tk]` for candle: query i sees keys j <= i + tk - tq. A large
/// negative number rather than -inf keeps candle's composed softmax backward NaN-free.
fn candle_mask(tq: usize, tk: usize) -> Tensor {
    let m: Vec<f32> = (0..tq * tk)
        .map(|n| if n % tk > n / tk + tk - tq { -1e9 } else { 0.0 })
        .collect();
    Tensor::from_vec(m, (tq, tk), &Device::Cpu).unwrap()
}

/// `softmax(q kᵀ / sqrt(Dh) + mask) v` from candle ops (differentiable by candle's autograd).
fn candle_sdpa(q: &Tensor, k: &Tensor, v: &Tensor, causal: bool) -> candle_core::Result<Tensor> {
    let (tq, dh) = (q.dim(2)?, q.dim(3)?);
    let tk = k.dim(2)?;
    let mut s = (q.matmul(&k.t()?)? * (1.0 / (dh as f64).sqrt()))?;
    if causal {
        s = s.broadcast_add(&candle_mask(tq, tk).to_dtype(s.dtype())?)?;
    }
    candle_nn::ops::softmax(&s, D::Minus1)?.matmul(v)
}

/// Multi-head attention from candle ops: inputs x, wq, wk, wv, wo, bq, bv, bo and optionally
/// bk (see [`mha_inputs`]).
fn candle_mha(v: &[Tensor], heads: usize, causal: bool) -> candle_core::Result<Tensor> {
    let (b, t, _) = v[0].dims3()?;
    let d = v[1].dim(0)?;
    let proj = |w: &Tensor, bias: Option<&Tensor>| -> candle_core::Result<Tensor> {
        let y = v[0].broadcast_matmul(&w.t()?)?;
        match bias {
            Some(bias) => y.broadcast_add(bias),
            None => Ok(y),
        }
    };
    let split = |y: Tensor| {
        y.reshape((b, t, heads, d / heads))?
            .transpose(1, 2)?
            .contiguous()
    };
    let q = split(proj(&v[1], Some(&v[5]))?)?;
    let k = split(proj(&v[2], v.get(8))?)?;
    let vv = split(proj(&v[3], Some(&v[6]))?)?;
    let o = candle_sdpa(&q, &k, &vv, causal)?;
    let o = o.transpose(1, 2)?.contiguous()?.reshape((b, t, d))?;
    o.broadcast_matmul(&v[4].t()?)?.broadcast_add(&v[7])
}

/// x `[b, t, e]`, wq, wk, wv, wo `[e, e]`, bq, bv, bo `[e]`, then bk `[e]` when `with_bk`.
/// The key bias gets a gradient of exactly 0 in exact arithmetic (softmax ignores the per-row
/// constant `q · bk`), so a finite-difference check of it measures only rounding noise; the
/// gradient checks leave it out and `mha_key_bias_gets_no_gradient` checks it is 0.
fn mha_inputs(b: usize, t: usize, e: usize, salt: u64, with_bk: bool) -> Vec<Tensor> {
    let mut v = vec![rand(&[b, t, e], salt)];
    for i in 0..4 {
        v.push((rand(&[e, e], salt + 1 + i) * 0.6).unwrap());
    }
    for i in 0..(if with_bk { 4 } else { 3 }) {
        v.push((rand(&[e], salt + 5 + i) * 0.2).unwrap());
    }
    v
}

fn mha(t: &mut Tape, x: &[Value], heads: usize, causal: bool) -> Result<Value> {
    let mut m = MultiHeadAttention::new(&x[1], &x[2], &x[3], &x[4], heads);
    m.bq = Some(&x[5]);
    m.bv = Some(&x[6]);
    m.bo = Some(&x[7]);
    m.bk = x.get(8);
    m.causal = causal;
    t.multi_head_attention(&x[0], &m)
}

// ---------------------------------------------------------------- attention

#[test]
fn sdpa_gradients() {
    let mut cases = Vec::new();
    // (B, H, Tq, Tk, Dh, causal)
    for (b, h, tq, tk, dh, causal) in [
        (1, 1, 5, 5, 4, false),
        (2, 3, 5, 5, 4, true),
        (1, 3, 7, 7, 4, true),
        (2, 1, 7, 7, 4, false),
        (2, 3, 3, 7, 4, false),
        (1, 1, 7, 3, 4, false),
        (2, 3, 3, 7, 4, true), // causal with Tk > Tq: offset Tk - Tq = 4
        (1, 2, 1, 1, 4, true),
    ] {
        let name = if causal { "sdpa(causal)" } else { "sdpa" };
        // Scores of a few units, so the softmax is far from uniform.
        let q = (rand(&[b, h, tq, dh], 1) * 2.0).unwrap();
        let inputs = vec![q, rand(&[b, h, tk, dh], 2), rand(&[b, h, tk, dh], 3)];
        cases.push(Case::new(name, inputs, move |t, x| {
            t.scaled_dot_product_attention(&x[0], &x[1], &x[2], causal)
        }));
    }
    // Value dim different from the key dim.
    cases.push(Case::new(
        "sdpa(Dv=3)",
        vec![
            rand(&[2, 1, 5, 4], 4),
            rand(&[2, 1, 5, 4], 5),
            rand(&[2, 1, 5, 3], 6),
        ],
        |t, x| t.scaled_dot_product_attention(&x[0], &x[1], &x[2], true),
    ));
    // q = k = v: one value saved three times (deduplicated), gradients summed.
    cases.push(Case::new(
        "sdpa(q=k=v)",
        vec![rand(&[1, 3, 5, 4], 7)],
        |t, x| t.scaled_dot_product_attention(&x[0], &x[0], &x[0], true),
    ));
    run_cases("attention", cases);
}

#[test]
fn mha_gradients() {
    let mut cases = Vec::new();
    // (B, T, E, heads, causal): Dh = 4 for E = 12 / 3 heads and E = 4 / 1 head.
    for (b, t, e, heads, causal) in [
        (2, 5, 12, 3, true),
        (1, 7, 12, 3, false),
        (2, 5, 4, 1, false),
        (1, 7, 4, 1, true),
    ] {
        let name = if causal { "mha(causal)" } else { "mha" };
        cases.push(Case::new(
            name,
            mha_inputs(b, t, e, 10, false),
            move |tape, x| mha(tape, x, heads, causal),
        ));
    }
    run_cases("attention", cases);
}

#[test]
fn sdpa_agrees_with_candle_autograd_small() {
    for (b, h, tq, tk, dh, causal) in [
        (2, 3, 7, 7, 4, true),
        (2, 3, 5, 5, 4, false),
        (1, 2, 3, 7, 8, false),
        (1, 2, 3, 7, 8, true),
    ] {
        let inputs = [
            (rand(&[b, h, tq, dh], 1) * 2.0).unwrap(),
            rand(&[b, h, tk, dh], 2),
            rand(&[b, h, tk, dh], 3),
        ];
        let d = compare_with_candle(
            &inputs,
            |t, v| t.scaled_dot_product_attention(&v[0], &v[1], &v[2], causal),
            |v| Ok(candle_sdpa(&v[0], &v[1], &v[2], causal)?),
        )
        .unwrap();
        println!("sdpa vs candle [{b},{h},{tq}/{tk},{dh}] causal={causal}: {d:.1e}");
        assert!(
            d < 1e-4,
            "sdpa vs candle (causal {causal}, Tq {tq}, Tk {tk}): {d}"
        );
    }
}

fn sdpa_forward(q: &Tensor, k: &Tensor, v: &Tensor, causal: bool) -> Tensor {
    let mut t = Tape::default();
    let (q, k, v) = (
        t.constant(q.clone()),
        t.constant(k.clone()),
        t.constant(v.clone()),
    );
    t.scaled_dot_product_attention(&q, &k, &v, causal)
        .unwrap()
        .into_tensor()
}

/// Replaces positions `from..` of dim 2 by other random numbers.
fn perturb_after(x: &Tensor, from: usize, salt: u64) -> Tensor {
    let n = x.dim(2).unwrap();
    let keep = x.narrow(2, 0, from).unwrap();
    let mut dims = x.dims().to_vec();
    dims[2] = n - from;
    let other = random_tensor(&dims, salt)
        .unwrap()
        .to_dtype(x.dtype())
        .unwrap();
    Tensor::cat(&[&keep, &other], 2).unwrap()
}

#[test]
fn causal_outputs_do_not_depend_on_later_positions() {
    for dtype in [DType::F32, DType::F64] {
        // Tq == Tk: outputs 0..=t0 are unchanged, bit for bit, whatever q/k/v hold after t0.
        let (q, k, v) = (
            rand(&[2, 3, 7, 4], 1),
            rand(&[2, 3, 7, 4], 2),
            rand(&[2, 3, 7, 4], 3),
        );
        let (q, k, v) = (
            q.to_dtype(dtype).unwrap(),
            k.to_dtype(dtype).unwrap(),
            v.to_dtype(dtype).unwrap(),
        );
        let base = sdpa_forward(&q, &k, &v, true);
        for t0 in [0, 3, 5] {
            let out = sdpa_forward(
                &perturb_after(&q, t0 + 1, 40),
                &perturb_after(&k, t0 + 1, 41),
                &perturb_after(&v, t0 + 1, 42),
                true,
            );
            let a = base.narrow(2, 0, t0 + 1).unwrap();
            let b = out.narrow(2, 0, t0 + 1).unwrap();
            let diff = (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap();
            assert_eq!(
                diff.to_scalar::<f64>().unwrap(),
                0.0,
                "output <= {t0} changed ({dtype:?})"
            );
            // ... and the later outputs do change (the perturbation is real).
            let later = (base.narrow(2, t0 + 1, 6 - t0).unwrap()
                - out.narrow(2, t0 + 1, 6 - t0).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
            assert!(later.to_scalar::<f64>().unwrap() > 1e-3);
        }
        // Tk > Tq: query i sees keys j <= i + 4; changing key/value 6 leaves queries 0 and 1.
        let q3 = q.narrow(2, 0, 3).unwrap();
        let base = sdpa_forward(&q3, &k, &v, true);
        let out = sdpa_forward(
            &q3,
            &perturb_after(&k, 6, 43),
            &perturb_after(&v, 6, 44),
            true,
        );
        let d01 = (base.narrow(2, 0, 2).unwrap() - out.narrow(2, 0, 2).unwrap()).unwrap();
        let d01 = d01
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        assert_eq!(d01.to_scalar::<f64>().unwrap(), 0.0);
        let d2 = (base.narrow(2, 2, 1).unwrap() - out.narrow(2, 2, 1).unwrap()).unwrap();
        let d2 = d2
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        assert!(d2.to_scalar::<f64>().unwrap() > 1e-3);
    }
}

#[test]
fn causal_gradients_do_not_reach_later_positions() {
    // loss = Σ w ⊙ out[.., ..=t0, ..]: the gradients of k, v (and q) after t0 are exactly 0,
    // with no NaN anywhere although the masked scores were -inf.
    let t0 = 2;
    let mut store = ParamStore::new();
    let ids: Vec<_> = (0..3)
        .map(|i| {
            store
                .add(
                    format!("x{i}"),
                    rand(&[2, 3, 7, 4], i + 1).to_dtype(DType::F32).unwrap(),
                )
                .unwrap()
        })
        .collect();
    let mut tape = Tape::default();
    let x: Vec<Value> = ids.iter().map(|&id| tape.param(&store, id)).collect();
    let out = tape
        .scaled_dot_product_attention(&x[0], &x[1], &x[2], true)
        .unwrap();
    let head = tape.narrow(&out, 2, 0, t0 + 1).unwrap();
    let w = tape.constant(rand(&[2, 3, t0 + 1, 4], 9).to_dtype(DType::F32).unwrap());
    let prod = tape.mul(&head, &w).unwrap();
    let loss = tape.sum_all(&prod).unwrap();
    tape.backward(&loss, &mut store).unwrap();
    for &id in &ids {
        let g = store.grad(id).unwrap().to_dtype(DType::F64).unwrap();
        let all: Vec<f64> = g.flatten_all().unwrap().to_vec1().unwrap();
        assert!(all.iter().all(|x| x.is_finite()), "NaN/inf in a gradient");
        let later = g
            .narrow(2, t0 + 1, 7 - t0 - 1)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert_eq!(
            later.to_scalar::<f64>().unwrap(),
            0.0,
            "gradient leaked to a later position"
        );
        let earlier = g
            .narrow(2, 0, t0 + 1)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert!(earlier.to_scalar::<f64>().unwrap() > 0.0);
    }
}

/// Runs sdpa with the given inputs tracked and returns (op, shape, shared) of every context
/// record.
fn sdpa_context(
    dims: [usize; 4],
    tk: usize,
    causal: bool,
    tracked: [bool; 3],
) -> Vec<(String, Vec<usize>, bool)> {
    let [b, h, tq, dh] = dims;
    let mut store = ParamStore::new();
    let mut tape = Tape::default();
    let mut vals = Vec::new();
    for (i, shape) in [[b, h, tq, dh], [b, h, tk, dh], [b, h, tk, dh]]
        .iter()
        .enumerate()
    {
        let t = rand(shape, i as u64).to_dtype(DType::F32).unwrap();
        vals.push(if tracked[i] {
            let id = store.add(format!("x{i}"), t).unwrap();
            let p = tape.param(&store, id);
            // A tracked non-parameter value (parameters are saved by reference).
            tape.scale(&p, 1.0).unwrap()
        } else {
            tape.constant(t)
        });
    }
    tape.scaled_dot_product_attention(&vals[0], &vals[1], &vals[2], causal)
        .unwrap();
    tape.context_log()
        .iter()
        .map(|r| (r.op.to_string(), r.shape.clone(), r.shared))
        .collect()
}

#[test]
fn sdpa_keeps_exactly_q_k_v_and_p() {
    let (b, h, tq, tk, dh) = (2, 3, 5, 7, 4);
    for causal in [false, true] {
        let log = sdpa_context([b, h, tq, dh], tk, causal, [true, true, true]);
        let expect = vec![
            ("sdpa".to_string(), vec![b, h, tq, dh], false),
            ("sdpa".to_string(), vec![b, h, tk, dh], false),
            ("sdpa".to_string(), vec![b, h, tk, dh], false),
            ("sdpa".to_string(), vec![b, h, tq, tk], false),
        ];
        assert_eq!(log, expect, "context of sdpa (causal {causal})");
        let score_sized = log
            .iter()
            .filter(|(_, s, _)| s.iter().product::<usize>() == b * h * tq * tk)
            .count();
        assert_eq!(
            score_sized, 1,
            "only P may have the size of the score matrix"
        );
    }
    // Only what the wanted gradients need: v alone → P; q alone → k, v, P; k alone → q, v, P.
    let shapes = |tr| -> Vec<Vec<usize>> {
        sdpa_context([b, h, tq, dh], tk, true, tr)
            .into_iter()
            .map(|r| r.1)
            .collect()
    };
    assert_eq!(shapes([false, false, true]), vec![vec![b, h, tq, tk]]);
    assert_eq!(
        shapes([true, false, false]),
        vec![vec![b, h, tk, dh], vec![b, h, tk, dh], vec![b, h, tq, tk]]
    );
    assert_eq!(
        shapes([false, true, false]),
        vec![vec![b, h, tq, dh], vec![b, h, tk, dh], vec![b, h, tq, tk]]
    );
    assert!(shapes([false, false, false]).is_empty());

    // q = k = v: stored once, the two other saves are marked shared.
    let mut store = ParamStore::new();
    let mut tape = Tape::default();
    let id = store
        .add("x", rand(&[b, h, tk, dh], 1).to_dtype(DType::F32).unwrap())
        .unwrap();
    let p = tape.param(&store, id);
    let x = tape.scale(&p, 1.0).unwrap();
    tape.scaled_dot_product_attention(&x, &x, &x, true).unwrap();
    let shared: Vec<bool> = tape.context_log().iter().map(|r| r.shared).collect();
    assert_eq!(shared, vec![false, true, true, false]);
}

#[test]
fn mha_context_has_one_score_sized_tensor() {
    let (b, t, e, heads) = (2, 7, 12, 3);
    let mut store = ParamStore::new();
    let mut tape = Tape::default();
    let mut x: Vec<Value> = mha_inputs(b, t, e, 30, true)
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            let id = store
                .add(format!("p{i}"), v.to_dtype(DType::F32).unwrap())
                .unwrap();
            tape.param(&store, id)
        })
        .collect();
    // The input is an activation (a tracked non-parameter), as inside a network.
    x[0] = tape.scale(&x[0], 1.0).unwrap();
    let y = mha(&mut tape, &x, heads, true).unwrap();
    assert_eq!(y.dims(), &[b, t, e]);
    let log = tape.context_log();
    for r in log {
        println!(
            "  {:<8} {:<6} {:?}{}",
            r.op,
            r.repr,
            r.shape,
            if r.shared { " (shared)" } else { "" }
        );
    }
    let score_sized: Vec<_> = log
        .iter()
        .filter(|r| r.shape.iter().product::<usize>() == b * heads * t * t)
        .collect();
    assert_eq!(score_sized.len(), 1);
    assert_eq!(score_sized[0].shape, vec![b, heads, t, t]);
    // Activation bytes: x (once), q, k, v, P, merged heads; everything else is shared or a param.
    let stored: Vec<Vec<usize>> = log
        .iter()
        .filter(|r| r.stored_bytes > 0)
        .map(|r| r.shape.clone())
        .collect();
    assert_eq!(
        stored,
        vec![
            vec![b, t, e],
            vec![b, heads, t, e / heads],
            vec![b, heads, t, e / heads],
            vec![b, heads, t, e / heads],
            vec![b, heads, t, t],
            vec![b, t, e]
        ]
    );
}

#[test]
fn eval_mode_records_nothing_and_gives_the_same_output() {
    let inputs: Vec<Tensor> = mha_inputs(2, 5, 12, 40, true)
        .into_iter()
        .map(|t| t.to_dtype(DType::F32).unwrap())
        .collect();
    let run = |train: bool| {
        let mut store = ParamStore::new();
        let mut tape = Tape::default();
        if !train {
            tape.eval_mode();
        }
        let x: Vec<Value> = inputs
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let id = store.add(format!("p{i}"), v.clone()).unwrap();
                tape.param(&store, id)
            })
            .collect();
        let y = mha(&mut tape, &x, 3, true).unwrap();
        (y.into_tensor(), tape.len(), tape.context_log().len())
    };
    let (y_train, nodes, saved) = run(true);
    let (y_eval, nodes_eval, saved_eval) = run(false);
    assert!(nodes > 0 && saved > 0);
    assert_eq!((nodes_eval, saved_eval), (0, 0));
    assert_eq!(max_rel_diff(&y_train, &y_eval).unwrap(), 0.0);
}

#[test]
fn attention_errors_name_the_op_and_shapes() {
    let mut t = Tape::default();
    let mut c = |dims: &[usize]| t.constant(Tensor::zeros(dims, DType::F32, &Device::Cpu).unwrap());
    let (q, k, v) = (c(&[2, 3, 5, 4]), c(&[2, 3, 7, 4]), c(&[2, 3, 7, 4]));
    let (bad_rank, bad_dh, bad_tv, bad_h) = (
        c(&[3, 5, 4]),
        c(&[2, 3, 7, 5]),
        c(&[2, 3, 6, 4]),
        c(&[2, 2, 7, 4]),
    );
    let x10 = c(&[2, 5, 10]);
    let w10 = c(&[10, 10]);
    let w12 = c(&[12, 10]);
    let mut t = Tape::default();
    let err = |r: Result<Value>| format!("{:#}", r.expect_err("expected an error"));
    let e = err(t.scaled_dot_product_attention(&bad_rank, &k, &v, false));
    assert!(e.contains("sdpa") && e.contains("[3, 5, 4]"), "{e}");
    let e = err(t.scaled_dot_product_attention(&q, &bad_dh, &v, false));
    assert!(e.contains("sdpa") && e.contains("[2, 3, 7, 5]"), "{e}");
    let e = err(t.scaled_dot_product_attention(&q, &k, &bad_tv, false));
    assert!(e.contains("sdpa") && e.contains("[2, 3, 6, 4]"), "{e}");
    let e = err(t.scaled_dot_product_attention(&q, &bad_h, &v, false));
    assert!(e.contains("sdpa") && e.contains("[2, 2, 7, 4]"), "{e}");
    // Causal with fewer keys than queries: some query would see nothing.
    let e = err(t.scaled_dot_product_attention(&k, &q, &q, true));
    assert!(e.contains("sdpa") && e.contains("Tk >= Tq"), "{e}");
    // E = 10 with 3 heads.
    let m = MultiHeadAttention::new(&w10, &w10, &w10, &w10, 3);
    let e = err(t.multi_head_attention(&x10, &m));
    assert!(
        e.contains("multi_head_attention") && e.contains("10") && e.contains("heads 3"),
        "{e}"
    );
    let m = MultiHeadAttention::new(&w10, &w12, &w10, &w10, 2);
    let e = err(t.multi_head_attention(&x10, &m));
    assert!(e.contains("wk") && e.contains("[12, 10]"), "{e}");
    let m = MultiHeadAttention::new(&w10, &w10, &w10, &w10, 2);
    let e = err(t.multi_head_attention(&q, &m));
    assert!(
        e.contains("multi_head_attention") && e.contains("[2, 3, 5, 4]"),
        "{e}"
    );
}

// ---------------------------------------------------------------- sparse

/// A random sparse matrix with about `density` of its entries set, row `skip_row` empty,
/// plus its dense copy built independently of `CsrMatrix`.
fn random_csr(
    rows: usize,
    cols: usize,
    density: f64,
    skip_row: usize,
    salt: u64,
) -> (CsrMatrix, Tensor) {
    let pick: Vec<f64> = rand(&[rows, cols], salt)
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let vals: Vec<f64> = rand(&[rows, cols], salt + 1)
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let (mut row_ptr, mut col, mut val, mut dense) =
        (vec![0], vec![], vec![], vec![0f64; rows * cols]);
    for r in 0..rows {
        for c in 0..cols {
            let n = r * cols + c;
            if r != skip_row && (pick[n] + 1.0) / 2.0 < density {
                col.push(c as u32);
                val.push(vals[n] as f32);
                dense[n] = vals[n] as f32 as f64;
            }
        }
        row_ptr.push(col.len());
    }
    let a = CsrMatrix::new(rows, cols, row_ptr, col, val).unwrap();
    (
        a,
        Tensor::from_vec(dense, (rows, cols), &Device::Cpu).unwrap(),
    )
}

#[test]
fn spmm_matches_a_dense_matmul() {
    for (rows, cols, f, density) in [
        (7, 5, 3, 0.4),
        (5, 7, 1, 0.3),
        (33, 17, 9, 0.2),
        (3000, 200, 5, 0.01),
    ] {
        let (a, dense) = random_csr(rows, cols, density, 1, 3);
        let a = Arc::new(a);
        for dtype in [DType::F64, DType::F32] {
            let x = rand(&[cols, f], 4).to_dtype(dtype).unwrap();
            let mut t = Tape::default();
            let xv = t.constant(x.clone());
            let y = t.spmm(&a, &xv).unwrap();
            assert_eq!(y.dtype(), dtype);
            let reference = dense.to_dtype(dtype).unwrap().matmul(&x).unwrap();
            // f64 agrees to rounding elementwise; f32 sums near zero are compared relative to
            // the largest output.
            let d = if dtype == DType::F64 {
                max_rel_diff(y.tensor(), &reference).unwrap()
            } else {
                scaled_abs_diff(y.tensor(), &reference)
            };
            assert!(
                d < if dtype == DType::F64 { 1e-12 } else { 1e-6 },
                "spmm {rows}x{cols}x{f} {dtype:?}: {d}"
            );
        }
        // The transpose is the transpose, and transposing twice gives the matrix back.
        let at = a.transpose();
        assert_eq!(
            max_rel_diff(
                &at.to_dense().unwrap(),
                &dense.t().unwrap().to_dtype(DType::F32).unwrap()
            )
            .unwrap(),
            0.0
        );
        assert_eq!(at.transpose(), *a);
    }
    // F = 0 and a matrix with no entries.
    let mut t = Tape::default();
    let a = Arc::new(CsrMatrix::new(3, 2, vec![0, 0, 0, 0], vec![], vec![]).unwrap());
    let x = t.constant(rand(&[2, 4], 1));
    assert_eq!(
        t.spmm(&a, &x)
            .unwrap()
            .tensor()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap(),
        0.0
    );
    let x0 = t.constant(Tensor::zeros((2, 0), DType::F32, &Device::Cpu).unwrap());
    assert_eq!(t.spmm(&a, &x0).unwrap().dims(), &[3, 0]);
}

#[test]
fn spmm_gradients() {
    let mut cases = Vec::new();
    for (rows, cols, f, density) in [
        (7, 5, 3, 0.4),
        (5, 7, 1, 0.5),
        (1, 3, 5, 0.9),
        (9, 9, 4, 0.3),
    ] {
        let (a, _) = random_csr(rows, cols, density, 2 % rows, 5);
        let a = Arc::new(a);
        cases.push(Case::new("spmm", vec![rand(&[cols, f], 6)], move |t, x| {
            t.spmm(&a, &x[0])
        }));
    }
    // Twice with the same (symmetric, normalised) graph, with a linear layer between: a GCN.
    let g = Arc::new(
        CsrMatrix::from_edges(
            7,
            &[(0, 1), (1, 2), (2, 3), (4, 5), (5, 6), (6, 4), (3, 3)],
            true,
        )
        .unwrap(),
    );
    cases.push(Case::new(
        "gcn(spmm x2)",
        vec![rand(&[7, 5], 7), rand(&[3, 5], 8)],
        move |t, x| {
            let h = t.spmm(&g, &x[0])?;
            let h = t.linear(&h, &x[1], None)?;
            t.spmm(&g, &h)
        },
    ));
    run_cases("sparse", cases);
    // And against candle's autograd through a dense matmul.
    let (a, dense) = random_csr(9, 7, 0.4, 3, 11);
    let a = Arc::new(a);
    let dense = dense.to_dtype(DType::F32).unwrap();
    let d = compare_with_candle(
        &[rand(&[7, 5], 12)],
        |t, v| t.spmm(&a, &v[0]),
        |v| Ok(dense.matmul(&v[0])?),
    )
    .unwrap();
    println!("spmm vs candle dense matmul: {d:.1e}");
    assert!(d < 1e-5, "spmm vs candle: {d}");
}

#[test]
fn spmm_context_is_the_graph_only_and_the_transpose_is_cached() {
    let (a, _) = random_csr(7, 5, 0.4, 1, 3);
    let nnz = a.nnz();
    let a = Arc::new(a);
    let mut store = ParamStore::new();
    let id = store
        .add("x", rand(&[5, 3], 1).to_dtype(DType::F32).unwrap())
        .unwrap();
    let mut tape = Tape::default();
    let x = tape.param(&store, id);
    let y = tape.spmm(&a, &x).unwrap();
    let log = tape.context_log();
    assert_eq!(log.len(), 1);
    assert_eq!(
        (
            log[0].op,
            log[0].repr.as_str(),
            log[0].shape.clone(),
            log[0].stored_bytes
        ),
        ("spmm", "graph", vec![nnz], 0)
    );
    // The transpose was built once and is shared by every later call.
    let t1 = CsrMatrix::transposed(&a);
    let t2 = CsrMatrix::transposed(&a);
    assert!(Arc::ptr_eq(&t1, &t2));
    assert_eq!(*t1, a.transpose());
    // A graph from `from_edges` is symmetric: its own transpose, no copy.
    let g = Arc::new(CsrMatrix::from_edges(4, &[(0, 1), (2, 1)], true).unwrap());
    assert!(g.is_symmetric() && Arc::ptr_eq(&CsrMatrix::transposed(&g), &g));
    assert_eq!(g.transpose(), *g);
    let w = tape.constant(rand(&[7, 3], 2).to_dtype(DType::F32).unwrap());
    let p = tape.mul(&y, &w).unwrap();
    let loss = tape.sum_all(&p).unwrap();
    tape.backward(&loss, &mut store).unwrap();
    assert_eq!(store.grad(id).unwrap().dims(), &[5, 3]);
}

#[test]
fn gcn_normalisation_of_a_known_graph() {
    // Path 0 - 1 - 2 plus an isolated node 3, the edge 1-0 listed twice (once reversed) and
    // a listed self loop on 2. With self loops, degrees are [2, 3, 2, 1].
    let a = CsrMatrix::from_edges(4, &[(0, 1), (1, 0), (1, 2), (2, 2)], true).unwrap();
    assert_eq!(a.row_ptr, vec![0, 2, 5, 7, 8]);
    assert_eq!(a.col, vec![0, 1, 0, 1, 2, 1, 2, 3]);
    let s = |x: f64, y: f64| 1.0 / (x * y).sqrt();
    let expect_rows = [
        s(2., 2.) + s(2., 3.),
        s(3., 2.) + s(3., 3.) + s(3., 2.),
        s(2., 3.) + s(2., 2.),
        1.0,
    ];
    let rows = a
        .to_dense()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .sum(1)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    for (r, (&got, &want)) in rows.iter().zip(&expect_rows).enumerate() {
        assert!((got - want).abs() < 1e-6, "row {r}: {got} vs {want}");
    }
    // Â sqrt(d) = sqrt(d): the defining property of the symmetric normalisation.
    let sqrt_d = Tensor::new(
        &[[2f32.sqrt()], [3f32.sqrt()], [2f32.sqrt()], [1.0]],
        &Device::Cpu,
    )
    .unwrap();
    let mut t = Tape::default();
    let x = t.constant(sqrt_d.clone());
    let y = t.spmm(&Arc::new(a), &x).unwrap();
    assert!(max_rel_diff(y.tensor(), &sqrt_d).unwrap() < 1e-6);
    // Without normalisation: the plain symmetric 0/1 adjacency, self loops only where listed.
    let a = CsrMatrix::from_edges(4, &[(0, 1), (1, 0), (1, 2), (2, 2)], false).unwrap();
    let dense: Vec<Vec<f32>> = a.to_dense().unwrap().to_vec2().unwrap();
    assert_eq!(
        dense,
        vec![
            vec![0., 1., 0., 0.],
            vec![1., 0., 1., 0.],
            vec![0., 1., 1., 0.],
            vec![0.; 4]
        ]
    );
}

#[test]
fn sparse_errors_name_what_is_wrong() {
    let err = |r: Result<CsrMatrix>| format!("{:#}", r.expect_err("expected an error"));
    let e = err(CsrMatrix::new(2, 3, vec![0, 1], vec![0], vec![1.0]));
    assert!(
        e.contains("row_ptr has 2 entries") && e.contains("3"),
        "{e}"
    );
    let e = err(CsrMatrix::new(
        2,
        3,
        vec![0, 2, 1],
        vec![0, 1],
        vec![1.0, 1.0],
    ));
    assert!(e.contains("decreases at row 1"), "{e}");
    let e = err(CsrMatrix::new(
        2,
        3,
        vec![1, 1, 2],
        vec![0, 1],
        vec![1.0, 1.0],
    ));
    assert!(e.contains("start at 0"), "{e}");
    let e = err(CsrMatrix::new(
        2,
        3,
        vec![0, 1, 3],
        vec![0, 1],
        vec![1.0, 1.0],
    ));
    assert!(e.contains("ends at 3") && e.contains("2 column"), "{e}");
    let e = err(CsrMatrix::new(
        2,
        3,
        vec![0, 1, 2],
        vec![0, 3],
        vec![1.0, 1.0],
    ));
    assert!(e.contains("column 3 in row 1") && e.contains("2x3"), "{e}");
    let e = err(CsrMatrix::new(2, 3, vec![0, 1, 2], vec![0, 1], vec![1.0]));
    assert!(e.contains("1 values for 2 column"), "{e}");
    let e = err(CsrMatrix::from_edges(3, &[(0, 1), (1, 3)], true));
    assert!(e.contains("(1, 3)") && e.contains("0..3"), "{e}");

    let a = Arc::new(CsrMatrix::new(2, 3, vec![0, 1, 2], vec![0, 2], vec![1.0, 2.0]).unwrap());
    let mut t = Tape::default();
    for dims in [vec![2, 4], vec![3], vec![1, 3, 4]] {
        let x = t.constant(Tensor::zeros(dims.clone(), DType::F32, &Device::Cpu).unwrap());
        let e = format!("{:#}", t.spmm(&a, &x).expect_err("expected an error"));
        assert!(
            e.contains("spmm") && e.contains("2x3") && e.contains(&format!("{dims:?}")),
            "{e}"
        );
    }
}

/// `(max |a - b|, max |b|)` in f64.
fn abs_diff_and_scale(a: &Tensor, b: &Tensor) -> (f64, f64) {
    let f = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
    let max = |t: Tensor| {
        t.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    (max((f(a) - f(b)).unwrap()), max(f(b)))
}

/// Worst `|a - b|` of one tensor over the largest `|b|` (the f32 error measure for long sums,
/// where single elements near zero make an elementwise relative error meaningless).
fn scaled_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    let (d, m) = abs_diff_and_scale(a, b);
    d / m.max(1e-30)
}

/// Forward + backward through the tape and through candle's autograd in `dtype`, with the
/// same loss weights; returns the worst absolute difference relative to the largest entry, for the output and
/// over all input gradients together.
/// (`compare_with_candle` works in f32 with an elementwise relative error, which f32
/// rounding of long sums defeats on entries near zero; here f64 must agree to rounding and
/// f32 to ~1e-6 of the largest entry.)
fn candle_diff(
    inputs: &[Tensor],
    dtype: DType,
    tape_build: impl Fn(&mut Tape, &[Value]) -> Result<Value>,
    candle_build: impl Fn(&[Tensor]) -> candle_core::Result<Tensor>,
) -> f64 {
    let inputs: Vec<Tensor> = inputs.iter().map(|t| t.to_dtype(dtype).unwrap()).collect();
    let mut store = ParamStore::new();
    let ids: Vec<_> = inputs
        .iter()
        .enumerate()
        .map(|(i, t)| store.add(format!("p{i}"), t.clone()).unwrap())
        .collect();
    let mut tape = Tape::default();
    let v: Vec<Value> = ids.iter().map(|&id| tape.param(&store, id)).collect();
    let out = tape_build(&mut tape, &v).unwrap();
    let w = random_tensor(out.dims(), 99)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    let wv = tape.constant(w.clone());
    let p = tape.mul(&out, &wv).unwrap();
    let l = tape.sum_all(&p).unwrap();
    tape.backward(&l, &mut store).unwrap();

    let vars: Vec<candle_core::Var> = inputs
        .iter()
        .map(|t| candle_core::Var::from_tensor(t).unwrap())
        .collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let co = candle_build(&ts).unwrap();
    let grads = (&co * &w).unwrap().sum_all().unwrap().backward().unwrap();
    // Each gradient is measured against the largest gradient entry of all inputs: some
    // gradients are 0 in exact arithmetic (the key bias: softmax ignores the per-row constant
    // `q · bk`) and both sides give rounding noise there.
    let out_err = scaled_abs_diff(out.tensor(), &co);
    let diffs: Vec<(f64, f64)> = ids
        .iter()
        .zip(&vars)
        .map(|(id, var)| {
            abs_diff_and_scale(
                store.grad(*id).unwrap(),
                grads.get(var.as_tensor()).unwrap(),
            )
        })
        .collect();
    let scale = diffs.iter().map(|d| d.1).fold(1e-30, f64::max);
    diffs.iter().map(|d| d.0 / scale).fold(out_err, f64::max)
}

#[test]
fn sdpa_and_mha_agree_with_candle_in_f64_and_f32() {
    let (b, h, tq, tk, dh) = (2, 4, 33, 33, 16);
    let inputs = [
        (rand(&[b, h, tq, dh], 1) * 2.0).unwrap(),
        rand(&[b, h, tk, dh], 2),
        rand(&[b, h, tk, dh], 3),
    ];
    for causal in [true, false] {
        for dt in [DType::F64, DType::F32] {
            let d = candle_diff(
                &inputs,
                dt,
                |t, v| t.scaled_dot_product_attention(&v[0], &v[1], &v[2], causal),
                |v| candle_sdpa(&v[0], &v[1], &v[2], causal),
            );
            println!("sdpa vs candle [{b},{h},{tq}/{tk},{dh}] causal={causal} {dt:?}: max|diff|/max|ref| {d:.1e}");
            assert!(
                d < if dt == DType::F64 { 1e-12 } else { 1e-5 },
                "sdpa causal {causal} {dt:?}: {d:.3e}"
            );
        }
    }
    for (heads, causal) in [(3, true), (1, false), (4, true)] {
        for dt in [DType::F64, DType::F32] {
            let d = candle_diff(
                &mha_inputs(2, 7, 12, 20, true),
                dt,
                |t, v| mha(t, v, heads, causal),
                |v| candle_mha(v, heads, causal),
            );
            println!("mha vs candle [2,7,12] heads={heads} causal={causal} {dt:?}: max|diff|/max|ref| {d:.1e}");
            assert!(
                d < if dt == DType::F64 { 1e-12 } else { 1e-5 },
                "mha heads {heads} causal {causal} {dt:?}: {d:.3e}"
            );
        }
    }
}

/// Timing against candle's own autograd (ignored by default; run with
/// `cargo test --release --test ops_attention -- --ignored --nocapture`).
#[test]
#[ignore]
fn sdpa_speed_vs_candle() {
    use std::time::Instant;
    for (b, h, t, dh) in [(8, 8, 128, 64), (4, 4, 512, 32), (32, 4, 64, 16)] {
        let inputs: Vec<Tensor> = (0..3)
            .map(|i| rand(&[b, h, t, dh], i).to_dtype(DType::F32).unwrap())
            .collect();
        let w = rand(&[b, h, t, dh], 9).to_dtype(DType::F32).unwrap();
        let reps = 10;
        let mut ours = f64::MAX;
        let mut theirs = f64::MAX;
        for _ in 0..reps {
            let start = Instant::now();
            let mut store = ParamStore::new();
            let ids: Vec<_> = inputs
                .iter()
                .enumerate()
                .map(|(i, x)| store.add(format!("p{i}"), x.clone()).unwrap())
                .collect();
            let mut tape = Tape::default();
            let v: Vec<Value> = ids.iter().map(|&id| tape.param(&store, id)).collect();
            let o = tape
                .scaled_dot_product_attention(&v[0], &v[1], &v[2], true)
                .unwrap();
            let wv = tape.constant(w.clone());
            let p = tape.mul(&o, &wv).unwrap();
            let l = tape.sum_all(&p).unwrap();
            tape.backward(&l, &mut store).unwrap();
            ours = ours.min(start.elapsed().as_secs_f64());

            let start = Instant::now();
            let vars: Vec<candle_core::Var> = inputs
                .iter()
                .map(|x| candle_core::Var::from_tensor(x).unwrap())
                .collect();
            let o = candle_sdpa(
                vars[0].as_tensor(),
                vars[1].as_tensor(),
                vars[2].as_tensor(),
                true,
            )
            .unwrap();
            let g = (&o * &w).unwrap().sum_all().unwrap().backward().unwrap();
            assert!(g.get(vars[0].as_tensor()).is_some());
            theirs = theirs.min(start.elapsed().as_secs_f64());
        }
        println!(
            "sdpa fwd+bwd [{b},{h},{t},{dh}] causal f32: ours {:.2} ms, candle autograd {:.2} ms",
            ours * 1e3,
            theirs * 1e3
        );
    }
}

#[test]
fn mha_key_bias_gets_no_gradient() {
    let inputs = mha_inputs(2, 5, 12, 50, true);
    let mut store = ParamStore::new();
    let ids: Vec<_> = inputs
        .iter()
        .enumerate()
        .map(|(i, x)| store.add(format!("p{i}"), x.clone()).unwrap())
        .collect();
    let mut tape = Tape::default();
    let x: Vec<Value> = ids.iter().map(|&id| tape.param(&store, id)).collect();
    let y = mha(&mut tape, &x, 3, true).unwrap();
    let w = tape.constant(rand(y.dims(), 51));
    let p = tape.mul(&y, &w).unwrap();
    let loss = tape.sum_all(&p).unwrap();
    tape.backward(&loss, &mut store).unwrap();
    let max = |id| -> f64 {
        let g: &Tensor = store.grad(id).unwrap();
        g.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    assert!(max(ids[8]) < 1e-12, "bk gradient {}", max(ids[8]));
    assert!(max(ids[5]) > 1e-3, "bq gradient should not vanish");
}
