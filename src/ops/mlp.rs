//! The transformer MLP, `linear → GELU → linear`, as one node that runs in batch chunks.
//!
//! Composed from its three ops, the MLP holds a hidden tensor four times the width of the
//! residual stream twice over: the GELU output in forward (until the second linear has read
//! it) and its gradient in backward. At L1–L4 that fp32 temporary is larger than every
//! compressed context of the model together, so it, not the context, sets the peak. Fused,
//! forward computes a chunk of samples at a time and quantizes the chunk's hidden tensors
//! into their contexts as it goes ([`Tape::begin_save_rows`]); backward reads the contexts a
//! chunk at a time and carries the chunk's gradient through both layers, so the hidden width
//! only ever exists for one chunk. `mlp_residual` adds each chunk's output into the residual
//! stream's buffer, so the output does not exist whole beside it either.
//!
//! The contexts, their slots and their codes are exactly those of the composed ops (`x` and
//! `w1` for the first linear, the GELU input `h`, the second linear's input `a = gelu(h)` and
//! `w2`), so profiles, the bit allocator and the rounding noise see no difference; gradients
//! differ from the composed ops only in the order the chunks' weight gradients are summed.

use super::activation::{
    add_bias_rows, fused_cpu_kernels, gelu_grad_owned, gelu_owned, GeluApprox,
};
use super::norm::{ChunkNorm, PreNorm};
use super::{accumulate, fused_chunk_rows_for, put_chunk, row_chunks};
use crate::tape::{Grad, RowSave, SaveAs, Saved, Tape, Value};
use anyhow::{bail, Result};
use candle_core::Tensor;

/// The parameters of one MLP, by reference: `w1: [hidden, in]`, `w2: [out, hidden]`.
#[derive(Clone, Copy)]
pub struct Mlp<'a> {
    pub w1: &'a Value,
    pub b1: Option<&'a Value>,
    pub w2: &'a Value,
    pub b2: Option<&'a Value>,
    pub approx: GeluApprox,
}

impl Tape {
    /// `linear(gelu(linear(x, w1, b1)), w2, b2)` over `x: [B, .., in]`, in batch chunks on
    /// the CPU at L1–L4 when the hidden tensor spans several chunks (see the module doc);
    /// otherwise, elsewhere, and while an analytic sensitivity estimate is gathered
    /// ([`Tape::fuses_in_chunks`]), the three ops one after another.
    pub fn mlp(&mut self, x: &Value, m: &Mlp) -> Result<Value> {
        self.mlp_owned(x.clone(), m)
    }

    /// [`Tape::mlp`] of an `x` handed over by the caller: on the composed path it is dropped
    /// once the first layer has read it, so (when the caller held the only handle) it is
    /// freed before the second layer's output exists.
    pub fn mlp_owned(&mut self, x: Value, m: &Mlp) -> Result<Value> {
        self.mlp_with(x, m, None)
    }

    /// `residual + mlp(x)` (a transformer block's second residual sum), both handed over.
    /// Fused, the chunks' outputs are added straight into `residual`'s buffer where nothing
    /// else needs it as it is (at L1–L4 the layer norm that read it keeps a compressed copy),
    /// so the MLP's output never exists whole beside the residual stream.
    pub fn mlp_residual(&mut self, x: Value, m: &Mlp, residual: Value) -> Result<Value> {
        self.mlp_with(x, m, Some(residual))
    }

    /// `x + mlp(layer_norm(x))`, the second half of a pre-norm transformer block, `x` handed
    /// over. Fused, the norm runs a chunk at a time too (saving what `layer_norm` saves), so
    /// neither the normalised tensor nor the MLP's output ever exists whole: forward holds the
    /// residual stream, backward its gradient, each beside one chunk's temporaries. Otherwise
    /// `layer_norm` then [`Tape::mlp_residual`].
    pub fn prenorm_mlp_residual(&mut self, x: Value, norm: &PreNorm, m: &Mlp) -> Result<Value> {
        const OP: &str = "mlp";
        let dims = x.dims().to_vec();
        let (hidden, in_f) = m.w1.tensor().dims2()?;
        let (out_f, _) = m.w2.tensor().dims2()?;
        let (dt, dev) = (x.dtype(), x.tensor().device().clone());
        let b = dims.first().copied().unwrap_or(0);
        let per: usize = dims
            .get(1..dims.len().saturating_sub(1))
            .map_or(1, |d| d.iter().product());
        let chunk = fused_chunk_rows_for(b, per * hidden * dt.size_in_bytes());
        let params: Vec<&Value> = [Some(m.w1), m.b1, Some(m.w2), m.b2, norm.gamma, norm.beta]
            .into_iter()
            .flatten()
            .collect();
        let fused = fused_cpu_kernels()
            && dev.is_cpu()
            && dims.len() >= 2
            && dims.last() == Some(&in_f)
            && out_f == in_f
            && super::worth_chunking(chunk, b, 2)
            && x.is_tracked()
            && params.iter().all(|p| p.is_tracked())
            && self.is_recording()
            && self.fuses_in_chunks();
        if !fused {
            let n = self.layer_norm(&x, norm.gamma, norm.beta, norm.eps)?;
            return self.mlp_with(n, m, Some(x));
        }
        let hid_dims: Vec<usize> = dims[..dims.len() - 1]
            .iter()
            .copied()
            .chain([hidden])
            .collect();
        // The composed ops' saves in their order: layer_norm (x, mean, rstd, gamma), linear
        // (its input n — rebuilt from the norm's where the policy does so — and w1), gelu
        // (h), linear (a, w2).
        let mut cn = ChunkNorm::begin(self, &x, norm)?;
        let n_at = self.log_place();
        let mut n_rows = if self.recomputes_contexts() {
            None
        } else {
            Some(self.begin_save_rows("linear", &dims, dt, &dev, SaveAs::Activation)?)
        };
        let cw1 = self.save("linear", m.w1, SaveAs::Activation)?;
        let mut h_rows = self.begin_save_rows("gelu", &hid_dims, dt, &dev, SaveAs::Activation)?;
        let mut a_rows = self.begin_save_rows("linear", &hid_dims, dt, &dev, SaveAs::Activation)?;
        // The sum goes into the residual stream's buffer unless the norm kept `x` as it is.
        let in_place = !cn.keeps_input_as_is() && self.may_overwrite(&x, None);
        let y = if in_place {
            x.tensor().clone()
        } else {
            Tensor::zeros(dims.as_slice(), dt, &dev)?
        };
        let (w1t, w2t) = (m.w1.tensor().t()?, m.w2.tensor().t()?);
        for (first, len) in row_chunks(b, chunk) {
            let rows = len * per;
            let xc = x.tensor().narrow(0, first, len)?;
            let n = cn.forward(first, &xc)?;
            if let Some(r) = n_rows.as_mut() {
                r.push(first, &n)?;
            }
            let n = n.reshape((rows, in_f))?;
            let saves = (&mut h_rows, Some(&mut a_rows));
            let yc = chunk_forward(&n, m, (&w1t, &w2t), &hid_dims, first, len, saves)?;
            drop(n);
            let yc = yc.reshape(xc.shape())?;
            if in_place {
                put_chunk(&y, first, &yc, true)?;
            } else {
                put_chunk(&y, first, &(yc + &xc)?, false)?;
            }
            crate::memory::check_budget()?;
        }
        let cn = cn.finish(self, norm.gamma.is_some(), norm.beta.is_some())?;
        let cx = match n_rows {
            Some(r) => self.finish_save_rows(r)?,
            None => self.recomputed_context_at(n_at, "linear", cn.output(), &dims, dt, &dev),
        };
        let ch = self.finish_save_rows(h_rows)?;
        let ca = self.finish_save_rows(a_rows)?;
        let cw2 = self.save("linear", m.w2, SaveAs::Activation)?;
        let (has_b1, has_b2, approx) = (m.b1.is_some(), m.b2.is_some(), m.approx);
        let (has_g, has_be) = (norm.gamma.is_some(), norm.beta.is_some());
        let mut inputs = vec![&x];
        inputs.extend(norm.gamma);
        inputs.extend(norm.beta);
        inputs.push(m.w1);
        inputs.extend(m.b1);
        inputs.push(m.w2);
        inputs.extend(m.b2);
        self.record_grad(OP, &inputs, y, move |g, _needs| {
            let ctx = Contexts {
                x: Some(cx),
                w1: Some(cw1),
                h: ch,
                a: Some(ca),
                w2: Some(cw2),
            };
            let want = Wanted([true, true, has_b1, true, has_b2]);
            let sizes = Sizes {
                b,
                per,
                in_f,
                hidden,
            };
            // The residual stream's gradient is the output gradient plus the norm's input
            // gradient, added into the output gradient's own buffer where it is owned.
            let g_owned = g.is_owned();
            let g = g.into_tensor();
            let g2 = g.reshape((b * per, out_f))?;
            let gx = if g_owned { g2.clone() } else { g2.copy()? };
            let (mut gg, mut gb) = (None, None);
            let grads = mlp_backward(&ctx, &g2, &want, &sizes, approx, |first, len, part| {
                let part = cn.backward(first, len, &part, &mut gg, &mut gb)?;
                put_chunk(&gx, first * per, &part, true)
            })?;
            drop((g, g2));
            let [gw1, gb1, gw2, gb2] = grads;
            let mut out = vec![Some(gx.reshape(dims.as_slice())?)];
            if has_g {
                out.push(gg);
            }
            if has_be {
                out.push(gb);
            }
            out.push(gw1);
            if has_b1 {
                out.push(gb1);
            }
            out.push(gw2);
            if has_b2 {
                out.push(gb2);
            }
            // New tensors, or the owned output gradient itself.
            Ok(out.into_iter().map(|t| t.map(Grad::owned)).collect())
        })
    }

    fn mlp_with(&mut self, x: Value, m: &Mlp, residual: Option<Value>) -> Result<Value> {
        const OP: &str = "mlp";
        let (hidden, in_f) = m.w1.tensor().dims2()?;
        let (out_f, hidden2) = m.w2.tensor().dims2()?;
        let dims = x.dims().to_vec();
        if hidden2 != hidden {
            bail!(
                "{OP}: w2 {:?} does not read the {hidden} outputs of w1 {:?}",
                m.w2.dims(),
                m.w1.dims()
            );
        }
        if dims.len() < 2 || dims.last() != Some(&in_f) {
            bail!("{OP}: input {dims:?} is not [batch, .., {in_f}] (w1 is [{hidden}, {in_f}])");
        }
        let b = dims[0];
        let per: usize = dims[1..dims.len() - 1].iter().product();
        let (dt, dev) = (x.dtype(), x.tensor().device().clone());
        let chunk = fused_chunk_rows_for(b, per * hidden * dt.size_in_bytes());
        // The composed ops save `h` only when something below the GELU is tracked.
        let below_tracked =
            self.needs_grad(&[&x, m.w1]) || m.b1.is_some_and(|b| self.needs_grad(&[b]));
        let fused = fused_cpu_kernels()
            && dev.is_cpu()
            // Composed, the MLP holds its input and the 4x-wide hidden tensor (5 input sizes),
            // fused its input, its output and a chunk of 5: less from two chunks on.
            && super::worth_chunking(chunk, b, 2)
            && below_tracked
            && self.fuses_in_chunks();
        let mut out_dims = dims.clone();
        *out_dims.last_mut().expect("rank >= 2") = out_f;
        if !fused {
            let h = self.linear_gelu(&x, m.w1, m.b1, m.approx)?;
            drop(x);
            let y = self.linear(&h, m.w2, m.b2)?;
            drop(h);
            return match residual {
                Some(r) => self.add_owned(y, &r),
                None => Ok(y),
            };
        }
        // The residual's buffer takes the sum where it may be overwritten; otherwise the
        // output is a new tensor and the sum a separate op.
        let (residual, add_after) = match residual {
            Some(r)
                if r.dims() == out_dims.as_slice()
                    && r.dtype() == dt
                    && self.may_overwrite(&r, None) =>
            {
                (Some(r), None)
            }
            other => (None, other),
        };
        let x = &x;
        let mut inputs: Vec<&Value> = residual.iter().collect();
        inputs.extend([x, m.w1]);
        inputs.extend(m.b1);
        inputs.push(m.w2);
        inputs.extend(m.b2);
        let hid_dims: Vec<usize> = dims[..dims.len() - 1]
            .iter()
            .copied()
            .chain([hidden])
            .collect();

        // The saves of the composed ops, in their order: linear (x, w1), gelu (h), linear
        // (a, w2). `h` is always saved: it is tracked whenever the node is.
        let cx = if m.w1.is_tracked() {
            Some(self.save("linear", x, SaveAs::Activation)?)
        } else {
            None
        };
        let cw1 = if x.is_tracked() {
            Some(self.save("linear", m.w1, SaveAs::Activation)?)
        } else {
            None
        };
        let mut h_rows = self.begin_save_rows("gelu", &hid_dims, dt, &dev, SaveAs::Activation)?;
        let mut a_rows = if m.w2.is_tracked() {
            Some(self.begin_save_rows("linear", &hid_dims, dt, &dev, SaveAs::Activation)?)
        } else {
            None
        };
        let y = match &residual {
            Some(r) => r.tensor().clone(),
            None => Tensor::zeros(out_dims.as_slice(), dt, &dev)?,
        };
        let (w1t, w2t) = (m.w1.tensor().t()?, m.w2.tensor().t()?);
        for (first, len) in row_chunks(b, chunk) {
            let rows = len * per;
            let xc = x.tensor().narrow(0, first, len)?.reshape((rows, in_f))?;
            let saves = (&mut h_rows, a_rows.as_mut());
            let yc = chunk_forward(&xc, m, (&w1t, &w2t), &hid_dims, first, len, saves)?;
            drop(xc);
            let mut y_dims = out_dims.clone();
            y_dims[0] = len;
            put_chunk(&y, first, &yc.reshape(y_dims)?, residual.is_some())?;
            crate::memory::check_budget()?;
        }
        let ch = self.finish_save_rows(h_rows)?;
        let ca = match a_rows {
            Some(r) => Some(self.finish_save_rows(r)?),
            None => None,
        };
        let cw2 = Some(self.save("linear", m.w2, SaveAs::Activation)?);
        let (has_b1, has_b2, approx) = (m.b1.is_some(), m.b2.is_some(), m.approx);
        let x_shape = x.shape().clone();
        let with_residual = residual.is_some();
        let out = self.record_grad(OP, &inputs, y, move |g, needs| {
            // The residual's gradient is the output gradient itself, handed on (with its
            // ownership) once the chunks below have read it.
            let needs = if with_residual { &needs[1..] } else { needs };
            let g_owned = g.is_owned();
            let g = g.into_tensor();
            let ctx = Contexts {
                x: cx,
                w1: cw1,
                h: ch,
                a: ca,
                w2: cw2,
            };
            let want = Wanted::from_needs(needs, has_b1, has_b2);
            let g2 = g.reshape((b * per, out_f))?;
            let sizes = Sizes {
                b,
                per,
                in_f,
                hidden,
            };
            let gx = if want.0[0] {
                Some(Tensor::zeros((b * per, in_f), g2.dtype(), g2.device())?)
            } else {
                None
            };
            let grads = mlp_backward(
                &ctx,
                &g2,
                &want,
                &sizes,
                approx,
                |first, _, part| match &gx {
                    Some(gx) => Ok(gx.slice_set(&part, 0, first * per)?),
                    None => Ok(()),
                },
            )?;
            let [gw1, gb1, gw2, gb2] = grads;
            let gx = gx.map(|t| t.reshape(&x_shape)).transpose()?;
            let mut out = vec![gx, gw1];
            if has_b1 {
                out.push(gb1);
            }
            out.push(gw2);
            if has_b2 {
                out.push(gb2);
            }
            drop(g2);
            // Every gradient is a new tensor (a matmul result or a buffer filled by chunks).
            let mut grads: Vec<Option<Grad>> =
                out.into_iter().map(|t| t.map(Grad::owned)).collect();
            if with_residual {
                let g = if g_owned {
                    Grad::owned(g)
                } else {
                    Grad::shared(g)
                };
                grads.insert(0, Some(g));
            }
            Ok(grads)
        })?;
        match add_after {
            Some(r) => self.add_owned(out, &r),
            None => Ok(out),
        }
    }
}

/// The MLP's forward over one chunk, samples `first..first + len` (`x: [rows, in]`): saves
/// the chunk's GELU input into `h_rows` and its output into `a_rows` (when the second layer's
/// input is kept) and returns the chunk's output `[rows, out]`. `hid_dims` is the whole
/// hidden tensor's shape.
fn chunk_forward(
    x: &Tensor,
    m: &Mlp,
    (w1t, w2t): (&Tensor, &Tensor),
    hid_dims: &[usize],
    first: usize,
    len: usize,
    (h_rows, a_rows): (&mut RowSave, Option<&mut RowSave>),
) -> Result<Tensor> {
    let rows = x.dims()[0];
    let mut h = x.matmul(w1t)?;
    if let Some(b1) = m.b1 {
        h = add_bias_rows(h, b1.tensor())?;
    }
    let mut chunk_dims = hid_dims.to_vec();
    chunk_dims[0] = len;
    let h = h.reshape(chunk_dims.as_slice())?;
    h_rows.push(first, &h)?;
    // The chunk's h is in its context now: GELU overwrites it.
    let a = gelu_owned(h, m.approx)?;
    if let Some(rows_a) = a_rows {
        rows_a.push(first, &a)?;
    }
    let hidden = hid_dims.last().copied().unwrap_or(1);
    let mut y = a.reshape((rows, hidden))?.matmul(w2t)?;
    drop(a);
    if let Some(b2) = m.b2 {
        y = add_bias_rows(y, b2.tensor())?;
    }
    Ok(y)
}

/// What the MLP saved (see [`Tape::mlp`]).
struct Contexts {
    x: Option<Saved>,
    w1: Option<Saved>,
    h: Saved,
    a: Option<Saved>,
    w2: Option<Saved>,
}

/// Which gradients are wanted: x, w1, b1, w2, b2.
struct Wanted([bool; 5]);

impl Wanted {
    /// From the node's `needs`, in input order `x, w1, [b1], w2, [b2]`.
    fn from_needs(needs: &[bool], has_b1: bool, has_b2: bool) -> Self {
        let mut it = needs.iter().copied();
        let mut next = || it.next().unwrap_or(false);
        let x = next();
        let w1 = next();
        let b1 = has_b1 && next();
        let w2 = next();
        let b2 = has_b2 && next();
        Wanted([x, w1, b1, w2, b2])
    }
    /// Whether anything below the GELU is wanted (then the hidden gradient is computed).
    fn below(&self) -> bool {
        self.0[0] || self.0[1] || self.0[2]
    }
}

struct Sizes {
    b: usize,
    per: usize,
    in_f: usize,
    hidden: usize,
}

/// The gradients `[w1, b1, w2, b2]` (each where wanted), chunk by chunk over the batch; the
/// input gradient of samples `first..first + len` (`[len * per, in]`), where wanted, goes to
/// `input_grad(first, len, rows)` as each chunk is done.
fn mlp_backward(
    c: &Contexts,
    g2: &Tensor,
    want: &Wanted,
    s: &Sizes,
    approx: GeluApprox,
    mut input_grad: impl FnMut(usize, usize, Tensor) -> Result<()>,
) -> Result<[Option<Tensor>; 4]> {
    let [_, _, _, w_w2, w_b2] = want.0;
    let dt = g2.dtype();
    let (mut gw1, mut gb1, mut gw2, mut gb2) = (None, None, None, None);
    let w1 = match &c.w1 {
        Some(w) => Some(w.load()?),
        None => None,
    };
    let w2 = match &c.w2 {
        Some(w) => Some(w.load()?),
        None => None,
    };
    let chunk = fused_chunk_rows_for(s.b, s.per * s.hidden * dt.size_in_bytes());
    for (first, len) in row_chunks(s.b, chunk) {
        let rows = len * s.per;
        let gc = g2.narrow(0, first * s.per, rows)?;
        if w_w2 {
            let Some(ca) = &c.a else {
                bail!("mlp: the second linear's input was not saved");
            };
            let a = ca.load_rows(first, len)?.reshape((rows, s.hidden))?;
            accumulate(&mut gw2, gc.t()?.matmul(&a)?)?;
        }
        if w_b2 {
            accumulate(&mut gb2, gc.sum(0)?)?;
        }
        if !want.below() {
            continue;
        }
        let Some(w2) = &w2 else {
            bail!("mlp: w2 was not saved but the hidden gradient is wanted");
        };
        let ga = gc.matmul(w2)?;
        let h = c.h.load_rows(first, len)?.reshape((rows, s.hidden))?;
        let gh = gelu_grad_owned(&h, ga, approx)?;
        drop(h);
        if want.0[1] {
            let Some(cx) = &c.x else {
                bail!("mlp: the first linear's input was not saved");
            };
            let x = cx.load_rows(first, len)?.reshape((rows, s.in_f))?;
            accumulate(&mut gw1, gh.t()?.matmul(&x)?)?;
        }
        if want.0[2] {
            accumulate(&mut gb1, gh.sum(0)?)?;
        }
        if want.0[0] {
            let Some(w1) = &w1 else {
                bail!("mlp: w1 was not saved but the input gradient is wanted");
            };
            input_grad(first, len, gh.matmul(w1)?)?;
        }
    }
    Ok([gw1, gb1, gw2, gb2])
}
