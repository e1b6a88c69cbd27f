//! Matrix products: batched matmul with broadcast batch dims, and the fully connected layer.

use super::activation::add_bias_rows;
use super::{chunk_rows_for, context_chunk_bytes, sum_to_shape};
use crate::tape::{Grad, SaveAs, Saved, Tape, Value};
use anyhow::{bail, Result};
use candle_core::Tensor;

/// `gᵀ x` for a linear layer (`g: [rows, out]`, the saved input `x` as `[rows, in]`). A
/// compressed input larger than [`CONTEXT_CHUNK_BYTES`](super::CONTEXT_CHUNK_BYTES) is unpacked in chunks of samples
/// (dim 0 of the saved tensor) and the partial products summed, so the whole unpacked input
/// never exists next to the gradients; an input kept as it is needs no unpacking.
fn linear_grad_weight(cx: &Saved, g2: &Tensor, rows: usize, in_f: usize) -> Result<Tensor> {
    let samples = cx.rows();
    let bytes = rows * in_f * g2.dtype().size_in_bytes();
    let chunked = !cx.stored_as_is()
        && cx.loads_rows_cheaply()
        && bytes > context_chunk_bytes()
        && samples > 1
        && rows.is_multiple_of(samples);
    if !chunked {
        let x2 = cx.load()?.reshape((rows, in_f))?;
        return Ok(g2.t()?.matmul(&x2)?);
    }
    let per = rows / samples;
    let chunk = chunk_rows_for(samples, per * in_f * g2.dtype().size_in_bytes());
    let mut acc: Option<Tensor> = None;
    let mut first = 0;
    while first < samples {
        let count = chunk.min(samples - first);
        let xc = cx.load_rows(first, count)?.reshape((count * per, in_f))?;
        let gc = g2.narrow(0, first * per, count * per)?;
        super::accumulate(&mut acc, gc.t()?.matmul(&xc)?)?;
        first += count;
    }
    acc.ok_or_else(|| anyhow::anyhow!("linear: empty batch"))
}

impl Tape {
    /// `a @ b` over the last two dims; leading (batch) dims broadcast.
    /// Context: `a` if `b` needs a gradient, `b` if `a` does.
    pub fn matmul(&mut self, a: &Value, b: &Value) -> Result<Value> {
        if a.rank() < 2 || b.rank() < 2 {
            bail!(
                "matmul needs rank >= 2 operands, got {:?} and {:?}",
                a.dims(),
                b.dims()
            );
        }
        let y = a.tensor().broadcast_matmul(b.tensor())?;
        if !self.needs_grad(&[a, b]) {
            return Ok(self.constant(y));
        }
        let (sa, sb) = (a.shape().clone(), b.shape().clone());
        let ca = if b.is_tracked() {
            Some(self.save("matmul", a, SaveAs::Activation)?)
        } else {
            None
        };
        let cb = if a.is_tracked() {
            Some(self.save("matmul", b, SaveAs::Activation)?)
        } else {
            None
        };
        self.record("matmul", &[a, b], y, move |g, needs| {
            let ga = match (&cb, needs[0]) {
                (Some(cb), true) => {
                    let bt = cb.load()?.t()?;
                    Some(sum_to_shape(&g.broadcast_matmul(&bt)?, &sa)?)
                }
                _ => None,
            };
            let gb = match (&ca, needs[1]) {
                (Some(ca), true) => {
                    let at = ca.load()?.t()?;
                    Some(sum_to_shape(&at.broadcast_matmul(&g)?, &sb)?)
                }
                _ => None,
            };
            Ok(vec![ga, gb])
        })
    }

    /// `x @ w^T + b` with `x: [..., in]`, `w: [out, in]`, `b: [out]`.
    /// Context: `x` (quantizable) when `w` needs a gradient; `w` by reference when `x` does.
    pub fn linear(&mut self, x: &Value, w: &Value, b: Option<&Value>) -> Result<Value> {
        let (out_f, in_f) = w.tensor().dims2()?;
        let dims = x.dims().to_vec();
        if dims.last() != Some(&in_f) {
            bail!("linear: input {dims:?} does not end in {in_f} (weight is [{out_f}, {in_f}])");
        }
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let x2 = x.tensor().reshape((rows, in_f))?;
        let mut y = x2.matmul(&w.tensor().t()?)?;
        drop(x2);
        if let Some(b) = b {
            // Into the fresh matmul result's own buffer on the CPU: no second [rows, out].
            y = add_bias_rows(y, b.tensor())?;
        }
        let mut out_dims = dims.clone();
        *out_dims.last_mut().expect("rank >= 1") = out_f;
        let y = y.reshape(out_dims)?;
        let inputs: Vec<&Value> = match b {
            Some(b) => vec![x, w, b],
            None => vec![x, w],
        };
        if !self.needs_grad(&inputs) {
            return Ok(self.constant(y));
        }
        let cx = if w.is_tracked() {
            Some(self.save("linear", x, SaveAs::Activation)?)
        } else {
            None
        };
        let cw = if x.is_tracked() {
            Some(self.save("linear", w, SaveAs::Activation)?)
        } else {
            None
        };
        let x_shape = x.shape().clone();
        self.record_grad("linear", &inputs, y, move |g, needs| {
            let g2 = g.into_tensor().reshape((rows, out_f))?;
            let gx = match (&cw, needs[0]) {
                (Some(cw), true) => Some(g2.matmul(&cw.load()?)?.reshape(&x_shape)?),
                _ => None,
            };
            let gw = match (&cx, needs[1]) {
                (Some(cx), true) => Some(linear_grad_weight(cx, &g2, rows, in_f)?),
                _ => None,
            };
            // All three are new tensors (the input gradient a matmul result): owned.
            let mut grads = vec![gx.map(Grad::owned), gw.map(Grad::owned)];
            if needs.len() == 3 {
                grads.push(if needs[2] {
                    Some(Grad::owned(g2.sum(0)?))
                } else {
                    None
                });
            }
            Ok(grads)
        })
    }
}
