//! Attention: fused scaled dot-product attention (one tape node) and multi-head attention
//! composed from `linear`, shape ops and that node.
//!
//! The fused node keeps exactly `q`, `k`, `v` and the attention probabilities `P`; the score
//! matrix `q kᵀ / sqrt(Dh)` exists only inside the forward pass. On the CPU (f32/f64) the
//! scale, causal mask and softmax run as one rayon kernel over rows, and so does the softmax
//! backward; elsewhere (CUDA, half types) the same maths runs as candle ops.

use super::activation::{add_bias_rows, fused_cpu_kernels};
use super::norm::{ChunkNorm, PreNorm};
use crate::tape::{Grad, Recompute, RowSave, SaveAs, Saved, Tape, Value};
use anyhow::{bail, Result};
use candle_core::{DType, Device, Storage, Tensor, WithDType, D};
use rayon::prelude::*;
use std::rc::Rc;

/// The gradients of `q`, `k` and `v` (each where wanted).
type Grads3 = (Option<Tensor>, Option<Tensor>, Option<Tensor>);

impl Tape {
    /// Scaled dot-product attention, `softmax(q kᵀ / sqrt(Dh) + mask) v`, as one fused node.
    ///
    /// Shapes: `q: [B, H, Tq, Dh]`, `k: [B, H, Tk, Dh]`, `v: [B, H, Tk, Dv]` (usually
    /// `Dv == Dh`) → `[B, H, Tq, Dv]`.
    ///
    /// `causal`: query `i` sees keys `j <= i + (Tk - Tq)`. With `Tq == Tk` that is the usual
    /// lower-triangular mask; with `Tk > Tq` the queries are taken to be the *last* `Tq`
    /// positions of a `Tk`-long sequence (the key/value-cache convention), so every query
    /// sees at least one key. `causal` with `Tk < Tq` would leave queries with no key at all
    /// and is an error. Masked probabilities are exactly 0 (they are never exponentiated).
    ///
    /// Context: `P = softmax(..)` `[B, H, Tq, Tk]` always (every gradient goes through it),
    /// `v` if `q` or `k` needs a gradient (`dP = dO vᵀ`), `k` if `q` does (`dq = dS k`), `q` if
    /// `k` does (`dk = dSᵀ q`) — all `SaveAs::Activation`. Nothing else: the pre-softmax
    /// scores live only inside the forward call. Backward:
    /// `dV = Pᵀ dO; dP = dO Vᵀ; dS = P ⊙ (dP − rowsum(dP ⊙ P)) / sqrt(Dh); dQ = dS K;
    /// dK = dSᵀ Q`. It is linear in each of `q`, `k`, `v` separately, so their independent
    /// stochastic rounding stays unbiased; it is quadratic in `P` (like any softmax that keeps
    /// its output), so a quantized `P` adds a small bias of the order of its rounding variance.
    pub fn scaled_dot_product_attention(
        &mut self,
        q: &Value,
        k: &Value,
        v: &Value,
        causal: bool,
    ) -> Result<Value> {
        const OP: &str = "sdpa";
        let (qd, kd, vd) = (q.dims(), k.dims(), v.dims());
        if q.rank() != 4 || k.rank() != 4 || v.rank() != 4 {
            bail!("{OP}: q, k, v must be [B, H, T, D], got q {qd:?}, k {kd:?}, v {vd:?}");
        }
        let (b, h, tq, dh) = (qd[0], qd[1], qd[2], qd[3]);
        let tk = kd[2];
        if kd[0] != b || kd[1] != h || vd[0] != b || vd[1] != h {
            bail!("{OP}: batch/head dims differ: q {qd:?}, k {kd:?}, v {vd:?}");
        }
        if kd[3] != dh {
            bail!("{OP}: q and k head dims differ: q {qd:?}, k {kd:?}");
        }
        if vd[2] != tk {
            bail!("{OP}: k and v lengths differ: k {kd:?}, v {vd:?}");
        }
        if tk == 0 || dh == 0 {
            bail!("{OP}: empty keys or head dim: q {qd:?}, k {kd:?}");
        }
        if causal && tk < tq {
            bail!("{OP}: causal attention needs Tk >= Tq (query i sees keys j <= i + Tk - Tq), got q {qd:?}, k {kd:?}");
        }
        if q.dtype() != k.dtype() || q.dtype() != v.dtype() {
            bail!(
                "{OP}: dtypes differ: q {:?}, k {:?}, v {:?}",
                q.dtype(),
                k.dtype(),
                v.dtype()
            );
        }
        let mask = Mask {
            scale: 1.0 / (dh as f64).sqrt(),
            causal,
            tq,
            tk,
        };
        let score_bytes = h * tq * tk * q.dtype().size_in_bytes();
        // Scores and P for samples `first..first + len`. The scores are a fresh matmul
        // result: on the CPU the softmax overwrites them.
        let probs = |first: usize, len: usize| -> Result<Tensor> {
            let (qc, kc) = if len == b {
                (q.tensor().clone(), k.tensor().clone())
            } else {
                (
                    q.tensor().narrow(0, first, len)?,
                    k.tensor().narrow(0, first, len)?,
                )
            };
            mask.softmax_owned(qc.matmul(&kc.t()?)?)
        };
        if !self.needs_grad(&[q, k, v]) {
            let y = probs(0, b)?.matmul(v.tensor())?;
            return Ok(self.constant(y));
        }
        // On the CPU at L1-L4 the forward runs in batch chunks too, P quantized chunk by
        // chunk (`begin_save_rows`): no score-sized tensor of the whole batch ever exists.
        let chunk = if q.tensor().device().is_cpu() && self.fuses_in_chunks() {
            super::chunk_rows_for(b, 2 * score_bytes)
        } else {
            b
        };
        let (nq, nk) = (q.is_tracked(), k.is_tracked());
        let cq = if nk {
            Some(self.save(OP, q, SaveAs::Activation)?)
        } else {
            None
        };
        let ck = if nq {
            Some(self.save(OP, k, SaveAs::Activation)?)
        } else {
            None
        };
        let cv = if nq || nk {
            Some(self.save(OP, v, SaveAs::Activation)?)
        } else {
            None
        };
        let (y, cp) = if chunk >= b {
            let p = probs(0, b)?;
            let y = p.matmul(v.tensor())?;
            (y, self.save_derived(OP, &p, SaveAs::Activation)?)
        } else {
            let dv = vd[3];
            let (dt, dev) = (q.dtype(), q.tensor().device().clone());
            let y = Tensor::zeros((b, h, tq, dv), dt, &dev)?;
            let mut rows =
                self.begin_save_rows(OP, &[b, h, tq, tk], dt, &dev, SaveAs::Activation)?;
            for (first, len) in super::row_chunks(b, chunk) {
                let p = probs(first, len)?;
                y.slice_set(&p.matmul(&v.tensor().narrow(0, first, len)?)?, 0, first)?;
                rows.push(first, &p)?;
                crate::memory::check_budget()?;
            }
            (y, self.finish_save_rows(rows)?)
        };
        // The output, for the op that reads it next (the output projection saves the merged
        // heads): rebuilt as P v from the two saved factors instead of stored.
        let rebuild = cv.as_ref().map(|cv| {
            Rc::new(AttentionOutput {
                p: cp.clone(),
                v: cv.clone(),
                merged: None,
            }) as Rc<dyn Recompute>
        });
        let y = self.record_grad(OP, &[q, k, v], y, move |g, needs| {
            let g = g.into_tensor();
            // Samples `first..first + len` (all of them with `whole`): their gradients only
            // need their own rows of every context and of `g`.
            let grads_of = |first: usize, len: usize, whole: bool| -> Result<Grads3> {
                let load = |c: &Saved| {
                    if whole {
                        c.load()
                    } else {
                        c.load_rows(first, len)
                    }
                };
                let g = if whole {
                    g.clone()
                } else {
                    g.narrow(0, first, len)?.contiguous()?
                };
                // dP = dO Vᵀ first, so that V is gone before P is unpacked: at most P, dP
                // and the small gradients are alive together.
                let dp = if needs[0] || needs[1] {
                    let v = load(
                        cv.as_ref()
                            .expect("v is saved when q or k needs a gradient"),
                    )?;
                    Some(g.matmul(&v.t()?)?)
                } else {
                    None
                };
                let p = load(&cp)?;
                let gv = if needs[2] {
                    Some(p.t()?.matmul(&g)?)
                } else {
                    None
                };
                drop(g);
                let Some(dp) = dp else {
                    return Ok((None, None, gv));
                };
                // dS already carries the 1/sqrt(Dh) factor; on the CPU it overwrites dP (a
                // fresh matmul result) instead of taking a third score-sized buffer.
                let ds = mask.softmax_backward_owned(&p, dp)?;
                drop(p);
                let gq = match (&ck, needs[0]) {
                    (Some(ck), true) => Some(ds.matmul(&load(ck)?)?),
                    _ => None,
                };
                let gk = match (&cq, needs[1]) {
                    (Some(cq), true) => Some(ds.t()?.matmul(&load(cq)?)?),
                    _ => None,
                };
                Ok((gq, gk, gv))
            };
            // In batch chunks where every context unpacks a chunk on its own: then only a
            // chunk's P and dP (score-sized, the largest tensors here) exist at a time,
            // beside the three input-sized gradients being filled.
            let saved = [Some(&cp), cq.as_ref(), ck.as_ref(), cv.as_ref()];
            let by_rows = saved.iter().flatten().all(|c| c.loads_rows_cheaply());
            let chunk = if by_rows {
                super::chunk_rows_for(b, 2 * score_bytes)
            } else {
                b
            };
            // Every gradient is a matmul result or the buffer the chunks were copied into:
            // a new tensor, owned.
            let own = |t: Option<Tensor>| t.map(Grad::owned);
            if chunk >= b {
                let (gq, gk, gv) = grads_of(0, b, true)?;
                return Ok(vec![own(gq), own(gk), own(gv)]);
            }
            let (dt, dev) = (g.dtype(), g.device().clone());
            let (mut gq, mut gk, mut gv) = (None, None, None);
            for (first, len) in super::row_chunks(b, chunk) {
                let (cq_, ck_, cv_) = grads_of(first, len, false)?;
                for (part, dst) in [(cq_, &mut gq), (ck_, &mut gk), (cv_, &mut gv)] {
                    let Some(part) = part else { continue };
                    if dst.is_none() {
                        let d = part.dims();
                        *dst = Some(Tensor::zeros((b, d[1], d[2], d[3]), dt, &dev)?);
                    }
                    if let Some(dst) = dst.as_ref() {
                        dst.slice_set(&part.contiguous()?, 0, first)?;
                    }
                }
            }
            Ok(vec![own(gq), own(gk), own(gv)])
        })?;
        if let Some(r) = rebuild {
            self.offer_recompute(&y, r);
        }
        Ok(y)
    }

    /// Multi-head attention over `x: [B, T, E]`: `q, k, v = linear(x, wq|wk|wv, b..)` (each
    /// `[B, T, D]`), split into `heads` heads `[B, H, T, D/H]`, fused
    /// [`Tape::scaled_dot_product_attention`], heads merged back to `[B, T, D]`, and the output
    /// projection `linear(.., wo, bo)` (`wo: [E_out, D]`).
    ///
    /// Context (all through the ops it is made of): `x` once (the three projections save the
    /// same value, deduplicated), the per-head `q`, `k`, `v` and `P` of the attention node,
    /// and the merged heads (input of the output projection); weights by reference. The
    /// split/merge reshapes and transposes keep only shapes.
    pub fn multi_head_attention(&mut self, x: &Value, m: &MultiHeadAttention) -> Result<Value> {
        self.multi_head_attention_owned(x.clone(), m)
    }

    /// [`Tape::multi_head_attention`] of an `x` handed over by the caller: it is dropped once
    /// the three projections have read it, so (when the caller held the only handle) it is
    /// freed before the score-sized tensors exist.
    pub fn multi_head_attention_owned(
        &mut self,
        x: Value,
        m: &MultiHeadAttention,
    ) -> Result<Value> {
        self.mha_with(x, m, None)
    }

    /// `residual + multi_head_attention(x)` (a transformer block's first residual sum), both
    /// handed over. In batch chunks, each chunk's output is added straight into `residual`'s
    /// buffer where nothing else needs it as it is (at L1–L4 the layer norm that read it
    /// keeps a compressed copy), so the attention output never exists whole beside it.
    pub fn multi_head_attention_residual(
        &mut self,
        x: Value,
        m: &MultiHeadAttention,
        residual: Value,
    ) -> Result<Value> {
        self.mha_with(x, m, Some(residual))
    }

    fn mha_with(
        &mut self,
        x: Value,
        m: &MultiHeadAttention,
        residual: Option<Value>,
    ) -> Result<Value> {
        const OP: &str = "multi_head_attention";
        let xd = x.dims();
        if x.rank() != 3 {
            bail!("{OP}: x must be [B, T, E], got {xd:?}");
        }
        if m.heads == 0 {
            bail!("{OP}: heads must be at least 1");
        }
        let (b, t) = (xd[0], xd[1]);
        let d = m.wq.dims().first().copied().unwrap_or(0);
        for (name, w) in [("wk", m.wk), ("wv", m.wv)] {
            if w.dims().first() != Some(&d) {
                bail!(
                    "{OP}: {name} {:?} does not project to the same dim as wq {:?}",
                    w.dims(),
                    m.wq.dims()
                );
            }
        }
        if d % m.heads != 0 {
            bail!(
                "{OP}: projection dim {d} (wq {:?}) is not divisible by heads {}",
                m.wq.dims(),
                m.heads
            );
        }
        let dh = d / m.heads;
        let params: Vec<&Value> = [m.wq, m.wk, m.wv, m.wo]
            .into_iter()
            .chain([m.bq, m.bk, m.bv, m.bo].into_iter().flatten())
            .collect();
        // Fused in batch chunks on the CPU in the usual training case at L1-L4: several
        // chunks (with fewer, the composed ops, which free `x` before the scores exist, hold
        // less), every input tracked (so the contexts are exactly the composed ops'), no
        // analytic estimate being taken (`Tape::fuses_in_chunks`).
        if fused_cpu_kernels()
            && x.tensor().device().is_cpu()
            // Composed: q, k, v and the output (4 input sizes); fused: the input, the output
            // and a chunk of q, k, v, P and the merged heads. Less from three chunks on.
            && super::worth_chunking(mha_chunk_rows(b, t, d, m.heads, x.dtype()), b, 3)
            && self.is_recording()
            && x.is_tracked()
            && params.iter().all(|p| p.is_tracked())
            && self.fuses_in_chunks()
        {
            let e_out = m.wo.dims().first().copied().unwrap_or(0);
            // The residual's buffer takes the sum where it may be overwritten; otherwise the
            // output is a new tensor and the sum a separate op.
            return match residual {
                Some(r)
                    if r.dims() == [b, t, e_out]
                        && r.dtype() == x.dtype()
                        && self.may_overwrite(&r, None) =>
                {
                    self.mha_chunks(&x, m, Some(r), None)
                }
                Some(r) => {
                    let y = self.mha_chunks(&x, m, None, None)?;
                    self.add_owned(y, &r)
                }
                None => self.mha_chunks(&x, m, None, None),
            };
        }
        let split = |tape: &mut Tape, w: &Value, bias: Option<&Value>| -> Result<Value> {
            let y = tape.linear(&x, w, bias)?;
            let y = tape.reshape(&y, &[b, t, m.heads, dh])?;
            tape.transpose(&y, 1, 2)
        };
        let q = split(self, m.wq, m.bq)?;
        let k = split(self, m.wk, m.bk)?;
        let v = split(self, m.wv, m.bv)?;
        drop(x);
        let o = self.scaled_dot_product_attention(&q, &k, &v, m.causal)?;
        drop((q, k, v));
        let merged = self.transpose(&o, 1, 2)?;
        drop(o);
        let merged = self.reshape(&merged, &[b, t, d])?;
        let y = self.linear(&merged, m.wo, m.bo)?;
        drop(merged);
        match residual {
            Some(r) => self.add_owned(y, &r),
            None => Ok(y),
        }
    }
}

/// The attention output `P v` (`[B, H, Tq, Dv]`) rebuilt from the saved `P` and `v`: the
/// product of two independently rounded factors, so unbiased where they are. With `merged:
/// (T, D)` its heads merged to `[B, T, D]` (the fused node's output projection input; the
/// composed ops' transpose and reshape pass the plain one on).
struct AttentionOutput {
    p: Saved,
    v: Saved,
    merged: Option<(usize, usize)>,
}

impl Recompute for AttentionOutput {
    fn rows(&self, first: usize, count: usize) -> Result<Tensor> {
        let (p, v) = (
            self.p.load_rows(first, count)?,
            self.v.load_rows(first, count)?,
        );
        match self.merged {
            Some((t, d)) => merged_heads(&p, &v, t, d),
            None => Ok(p.matmul(&v)?),
        }
    }
    fn label(&self) -> String {
        "from sdpa".into()
    }
}

/// Heads `[B, H, T, Dh]` of `P v` merged to `[B, T, D]`, as the composed ops' transpose and
/// reshape make them.
fn merged_heads(p: &Tensor, v: &Tensor, t: usize, d: usize) -> Result<Tensor> {
    let o = p.matmul(v)?;
    let n = o.dims()[0];
    Ok(o.transpose(1, 2)?.contiguous()?.reshape((n, t, d))?)
}

/// The inputs of a multi-head attention node in order: `x, wq, [bq], wk, [bk], wv, [bv], wo,
/// [bo]`.
fn mha_inputs<'a>(x: &'a Value, m: &MultiHeadAttention<'a>) -> Vec<&'a Value> {
    let mut v = vec![x];
    for (w, b) in [(m.wq, m.bq), (m.wk, m.bk), (m.wv, m.bv), (m.wo, m.bo)] {
        v.push(w);
        v.extend(b);
    }
    v
}

/// Samples per chunk of the fused attention: a chunk's scores and P, and its q, k, v and
/// merged heads, within [`FUSED_CHUNK_BYTES`](super::FUSED_CHUNK_BYTES).
fn mha_chunk_rows(b: usize, t: usize, d: usize, heads: usize, dt: DType) -> usize {
    let per_sample = (2 * heads * t * t + 4 * t * d) * dt.size_in_bytes();
    super::fused_chunk_rows_for(b, per_sample)
}

/// `x W^T + b` over the rows of `x` (`[rows, in]`).
fn project(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let y = x.matmul(&w.t()?)?;
    Ok(match b {
        Some(b) => add_bias_rows(y, b)?,
        None => y,
    })
}

impl Tape {
    /// `x + multi_head_attention(layer_norm(x))`, the first half of a pre-norm transformer
    /// block, `x` handed over. Fused, the norm runs a chunk at a time too (saving what
    /// `layer_norm` saves), so neither the normalised tensor nor the attention output ever
    /// exists whole: forward holds the residual stream, backward its gradient, each beside
    /// one chunk's temporaries. Otherwise `layer_norm` then
    /// [`Tape::multi_head_attention_residual`].
    pub fn prenorm_attention_residual(
        &mut self,
        x: Value,
        norm: &PreNorm,
        m: &MultiHeadAttention,
    ) -> Result<Value> {
        let xd = x.dims().to_vec();
        let params: Vec<&Value> = [m.wq, m.wk, m.wv, m.wo]
            .into_iter()
            .chain(
                [m.bq, m.bk, m.bv, m.bo, norm.gamma, norm.beta]
                    .into_iter()
                    .flatten(),
            )
            .collect();
        let d = m.wq.dims().first().copied().unwrap_or(0);
        let fused = fused_cpu_kernels()
            && x.tensor().device().is_cpu()
            && xd.len() == 3
            && m.heads > 0
            && d % m.heads == 0
            && m.wo.dims().first() == Some(&xd[2])
            && super::worth_chunking(
                mha_chunk_rows(xd[0], xd[1], d, m.heads, x.dtype()),
                xd[0],
                3,
            )
            && self.is_recording()
            && x.is_tracked()
            && params.iter().all(|p| p.is_tracked())
            && self.fuses_in_chunks();
        if !fused {
            let n = self.layer_norm(&x, norm.gamma, norm.beta, norm.eps)?;
            return self.mha_with(n, m, Some(x));
        }
        self.mha_chunks(&x, m, None, Some(norm))
    }

    /// Multi-head attention as one node run in batch chunks, of `x` itself or, with `norm`, of
    /// `layer_norm(x)` plus `x` (the residual stream), and plus `residual` when given (see
    /// [`Tape::multi_head_attention_owned`] for when): the projections, scores, softmax and
    /// output of a few samples at a time, each chunk's `q`, `k`, `v`, `P` and merged heads
    /// quantized into their contexts as they are made ([`Tape::begin_save_rows`]), and in
    /// backward the gradient carried through the output projection, the attention and the
    /// three input projections a chunk at a time. So neither the whole batch's `q`, `k`, `v`
    /// (three tensors the size of `x`) nor its score-sized tensors ever exist; in backward
    /// neither do their gradients. The contexts (slots, shapes, codes) are exactly those of
    /// the composed ops.
    fn mha_chunks(
        &mut self,
        x: &Value,
        m: &MultiHeadAttention,
        residual: Option<Value>,
        norm: Option<&PreNorm>,
    ) -> Result<Value> {
        const OP: &str = "multi_head_attention";
        let xd = x.dims();
        let (b, t, e) = (xd[0], xd[1], xd[2]);
        let d = m.wq.dims()[0];
        let (h, dh) = (m.heads, d / m.heads);
        let e_out = m.wo.dims()[0];
        let (dt, dev) = (x.dtype(), x.tensor().device().clone());
        let mask = Mask {
            scale: 1.0 / (dh as f64).sqrt(),
            causal: m.causal,
            tq: t,
            tk: t,
        };
        // The composed ops' saves, in their order: with a norm, layer_norm's (x, mean, rstd,
        // gamma); each projection saves its input (stored once) and its weight; the
        // attention q, k, v and P; the output projection its input.
        let mut cn = match norm {
            Some(n) => Some(ChunkNorm::begin(self, x, n)?),
            None => None,
        };
        // Where the policy rebuilds contexts, the projections' input (the norm's output) and
        // the output projection's (the merged heads, `P v`) are rebuilt, as the composed ops'
        // offers make them; `*_at` is where their log lines belong.
        let rebuild = self.recomputes_contexts();
        let n_at = self.log_place();
        let (cx, mut n_rows) = match cn {
            Some(_) if rebuild => (None, None),
            Some(_) => {
                let r = self.begin_save_rows("linear", &[b, t, e], dt, &dev, SaveAs::Activation)?;
                (None, Some(r))
            }
            None => (Some(self.save("linear", x, SaveAs::Activation)?), None),
        };
        let cwq = self.save("linear", m.wq, SaveAs::Activation)?;
        match cn {
            Some(_) => self.note_shared("linear", &[b, t, e]),
            None => drop(self.save("linear", x, SaveAs::Activation)?),
        }
        let cwk = self.save("linear", m.wk, SaveAs::Activation)?;
        match cn {
            Some(_) => self.note_shared("linear", &[b, t, e]),
            None => drop(self.save("linear", x, SaveAs::Activation)?),
        }
        let cwv = self.save("linear", m.wv, SaveAs::Activation)?;
        let head_dims = [b, h, t, dh];
        let mut rows: Vec<RowSave> = Vec::with_capacity(4);
        for dims in [head_dims, head_dims, head_dims, [b, h, t, t]] {
            rows.push(self.begin_save_rows("sdpa", &dims, dt, &dev, SaveAs::Activation)?);
        }
        let merged_at = self.log_place();
        let mut merged_rows = if rebuild {
            None
        } else {
            Some(self.begin_save_rows("linear", &[b, t, d], dt, &dev, SaveAs::Activation)?)
        };
        // With a norm the sum goes into `x`'s own buffer unless the norm kept it as it is.
        let norm_in_place =
            cn.as_ref().is_some_and(|c| !c.keeps_input_as_is()) && self.may_overwrite(x, None);
        let y = match (&residual, &cn) {
            (Some(r), _) => r.tensor().clone(),
            (None, Some(_)) if norm_in_place => x.tensor().clone(),
            _ => Tensor::zeros((b, t, e_out), dt, &dev)?,
        };
        let chunk = mha_chunk_rows(b, t, d, h, dt);
        let bias = |v: Option<&Value>| v.map(|v| v.tensor().clone());
        let (bq, bk, bv, bo) = (bias(m.bq), bias(m.bk), bias(m.bv), bias(m.bo));
        for (first, len) in super::row_chunks(b, chunk) {
            let x_rows = x.tensor().narrow(0, first, len)?;
            let xc = match cn.as_mut() {
                Some(cn) => {
                    let n = cn.forward(first, &x_rows)?;
                    if let Some(r) = n_rows.as_mut() {
                        r.push(first, &n)?;
                    }
                    n
                }
                None => x_rows.clone(),
            }
            .reshape((len * t, e))?;
            let heads = |w: &Value, bias: Option<&Tensor>| -> Result<Tensor> {
                let y = project(&xc, w.tensor(), bias)?;
                Ok(y.reshape((len, t, h, dh))?.transpose(1, 2)?.contiguous()?)
            };
            let q = heads(m.wq, bq.as_ref())?;
            let k = heads(m.wk, bk.as_ref())?;
            let v = heads(m.wv, bv.as_ref())?;
            drop(xc);
            rows[0].push(first, &q)?;
            rows[1].push(first, &k)?;
            rows[2].push(first, &v)?;
            let p = mask.softmax_owned(q.matmul(&k.t()?)?)?;
            drop((q, k));
            rows[3].push(first, &p)?;
            let o = p.matmul(&v)?;
            drop((p, v));
            let merged = o.transpose(1, 2)?.contiguous()?.reshape((len, t, d))?;
            drop(o);
            if let Some(r) = merged_rows.as_mut() {
                r.push(first, &merged)?;
            }
            let yc = project(&merged.reshape((len * t, d))?, m.wo.tensor(), bo.as_ref())?;
            let yc = yc.reshape((len, t, e_out))?;
            match &cn {
                Some(_) if norm_in_place => super::put_chunk(&y, first, &yc, true)?,
                Some(_) => super::put_chunk(&y, first, &(yc + &x_rows)?, false)?,
                None => super::put_chunk(&y, first, &yc, residual.is_some())?,
            }
            crate::memory::check_budget()?;
        }
        let cn = match cn {
            Some(c) => Some(c.finish(
                self,
                norm.is_some_and(|n| n.gamma.is_some()),
                norm.is_some_and(|n| n.beta.is_some()),
            )?),
            None => None,
        };
        let cx = match (cx, n_rows, &cn) {
            (Some(c), _, _) => c,
            (None, Some(r), _) => self.finish_save_rows(r)?,
            (None, None, Some(cn)) => {
                self.recomputed_context_at(n_at, "linear", cn.output(), &[b, t, e], dt, &dev)
            }
            (None, None, None) => bail!("{OP}: the projections' input was not saved"),
        };
        let mut saved = Vec::with_capacity(4);
        for r in rows {
            saved.push(self.finish_save_rows(r)?);
        }
        let cm = match merged_rows {
            Some(r) => Some(self.finish_save_rows(r)?),
            None => None,
        };
        let cwo = self.save("linear", m.wo, SaveAs::Activation)?;
        let [cq, ck, cv, cp]: [Saved; 4] = saved
            .try_into()
            .map_err(|_| anyhow::anyhow!("{OP}: four contexts expected"))?;
        if cm.is_none() {
            // Logged like the composed output projection's save; backward forms the chunk's
            // `P v` from the P and v it loads anyway rather than through this handle.
            let merged = Rc::new(AttentionOutput {
                p: cp.clone(),
                v: cv.clone(),
                merged: Some((t, d)),
            });
            drop(self.recomputed_context_at(merged_at, "linear", merged, &[b, t, d], dt, &dev));
        }
        let has = [
            m.bq.is_some(),
            m.bk.is_some(),
            m.bv.is_some(),
            m.bo.is_some(),
        ];
        let mut inputs: Vec<&Value> = residual.iter().collect();
        match norm {
            Some(n) => {
                inputs.push(x);
                inputs.extend(n.gamma);
                inputs.extend(n.beta);
                inputs.extend(mha_inputs(x, m).into_iter().skip(1));
            }
            None => inputs.extend(mha_inputs(x, m)),
        }
        let with_residual = residual.is_some();
        let has_norm = [
            norm.is_some_and(|n| n.gamma.is_some()),
            norm.is_some_and(|n| n.beta.is_some()),
        ];
        self.record_grad(OP, &inputs, y, move |g, _needs| {
            // The residual's gradient is the output gradient itself, handed on (with its
            // ownership) once the chunks below have read it.
            let g_owned = g.is_owned();
            let g = g.into_tensor();
            let w = [cwq.load()?, cwk.load()?, cwv.load()?, cwo.load()?];
            // Gradients of wq, wk, wv, wo and their biases, summed over the chunks.
            let mut gw: [Option<Tensor>; 4] = [None, None, None, None];
            let mut gb: [Option<Tensor>; 4] = [None, None, None, None];
            let add = super::accumulate;
            // With a norm, `x`'s gradient is the output gradient (the residual path) plus the
            // norm's input gradient, added into the output gradient's buffer where owned.
            let (mut gg, mut gbn) = (None, None);
            let gx = match (&cn, g_owned) {
                (Some(_), true) => g.reshape((b * t, e))?,
                (Some(_), false) => g.reshape((b * t, e))?.copy()?,
                (None, _) => Tensor::zeros((b * t, e), dt, &dev)?,
            };
            for (first, len) in super::row_chunks(b, chunk) {
                let n = len * t;
                let gc = g.narrow(0, first, len)?.reshape((n, e_out))?;
                // The merged heads, stored or rebuilt from the chunk's P and v.
                let (merged, mut pv) = match &cm {
                    Some(cm) => (cm.load_rows(first, len)?, None),
                    None => {
                        let (p, v) = (cp.load_rows(first, len)?, cv.load_rows(first, len)?);
                        (merged_heads(&p, &v, t, d)?, Some((p, v)))
                    }
                };
                add(&mut gw[3], gc.t()?.matmul(&merged.reshape((n, d))?)?)?;
                drop(merged);
                add(&mut gb[3], gc.sum(0)?)?;
                let go = gc
                    .matmul(&w[3])?
                    .reshape((len, t, h, dh))?
                    .transpose(1, 2)?
                    .contiguous()?;
                drop(gc);
                // The attention backward of the chunk, as in `scaled_dot_product_attention`.
                let (p, v) = match pv.take() {
                    Some(pv) => pv,
                    None => (cp.load_rows(first, len)?, cv.load_rows(first, len)?),
                };
                let dp = go.matmul(&v.t()?)?;
                drop(v);
                let gv = p.t()?.matmul(&go)?;
                drop(go);
                let ds = mask.softmax_backward_owned(&p, dp)?;
                drop(p);
                let gq = ds.matmul(&ck.load_rows(first, len)?)?;
                let gk = ds.t()?.matmul(&cq.load_rows(first, len)?)?;
                drop(ds);
                let xc = cx.load_rows(first, len)?.reshape((n, e))?;
                let mut gxc: Option<Tensor> = None;
                for (i, gh) in [gq, gk, gv].into_iter().enumerate() {
                    let gh = gh.transpose(1, 2)?.contiguous()?.reshape((n, d))?;
                    add(&mut gw[i], gh.t()?.matmul(&xc)?)?;
                    add(&mut gb[i], gh.sum(0)?)?;
                    add(&mut gxc, gh.matmul(&w[i])?)?;
                }
                if let Some(gxc) = gxc {
                    match &cn {
                        Some(cn) => {
                            let part = cn.backward(first, len, &gxc, &mut gg, &mut gbn)?;
                            super::put_chunk(&gx, first * t, &part, true)?;
                        }
                        None => gx.slice_set(&gxc, 0, first * t)?,
                    }
                }
            }
            let mut out = Vec::with_capacity(12);
            if with_residual {
                out.push(Some(if g_owned {
                    Grad::owned(g)
                } else {
                    Grad::shared(g)
                }));
            } else {
                drop(g);
            }
            out.push(Some(Grad::owned(gx.reshape((b, t, e))?)));
            if has_norm[0] {
                out.push(gg.take().map(Grad::owned));
            }
            if has_norm[1] {
                out.push(gbn.take().map(Grad::owned));
            }
            for i in 0..4 {
                out.push(gw[i].take().map(Grad::owned));
                if has[i] {
                    out.push(gb[i].take().map(Grad::owned));
                }
            }
            Ok(out)
        })
    }
}

/// The parameters of one multi-head attention layer, by reference (the caller owns the
/// values). Weights are `[out, in]` as for [`Tape::linear`]: `wq, wk, wv: [D, E]`,
/// `wo: [E_out, D]`; `D` must be divisible by `heads`.
#[derive(Clone, Copy)]
pub struct MultiHeadAttention<'a> {
    pub wq: &'a Value,
    pub wk: &'a Value,
    pub wv: &'a Value,
    pub wo: &'a Value,
    pub bq: Option<&'a Value>,
    pub bk: Option<&'a Value>,
    pub bv: Option<&'a Value>,
    pub bo: Option<&'a Value>,
    pub heads: usize,
    pub causal: bool,
}

impl<'a> MultiHeadAttention<'a> {
    /// No biases, not causal; set the public fields for more.
    pub fn new(wq: &'a Value, wk: &'a Value, wv: &'a Value, wo: &'a Value, heads: usize) -> Self {
        Self {
            wq,
            wk,
            wv,
            wo,
            bq: None,
            bk: None,
            bv: None,
            bo: None,
            heads,
            causal: false,
        }
    }
}

/// Scale and mask of one attention call: enough to redo the masking in backward without
/// keeping any tensor.
#[derive(Clone, Copy, Debug)]
struct Mask {
    scale: f64,
    causal: bool,
    tq: usize,
    tk: usize,
}

impl Mask {
    /// Keys visible to row `r` of the flattened `[B*H*Tq, Tk]` score matrix.
    #[inline]
    fn visible(&self, r: usize) -> usize {
        if self.causal {
            (r % self.tq + self.tk - self.tq + 1).min(self.tk)
        } else {
            self.tk
        }
    }

    /// Rows per rayon task, so each task touches at least a few thousand elements.
    fn rows_per_task(&self) -> usize {
        (8192 / self.tk.max(1)).max(1)
    }

    /// `softmax(scores * scale + mask)` over the last dim; masked entries exactly 0.
    fn softmax(&self, scores: &Tensor) -> Result<Tensor> {
        match cpu_kernel_dtype(scores) {
            Some(DType::F32) => self.softmax_cpu::<f32>(scores),
            Some(DType::F64) => self.softmax_cpu::<f64>(scores),
            _ => self.softmax_candle(scores),
        }
    }

    /// `dS = scale * P ⊙ (dP − rowsum(dP ⊙ P))`, 0 at masked positions.
    fn softmax_backward(&self, p: &Tensor, dp: &Tensor) -> Result<Tensor> {
        match (cpu_kernel_dtype(p), cpu_kernel_dtype(dp)) {
            (Some(DType::F32), Some(DType::F32)) => self.softmax_backward_cpu::<f32>(p, dp),
            (Some(DType::F64), Some(DType::F64)) => self.softmax_backward_cpu::<f64>(p, dp),
            _ => self.softmax_backward_candle(p, dp),
        }
    }

    /// [`Mask::softmax_backward`] for a `dp` the caller owns: on the CPU `dS` is written into
    /// `dp`'s own buffer (row by row, each row's dot product read before it is overwritten).
    fn softmax_backward_owned(&self, p: &Tensor, dp: Tensor) -> Result<Tensor> {
        let fused = match (cpu_kernel_dtype(p), cpu_kernel_dtype(&dp)) {
            (Some(a), Some(b)) => {
                a == b && p.is_contiguous() && dp.is_contiguous() && p.shape() == dp.shape()
            }
            _ => false,
        };
        if !fused {
            return self.softmax_backward(p, &dp);
        }
        dp.inplace_op2(p, &SoftmaxBackwardInPlace(*self))?;
        Ok(dp)
    }

    /// One row of the softmax backward: `dp[..n] = scale p (dp - Σ p dp)` over the `n`
    /// visible keys, 0 beyond.
    #[inline]
    fn softmax_backward_row<T: Real>(&self, n: usize, p: &[T], dp: &mut [T]) {
        let scale = T::from_f64(self.scale);
        let dot = p[..n]
            .iter()
            .zip(&dp[..n])
            .fold(T::from_f64(0.0), |a, (&p, &d)| a + p * d);
        for (d, &p) in dp[..n].iter_mut().zip(&p[..n]) {
            *d = scale * p * (*d - dot);
        }
        for d in &mut dp[n..] {
            *d = T::from_f64(0.0);
        }
    }

    /// [`Mask::softmax`] of scores the caller owns: on the CPU the probabilities are written
    /// into the scores' own buffer.
    fn softmax_owned(&self, scores: Tensor) -> Result<Tensor> {
        if cpu_kernel_dtype(&scores).is_some() && scores.is_contiguous() {
            scores.inplace_op1(&SoftmaxInPlace(*self))?;
            return Ok(scores);
        }
        self.softmax(&scores)
    }

    /// One row of the masked softmax: `o[..n] = softmax(s[..n] * scale)` over the `n` visible
    /// keys (read from `s`, which may be `o` itself), 0 beyond.
    #[inline]
    fn softmax_row<T: Real>(&self, n: usize, o: &mut [T]) {
        let scale = T::from_f64(self.scale);
        let max = o[..n].iter().copied().fold(T::neg_inf(), T::max);
        let mut sum = T::from_f64(0.0);
        for o in o[..n].iter_mut() {
            let e = ((*o - max) * scale).exp();
            *o = e;
            sum += e;
        }
        let inv = T::from_f64(1.0) / sum;
        for o in o[..n].iter_mut() {
            *o *= inv;
        }
        for o in &mut o[n..] {
            *o = T::from_f64(0.0);
        }
    }

    fn softmax_cpu<T: Real>(&self, scores: &Tensor) -> Result<Tensor> {
        let scores = scores.contiguous()?;
        let tk = self.tk;
        let mut out = vec![T::from_f64(0.0); scores.elem_count()];
        let chunk = self.rows_per_task() * tk;
        with_cpu_slice::<T, _>(&scores, |s| {
            out.par_chunks_mut(chunk)
                .zip(s.par_chunks(chunk))
                .enumerate()
                .for_each(|(c, (out, s))| {
                    let row0 = c * (chunk / tk);
                    for (i, (o, s)) in out.chunks_mut(tk).zip(s.chunks(tk)).enumerate() {
                        // Masked probabilities are exactly 0.
                        o.copy_from_slice(s);
                        self.softmax_row(self.visible(row0 + i), o);
                    }
                });
            Ok(())
        })?;
        Ok(Tensor::from_vec(out, scores.shape(), &Device::Cpu)?)
    }

    fn softmax_backward_cpu<T: Real>(&self, p: &Tensor, dp: &Tensor) -> Result<Tensor> {
        let (p, dp) = (p.contiguous()?, dp.contiguous()?);
        let tk = self.tk;
        let mut out = vec![T::from_f64(0.0); p.elem_count()];
        let chunk = self.rows_per_task() * tk;
        with_cpu_slice::<T, _>(&p, |p| {
            with_cpu_slice::<T, _>(&dp, |dp| {
                out.par_chunks_mut(chunk)
                    .zip(p.par_chunks(chunk).zip(dp.par_chunks(chunk)))
                    .enumerate()
                    .for_each(|(c, (out, (p, dp)))| {
                        let row0 = c * (chunk / tk);
                        let rows = out.chunks_mut(tk).zip(p.chunks(tk).zip(dp.chunks(tk)));
                        for (i, (o, (p, dp))) in rows.enumerate() {
                            o.copy_from_slice(dp);
                            self.softmax_backward_row(self.visible(row0 + i), p, o);
                        }
                    });
                Ok(())
            })
        })?;
        Ok(Tensor::from_vec(out, p.shape(), &Device::Cpu)?)
    }

    /// Additive mask `[Tq, Tk]`: 0 where visible, -inf where masked.
    fn additive_mask(&self, dtype: DType, device: &Device) -> Result<Tensor> {
        let mut m = vec![0f32; self.tq * self.tk];
        for (i, row) in m.chunks_mut(self.tk).enumerate() {
            for x in &mut row[self.visible(i)..] {
                *x = f32::NEG_INFINITY;
            }
        }
        Ok(Tensor::from_vec(m, (self.tq, self.tk), device)?.to_dtype(dtype)?)
    }

    fn softmax_candle(&self, scores: &Tensor) -> Result<Tensor> {
        let mut s = scores.affine(self.scale, 0.0)?;
        if self.causal {
            s = s.broadcast_add(&self.additive_mask(s.dtype(), s.device())?)?;
        }
        // exp(-inf - max) is exactly 0, and every row has a visible key, so no NaN.
        Ok(candle_nn::ops::softmax_last_dim(&s)?)
    }

    fn softmax_backward_candle(&self, p: &Tensor, dp: &Tensor) -> Result<Tensor> {
        let dot = (p * dp)?.sum_keepdim(D::Minus1)?;
        let ds = (dp.broadcast_sub(&dot)? * p)?.affine(self.scale, 0.0)?;
        if self.causal {
            // Zero the masked positions even if a quantized P is not exactly 0 there.
            let keep = self.additive_mask(DType::F32, ds.device())?.eq(0f64)?;
            let zeros = ds.zeros_like()?;
            return Ok(keep.broadcast_as(ds.shape())?.where_cond(&ds, &zeros)?);
        }
        Ok(ds)
    }
}

/// `scores ← P` in place (see [`Mask::softmax_owned`]).
struct SoftmaxInPlace(Mask);

impl SoftmaxInPlace {
    fn run<T: Real>(&self, s: &mut [T]) {
        let m = &self.0;
        let tk = m.tk;
        let chunk = m.rows_per_task() * tk;
        s.par_chunks_mut(chunk).enumerate().for_each(|(c, s)| {
            let row0 = c * (chunk / tk);
            for (i, row) in s.chunks_mut(tk).enumerate() {
                m.softmax_row(m.visible(row0 + i), row);
            }
        });
    }
}

impl candle_core::InplaceOp1 for SoftmaxInPlace {
    fn name(&self) -> &'static str {
        "softmax_in_place"
    }
    fn cpu_fwd(
        &self,
        s: &mut candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        use candle_core::CpuStorage as C;
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("softmax_in_place: the scores must be contiguous");
        };
        if (b - a) % self.0.tk.max(1) != 0 {
            candle_core::bail!(
                "softmax_in_place: {} elements are not rows of {}",
                b - a,
                self.0.tk
            );
        }
        match s {
            C::F32(v) => self.run(&mut v[a..b]),
            C::F64(v) => self.run(&mut v[a..b]),
            _ => candle_core::bail!("softmax_in_place: needs f32 or f64"),
        }
        Ok(())
    }
}

/// `dP ← dS` in place (see [`Mask::softmax_backward_owned`]); the source is `P`.
struct SoftmaxBackwardInPlace(Mask);

impl SoftmaxBackwardInPlace {
    fn run<T: Real>(&self, dp: &mut [T], p: &[T]) {
        let m = &self.0;
        let tk = m.tk;
        let chunk = m.rows_per_task() * tk;
        dp.par_chunks_mut(chunk)
            .zip(p.par_chunks(chunk))
            .enumerate()
            .for_each(|(c, (dp, p))| {
                let row0 = c * (chunk / tk);
                for (i, (dp, p)) in dp.chunks_mut(tk).zip(p.chunks(tk)).enumerate() {
                    m.softmax_backward_row(m.visible(row0 + i), p, dp);
                }
            });
    }
}

impl candle_core::InplaceOp2 for SoftmaxBackwardInPlace {
    fn name(&self) -> &'static str {
        "softmax_backward_in_place"
    }
    fn cpu_fwd(
        &self,
        dst: &mut candle_core::CpuStorage,
        dl: &candle_core::Layout,
        src: &candle_core::CpuStorage,
        sl: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        use candle_core::CpuStorage as C;
        let (dr, sr) = super::inplace_ranges("softmax_backward_in_place", dl, sl, true)?;
        if (dr.len()) % self.0.tk.max(1) != 0 {
            candle_core::bail!("softmax_backward_in_place: shapes differ");
        }
        match (dst, src) {
            (C::F32(d), C::F32(s)) => self.run(&mut d[dr], &s[sr]),
            (C::F64(d), C::F64(s)) => self.run(&mut d[dr], &s[sr]),
            _ => candle_core::bail!("softmax_backward_in_place: needs f32 or f64"),
        }
        Ok(())
    }
}

/// The element type our CPU kernels handle for `t`, or `None` (other device or dtype).
fn cpu_kernel_dtype(t: &Tensor) -> Option<DType> {
    match (t.device(), t.dtype()) {
        (Device::Cpu, d @ (DType::F32 | DType::F64)) => Some(d),
        _ => None,
    }
}

/// Runs `f` on the contiguous CPU slice of `t` (which must be contiguous and on the CPU).
fn with_cpu_slice<T: WithDType, R>(t: &Tensor, f: impl FnOnce(&[T]) -> Result<R>) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        bail!("expected a CPU tensor, got {:?}", t.device());
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        bail!("expected a contiguous tensor of shape {:?}", t.dims());
    };
    f(&cpu.as_slice::<T>()?[start..end])
}

/// The float operations the CPU kernels need beyond [`WithDType`] (which brings `+ - * /`,
/// comparisons and `max`), for f32 and f64.
trait Real: WithDType {
    fn neg_inf() -> Self;
    fn exp(self) -> Self;
}

impl Real for f32 {
    fn neg_inf() -> Self {
        f32::NEG_INFINITY
    }
    fn exp(self) -> Self {
        f32::exp(self)
    }
}

impl Real for f64 {
    fn neg_inf() -> Self {
        f64::NEG_INFINITY
    }
    fn exp(self) -> Self {
        f64::exp(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tape::gradcheck::{max_rel_diff, random_tensor};

    /// The CPU kernels and the candle fallback (used on CUDA) agree, causal and not.
    #[test]
    fn cpu_kernels_match_the_candle_fallback() -> Result<()> {
        for (causal, tq, tk) in [(false, 5, 7), (true, 7, 7), (true, 3, 7), (false, 1, 1)] {
            let mask = Mask {
                scale: 0.5,
                causal,
                tq,
                tk,
            };
            for dtype in [DType::F32, DType::F64] {
                let s = (random_tensor(&[2, 3, tq, tk], 1)? * 4.0)?.to_dtype(dtype)?;
                let p = mask.softmax(&s)?;
                let p_ref = mask.softmax_candle(&s)?;
                assert!(max_rel_diff(&p, &p_ref)? < 1e-6);
                let dp = random_tensor(&[2, 3, tq, tk], 2)?.to_dtype(dtype)?;
                let ds = mask.softmax_backward(&p, &dp)?;
                let ds_ref = mask.softmax_backward_candle(&p, &dp)?;
                assert!(max_rel_diff(&ds, &ds_ref)? < 1e-5);
                // The in-place variants (into the scores, into dP) give the same numbers.
                let p_owned = mask.softmax_owned(s.copy()?)?;
                assert_eq!(max_rel_diff(&p_owned, &p)?, 0.0);
                let ds_owned = mask.softmax_backward_owned(&p, dp.copy()?)?;
                assert_eq!(max_rel_diff(&ds_owned, &ds)?, 0.0);
            }
        }
        Ok(())
    }
}
