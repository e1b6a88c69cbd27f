//! Gradient checks for elementwise, reduction, shape and matmul/linear ops, plus the proof
//! that a check can fail.

mod common;
use actrain::tape::gradcheck::{check_grads, CheckOptions};
use actrain::tape::{SaveAs, Tape, Value};
use common::{compare_with_candle, rand, run_cases, Case};

#[test]
fn elementwise_and_reductions() {
    let mut cases = Vec::new();
    for (a, b) in [
        (vec![3, 5], vec![3, 5]),
        (vec![2, 3, 7], vec![7]),
        (vec![4, 1, 5], vec![1, 3, 1]),
        (vec![1], vec![3, 3]),
    ] {
        cases.push(Case::new("add", vec![rand(&a, 1), rand(&b, 2)], |t, x| {
            t.add(&x[0], &x[1])
        }));
        cases.push(Case::new("sub", vec![rand(&a, 3), rand(&b, 4)], |t, x| {
            t.sub(&x[0], &x[1])
        }));
        cases.push(Case::new("mul", vec![rand(&a, 5), rand(&b, 6)], |t, x| {
            t.mul(&x[0], &x[1])
        }));
        // Keep the divisor away from zero: 1.5 + x in [0.5, 2.5).
        let d = (rand(&b, 8) + 1.5).unwrap();
        cases.push(Case::new("div", vec![rand(&a, 7), d], |t, x| {
            t.div(&x[0], &x[1])
        }));
    }
    for dims in [vec![5], vec![3, 4, 5], vec![2, 1, 9]] {
        cases.push(Case::new("affine", vec![rand(&dims, 9)], |t, x| {
            t.affine(&x[0], -1.7, 0.3)
        }));
        let pos = (rand(&dims, 10) + 2.0).unwrap();
        cases.push(Case::new("powf", vec![pos.clone()], |t, x| {
            t.powf(&x[0], 2.5)
        }));
        cases.push(Case::new("log", vec![pos], |t, x| t.log(&x[0])));
        cases.push(Case::new("exp", vec![rand(&dims, 11)], |t, x| t.exp(&x[0])));
        cases.push(Case::new("sum_all", vec![rand(&dims, 12)], |t, x| {
            t.sum_all(&x[0])
        }));
        cases.push(Case::new("mean_all", vec![rand(&dims, 13)], |t, x| {
            t.mean_all(&x[0])
        }));
    }
    cases.push(Case::new(
        "sum(dim1,keep)",
        vec![rand(&[3, 4, 5], 14)],
        |t, x| t.sum(&x[0], &[1], true),
    ));
    cases.push(Case::new(
        "mean(0,2)",
        vec![rand(&[3, 4, 5], 15)],
        |t, x| t.mean(&x[0], &[0, 2], false),
    ));
    run_cases("elementwise", cases);
}

#[test]
fn shape_ops() {
    let cases = vec![
        Case::new("reshape", vec![rand(&[3, 4, 5], 1)], |t, x| {
            t.reshape(&x[0], &[12, 5])
        }),
        Case::new("flatten", vec![rand(&[2, 3, 4, 5], 2)], |t, x| {
            t.flatten(&x[0], 1)
        }),
        Case::new("transpose", vec![rand(&[3, 4, 5], 3)], |t, x| {
            t.transpose(&x[0], 0, 2)
        }),
        Case::new("permute", vec![rand(&[2, 3, 4, 5], 4)], |t, x| {
            t.permute(&x[0], &[2, 0, 3, 1])
        }),
        Case::new(
            "concat",
            vec![rand(&[2, 3, 4], 5), rand(&[2, 5, 4], 6)],
            |t, x| t.concat(&[&x[0], &x[1]], 1),
        ),
        Case::new("narrow", vec![rand(&[4, 7, 3], 7)], |t, x| {
            t.narrow(&x[0], 1, 2, 3)
        }),
        Case::new("split", vec![rand(&[3, 9], 8)], |t, x| {
            let parts = t.split(&x[0], 1, &[2, 3, 4])?;
            // Weight the pieces differently so a gradient routed to the wrong piece shows.
            let b = t.scale(&parts[1], 3.0)?;
            let c = t.scale(&parts[2], -2.0)?;
            let ab = t.concat(&[&c, &parts[0], &b], 1)?;
            Ok(ab)
        }),
    ];
    let mut cases = cases;
    let idx = candle_core::Tensor::new(&[2u32, 0, 2, 4], &candle_core::Device::Cpu).unwrap();
    cases.push(Case::new(
        "select_rows",
        vec![rand(&[5, 3], 9)],
        move |t, x| t.select_rows(&x[0], &idx),
    ));
    run_cases("shape", cases);
}

#[test]
fn matmul_and_linear() {
    let mut cases = Vec::new();
    for (a, b) in [
        (vec![3, 4], vec![4, 5]),
        (vec![2, 3, 4], vec![2, 4, 5]),
        (vec![2, 3, 4], vec![4, 5]),
        (vec![2, 1, 3, 7], vec![1, 3, 7, 2]),
    ] {
        cases.push(Case::new(
            "matmul",
            vec![rand(&a, 1), rand(&b, 2)],
            |t, x| t.matmul(&x[0], &x[1]),
        ));
    }
    for x in [vec![5, 7], vec![2, 3, 7], vec![1, 7]] {
        cases.push(Case::new(
            "linear",
            vec![rand(&x, 3), rand(&[4, 7], 4), rand(&[4], 5)],
            |t, x| t.linear(&x[0], &x[1], Some(&x[2])),
        ));
        cases.push(Case::new(
            "linear(no bias)",
            vec![rand(&x, 6), rand(&[3, 7], 7)],
            |t, x| t.linear(&x[0], &x[1], None),
        ));
    }
    run_cases("linear", cases);
}

#[test]
fn agrees_with_candle_autograd() {
    let x = rand(&[6, 7], 1);
    let w = rand(&[5, 7], 2);
    let b = rand(&[5], 3);
    let d = compare_with_candle(
        &[x.clone(), w.clone(), b.clone()],
        |t, v| t.linear(&v[0], &v[1], Some(&v[2])),
        |v| Ok(v[0].matmul(&v[1].t()?)?.broadcast_add(&v[2])?),
    )
    .unwrap();
    assert!(d < 1e-4, "linear vs candle: {d}");
    let d = compare_with_candle(
        &[rand(&[2, 3, 4], 4), rand(&[2, 4, 5], 5)],
        |t, v| t.matmul(&v[0], &v[1]),
        |v| Ok(v[0].matmul(&v[1])?),
    )
    .unwrap();
    assert!(d < 1e-4, "matmul vs candle: {d}");
    let d = compare_with_candle(
        &[rand(&[4, 1, 5], 6), rand(&[1, 3, 1], 7)],
        |t, v| {
            let p = t.mul(&v[0], &v[1])?;
            let q = t.div(&p, &v[0])?; // = v1 broadcast, exercises div's both-sided rule
            t.add(&p, &q)
        },
        |v| {
            let p = v[0].broadcast_mul(&v[1])?;
            let q = p.broadcast_div(&v[0])?;
            Ok((p + q)?)
        },
    )
    .unwrap();
    assert!(d < 1e-3, "mul/div/add vs candle: {d}");
}

/// A ReLU-like op whose backward is deliberately wrong (doubles the gradient): the check
/// must report a large error. This is what makes every passing check mean something.
#[test]
fn a_broken_backward_rule_is_caught() {
    fn broken(t: &mut Tape, x: &Value) -> anyhow::Result<Value> {
        let y = x.tensor().relu()?;
        let m = t.save("broken_relu", x, SaveAs::SignMask)?;
        t.record("broken_relu", &[x], y, move |g, _| {
            Ok(vec![Some((g.mul(&m.load()?)? * 2.0)?)])
        })
    }
    let r = check_grads(
        &[rand(&[4, 5], 1)],
        |t, x| broken(t, &x[0]),
        CheckOptions::default(),
    )
    .unwrap();
    assert!(
        r.worst_rel_err > 0.1,
        "a wrong gradient went unnoticed: {:?}",
        r
    );

    // And a backward that routes the gradient to the wrong input of a two-input op.
    let r = check_grads(
        &[rand(&[3, 3], 2), rand(&[3, 3], 3)],
        |t, x| {
            let y = x[0].tensor().mul(x[1].tensor())?;
            let a = t.save("swapped_mul", &x[0], SaveAs::Activation)?;
            let b = t.save("swapped_mul", &x[1], SaveAs::Activation)?;
            t.record("swapped_mul", &[&x[0], &x[1]], y, move |g, _| {
                Ok(vec![Some(g.mul(&a.load()?)?), Some(g.mul(&b.load()?)?)])
            })
        },
        CheckOptions::default(),
    )
    .unwrap();
    assert!(
        r.worst_rel_err > 0.1,
        "swapped gradients went unnoticed: {:?}",
        r
    );
}

#[test]
fn a_wrongly_shaped_gradient_is_an_error_naming_the_op() {
    let err = check_grads(
        &[rand(&[3, 4], 1)],
        |t, x| {
            let y = x[0].tensor().clone();
            t.record("bad_shape", &[&x[0]], y, |g, _| {
                Ok(vec![Some(g.sum_keepdim(0)?)])
            })
        },
        CheckOptions::default(),
    )
    .unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("bad_shape"), "{msg}");
}
