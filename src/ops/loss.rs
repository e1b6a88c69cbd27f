//! Cross-entropy over logits (with label smoothing and an ignore index), and accuracy.

use super::activation::{CpuView, Real, PAR_CHUNK};
use crate::tape::{SaveAs, Tape, Value};
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, D};
use rayon::prelude::*;

/// Options of [`Tape::cross_entropy`], with PyTorch's meaning.
#[derive(Clone, Copy, Debug, Default)]
pub struct CrossEntropyOptions {
    /// ε in `[0, 1]`: the target distribution is `(1 − ε)·onehot + ε/C`.
    pub label_smoothing: f64,
    /// Targets equal to this contribute no loss and no gradient, and are not counted in the mean.
    pub ignore_index: Option<u32>,
}

impl Tape {
    /// Mean cross-entropy of `logits` (`[N, C]` or `[N, T, C]`, classes last) against `U32`
    /// `targets` (`[N]` or `[N, T]`) over the non-ignored targets; a scalar of shape `[]`.
    /// Label smoothing as in PyTorch. If every target is ignored the loss is 0 and the gradient
    /// zero (not NaN).
    ///
    /// Context: the softmax probabilities `p` (Activation) and the targets (exact `U32`,
    /// never compressed). Backward is `g · (p − target_dist) / count`, *linear* in `p`, so a
    /// stochastically rounded `p` keeps the gradient unbiased — which recomputing the softmax
    /// from quantized logits would not (softmax is nonlinear). The count and the options are
    /// scalars captured by the rule.
    pub fn cross_entropy(
        &mut self,
        logits: &Value,
        targets: &Tensor,
        opts: CrossEntropyOptions,
    ) -> Result<Value> {
        let (rows, classes) = check_shapes("cross_entropy", logits.dims(), targets)?;
        let eps = opts.label_smoothing;
        if !(0.0..=1.0).contains(&eps) {
            bail!("cross_entropy: label_smoothing must be in [0, 1], got {eps}");
        }
        let targets = targets.flatten_all()?;
        let tv = targets.to_vec1::<u32>()?;
        let mut count = 0usize;
        for &t in &tv {
            if Some(t) == opts.ignore_index {
                continue;
            }
            if t as usize >= classes {
                bail!(
                    "cross_entropy: target {t} out of range for {classes} classes (logits {:?})",
                    logits.dims()
                );
            }
            count += 1;
        }
        let spec = Spec {
            classes,
            eps,
            ignore: opts.ignore_index,
            count,
        };
        let x2 = logits.tensor().reshape((rows, classes))?;
        let need = self.needs_grad(&[logits]);
        let (loss, probs) = ce_forward(&x2, &tv, spec, need)?;
        drop(x2);
        let Some(probs) = probs.filter(|_| need) else {
            return Ok(self.constant(loss));
        };
        let cp = self.save_derived("cross_entropy", &probs, SaveAs::Activation)?;
        drop(probs);
        let ct = self.save_derived("cross_entropy", &targets, SaveAs::Exact)?;
        let in_shape = logits.shape().clone();
        self.record("cross_entropy", &[logits], loss, move |g, _| {
            let p = cp.load()?;
            let tv = ct.load()?.to_vec1::<u32>()?;
            let gx = ce_backward(&p, &tv, &g, spec)?;
            Ok(vec![Some(gx.reshape(&in_shape)?)])
        })
    }
}

/// Top-1 accuracy over the last dim of `logits` (`[N, C]` or `[N, T, C]`) against `U32`
/// `targets` (`[N]` or `[N, T]`): `(correct, counted)`. Not a tape op.
pub fn accuracy(logits: &Tensor, targets: &Tensor) -> Result<(usize, usize)> {
    check_shapes("accuracy", logits.dims(), targets)?;
    let pred = logits.argmax(D::Minus1)?;
    let correct = pred
        .eq(targets)?
        .to_dtype(DType::U32)?
        .sum_all()?
        .to_scalar::<u32>()?;
    Ok((correct as usize, targets.elem_count()))
}

/// Checks `logits [N, C] / targets [N]` or `logits [N, T, C] / targets [N, T]`; returns
/// `(rows, classes)`.
fn check_shapes(op: &str, logits: &[usize], targets: &Tensor) -> Result<(usize, usize)> {
    if targets.dtype() != DType::U32 {
        bail!(
            "{op}: targets must be U32, got {:?} (shape {:?})",
            targets.dtype(),
            targets.dims()
        );
    }
    let ok = matches!(logits.len(), 2 | 3) && targets.dims() == &logits[..logits.len() - 1];
    if !ok {
        bail!(
            "{op}: logits {logits:?} and targets {:?} do not match (expected logits [N, C] with \
             targets [N], or [N, T, C] with [N, T])",
            targets.dims()
        );
    }
    let classes = logits[logits.len() - 1];
    if classes == 0 {
        bail!("{op}: logits {logits:?} have no classes");
    }
    Ok((targets.elem_count(), classes))
}

#[derive(Clone, Copy, Debug)]
struct Spec {
    classes: usize,
    eps: f64,
    ignore: Option<u32>,
    /// Number of non-ignored targets.
    count: usize,
}

impl Spec {
    fn ignored(&self, t: u32) -> bool {
        Some(t) == self.ignore
    }
}

/// Loss (scalar of the logits' dtype) and, if `want_p`, the probabilities `[rows, C]`.
fn ce_forward(x: &Tensor, tv: &[u32], s: Spec, want_p: bool) -> Result<(Tensor, Option<Tensor>)> {
    let fused = match x.dtype() {
        DType::F32 => ce_forward_cpu::<f32>(x, tv, s, want_p)?,
        DType::F64 => ce_forward_cpu::<f64>(x, tv, s, want_p)?,
        _ => None,
    };
    if let Some(r) = fused {
        return Ok(r);
    }
    // Any device: log-softmax, gather the target column, smooth with the row sum.
    let rows = tv.len();
    let logp = candle_nn::ops::log_softmax(x, 1)?;
    let safe: Vec<u32> = tv
        .iter()
        .map(|&t| if s.ignored(t) { 0 } else { t })
        .collect();
    let safe = Tensor::from_vec(safe, (rows, 1), x.device())?;
    let mut per_row = logp
        .gather(&safe, 1)?
        .squeeze(1)?
        .affine(-(1.0 - s.eps), 0.0)?;
    if s.eps > 0.0 {
        per_row = per_row.sub(&logp.sum(1)?.affine(s.eps / s.classes as f64, 0.0)?)?;
    }
    if s.count < rows {
        per_row = per_row.mul(&row_weights(tv, s, 1.0, x.dtype(), x.device())?.squeeze(1)?)?;
    }
    let loss = if s.count == 0 {
        per_row.sum_all()?.zeros_like()?
    } else {
        per_row.sum_all()?.affine(1.0 / s.count as f64, 0.0)?
    };
    let p = if want_p { Some(logp.exp()?) } else { None };
    Ok((loss, p))
}

/// `[rows, 1]` weights `scale` for counted targets, 0 for ignored ones.
fn row_weights(tv: &[u32], s: Spec, scale: f64, dtype: DType, dev: &Device) -> Result<Tensor> {
    let w: Vec<f64> = tv
        .iter()
        .map(|&t| if s.ignored(t) { 0.0 } else { scale })
        .collect();
    Ok(Tensor::from_vec(w, (tv.len(), 1), &Device::Cpu)?
        .to_dtype(dtype)?
        .to_device(dev)?)
}

/// One pass per row: max, log-sum-exp, probabilities, and the row's loss
/// `lse − (1 − ε) x_t − (ε / C) Σ x` (in f64); rows in parallel on contiguous CPU tensors.
fn ce_forward_cpu<T: Real>(
    x: &Tensor,
    tv: &[u32],
    s: Spec,
    want_p: bool,
) -> Result<Option<(Tensor, Option<Tensor>)>> {
    let Some(view) = CpuView::of(x) else {
        return Ok(None);
    };
    let xs = view.slice::<T>()?;
    let c = s.classes;
    let min_rows = (PAR_CHUNK / c).max(1);
    let row = |xr: &[T], t: u32, pr: Option<&mut [T]>| -> f64 {
        let max = xr
            .iter()
            .copied()
            .fold(xr[0], |m, v| if v > m { v } else { m });
        let mut sum = T::c(0.0);
        let mut total = 0.0f64;
        for &v in xr {
            sum += (v - max).exp();
            total += v.to_f64();
        }
        let lse = max + sum.ln();
        if let Some(pr) = pr {
            for (p, &v) in pr.iter_mut().zip(xr) {
                *p = (v - lse).exp();
            }
        }
        if s.ignored(t) {
            return 0.0;
        }
        lse.to_f64() - (1.0 - s.eps) * xr[t as usize].to_f64() - s.eps / c as f64 * total
    };
    let mut losses = vec![0.0f64; tv.len()];
    let p = if want_p {
        let mut p = vec![T::c(0.0); xs.len()];
        losses
            .par_iter_mut()
            .zip(p.par_chunks_mut(c).zip(xs.par_chunks(c)))
            .zip(tv.par_iter())
            .with_min_len(min_rows)
            .for_each(|((l, (pr, xr)), &t)| *l = row(xr, t, Some(pr)));
        Some(Tensor::from_vec(p, x.shape(), &Device::Cpu)?)
    } else {
        losses
            .par_iter_mut()
            .zip(xs.par_chunks(c))
            .zip(tv.par_iter())
            .with_min_len(min_rows)
            .for_each(|((l, xr), &t)| *l = row(xr, t, None));
        None
    };
    // Summed in order, so the loss does not depend on the thread count.
    let total: f64 = losses.iter().sum();
    let mean = if s.count == 0 {
        0.0
    } else {
        total / s.count as f64
    };
    let loss = Tensor::new(mean, &Device::Cpu)?.to_dtype(x.dtype())?;
    Ok(Some((loss, p)))
}

/// `g · (p − target_dist) / count` on the counted rows, 0 on ignored ones.
fn ce_backward(p: &Tensor, tv: &[u32], g: &Tensor, s: Spec) -> Result<Tensor> {
    if s.count == 0 {
        return Ok(p.zeros_like()?);
    }
    let fused = match p.dtype() {
        DType::F32 => ce_backward_cpu::<f32>(p, tv, g, s)?,
        DType::F64 => ce_backward_cpu::<f64>(p, tv, g, s)?,
        _ => None,
    };
    if let Some(gx) = fused {
        return Ok(gx);
    }
    // Any device: (p − ε/C)·w per row, then −(1 − ε)·w scattered into the target column.
    let rows = tv.len();
    let w = row_weights(tv, s, 1.0 / s.count as f64, p.dtype(), p.device())?.broadcast_mul(g)?;
    let gx = p
        .affine(1.0, -s.eps / s.classes as f64)?
        .broadcast_mul(&w)?;
    let safe: Vec<u32> = tv
        .iter()
        .map(|&t| if s.ignored(t) { 0 } else { t })
        .collect();
    let safe = Tensor::from_vec(safe, (rows, 1), p.device())?;
    Ok(gx.scatter_add(&safe, &w.affine(-(1.0 - s.eps), 0.0)?, 1)?)
}

fn ce_backward_cpu<T: Real>(p: &Tensor, tv: &[u32], g: &Tensor, s: Spec) -> Result<Option<Tensor>> {
    if !g.device().is_cpu() {
        return Ok(None);
    }
    let Some(view) = CpuView::of(p) else {
        return Ok(None);
    };
    let ps = view.slice::<T>()?;
    let c = s.classes;
    let w = T::c(g.to_dtype(DType::F64)?.to_scalar::<f64>()? / s.count as f64);
    let smooth = T::c(s.eps / c as f64);
    let hit = T::c(1.0 - s.eps);
    let mut out = vec![T::c(0.0); ps.len()];
    out.par_chunks_mut(c)
        .zip(ps.par_chunks(c))
        .zip(tv.par_iter())
        .with_min_len((PAR_CHUNK / c).max(1))
        .for_each(|((o, pr), &t)| {
            if s.ignored(t) {
                return;
            }
            for (o, &p) in o.iter_mut().zip(pr) {
                *o = (p - smooth) * w;
            }
            o[t as usize] -= hit * w;
        });
    Ok(Some(Tensor::from_vec(out, p.shape(), &Device::Cpu)?))
}
