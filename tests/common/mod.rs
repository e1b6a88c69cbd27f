//! Shared helpers for the op test files: a gradient-check case table that prints one markdown
//! row per case (op, shapes, worst relative error, status) and fails if any case is above
//! tolerance. Run with `--nocapture` to see the table.
#![allow(dead_code)]

use actrain::tape::gradcheck::{check_grads, random_tensor, CheckOptions};
use actrain::tape::{Tape, Value};
use anyhow::Result;
use candle_core::Tensor;

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
