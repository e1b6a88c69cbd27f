//! Shared helpers for the op test files: a gradient-check case table that prints one markdown
//! row per case (op, shapes, worst relative error, status) and fails if any case is above
//! tolerance. Run with `--nocapture` to see the table.
#![allow(dead_code)]

use actrain::ops::activation::GeluApprox;
use actrain::ops::attention::MultiHeadAttention;
use actrain::ops::mlp::Mlp;
use actrain::ops::norm::PreNorm;
use actrain::tape::gradcheck::{check_grads, random_tensor, CheckOptions};
use actrain::tape::{Tape, Value};
use anyhow::Result;
use candle_core::{DType, Tensor};

pub type OpFn = Box<dyn Fn(&mut Tape, &[Value]) -> Result<Value>>;

pub struct Case {
    pub op: &'static str,
    pub inputs: Vec<Tensor>,
    pub f: OpFn,
    pub tol: f64,
}

impl Case {
    pub fn new(
        op: &'static str,
        inputs: Vec<Tensor>,
        f: impl Fn(&mut Tape, &[Value]) -> Result<Value> + 'static,
    ) -> Self {
        Self {
            op,
            inputs,
            f: Box::new(f),
            tol: 1e-5,
        }
    }
    pub fn tol(mut self, tol: f64) -> Self {
        self.tol = tol;
        self
    }
}

/// Random f64 input in [-1, 1) of the given shape (seeded by the shape and `salt`).
pub fn rand(dims: &[usize], salt: u64) -> Tensor {
    let seed = dims
        .iter()
        .fold(salt, |h, &d| h.wrapping_mul(31).wrapping_add(d as u64));
    random_tensor(dims, seed).expect("random tensor")
}

/// Runs every case, prints `| op | input shapes | worst rel. error | status |`, and panics
/// listing the failures.
pub fn run_cases(family: &str, cases: Vec<Case>) {
    let mut failures = Vec::new();
    println!("\n| op ({family}) | input shapes | worst rel. error | status |\n|---|---|---|---|");
    for c in cases {
        let shapes: Vec<String> = c.inputs.iter().map(|t| format!("{:?}", t.dims())).collect();
        let shapes = shapes.join(" ");
        match check_grads(&c.inputs, &c.f, CheckOptions::default()) {
            Ok(r) => {
                let ok = r.worst_rel_err <= c.tol;
                println!(
                    "| {} | {} | {:.1e} | {} |",
                    c.op,
                    shapes,
                    r.worst_rel_err,
                    if ok { "pass" } else { "FAIL" }
                );
                if !ok {
                    failures.push(format!(
                        "{} {}: {:.3e} > {:.1e}",
                        c.op, shapes, r.worst_rel_err, c.tol
                    ));
                }
            }
            Err(e) => {
                println!("| {} | {} | - | ERROR |", c.op, shapes);
                failures.push(format!("{} {}: error {e:#}", c.op, shapes));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "gradient checks failed:\n{}",
        failures.join("\n")
    );
}

/// Runs `f` forward+backward in f32 both through the tape and through candle's own autograd
/// (`candle_build` gets `Var`s) and returns the worst relative difference over the output and
/// all input gradients.
pub fn compare_with_candle(
    inputs: &[Tensor],
    tape_build: impl Fn(&mut Tape, &[Value]) -> Result<Value>,
    candle_build: impl Fn(&[Tensor]) -> Result<Tensor>,
) -> Result<f64> {
    use actrain::tape::gradcheck::max_rel_diff;
    use actrain::tape::ParamStore;
    use candle_core::{DType, Var};
    let inputs: Vec<Tensor> = inputs
        .iter()
        .map(|t| t.to_dtype(DType::F32))
        .collect::<candle_core::Result<_>>()?;
    let mut store = ParamStore::new();
    let ids: Vec<_> = inputs
        .iter()
        .enumerate()
        .map(|(i, t)| store.add(format!("p{i}"), t.clone()))
        .collect::<Result<_>>()?;
    let mut tape = Tape::default();
    let vals: Vec<Value> = ids.iter().map(|&id| tape.param(&store, id)).collect();
    let out = tape_build(&mut tape, &vals)?;
    let w = random_tensor(out.dims(), 99)?.to_dtype(DType::F32)?;
    let wv = tape.constant(w.clone());
    let prod = tape.mul(&out, &wv)?;
    let loss = tape.sum_all(&prod)?;
    tape.backward(&loss, &mut store)?;

    let vars: Vec<Var> = inputs
        .iter()
        .map(Var::from_tensor)
        .collect::<candle_core::Result<_>>()?;
    let vts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let cout = candle_build(&vts)?;
    let closs = (&cout * &w)?.sum_all()?;
    let grads = closs.backward()?;
    let mut worst = max_rel_diff(out.tensor(), &cout)?;
    for (id, v) in ids.iter().zip(&vars) {
        let ours = store
            .grad(*id)
            .cloned()
            .unwrap_or(v.as_tensor().zeros_like()?);
        let theirs = grads
            .get(v.as_tensor())
            .cloned()
            .unwrap_or(v.as_tensor().zeros_like()?);
        worst = worst.max(max_rel_diff(&ours, &theirs)?);
    }
    Ok(worst)
}

/// `random_tensor(dims, seed) · scale` in f32.
pub fn rand32(dims: &[usize], seed: u64, scale: f64) -> Tensor {
    (random_tensor(dims, seed).unwrap() * scale)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
}

/// The inputs of [`prenorm_block`]: `x: [4, 6, 8]`, gamma, beta, wq, wk, wv, wo, w1, b1, w2,
/// b2.
pub fn prenorm_block_inputs() -> Vec<Tensor> {
    vec![
        rand32(&[4, 6, 8], 90, 1.0),
        rand32(&[8], 91, 1.0),
        rand32(&[8], 92, 0.5),
        rand32(&[8, 8], 93, 0.5),
        rand32(&[8, 8], 94, 0.5),
        rand32(&[8, 8], 95, 0.5),
        rand32(&[8, 8], 96, 0.5),
        rand32(&[16, 8], 97, 0.5),
        rand32(&[16], 98, 0.5),
        rand32(&[8, 16], 99, 0.5),
        rand32(&[8], 100, 0.5),
    ]
}

/// A causal pre-norm transformer block (2 heads, one norm's parameters for both halves) on
/// [`prenorm_block_inputs`]: as the fused halves (`prenorm_attention_residual`,
/// `prenorm_mlp_residual`), or as `layer_norm` followed by the composed ops and adds.
pub fn prenorm_block(t: &mut Tape, v: &[Value], fused: bool) -> Result<Value> {
    let x = t.scale(&v[0], 1.0)?;
    let norm = PreNorm {
        gamma: Some(&v[1]),
        beta: Some(&v[2]),
        eps: 1e-5,
    };
    let attn = MultiHeadAttention {
        causal: true,
        ..MultiHeadAttention::new(&v[3], &v[4], &v[5], &v[6], 2)
    };
    let mlp = Mlp {
        w1: &v[7],
        b1: Some(&v[8]),
        w2: &v[9],
        b2: Some(&v[10]),
        approx: GeluApprox::Tanh,
    };
    if fused {
        let x1 = t.prenorm_attention_residual(x, &norm, &attn)?;
        return t.prenorm_mlp_residual(x1, &norm, &mlp);
    }
    let n1 = t.layer_norm(&x, norm.gamma, norm.beta, norm.eps)?;
    let a = t.multi_head_attention(&n1, &attn)?;
    drop(n1);
    let x1 = t.add(&a, &x)?;
    let n2 = t.layer_norm(&x1, norm.gamma, norm.beta, norm.eps)?;
    let m = t.mlp(&n2, &mlp)?;
    t.add(&m, &x1)
}
