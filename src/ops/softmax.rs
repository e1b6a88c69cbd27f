//! Softmax and log-softmax over one dim, numerically stable (the row max is subtracted).

use super::activation::{cpu_rows, Real, RowOp};
use crate::tape::{SaveAs, Tape, Value};
use anyhow::{bail, Result};
use candle_core::DType;

impl Tape {
    /// `softmax(x)` along `dim`. Context: the output `y` (Activation, shared with any later op
    /// that saves `y`, e.g. attention's `probs @ V`). Backward is `y ⊙ (g − Σ_dim g ⊙ y)`,
    /// bilinear in `y`: quantizing `y` with stochastic rounding leaves it unbiased up to the
    /// second-order `y ⊙ y` term.
    pub fn softmax(&mut self, x: &Value, dim: usize) -> Result<Value> {
        check_dim("softmax", x, dim)?;
        let last = dim + 1 == x.rank();
        let t = x.tensor();
        let y = if last && (t.device().is_cpu() || t.dtype() != DType::F64) {
            // candle's fused row kernel (parallel on CPU, a single kernel on CUDA).
            candle_nn::ops::softmax_last_dim(&t.contiguous()?)?
        } else {
            candle_nn::ops::softmax(t, dim)?
        };
        if !self.needs_grad(&[x]) {
            return Ok(self.constant(y));
        }
        let out = self.output(y);
        let cy = self.save("softmax", &out, SaveAs::Activation)?;
        self.record_output("softmax", &[x], out, move |g, _| {
            let y = cy.load()?;
            if last {
                let cols = y.dim(dim)?;
                if let Some(gx) = cpu_rows(&[&y, &g], cols, &SoftmaxBackwardRow)? {
                    return Ok(vec![Some(gx)]);
                }
            }
            let s = (&g * &y)?.sum_keepdim(dim)?;
            Ok(vec![Some(g.broadcast_sub(&s)?.mul(&y)?)])
        })
    }

    /// `log(softmax(x))` along `dim`, computed as `x − max − log Σ exp(x − max)`.
    /// Context: its output `o` (Activation). Backward is `g − exp(o) · Σ_dim g`; `exp` is
    /// nonlinear, so a quantized `o` makes the gradient approximately (not exactly) unbiased.
    pub fn log_softmax(&mut self, x: &Value, dim: usize) -> Result<Value> {
        check_dim("log_softmax", x, dim)?;
        let last = dim + 1 == x.rank();
        let t = x.tensor();
        let fused = if last {
            cpu_rows(&[t], t.dim(dim)?, &LogSoftmaxRow)?
        } else {
            None
        };
        let y = match fused {
            Some(y) => y,
            None => candle_nn::ops::log_softmax(t, dim)?,
        };
        if !self.needs_grad(&[x]) {
            return Ok(self.constant(y));
        }
        let out = self.output(y);
        let co = self.save("log_softmax", &out, SaveAs::Activation)?;
        self.record_output("log_softmax", &[x], out, move |g, _| {
            let o = co.load()?;
            if last {
                let cols = o.dim(dim)?;
                if let Some(gx) = cpu_rows(&[&o, &g], cols, &LogSoftmaxBackwardRow)? {
                    return Ok(vec![Some(gx)]);
                }
            }
            let s = g.sum_keepdim(dim)?;
            Ok(vec![Some(g.sub(&o.exp()?.broadcast_mul(&s)?)?)])
        })
    }
}

fn check_dim(op: &str, x: &Value, dim: usize) -> Result<()> {
    if dim >= x.rank() {
        bail!(
            "{op}: dim {dim} out of range for input of shape {:?}",
            x.dims()
        );
    }
    if x.dims()[dim] == 0 {
        bail!("{op}: dim {dim} of input {:?} is empty", x.dims());
    }
    Ok(())
}

/// `out = y ⊙ (g − Σ g ⊙ y)` for one row; inputs `[y, g]`.
struct SoftmaxBackwardRow;
impl RowOp for SoftmaxBackwardRow {
    #[inline]
    fn apply<T: Real>(&self, inputs: &[&[T]], out: &mut [T]) {
        let (y, g) = (inputs[0], inputs[1]);
        let mut dot = 0.0f64;
        for (&a, &b) in y.iter().zip(g) {
            dot += (a * b).to_f64();
        }
        let dot = T::c(dot);
        for ((o, &a), &b) in out.iter_mut().zip(y).zip(g) {
            *o = a * (b - dot);
        }
    }
}

/// `out = x − max − ln Σ exp(x − max)` for one row; inputs `[x]`.
struct LogSoftmaxRow;
impl RowOp for LogSoftmaxRow {
    #[inline]
    fn apply<T: Real>(&self, inputs: &[&[T]], out: &mut [T]) {
        let x = inputs[0];
        let max = x
            .iter()
            .copied()
            .fold(x[0], |m, v| if v > m { v } else { m });
        let mut sum = T::c(0.0);
        for (o, &v) in out.iter_mut().zip(x) {
            let d = v - max;
            *o = d;
            sum += d.exp();
        }
        let lse = sum.ln();
        for o in out.iter_mut() {
            *o -= lse;
        }
    }
}

/// `out = g − exp(o) Σ g` for one row; inputs `[o, g]`.
struct LogSoftmaxBackwardRow;
impl RowOp for LogSoftmaxBackwardRow {
    #[inline]
    fn apply<T: Real>(&self, inputs: &[&[T]], out: &mut [T]) {
        let (o, g) = (inputs[0], inputs[1]);
        let mut s = 0.0f64;
        for &b in g {
            s += b.to_f64();
        }
        let s = T::c(s);
        for ((r, &a), &b) in out.iter_mut().zip(o).zip(g) {
            *r = b - a.exp() * s;
        }
    }
}
