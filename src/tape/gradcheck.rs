//! Gradient checking: the tape's analytic gradients against central finite differences in f64.
//!
//! `f` builds a computation from the inputs (all treated as trainable parameters); the check
//! reduces its output with fixed pseudo-random weights, `loss = Σ out ⊙ R`, so every output
//! element contributes with a different weight and a wrong gradient cannot cancel out.

use super::{splitmix64, ParamStore, Tape, Value};
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};

/// Result of one check: the worst relative error over all checked elements.
#[derive(Debug, Clone)]
pub struct GradCheck {
    pub worst_rel_err: f64,
    /// Worst error per input, in input order.
    pub per_input: Vec<f64>,
    pub elements_checked: usize,
}

impl GradCheck {
    /// Fails with a readable message when the worst error is above `tol`.
    pub fn assert_below(&self, what: &str, tol: f64) {
        assert!(
            self.worst_rel_err <= tol,
            "gradient check `{what}`: worst relative error {:.3e} > {tol:.1e} (per input {:?})",
            self.worst_rel_err,
            self.per_input
        );
    }
}

/// Options: finite-difference step and how many elements per input to probe.
#[derive(Clone, Copy, Debug)]
pub struct CheckOptions {
    pub eps: f64,
    pub max_elements_per_input: usize,
    pub seed: u64,
}

impl Default for CheckOptions {
    fn default() -> Self {
        Self {
            eps: 1e-6,
            max_elements_per_input: 48,
            seed: 7,
        }
    }
}

/// Relative error that tolerates gradients at zero: `|a-n| / (max(|a|,|n|) + 1e-4)`.
pub fn rel_err(a: f64, n: f64) -> f64 {
    (a - n).abs() / (a.abs().max(n.abs()) + 1e-4)
}

/// Worst elementwise [`rel_err`] between two tensors of the same shape.
pub fn max_rel_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    if a.dims() != b.dims() {
        bail!("shapes differ: {:?} vs {:?}", a.dims(), b.dims());
    }
    let a = a.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let b = b.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    Ok(a.iter()
        .zip(&b)
        .map(|(&x, &y)| rel_err(x, y))
        .fold(0.0, f64::max))
}

/// Deterministic pseudo-random f64 tensor in [-1, 1) (inputs and loss weights for checks).
pub fn random_tensor(dims: &[usize], seed: u64) -> Result<Tensor> {
    let n: usize = dims.iter().product();
    let v: Vec<f64> = (0..n as u64)
        .map(|i| {
            (splitmix64(seed.wrapping_mul(0x1000_0001) ^ i) >> 11) as f64 / (1u64 << 53) as f64
                * 2.0
                - 1.0
        })
        .collect();
    Ok(Tensor::from_vec(v, dims, &candle_core::Device::Cpu)?)
}

fn loss_of<F>(
    f: &F,
    inputs: &[Tensor],
    weights: Option<&Tensor>,
    seed: u64,
) -> Result<(f64, Tensor)>
where
    F: Fn(&mut Tape, &[Value]) -> Result<Value>,
{
    let mut tape = Tape::default().with_seed(seed);
    tape.set_recording(false);
    let vals: Vec<Value> = inputs.iter().map(|t| tape.constant(t.clone())).collect();
    let out = f(&mut tape, &vals)?.into_tensor().to_dtype(DType::F64)?;
    let w = match weights {
        Some(w) => w.clone(),
        None => random_tensor(out.dims(), seed ^ 0xABCD)?,
    };
    let l = (&out * &w)?.sum_all()?.to_scalar::<f64>()?;
    Ok((l, w))
}

/// Checks the gradient of `f` with respect to every input (f64 tensors).
pub fn check_grads<F>(inputs: &[Tensor], f: F, opts: CheckOptions) -> Result<GradCheck>
where
    F: Fn(&mut Tape, &[Value]) -> Result<Value>,
{
    for (i, t) in inputs.iter().enumerate() {
        if t.dtype() != DType::F64 {
            bail!("gradient check input {i} must be f64, got {:?}", t.dtype());
        }
    }
    // Analytic gradients through the tape.
    let mut store = ParamStore::new();
    let ids: Vec<_> = inputs
        .iter()
        .enumerate()
        .map(|(i, t)| store.add(format!("in{i}"), t.clone()))
        .collect::<Result<_>>()?;
    let (_, weights) = loss_of(&f, inputs, None, opts.seed)?;
    let mut tape = Tape::default().with_seed(opts.seed);
    let vals: Vec<Value> = ids.iter().map(|&id| tape.param(&store, id)).collect();
    let out = f(&mut tape, &vals)?;
    let w = tape.constant(weights.to_dtype(out.dtype())?);
    let prod = tape.mul(&out, &w)?;
    let loss = tape.sum_all(&prod)?;
    tape.backward(&loss, &mut store)?;

    let mut per_input = Vec::with_capacity(inputs.len());
    let mut checked = 0;
    for (k, &id) in ids.iter().enumerate() {
        let n = inputs[k].elem_count();
        let analytic = match store.grad(id) {
            Some(g) => g.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?,
            None => vec![0.0; n],
        };
        let base = inputs[k].flatten_all()?.to_vec1::<f64>()?;
        let stride = (n / opts.max_elements_per_input.max(1)).max(1);
        let mut worst = 0.0f64;
        let mut j = (splitmix64(opts.seed ^ k as u64) as usize) % stride;
        while j < n {
            let eval = |delta: f64| -> Result<f64> {
                let mut v = base.clone();
                v[j] += delta;
                let mut ins = inputs.to_vec();
                ins[k] = Tensor::from_vec(v, inputs[k].dims(), inputs[k].device())?;
                Ok(loss_of(&f, &ins, Some(&weights), opts.seed)?.0)
            };
            let numeric = (eval(opts.eps)? - eval(-opts.eps)?) / (2.0 * opts.eps);
            worst = worst.max(rel_err(analytic[j], numeric));
            checked += 1;
            j += stride;
        }
        per_input.push(worst);
    }
    Ok(GradCheck {
        worst_rel_err: per_input.iter().cloned().fold(0.0, f64::max),
        per_input,
        elements_checked: checked,
    })
}
