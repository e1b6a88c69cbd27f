//! Normalisation: batch norm (per channel, over batch and space), layer norm and RMS norm
//! (per row, over the last dim).
//!
//! Every one keeps its input as a quantizable activation plus the exact per-channel or
//! per-row statistics, and backward recomputes `x̂` from the (possibly dequantized) input
//! with those exact statistics. Note the input gradient is not linear in `x` (it contains
//! `x̂ · mean(g x̂)`), so a stochastically rounded `x` makes it very slightly biased, by the
//! rounding variance only; the exact statistics keep the bulk of it exact.
//!
//! On the CPU with f32/f64 tensors forward and backward run fused kernels (rayon over rows,
//! or over channels and samples for batch norm; statistics accumulated in f64); elsewhere
//! the same formulas run as candle ops. Batch norm's backward reads its saved input in
//! chunks of samples (two passes: the reductions, then the input gradient) and writes the
//! input gradient into the output gradient's buffer when the tape hands that over as owned,
//! so it holds one layer-sized tensor and a chunk rather than three layer-sized tensors.

use crate::tape::{Grad, Recompute, RowSave, SaveAs, Saved, Tape, Value};
use anyhow::{bail, Result};
use candle_core::{DType, Device, Layout, Storage, Tensor, WithDType};
use rayon::prelude::*;
use std::cell::Cell;
use std::rc::Rc;

/// Running statistics of a batch norm layer, `[C]` each (the layer's buffers).
#[derive(Clone, Debug)]
pub struct BatchNormStats {
    pub mean: Tensor,
    pub var: Tensor,
}

impl BatchNormStats {
    /// PyTorch's initial values: mean 0, variance 1.
    pub fn new(channels: usize, dtype: DType, device: &Device) -> Result<Self> {
        Ok(Self {
            mean: Tensor::zeros(channels, dtype, device)?,
            var: Tensor::ones(channels, dtype, device)?,
        })
    }
}

thread_local! {
    static FORCE_GENERIC: Cell<bool> = const { Cell::new(false) };
}

/// Tests only: make the norms on this thread use the candle-ops path instead of the CPU
/// kernels (so both paths can be gradient-checked).
#[doc(hidden)]
pub fn force_generic_norm_kernels(on: bool) {
    FORCE_GENERIC.with(|f| f.set(on));
}

/// The fused CPU kernels apply: every tensor on the CPU, all f32 or all f64.
fn use_kernel(ts: &[&Tensor]) -> bool {
    let Some(first) = ts.first() else {
        return false;
    };
    let dtype = first.dtype();
    !FORCE_GENERIC.with(|f| f.get())
        && matches!(dtype, DType::F32 | DType::F64)
        && ts.iter().all(|t| t.device().is_cpu() && t.dtype() == dtype)
}

fn cpu_slice<'a, T: WithDType>(s: &'a Storage, l: &Layout) -> Result<&'a [T]> {
    let Storage::Cpu(cpu) = s else {
        bail!("norm kernel: expected a CPU tensor");
    };
    let Some((a, b)) = l.contiguous_offsets() else {
        bail!("norm kernel: expected a contiguous tensor");
    };
    Ok(&cpu.as_slice::<T>()?[a..b])
}

/// Runs `f` on the contiguous data of `ts` (made contiguous first) as `&[T]` slices.
fn with_slices<T: WithDType, R>(ts: &[&Tensor], f: impl FnOnce(&[&[T]]) -> Result<R>) -> Result<R> {
    let ts: Vec<Tensor> = ts
        .iter()
        .map(|t| t.contiguous())
        .collect::<candle_core::Result<_>>()?;
    let guards: Vec<_> = ts.iter().map(|t| t.storage_and_layout()).collect();
    let slices: Vec<&[T]> = guards
        .iter()
        .map(|(s, l)| cpu_slice::<T>(s, l))
        .collect::<Result<_>>()?;
    f(&slices)
}

/// `Σ_{i<n} f(i)` with eight partial sums in `T` (lets the compiler vectorise), added in f64.
#[inline(always)]
fn lane_sum<T: WithDType>(n: usize, f: impl Fn(usize) -> T) -> f64 {
    let mut acc = [T::zero(); 8];
    let full = n / 8 * 8;
    let mut i = 0;
    while i < full {
        for (l, a) in acc.iter_mut().enumerate() {
            *a += f(i + l);
        }
        i += 8;
    }
    let mut s: f64 = acc.iter().map(|a| a.to_f64()).sum();
    for j in full..n {
        s += f(j).to_f64();
    }
    s
}

fn vec_tensor<T: WithDType>(v: Vec<T>, dims: &[usize]) -> Result<Tensor> {
    Ok(Tensor::from_vec(v, dims, &Device::Cpu)?)
}

// ---------------------------------------------------------------------------------------
// Row kernels (layer norm, RMS norm) over contiguous `[rows, d]`.

/// Returns `(y, mean, rstd)`; `mean` is all zeros (and unused) when `center` is false.
fn row_norm_fwd<T: WithDType>(
    x: &[T],
    d: usize,
    gamma: Option<&[T]>,
    beta: Option<&[T]>,
    eps: f64,
    center: bool,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let rows = x.len() / d;
    let mut y = vec![T::zero(); x.len()];
    let mut mean = vec![T::zero(); rows];
    let mut rstd = vec![T::zero(); rows];
    y.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .zip(mean.par_iter_mut().zip(rstd.par_iter_mut()))
        .for_each(|((y, x), (mean, rstd))| {
            let m = if center {
                lane_sum(d, |j| x[j]) / d as f64
            } else {
                0.0
            };
            let mt = T::from_f64(m);
            let var = lane_sum(d, |j| {
                let c = x[j] - mt;
                c * c
            }) / d as f64;
            let r = T::from_f64(1.0 / (var + eps).sqrt());
            *mean = mt;
            *rstd = r;
            match (gamma, beta) {
                (Some(g), Some(b)) => {
                    for (((y, &x), &g), &b) in y.iter_mut().zip(x).zip(g).zip(b) {
                        *y = (x - mt) * r * g + b;
                    }
                }
                (Some(g), None) => {
                    for ((y, &x), &g) in y.iter_mut().zip(x).zip(g) {
                        *y = (x - mt) * r * g;
                    }
                }
                (None, Some(b)) => {
                    for ((y, &x), &b) in y.iter_mut().zip(x).zip(b) {
                        *y = (x - mt) * r + b;
                    }
                }
                (None, None) => {
                    for (y, &x) in y.iter_mut().zip(x) {
                        *y = (x - mt) * r;
                    }
                }
            }
        });
    (y, mean, rstd)
}

/// `(gx, ggamma, gbeta)` of a row norm, each only if asked for.
type RowGrads<T> = (Option<Vec<T>>, Option<Vec<T>>, Option<Vec<T>>);
/// Per-task partial sums `(Σ g x̂, Σ g)` over a block of rows.
type Partial<T> = (Vec<T>, Vec<T>);

/// Backward of a row norm. `x = None` when no `x̂` is needed (only beta wants a gradient).
/// Returns `(gx, ggamma, gbeta)`, each only if asked for.
#[allow(clippy::too_many_arguments)]
fn row_norm_bwd<T: WithDType>(
    g: &[T],
    x: Option<(&[T], &[T], &[T])>, // (x, mean, rstd)
    d: usize,
    gamma: Option<&[T]>,
    center: bool,
    want: [bool; 3],
) -> RowGrads<T> {
    let rows = g.len() / d;
    let want_gx = want[0] && x.is_some();
    let want_gg = want[1] && x.is_some();
    // Blocks of rows per task: enough tasks to balance, few partial vectors to add up.
    let rb = rows.div_ceil(4 * rayon::current_num_threads()).max(1);
    let block = |b: usize, mut gx: Option<&mut [T]>| -> Partial<T> {
        let mut gg = vec![T::zero(); if want_gg { d } else { 0 }];
        let mut gb = vec![T::zero(); if want[2] { d } else { 0 }];
        for r in b * rb..((b + 1) * rb).min(rows) {
            let gr = &g[r * d..(r + 1) * d];
            if want[2] {
                for (a, &v) in gb.iter_mut().zip(gr) {
                    *a += v;
                }
            }
            let Some((x, mean, rstd)) = x else { continue };
            let xr = &x[r * d..(r + 1) * d];
            let (m, rs) = (if center { mean[r] } else { T::zero() }, rstd[r]);
            if want_gg {
                for ((a, &gv), &xv) in gg.iter_mut().zip(gr).zip(xr) {
                    *a += gv * (xv - m) * rs;
                }
            }
            if let Some(gx) = gx.as_deref_mut() {
                let gxr = &mut gx[(r - b * rb) * d..(r - b * rb + 1) * d];
                let gam = |j: usize| gamma.map_or(T::one(), |gm| gm[j]);
                let mean_gxh = if center {
                    lane_sum(d, |j| gr[j] * gam(j)) / d as f64
                } else {
                    0.0
                };
                let mean_gxh_xh = lane_sum(d, |j| gr[j] * gam(j) * (xr[j] - m) * rs) / d as f64;
                let (a, bb) = (T::from_f64(mean_gxh), T::from_f64(mean_gxh_xh));
                match gamma {
                    Some(gm) => {
                        for (((o, &gv), &xv), &gmv) in gxr.iter_mut().zip(gr).zip(xr).zip(gm) {
                            *o = rs * (gv * gmv - a - (xv - m) * rs * bb);
                        }
                    }
                    None => {
                        for ((o, &gv), &xv) in gxr.iter_mut().zip(gr).zip(xr) {
                            *o = rs * (gv - a - (xv - m) * rs * bb);
                        }
                    }
                }
            }
        }
        (gg, gb)
    };
    let mut gx = if want_gx {
        Some(vec![T::zero(); g.len()])
    } else {
        None
    };
    let partials: Vec<Partial<T>> = match gx.as_mut() {
        Some(gx) => gx
            .par_chunks_mut(rb * d)
            .enumerate()
            .map(|(b, c)| block(b, Some(c)))
            .collect(),
        None => (0..rows.div_ceil(rb))
            .into_par_iter()
            .map(|b| block(b, None))
            .collect(),
    };
    let reduce = |pick: fn(&Partial<T>) -> &Vec<T>| -> Vec<T> {
        let mut acc = vec![0f64; d];
        for p in &partials {
            for (a, &v) in acc.iter_mut().zip(pick(p)) {
                *a += v.to_f64();
            }
        }
        acc.into_iter().map(T::from_f64).collect()
    };
    let gg = if want_gg {
        Some(reduce(|p| &p.0))
    } else {
        None
    };
    let gb = if want[2] {
        Some(reduce(|p| &p.1))
    } else {
        None
    };
    (gx, gg, gb)
}

// ---------------------------------------------------------------------------------------
// Batch-norm kernels over contiguous `[N, C, S]`.

/// Per-channel `(Σ f(x) over N and S)` for every channel, in parallel over channels.
fn channel_sums(n: usize, c: usize, f: impl Fn(usize, usize) -> f64 + Sync) -> Vec<f64> {
    (0..c)
        .into_par_iter()
        .map(|ci| (0..n).map(|ni| f(ni, ci)).sum())
        .collect()
}

/// Batch mean and biased variance per channel (f64, two passes).
fn bn_stats<T: WithDType>(x: &[T], n: usize, c: usize, s: usize) -> (Vec<f64>, Vec<f64>) {
    let m = (n * s) as f64;
    let mean: Vec<f64> = channel_sums(n, c, |ni, ci| {
        let p = &x[(ni * c + ci) * s..][..s];
        lane_sum(s, |j| p[j])
    })
    .into_iter()
    .map(|v| v / m)
    .collect();
    let var = channel_sums(n, c, |ni, ci| {
        let p = &x[(ni * c + ci) * s..][..s];
        let mt = T::from_f64(mean[ci]);
        lane_sum(s, |j| {
            let d = p[j] - mt;
            d * d
        })
    })
    .into_iter()
    .map(|v| v / m)
    .collect();
    (mean, var)
}

/// `y = (x - mean[c]) * scale[c] + beta[c]`, in parallel over samples.
fn bn_apply<T: WithDType>(
    x: &[T],
    c: usize,
    s: usize,
    mean: &[T],
    scale: &[T],
    beta: &[T],
) -> Vec<T> {
    let mut y = vec![T::zero(); x.len()];
    y.par_chunks_mut(c * s)
        .zip(x.par_chunks(c * s))
        .for_each(|(y, x)| {
            for ci in 0..c {
                let (m, k, b) = (mean[ci], scale[ci], beta[ci]);
                for (y, &x) in y[ci * s..][..s].iter_mut().zip(&x[ci * s..][..s]) {
                    *y = (x - m) * k + b;
                }
            }
        });
    y
}

/// [`bn_apply`] written into the input's own buffer: `x = (x - mean[c]) scale[c] + beta[c]`,
/// the same arithmetic in the same order (so bit for bit the same result).
struct BnApplyInPlace<'a, T> {
    mean: &'a [T],
    scale: &'a [T],
    beta: &'a [T],
    cs: (usize, usize),
}

impl<T: WithDType> candle_core::InplaceOp1 for BnApplyInPlace<'_, T> {
    fn name(&self) -> &'static str {
        "batch_norm_in_place"
    }
    fn cpu_fwd(&self, st: &mut candle_core::CpuStorage, l: &Layout) -> candle_core::Result<()> {
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("batch_norm_in_place: the input must be contiguous");
        };
        // The parameters arrive as `T`, the storage's own type: the casts are exact.
        fn run<U: WithDType, T: WithDType>(x: &mut [U], op: &BnApplyInPlace<'_, T>) {
            let cast = |v: &[T]| -> Vec<U> { v.iter().map(|v| U::from_f64(v.to_f64())).collect() };
            let (mean, scale, beta) = (cast(op.mean), cast(op.scale), cast(op.beta));
            let (c, s) = op.cs;
            x.par_chunks_mut(c * s).for_each(|x| {
                for ci in 0..c {
                    let (m, k, b) = (mean[ci], scale[ci], beta[ci]);
                    for x in x[ci * s..][..s].iter_mut() {
                        *x = (*x - m) * k + b;
                    }
                }
            });
        }
        match st {
            candle_core::CpuStorage::F32(v) if T::DTYPE == DType::F32 => run(&mut v[a..b], self),
            candle_core::CpuStorage::F64(v) if T::DTYPE == DType::F64 => run(&mut v[a..b], self),
            _ => candle_core::bail!("batch_norm_in_place: the input's dtype is not the kernel's"),
        }
        Ok(())
    }
}

/// Adds `Σ_{n,s} g (x - mean) invstd` over the `count` samples of `g` and `x` (`[count, C,
/// S]`) to `acc[c]`, in sample order (so chunks add up exactly as one pass would).
fn bn_sum_gxh_rows<T: WithDType>(
    acc: &mut [f64],
    g: &[T],
    x: &[T],
    mean: &[T],
    invstd: &[T],
    (c, s): (usize, usize),
    count: usize,
) {
    acc.par_iter_mut().enumerate().for_each(|(ci, acc)| {
        let (m, k) = (mean[ci], invstd[ci]);
        for li in 0..count {
            let gp = &g[(li * c + ci) * s..][..s];
            let xp = &x[(li * c + ci) * s..][..s];
            *acc += lane_sum(s, |j| gp[j] * (xp[j] - m) * k);
        }
    });
}

/// The per-channel numbers batch norm's input gradient needs, in f64 (each value of the
/// tensors' dtype, so converting back is exact): `gx = gamma invstd (g - a - x̂ b)` with
/// `a = Σg / M`, `b = Σ g x̂ / M` in training, `gx = gamma invstd g` in eval.
struct BnGx {
    mean: Vec<f64>,
    invstd: Vec<f64>,
    gamma: Vec<f64>,
    sum_g: Vec<f64>,
    sum_gxh: Vec<f64>,
    inv_m: f64,
    training: bool,
    c: usize,
    s: usize,
}

impl BnGx {
    /// Overwrites `g` (whole samples of `[N, C, S]`) with `gx`; `x` holds the same samples.
    fn apply<T: WithDType>(&self, g: &mut [T], x: &[T]) {
        let (c, s) = (self.c, self.s);
        g.par_chunks_mut(c * s)
            .zip(x.par_chunks(c * s))
            .for_each(|(g, x)| {
                for ci in 0..c {
                    let m = T::from_f64(self.mean[ci]);
                    let k = T::from_f64(self.invstd[ci]);
                    let scale = T::from_f64(self.gamma[ci]) * k;
                    let (g, x) = (&mut g[ci * s..][..s], &x[ci * s..][..s]);
                    if self.training {
                        let a = T::from_f64(self.sum_g[ci] * self.inv_m);
                        let b = T::from_f64(self.sum_gxh[ci] * self.inv_m);
                        for (o, &xv) in g.iter_mut().zip(x) {
                            *o = scale * (*o - a - (xv - m) * k * b);
                        }
                    } else {
                        for o in g.iter_mut() {
                            *o = scale * *o;
                        }
                    }
                }
            });
    }
}

impl candle_core::InplaceOp2 for BnGx {
    fn name(&self) -> &'static str {
        "batch_norm_grad_in_place"
    }
    fn cpu_fwd(
        &self,
        dst: &mut candle_core::CpuStorage,
        dl: &Layout,
        src: &candle_core::CpuStorage,
        sl: &Layout,
    ) -> candle_core::Result<()> {
        use candle_core::CpuStorage as C;
        let (dr, sr) = super::inplace_ranges("batch_norm backward", dl, sl, true)?;
        match (dst, src) {
            (C::F32(d), C::F32(x)) => self.apply(&mut d[dr], &x[sr]),
            (C::F64(d), C::F64(x)) => self.apply(&mut d[dr], &x[sr]),
            _ => candle_core::bail!("batch_norm backward: needs f32 or f64"),
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------

fn check_vec(op: &str, what: &str, v: &Value, n: usize, x: &Value) -> Result<()> {
    if v.dims() != [n] {
        bail!(
            "{op}: {what} must be [{n}], got {:?} (input {:?})",
            v.dims(),
            x.dims()
        );
    }
    if v.dtype() != x.dtype() {
        bail!(
            "{op}: {what} is {:?} but the input is {:?}",
            v.dtype(),
            x.dtype()
        );
    }
    Ok(())
}

/// `(rows, d)` of a last-dim normalisation, with its argument checks.
fn rows_of(
    op: &str,
    x: &Value,
    gamma: Option<&Value>,
    beta: Option<&Value>,
) -> Result<(usize, usize)> {
    let dims = x.dims();
    let Some(&d) = dims.last() else {
        bail!("{op}: input must have at least one dim, got a scalar");
    };
    if d == 0 {
        bail!("{op}: last dim of input {dims:?} is empty");
    }
    if let Some(g) = gamma {
        check_vec(op, "gamma", g, d, x)?;
    }
    if let Some(b) = beta {
        check_vec(op, "beta", b, d, x)?;
    }
    Ok((x.tensor().elem_count() / d, d))
}

/// Dispatches a generic kernel call on the dtype (F32 or F64).
macro_rules! by_dtype {
    ($dtype:expr, $f:ident, $($arg:expr),*) => {
        match $dtype {
            DType::F32 => $f::<f32>($($arg),*),
            _ => $f::<f64>($($arg),*),
        }
    };
}

/// Batch-norm forward statistics and output: `(mean, invstd, y)` with `[C]` statistics,
/// plus the biased batch variance in training.
struct BnForward {
    mean: Tensor,
    invstd: Tensor,
    batch_var: Option<Tensor>,
    y: Tensor,
}

#[allow(clippy::too_many_arguments)]
fn bn_forward_kernel<T: WithDType>(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    running: Option<(&Tensor, &Tensor)>,
    (n, c, s): (usize, usize, usize),
    eps: f64,
    in_place: bool,
) -> Result<BnForward> {
    let dims = x.dims().to_vec();
    let (mean, var, batch_var) = match running {
        None => {
            let (mean, var) = with_slices::<T, _>(&[x], |v| Ok(bn_stats(v[0], n, c, s)))?;
            let bv = vec_tensor(var.iter().map(|&v| T::from_f64(v)).collect(), &[c])?;
            (mean, var, Some(bv))
        }
        Some((rm, rv)) => {
            let rm: Vec<f64> = rm.to_dtype(DType::F64)?.to_vec1()?;
            let rv: Vec<f64> = rv.to_dtype(DType::F64)?.to_vec1()?;
            (rm, rv, None)
        }
    };
    let invstd: Vec<f64> = var.iter().map(|&v| 1.0 / (v + eps).sqrt()).collect();
    let mean_t: Vec<T> = mean.iter().map(|&v| T::from_f64(v)).collect();
    let y = if in_place {
        let (scale, beta) = with_slices::<T, _>(&[gamma, beta], |v| {
            let scale: Vec<T> = invstd
                .iter()
                .zip(v[0])
                .map(|(&k, &g)| T::from_f64(k) * g)
                .collect();
            Ok((scale, v[1].to_vec()))
        })?;
        x.inplace_op1(&BnApplyInPlace {
            mean: &mean_t,
            scale: &scale,
            beta: &beta,
            cs: (c, s),
        })?;
        x.clone()
    } else {
        let y = with_slices::<T, _>(&[x, gamma, beta], |v| {
            let scale: Vec<T> = invstd
                .iter()
                .zip(v[1])
                .map(|(&k, &g)| T::from_f64(k) * g)
                .collect();
            Ok(bn_apply(v[0], c, s, &mean_t, &scale, v[2]))
        })?;
        vec_tensor(y, &dims)?
    };
    Ok(BnForward {
        mean: vec_tensor(mean_t, &[c])?,
        invstd: vec_tensor(invstd.into_iter().map(T::from_f64).collect(), &[c])?,
        batch_var,
        y,
    })
}

type Grads3 = (Option<Tensor>, Option<Tensor>, Option<Tensor>);

/// Reads samples `first..first + count` of a saved batch-norm input.
type RowLoader<'a> = &'a dyn Fn(usize, usize) -> Result<Tensor>;

/// `(Σ g, Σ g x̂, the input if one chunk read it whole)` per channel over `g: [N, C, S]`,
/// the saved input read through `load` in chunks of `chunk` samples (no `Σ g x̂` without it).
#[allow(clippy::type_complexity)]
fn bn_reductions<T: WithDType>(
    g: &Tensor,
    x: Option<(RowLoader, &Tensor, &Tensor)>,
    (n, c, s): (usize, usize, usize),
    chunk: usize,
) -> Result<(Vec<f64>, Option<Vec<f64>>, Option<Tensor>)> {
    let Some((load, mean, invstd)) = x else {
        let sum_g = with_slices::<T, _>(&[g], |gv| {
            let gs = gv[0];
            Ok(channel_sums(n, c, |ni, ci| {
                let p = &gs[(ni * c + ci) * s..][..s];
                lane_sum(s, |j| p[j])
            }))
        })?;
        return Ok((sum_g, None, None));
    };
    let mut sums = BnSums::new(c);
    let mut whole = None;
    for (first, count) in super::row_chunks(n, chunk) {
        let xc = load(first, count)?;
        sums.add(&g.narrow(0, first, count)?, &xc, mean, invstd)?;
        if count == n {
            whole = Some(xc);
        }
    }
    Ok((sums.sum_g, Some(sums.sum_gxh), whole))
}

/// Batch-norm backward on the CPU. `x = Some((load, mean, invstd))` when `x̂` is needed:
/// the input is read through `load` in chunks of `chunk` samples — twice, once for the
/// reductions `Σ g x̂` and once to write `gx` — so only one chunk of the unpacked input is
/// alive next to `g` and `gx`. Sums are f64 and run in sample order whatever the chunking.
/// With `g` owned, `gx` is written into `g`'s own buffer (and comes back owned).
fn bn_backward_kernel<T: WithDType>(
    g: Grad,
    x: Option<(RowLoader, &Tensor, &Tensor)>,
    gamma: Option<&Tensor>,
    (n, c, s): (usize, usize, usize),
    chunk: usize,
    training: bool,
    want: [bool; 3],
) -> Result<(Option<Grad>, Option<Tensor>, Option<Tensor>)> {
    let dims = g.tensor().dims().to_vec();
    let to_t = |v: &[f64]| vec_tensor(v.iter().map(|&v| T::from_f64(v)).collect::<Vec<T>>(), &[c]);
    let chunk = chunk.clamp(1, n.max(1));
    let sample = c * s;
    let to_f64 = |t: &Tensor| -> Result<Vec<f64>> { Ok(t.to_dtype(DType::F64)?.to_vec1()?) };
    // Pass 1: the reductions. A chunk covering the batch is kept for the second pass.
    let (sum_g, sum_gxh, whole) = bn_reductions::<T>(g.tensor(), x, (n, c, s), chunk)?;
    let gb = if want[2] { Some(to_t(&sum_g)?) } else { None };
    let gg = match &sum_gxh {
        Some(v) if want[1] => Some(to_t(v)?),
        _ => None,
    };
    // Pass 2: the input gradient, chunk by chunk, into `g` itself or into a copy of it.
    let gx = match (gamma, &x) {
        (Some(gamma), Some((load, mean, invstd))) if want[0] => {
            let k = BnGx {
                mean: to_f64(mean)?,
                invstd: to_f64(invstd)?,
                gamma: to_f64(gamma)?,
                sum_g,
                sum_gxh: sum_gxh.unwrap_or_default(),
                inv_m: 1.0 / (n * s) as f64,
                training,
                c,
                s,
            };
            let owned = g.is_owned() && g.tensor().is_contiguous();
            let (out, mut copy) = if owned {
                (g.into_tensor(), None)
            } else {
                let v = with_slices::<T, _>(&[g.tensor()], |gv| Ok(gv[0].to_vec()))?;
                (g.into_tensor(), Some(v))
            };
            let mut first = 0;
            while first < n {
                let count = chunk.min(n - first);
                let xc = match &whole {
                    Some(t) => t.clone(),
                    None => load(first, count)?,
                };
                match copy.as_mut() {
                    None => out
                        .narrow(0, first, count)?
                        .inplace_op2(&xc.contiguous()?, &k)?,
                    Some(v) => with_slices::<T, _>(&[&xc], |xv| {
                        k.apply(&mut v[first * sample..(first + count) * sample], xv[0]);
                        Ok(())
                    })?,
                }
                first += count;
            }
            Some(Grad::owned(match copy {
                None => out,
                Some(v) => vec_tensor(v, &dims)?,
            }))
        }
        _ => None,
    };
    Ok((gx, gg, gb))
}

fn row_forward_kernel<T: WithDType>(
    x: &Tensor,
    gamma: Option<&Tensor>,
    beta: Option<&Tensor>,
    (rows, d): (usize, usize),
    eps: f64,
    center: bool,
) -> Result<(Tensor, Tensor, Tensor)> {
    let mut ts = vec![x];
    ts.extend(gamma);
    ts.extend(beta);
    let (y, mean, rstd) = with_slices::<T, _>(&ts, |v| {
        let gm = gamma.map(|_| v[1]);
        let bt = beta.map(|_| v[v.len() - 1]);
        Ok(row_norm_fwd(v[0], d, gm, bt, eps, center))
    })?;
    Ok((
        vec_tensor(y, x.dims())?,
        vec_tensor(mean, &[rows, 1])?,
        vec_tensor(rstd, &[rows, 1])?,
    ))
}

fn row_backward_kernel<T: WithDType>(
    g: &Tensor,
    x: Option<(&Tensor, &Tensor, &Tensor)>,
    gamma: Option<&Tensor>,
    d: usize,
    center: bool,
    want: [bool; 3],
) -> Result<Grads3> {
    let mut ts = vec![g];
    if let Some((x, m, r)) = x {
        ts.extend([x, m, r]);
    }
    ts.extend(gamma);
    let (gx, gg, gb) = with_slices::<T, _>(&ts, |v| {
        let xs = if x.is_some() {
            Some((v[1], v[2], v[3]))
        } else {
            None
        };
        let gm = gamma.map(|_| v[v.len() - 1]);
        Ok(row_norm_bwd(v[0], xs, d, gm, center, want))
    })?;
    Ok((
        gx.map(|v| vec_tensor(v, g.dims())).transpose()?,
        gg.map(|v| vec_tensor(v, &[d])).transpose()?,
        gb.map(|v| vec_tensor(v, &[d])).transpose()?,
    ))
}

/// Layer norm (`center`) or RMS norm over the last dim of `x` (any leading dims):
/// `(y, mean, rstd)` with `y` shaped like `x` and the statistics `[rows, 1]` (mean all zero
/// for RMS), on the CPU kernels where they apply, candle ops elsewhere.
pub(crate) fn norm_rows(
    x: &Tensor,
    gamma: Option<&Tensor>,
    beta: Option<&Tensor>,
    eps: f64,
    center: bool,
) -> Result<(Tensor, Tensor, Tensor)> {
    let d = x.dims().last().copied().unwrap_or(1).max(1);
    let rows = x.elem_count() / d;
    let mut ts = vec![x];
    ts.extend(gamma);
    ts.extend(beta);
    if use_kernel(&ts) {
        by_dtype!(
            x.dtype(),
            row_forward_kernel,
            x,
            gamma,
            beta,
            (rows, d),
            eps,
            center
        )
    } else {
        row_forward_generic(x, gamma, beta, (rows, d), eps, center)
    }
}

/// The backward of [`norm_rows`] for `g: [rows, d]` and, where kept, the saved
/// `(x: [rows, d], mean, rstd: [rows, 1])`: the gradients of `x`, `gamma` and `beta` where
/// `want`ed.
pub(crate) fn norm_rows_backward(
    g: &Tensor,
    xs: Option<(&Tensor, &Tensor, &Tensor)>,
    gamma: Option<&Tensor>,
    center: bool,
    want: [bool; 3],
) -> Result<Grads3> {
    let d = g.dims().last().copied().unwrap_or(1).max(1);
    let mut ts = vec![g];
    if let Some((a, b, c)) = xs {
        ts.extend([a, b, c]);
    }
    ts.extend(gamma);
    if use_kernel(&ts) {
        by_dtype!(
            g.dtype(),
            row_backward_kernel,
            g,
            xs,
            gamma,
            d,
            center,
            want
        )
    } else {
        row_backward_generic(g, xs, gamma, d, center, want)
    }
}

/// The layer norm in front of a residual branch (a pre-norm transformer block), by reference:
/// `gamma`, `beta: [d]`.
#[derive(Clone, Copy)]
pub struct PreNorm<'a> {
    pub gamma: Option<&'a Value>,
    pub beta: Option<&'a Value>,
    pub eps: f64,
}

/// A pre-norm computed chunk by chunk inside a fused branch ([`Tape::mlp_residual`],
/// [`Tape::multi_head_attention_residual`] with a norm): it saves what [`Tape::layer_norm`]
/// saves, in the same order (`x`, mean, rstd, gamma), the statistics a chunk at a time.
pub(crate) struct ChunkNorm {
    gamma: Option<Tensor>,
    beta: Option<Tensor>,
    eps: f64,
    cx: Saved,
    mean: RowSave,
    rstd: RowSave,
    /// `gamma` by reference, held like `layer_norm`'s node holds it (so a later save of the
    /// same parameter is logged as shared, as it is for the composed op).
    cg: Option<Saved>,
    /// Rows (tokens) per sample.
    per: usize,
}

/// What a [`ChunkNorm`] saved, for the branch's backward.
pub(crate) struct ChunkNormCtx {
    gamma: Option<Tensor>,
    beta: Option<Tensor>,
    cx: Saved,
    mean: Saved,
    rstd: Saved,
    _cg: Option<Saved>,
    per: usize,
    d: usize,
    want_gamma: bool,
    want_beta: bool,
}

impl ChunkNorm {
    /// Saves the norm's input `x: [B, .., d]` and begins its statistics.
    pub(crate) fn begin(tape: &mut Tape, x: &Value, n: &PreNorm) -> Result<Self> {
        const OP: &str = "layer_norm";
        let d = x.dims().last().copied().unwrap_or(1).max(1);
        let rows = x.tensor().elem_count() / d;
        let per = rows / x.dims().first().copied().unwrap_or(1).max(1);
        let (dt, dev) = (x.dtype(), x.tensor().device().clone());
        let cx = tape.save(OP, x, SaveAs::Activation)?;
        let mean = tape.begin_save_rows(OP, &[rows, 1], dt, &dev, SaveAs::Exact)?;
        let rstd = tape.begin_save_rows(OP, &[rows, 1], dt, &dev, SaveAs::Exact)?;
        let cg = match n.gamma {
            Some(g) => Some(tape.save(OP, g, SaveAs::Activation)?),
            None => None,
        };
        Ok(Self {
            cg,
            gamma: n.gamma.map(|g| g.tensor().clone()),
            beta: n.beta.map(|b| b.tensor().clone()),
            eps: n.eps,
            cx,
            mean,
            rstd,
            per,
        })
    }

    /// The norm of samples `first..first + x.dims()[0]` of the input (`x` those rows).
    pub(crate) fn forward(&mut self, first: usize, x: &Tensor) -> Result<Tensor> {
        let (y, mean, rstd) =
            norm_rows(x, self.gamma.as_ref(), self.beta.as_ref(), self.eps, true)?;
        self.mean.push(first * self.per, &mean)?;
        self.rstd.push(first * self.per, &rstd)?;
        Ok(y)
    }

    /// Whether the saved input is the input tensor itself (then it must not be overwritten).
    pub(crate) fn keeps_input_as_is(&self) -> bool {
        self.cx.stored_as_is()
    }

    pub(crate) fn finish(
        self,
        tape: &mut Tape,
        want_gamma: bool,
        want_beta: bool,
    ) -> Result<ChunkNormCtx> {
        let d = self.cx.shape().dims().last().copied().unwrap_or(1).max(1);
        Ok(ChunkNormCtx {
            gamma: self.gamma,
            beta: self.beta,
            cx: self.cx,
            mean: tape.finish_save_rows(self.mean)?,
            rstd: tape.finish_save_rows(self.rstd)?,
            _cg: self.cg,
            per: self.per,
            d,
            want_gamma,
            want_beta,
        })
    }
}

impl ChunkNormCtx {
    /// The norm's output rebuilt from what it saved, as the composed `layer_norm` offers it
    /// to the linear layer that reads it ([`NormOutput`]).
    pub(crate) fn output(&self) -> Rc<dyn Recompute> {
        Rc::new(NormOutput {
            x: self.cx.clone(),
            mean: Some(self.mean.clone()),
            rstd: self.rstd.clone(),
            gamma: self.gamma.clone(),
            beta: self.beta.clone(),
            d: self.d,
            op: "layer_norm",
        })
    }

    /// The input gradient of samples `first..first + len` from the gradient `g` (`[rows, d]`)
    /// of their normalised rows; the parameter gradients are summed into `gg`, `gb`.
    pub(crate) fn backward(
        &self,
        first: usize,
        len: usize,
        g: &Tensor,
        gg: &mut Option<Tensor>,
        gb: &mut Option<Tensor>,
    ) -> Result<Tensor> {
        let n = len * self.per;
        let x = self.cx.load_rows(first, len)?.reshape((n, self.d))?;
        let mean = self.mean.load()?.narrow(0, first * self.per, n)?;
        let rstd = self.rstd.load()?.narrow(0, first * self.per, n)?;
        let want = [true, self.want_gamma, self.want_beta];
        let xs = Some((&x, &mean, &rstd));
        let (gx, ggc, gbc) = norm_rows_backward(g, xs, self.gamma.as_ref(), true, want)?;
        if let Some(p) = ggc {
            super::accumulate(gg, p)?;
        }
        if let Some(p) = gbc {
            super::accumulate(gb, p)?;
        }
        gx.ok_or_else(|| anyhow::anyhow!("layer_norm: no input gradient"))
    }
}

impl Tape {
    /// Batch normalisation of `x: [N, C]`, `[N, C, L]` or `[N, C, H, W]` per channel:
    /// `y = (x - mean) / sqrt(var + eps) * gamma + beta` with `gamma`, `beta: [C]`.
    ///
    /// In training mode ([`Tape::is_training`]) mean and (biased) variance are the batch's,
    /// over every dim but 1, and `running` is updated in place like PyTorch:
    /// `running = (1 - momentum) running + momentum batch`, with the unbiased batch variance
    /// for `running.var`. In eval mode `running` normalises and is left alone (and if
    /// recording is on, gradients flow through the frozen statistics).
    ///
    /// Context: `x` as [`SaveAs::Activation`] (quantizable; only if `x` or `gamma` needs a
    /// gradient), the per-channel `mean` and `invstd` used, `[C]`, as [`SaveAs::Exact`]
    /// (tiny, and every gradient element depends on them), and `gamma` by reference if `x`
    /// needs a gradient. Backward recomputes `x̂ = (x - mean) invstd`.
    pub fn batch_norm(
        &mut self,
        x: &Value,
        gamma: &Value,
        beta: &Value,
        running: &mut BatchNormStats,
        momentum: f64,
        eps: f64,
    ) -> Result<Value> {
        self.batch_norm_impl(x, gamma, beta, running, momentum, eps, false)
    }

    /// [`Tape::batch_norm`] of a value handed over by the caller, which keeps no other handle
    /// or view of it: where no context holds `x` as it is (L1–L4, see
    /// [`Tape::may_overwrite`]) the output is written into `x`'s own buffer once `x` is saved.
    pub fn batch_norm_owned(
        &mut self,
        x: Value,
        gamma: &Value,
        beta: &Value,
        running: &mut BatchNormStats,
        momentum: f64,
        eps: f64,
    ) -> Result<Value> {
        self.batch_norm_impl(&x, gamma, beta, running, momentum, eps, true)
    }

    #[allow(clippy::too_many_arguments)]
    fn batch_norm_impl(
        &mut self,
        x: &Value,
        gamma: &Value,
        beta: &Value,
        running: &mut BatchNormStats,
        momentum: f64,
        eps: f64,
        owned: bool,
    ) -> Result<Value> {
        let op = "batch_norm";
        let dims = x.dims().to_vec();
        if !(2..=4).contains(&dims.len()) {
            bail!("{op}: input must be [N, C], [N, C, L] or [N, C, H, W], got {dims:?}");
        }
        let (n, c) = (dims[0], dims[1]);
        let s: usize = dims[2..].iter().product();
        let m = n * s;
        check_vec(op, "gamma", gamma, c, x)?;
        check_vec(op, "beta", beta, c, x)?;
        if running.mean.dims() != [c] || running.var.dims() != [c] {
            bail!(
                "{op}: running mean/var must be [{c}], got {:?} and {:?} (input {dims:?})",
                running.mean.dims(),
                running.var.dims()
            );
        }
        if eps.is_nan() || eps < 0.0 {
            bail!("{op}: eps must be >= 0, got {eps}");
        }
        let training = self.is_training();
        if training && m < 2 {
            bail!("{op}: training needs more than one value per channel, got input {dims:?}");
        }
        let ncs = (n, c, s);
        let inputs = [x, gamma, beta];
        let need_x = x.is_tracked() || gamma.is_tracked();
        // The input is saved before the output is computed, so that the output may take its
        // buffer (nothing reads `x` afterwards but the saved copy).
        let sx = if self.needs_grad(&inputs) && need_x {
            Some(self.save(op, x, SaveAs::Activation)?)
        } else {
            None
        };
        let in_place = owned && self.may_overwrite(x, sx.as_ref());
        let BnOutput { y, mean, invstd } = bn_forward(
            x.tensor(),
            gamma.tensor(),
            beta.tensor(),
            running,
            (momentum, eps),
            training,
            in_place,
        )?;
        if !self.needs_grad(&inputs) {
            return Ok(self.constant(y));
        }
        let cx = if let Some(sx) = sx {
            Some((
                sx,
                self.save_derived(op, &mean, SaveAs::Exact)?,
                self.save_derived(op, &invstd, SaveAs::Exact)?,
            ))
        } else {
            None
        };
        let cg = if x.is_tracked() {
            Some(self.save(op, gamma, SaveAs::Activation)?)
        } else {
            None
        };
        drop((mean, invstd));
        // The output, for the op that reads it next (a ReLU, then a conv that saves the
        // ReLU's output): rebuilt from the saved input and statistics, not stored again.
        let rebuild = cx.as_ref().map(|(x, mean, invstd)| {
            batch_norm_output(
                x.clone(),
                mean.clone(),
                invstd.clone(),
                gamma.tensor().clone(),
                beta.tensor().clone(),
            )
        });
        let y = self.record_grad(op, &inputs, y, move |g, needs| {
            let want = [needs[0], needs[1], needs[2]];
            let stats = match &cx {
                Some((_, cm, ci)) => Some((cm.load()?, ci.load()?)),
                None => None,
            };
            let gamma = cg.as_ref().map(|cg| cg.load()).transpose()?;
            let mut ts = vec![g.tensor()];
            if let Some((m, k)) = &stats {
                ts.extend([m, k]);
            }
            ts.extend(gamma.as_ref());
            if use_kernel(&ts) {
                // Chunks of the saved input where a chunk unpacks only its own samples.
                let (sx, chunk) = match &cx {
                    Some((sx, _, _)) if sx.loads_rows_cheaply() => {
                        let per = c * s * g.tensor().dtype().size_in_bytes();
                        (Some(sx), super::chunk_rows_for(n, per))
                    }
                    Some((sx, _, _)) => (Some(sx), n),
                    None => (None, n),
                };
                let load = |first: usize, count: usize| -> Result<Tensor> {
                    let sx = sx.expect("only called when x is saved");
                    let t = if count == n {
                        sx.load()?
                    } else {
                        sx.load_rows(first, count)?
                    };
                    Ok(t.reshape((count, c, s))?)
                };
                let xs = stats.as_ref().map(|(m, k)| (&load as RowLoader, m, k));
                let dtype = g.tensor().dtype();
                let (gx, gg, gb) = by_dtype!(
                    dtype,
                    bn_backward_kernel,
                    g,
                    xs,
                    gamma.as_ref(),
                    ncs,
                    chunk,
                    training,
                    want
                )?;
                return Ok(vec![gx, gg.map(Grad::owned), gb.map(Grad::owned)]);
            }
            let xs = match (&cx, &stats) {
                (Some((cx, _, _)), Some((m, k))) => Some((cx.load()?, m, k)),
                _ => None,
            };
            let xs_ref = xs.as_ref().map(|(a, b, c)| (a, *b, *c));
            let (gx, gg, gb) =
                bn_backward_generic(g.tensor(), xs_ref, gamma.as_ref(), ncs, training, want)?;
            Ok(vec![
                gx.map(|t| t.reshape(dims.as_slice()))
                    .transpose()?
                    .map(Grad::owned),
                gg.map(Grad::owned),
                gb.map(Grad::owned),
            ])
        })?;
        if let Some(r) = rebuild {
            self.offer_recompute(&y, r);
        }
        Ok(y)
    }

    /// Layer normalisation over the last dim: `y = (x - mean) / sqrt(var + eps) * gamma + beta`
    /// per row (biased variance), `gamma`/`beta: [D]` optional.
    ///
    /// Context: `x` as [`SaveAs::Activation`] plus the per-row `mean` and `rstd` (`[rows, 1]`)
    /// as [`SaveAs::Exact`] (only if `x` or `gamma` needs a gradient), and `gamma` by
    /// reference if `x` needs a gradient. Backward recomputes `x̂` from them.
    pub fn layer_norm(
        &mut self,
        x: &Value,
        gamma: Option<&Value>,
        beta: Option<&Value>,
        eps: f64,
    ) -> Result<Value> {
        self.last_dim_norm("layer_norm", true, x, gamma, beta, eps)
    }

    /// RMS normalisation over the last dim: `y = x / sqrt(mean(x²) + eps) * gamma`.
    ///
    /// Context: `x` as [`SaveAs::Activation`] plus the per-row `rrms` (`[rows, 1]`) as
    /// [`SaveAs::Exact`] (only if `x` or `gamma` needs a gradient), and `gamma` by reference
    /// if `x` does.
    pub fn rms_norm(&mut self, x: &Value, gamma: Option<&Value>, eps: f64) -> Result<Value> {
        self.last_dim_norm("rms_norm", false, x, gamma, None, eps)
    }

    fn last_dim_norm(
        &mut self,
        op: &'static str,
        center: bool,
        x: &Value,
        gamma: Option<&Value>,
        beta: Option<&Value>,
        eps: f64,
    ) -> Result<Value> {
        let (rows, d) = rows_of(op, x, gamma, beta)?;
        if eps.is_nan() || eps < 0.0 {
            bail!("{op}: eps must be >= 0, got {eps}");
        }
        let dims = x.dims().to_vec();
        let (gt, bt) = (gamma.map(|g| g.tensor()), beta.map(|b| b.tensor()));
        let (y, mean, rstd) = norm_rows(x.tensor(), gt, bt, eps, center)?;
        let mut inputs = vec![x];
        inputs.extend(gamma);
        inputs.extend(beta);
        if !self.needs_grad(&inputs) {
            return Ok(self.constant(y));
        }
        let need_x = x.is_tracked() || gamma.is_some_and(|g| g.is_tracked());
        let cx = if need_x {
            let cx = self.save(op, x, SaveAs::Activation)?;
            let cm = if center {
                Some(self.save_derived(op, &mean, SaveAs::Exact)?)
            } else {
                None
            };
            Some((cx, cm, self.save_derived(op, &rstd, SaveAs::Exact)?))
        } else {
            None
        };
        let cg = match gamma {
            Some(g) if x.is_tracked() => Some(self.save(op, g, SaveAs::Activation)?),
            _ => None,
        };
        drop((mean, rstd));
        // The output, for the op that reads it next (a linear layer saves it): rebuilt from
        // the saved input and statistics instead of stored a second time.
        // (Of a batch of rows: a rebuild is read in row chunks.)
        let rebuild = cx
            .as_ref()
            .filter(|_| dims.len() >= 2)
            .map(|(x, mean, rstd)| {
                Rc::new(NormOutput {
                    x: x.clone(),
                    mean: mean.clone(),
                    rstd: rstd.clone(),
                    gamma: gt.cloned(),
                    beta: bt.cloned(),
                    d,
                    op,
                }) as Rc<dyn Recompute>
            });
        let (has_gamma, has_beta) = (gamma.is_some(), beta.is_some());
        let y = self.record_grad(op, &inputs, y, move |g, needs| {
            let ig = if has_gamma { Some(1) } else { None };
            let ib = if has_beta {
                Some(1 + has_gamma as usize)
            } else {
                None
            };
            let want = [
                needs[0],
                ig.is_some_and(|i| needs[i]),
                ib.is_some_and(|i| needs[i]),
            ];
            let gamma = cg.as_ref().map(|cg| cg.load()).transpose()?;
            let g_owned = g.is_owned();
            let g2 = g.into_tensor().reshape((rows, d))?;
            let stats = match &cx {
                Some((_, cm, cr)) => {
                    let r = cr.load()?;
                    let m = match cm {
                        Some(cm) => cm.load()?,
                        None => r.zeros_like()?,
                    };
                    Some((m, r))
                }
                None => None,
            };
            // Rows `first..first + n` of the gradients, from the same rows of `g`, of the saved
            // input and of its statistics.
            let rows_grads = |x: Option<Tensor>, first: usize, n: usize| -> Result<Grads3> {
                let g2 = if n == rows {
                    g2.clone()
                } else {
                    g2.narrow(0, first, n)?
                };
                let st = match &stats {
                    Some((m, r)) if n == rows => Some((m.clone(), r.clone())),
                    Some((m, r)) => Some((m.narrow(0, first, n)?, r.narrow(0, first, n)?)),
                    None => None,
                };
                let xs = match (&x, &st) {
                    (Some(x), Some((m, r))) => Some((x, m, r)),
                    _ => None,
                };
                norm_rows_backward(&g2, xs, gamma.as_ref(), center, want)
            };
            // A compressed input is read a chunk of samples at a time, and the input gradient
            // goes into the rows of an owned output gradient as each chunk is done: no whole
            // unpacked input, and no input-sized buffer beside the gradient.
            let samples = cx.as_ref().map_or(1, |(c, _, _)| c.rows());
            // CPU only for now: the GPU path (candle ops per chunk, `slice_set` into the
            // gradient) is not yet checked on a card.
            let chunked = g2.device().is_cpu()
                && cx.as_ref().is_some_and(|(c, _, _)| {
                    !c.stored_as_is() && c.loads_rows_cheaply() && samples > 1
                })
                && rows.is_multiple_of(samples)
                && rows * d * g2.dtype().size_in_bytes() > super::context_chunk_bytes();
            let (gx, gg, gb) = if !chunked {
                let x = match &cx {
                    Some((c, _, _)) => Some(c.load()?.reshape((rows, d))?),
                    None => None,
                };
                rows_grads(x, 0, rows)?
            } else {
                let Some((c, _, _)) = &cx else {
                    bail!("{op}: chunked backward without a saved input");
                };
                let per = rows / samples;
                let chunk = super::chunk_rows_for(samples, per * d * g2.dtype().size_in_bytes());
                let gx = match (want[0], g_owned) {
                    (false, _) => None,
                    (true, true) => Some(g2.clone()),
                    (true, false) => Some(Tensor::zeros((rows, d), g2.dtype(), g2.device())?),
                };
                let (mut gg, mut gb): (Option<Tensor>, Option<Tensor>) = (None, None);
                for (first, len) in super::row_chunks(samples, chunk) {
                    let x = c.load_rows(first, len)?.reshape((len * per, d))?;
                    let (gxc, ggc, gbc) = rows_grads(Some(x), first * per, len * per)?;
                    if let (Some(dst), Some(part)) = (&gx, gxc) {
                        // Rows already read: overwriting them in `g` is safe.
                        dst.slice_set(&part, 0, first * per)?;
                    }
                    for (acc, part) in [(&mut gg, ggc), (&mut gb, gbc)] {
                        if let Some(part) = part {
                            super::accumulate(acc, part)?;
                        }
                    }
                }
                (gx, gg, gb)
            };
            drop(g2);
            // Every gradient is a new tensor or the owned output gradient itself: owned.
            let mut grads: Vec<Option<Grad>> = vec![gx
                .map(|t| t.reshape(dims.as_slice()))
                .transpose()?
                .map(Grad::owned)];
            if has_gamma {
                grads.push(gg.map(Grad::owned));
            }
            if has_beta {
                grads.push(gb.map(Grad::owned));
            }
            Ok(grads)
        })?;
        if let Some(r) = rebuild {
            self.offer_recompute(&y, r);
        }
        Ok(y)
    }
}

/// A layer (or RMS) norm's output rebuilt from its saved input `x` (`[B, .., d]`) and
/// per-row statistics: `(x - mean) · rstd · gamma + beta`. The statistics are exact, so the
/// output is an affine function of the (quantized) input: unbiased where the input is, and
/// read in the same rows.
pub(crate) struct NormOutput {
    x: Saved,
    /// `[rows, 1]`; none for RMS norm.
    mean: Option<Saved>,
    rstd: Saved,
    gamma: Option<Tensor>,
    beta: Option<Tensor>,
    d: usize,
    op: &'static str,
}

impl Recompute for NormOutput {
    fn rows(&self, first: usize, count: usize) -> Result<Tensor> {
        let mut dims = self.x.shape().dims().to_vec();
        // Rows (of `d`) per sample.
        let per = self.x.shape().elem_count() / (self.x.rows().max(1) * self.d).max(1);
        dims[0] = count;
        let n = count * per;
        let stat = |s: &Saved| -> Result<Tensor> { Ok(s.load()?.narrow(0, first * per, n)?) };
        // `x` goes as soon as the first result exists: at most two row-sized tensors at once.
        let mut y = {
            let x = self.x.load_rows(first, count)?.reshape((n, self.d))?;
            match &self.mean {
                Some(m) => x.broadcast_sub(&stat(m)?)?,
                None => x,
            }
        };
        y = y.broadcast_mul(&stat(&self.rstd)?)?;
        if let Some(g) = &self.gamma {
            y = y.broadcast_mul(g)?;
        }
        if let Some(b) = &self.beta {
            y = y.broadcast_add(b)?;
        }
        Ok(y.reshape(dims)?)
    }

    fn label(&self) -> String {
        format!("from {}", self.op)
    }
}

/// What [`bn_forward`] computed: the output and the `[C]` statistics it normalised with.
pub(crate) struct BnOutput {
    pub y: Tensor,
    pub mean: Tensor,
    pub invstd: Tensor,
}

/// Batch-norm forward of `x: [N, C, ..]` with the batch's statistics (`training`, which also
/// updates `running` with `momentum`) or the running ones. `in_place`: the caller owns `x`
/// and nothing reads it as it is afterwards, so on the CPU kernels the output takes its buffer.
pub(crate) fn bn_forward(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    running: &mut BatchNormStats,
    (momentum, eps): (f64, f64),
    training: bool,
    in_place: bool,
) -> Result<BnOutput> {
    let dims = x.dims();
    let (n, c) = (dims[0], dims[1]);
    let s: usize = dims[2..].iter().product();
    let m = n * s;
    let kernel = use_kernel(&[x, gamma, beta]);
    let fwd = if kernel {
        let run = if training {
            None
        } else {
            Some((&running.mean, &running.var))
        };
        by_dtype!(
            x.dtype(),
            bn_forward_kernel,
            x,
            gamma,
            beta,
            run,
            (n, c, s),
            eps,
            in_place
        )?
    } else {
        bn_forward_generic(x, gamma, beta, training, running, (n, c, s), eps)?
    };
    let BnForward {
        mean,
        invstd,
        batch_var,
        y,
    } = fwd;
    if let Some(var) = batch_var {
        // Running statistics (buffers, not part of the graph).
        let rd = running.mean.dtype();
        let bm = mean.to_dtype(rd)?;
        let bv = (var * (m as f64 / (m - 1) as f64))?.to_dtype(rd)?;
        running.mean = ((&running.mean * (1.0 - momentum))? + (bm * momentum)?)?;
        running.var = ((&running.var * (1.0 - momentum))? + (bv * momentum)?)?;
    }
    Ok(BnOutput { y, mean, invstd })
}

/// Batch-norm backward for a consumer that takes the input gradient a few samples at a
/// time (a convolution's backward, chunk by chunk): [`BnChunkGrad::new`] makes the
/// per-channel reductions over the whole batch (reading the saved input in chunks), then
/// [`BnChunkGrad::rows`] gives the input gradient of any samples — so it never exists
/// whole. CPU f32/f64 only ([`BnChunkGrad::applies`]).
pub(crate) struct BnChunkGrad {
    k: BnGx,
    x: Saved,
    dims: Vec<usize>,
    /// `(Σ g x̂, Σ g)` per channel: the gradients of gamma and beta.
    pub gamma_grad: Tensor,
    pub beta_grad: Tensor,
}

impl BnChunkGrad {
    /// Whether the kernels apply to these tensors.
    pub(crate) fn applies(ts: &[&Tensor]) -> bool {
        use_kernel(ts) && ts.iter().all(|t| t.is_contiguous())
    }

    /// The reductions over `g: [N, C, ..]` and the saved input `x` (normalised with the
    /// saved `mean` and `invstd` in training).
    pub(crate) fn new(
        g: &Tensor,
        x: &Saved,
        mean: &Saved,
        invstd: &Saved,
        gamma: &Tensor,
    ) -> Result<Self> {
        by_dtype!(g.dtype(), bn_chunk_grad_new, g, x, mean, invstd, gamma)
    }

    /// The reductions gathered chunk by chunk in `sums` (over all `n` samples of the saved
    /// input `x`), for an output gradient that never existed whole.
    pub(crate) fn from_sums(
        sums: BnSums,
        x: &Saved,
        mean: &Saved,
        invstd: &Saved,
        gamma: &Tensor,
    ) -> Result<Self> {
        let dims = x.shape().dims().to_vec();
        let BnSums { sum_g, sum_gxh, .. } = sums;
        by_dtype!(
            gamma.dtype(),
            bn_chunk_grad_from,
            sum_g,
            sum_gxh,
            x,
            mean,
            invstd,
            gamma,
            dims
        )
    }

    /// The input gradient of samples `first..first + count`, a new tensor.
    pub(crate) fn rows(&self, g: &Tensor, first: usize, count: usize) -> Result<Tensor> {
        self.apply(g.narrow(0, first, count)?.force_contiguous()?, first, count)
    }

    /// [`BnChunkGrad::rows`] of an output gradient chunk `g` (samples `first..first +
    /// count`) the caller hands over: written into it.
    pub(crate) fn apply(&self, g: Tensor, first: usize, count: usize) -> Result<Tensor> {
        let mut dims = self.dims.clone();
        dims[0] = count;
        let xc = self.x.load_rows(first, count)?.contiguous()?;
        g.inplace_op2(&xc, &self.k)?;
        Ok(g.reshape(dims)?)
    }
}

/// Batch norm's per-channel reductions `Σ g` and `Σ g x̂` gathered a chunk of samples at a
/// time (for [`BnChunkGrad::from_sums`]), in sample order: the same sums, bit for bit, as
/// one pass over the whole gradient.
pub(crate) struct BnSums {
    sum_g: Vec<f64>,
    sum_gxh: Vec<f64>,
}

impl BnSums {
    pub(crate) fn new(channels: usize) -> Self {
        Self {
            sum_g: vec![0.0; channels],
            sum_gxh: vec![0.0; channels],
        }
    }

    /// Adds the samples of the chunk `g` (contiguous `[count, C, ..]`, CPU), whose saved
    /// input is `x`, normalised with `mean` and `invstd`.
    pub(crate) fn add(
        &mut self,
        g: &Tensor,
        x: &Tensor,
        mean: &Tensor,
        invstd: &Tensor,
    ) -> Result<()> {
        by_dtype!(g.dtype(), bn_sums_add, self, g, x, mean, invstd)
    }
}

fn bn_sums_add<T: WithDType>(
    sums: &mut BnSums,
    g: &Tensor,
    x: &Tensor,
    mean: &Tensor,
    invstd: &Tensor,
) -> Result<()> {
    let dims = g.dims();
    let (count, c) = (dims[0], dims[1]);
    let s: usize = dims[2..].iter().product();
    let (mean, invstd): (Vec<T>, Vec<T>) = (mean.to_vec1()?, invstd.to_vec1()?);
    with_slices::<T, _>(&[g, x], |v| {
        let (gs, xs) = (v[0], v[1]);
        sums.sum_g.par_iter_mut().enumerate().for_each(|(ci, acc)| {
            for ni in 0..count {
                let p = &gs[(ni * c + ci) * s..][..s];
                *acc += lane_sum(s, |j| p[j]);
            }
        });
        bn_sum_gxh_rows(&mut sums.sum_gxh, gs, xs, &mean, &invstd, (c, s), count);
        Ok(())
    })
}

fn bn_chunk_grad_new<T: WithDType>(
    g: &Tensor,
    x: &Saved,
    mean: &Saved,
    invstd: &Saved,
    gamma: &Tensor,
) -> Result<BnChunkGrad> {
    let dims = g.dims().to_vec();
    let (n, c) = (dims[0], dims[1]);
    let s: usize = dims[2..].iter().product();
    let (mean_t, invstd_t) = (mean.load()?, invstd.load()?);
    let load = |first: usize, count: usize| -> Result<Tensor> { x.load_rows(first, count) };
    let chunk = super::chunk_rows_for(n, c * s * g.dtype().size_in_bytes());
    let (sum_g, sum_gxh, _) = bn_reductions::<T>(
        g,
        Some((&load as RowLoader, &mean_t, &invstd_t)),
        (n, c, s),
        chunk,
    )?;
    let sum_gxh = sum_gxh.unwrap_or_default();
    bn_chunk_grad_from::<T>(sum_g, sum_gxh, x, mean, invstd, gamma, dims)
}

fn bn_chunk_grad_from<T: WithDType>(
    sum_g: Vec<f64>,
    sum_gxh: Vec<f64>,
    x: &Saved,
    mean: &Saved,
    invstd: &Saved,
    gamma: &Tensor,
    dims: Vec<usize>,
) -> Result<BnChunkGrad> {
    let (n, c) = (dims[0], dims[1]);
    let s: usize = dims[2..].iter().product();
    let to_t = |v: &[f64]| vec_tensor(v.iter().map(|&v| T::from_f64(v)).collect::<Vec<T>>(), &[c]);
    let to_f64 = |t: &Tensor| -> Result<Vec<f64>> { Ok(t.to_dtype(DType::F64)?.to_vec1()?) };
    Ok(BnChunkGrad {
        gamma_grad: to_t(&sum_gxh)?,
        beta_grad: to_t(&sum_g)?,
        k: BnGx {
            mean: to_f64(&mean.load()?)?,
            invstd: to_f64(&invstd.load()?)?,
            gamma: to_f64(gamma)?,
            sum_g,
            sum_gxh,
            inv_m: 1.0 / (n * s) as f64,
            training: true,
            c,
            s,
        },
        x: x.clone(),
        dims,
    })
}

/// A batch norm's output rebuilt from its saved input `x` (`[N, C, ..]`) and the per-channel
/// statistics it was normalised with: `(x - mean[c]) · invstd[c] · gamma[c] + beta[c]`. The
/// statistics are exact, so the output is affine in the (quantized) input: unbiased where
/// the input is, and read in the same rows.
pub(crate) struct BatchNormOutput {
    x: Saved,
    mean: Saved,
    invstd: Saved,
    gamma: Tensor,
    beta: Tensor,
}

/// The rebuild of a batch norm's output from its saved input `x`, statistics and affine
/// parameters (see [`BatchNormOutput`]).
pub(crate) fn batch_norm_output(
    x: Saved,
    mean: Saved,
    invstd: Saved,
    gamma: Tensor,
    beta: Tensor,
) -> Rc<dyn Recompute> {
    Rc::new(BatchNormOutput {
        x,
        mean,
        invstd,
        gamma,
        beta,
    })
}

impl Recompute for BatchNormOutput {
    fn rows(&self, first: usize, count: usize) -> Result<Tensor> {
        let x = self.x.load_rows(first, count)?;
        let dims = x.dims().to_vec();
        let c = dims[1];
        let s: usize = dims[2..].iter().product();
        let (mean, invstd) = (self.mean.load()?, self.invstd.load()?);
        let scale = (&invstd * &self.gamma)?;
        // An unpacked chunk is ours: normalised in place, as the forward kernel does.
        if use_kernel(&[&x, &mean, &scale, &self.beta])
            && !self.x.stored_as_is()
            && x.is_contiguous()
        {
            by_dtype!(
                x.dtype(),
                bn_apply_in_place,
                &x,
                &mean,
                &scale,
                &self.beta,
                (c, s)
            )?;
            return Ok(x);
        }
        let per_channel = |t: &Tensor| -> Result<Tensor> {
            let mut d = vec![1; dims.len()];
            d[1] = c;
            Ok(t.reshape(d)?)
        };
        Ok(x.broadcast_sub(&per_channel(&mean)?)?
            .broadcast_mul(&per_channel(&scale)?)?
            .broadcast_add(&per_channel(&self.beta)?)?)
    }

    fn label(&self) -> String {
        "from batch_norm".to_string()
    }
}

fn bn_apply_in_place<T: WithDType>(
    x: &Tensor,
    mean: &Tensor,
    scale: &Tensor,
    beta: &Tensor,
    cs: (usize, usize),
) -> Result<()> {
    let (mean, scale, beta) = (
        mean.to_vec1::<T>()?,
        scale.to_vec1::<T>()?,
        beta.to_vec1::<T>()?,
    );
    x.inplace_op1(&BnApplyInPlace {
        mean: &mean,
        scale: &scale,
        beta: &beta,
        cs,
    })?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The same computations with candle ops (any device, any float dtype).

fn bn_forward_generic(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    training: bool,
    running: &BatchNormStats,
    (n, c, s): (usize, usize, usize),
    eps: f64,
) -> Result<BnForward> {
    let x3 = x.reshape((n, c, s))?;
    let m = (n * s) as f64;
    let (mean, var, batch_var) = if training {
        let mean = (x3.sum_keepdim((0, 2))? / m)?; // [1, C, 1]
        let var = (x3.broadcast_sub(&mean)?.sqr()?.sum_keepdim((0, 2))? / m)?.flatten_all()?;
        (mean.flatten_all()?, var.clone(), Some(var))
    } else {
        (
            running.mean.to_dtype(x.dtype())?,
            running.var.to_dtype(x.dtype())?,
            None,
        )
    };
    let invstd = (var + eps)?.sqrt()?.recip()?;
    let scale = (&invstd * gamma)?.reshape((1, c, 1))?;
    let y = x3
        .broadcast_sub(&mean.reshape((1, c, 1))?)?
        .broadcast_mul(&scale)?
        .broadcast_add(&beta.reshape((1, c, 1))?)?
        .reshape(x.dims())?;
    Ok(BnForward {
        mean,
        invstd,
        batch_var,
        y,
    })
}

fn bn_backward_generic(
    g: &Tensor,
    x: Option<(&Tensor, &Tensor, &Tensor)>,
    gamma: Option<&Tensor>,
    (n, c, s): (usize, usize, usize),
    training: bool,
    want: [bool; 3],
) -> Result<Grads3> {
    let g3 = g.reshape((n, c, s))?;
    let gbeta = g3.sum_keepdim((0, 2))?; // [1, C, 1]
    let (mut gx, mut ggamma) = (None, None);
    if let Some((x, mean, invstd)) = x {
        let invstd = invstd.reshape((1, c, 1))?;
        let xhat = x
            .reshape((n, c, s))?
            .broadcast_sub(&mean.reshape((1, c, 1))?)?
            .broadcast_mul(&invstd)?;
        let gg = (&g3 * &xhat)?.sum_keepdim((0, 2))?; // [1, C, 1]
        if let (Some(gamma), true) = (gamma, want[0]) {
            let k = invstd.broadcast_mul(&gamma.reshape((1, c, 1))?)?;
            let t = if training {
                // g - mean(g) - x̂ mean(g x̂), per channel.
                let inv_m = 1.0 / (n * s) as f64;
                g3.broadcast_sub(&(&gbeta * inv_m)?)?
                    .sub(&xhat.broadcast_mul(&(&gg * inv_m)?)?)?
            } else {
                g3.clone()
            };
            gx = Some(t.broadcast_mul(&k)?);
        }
        if want[1] {
            ggamma = Some(gg.flatten_all()?);
        }
    }
    let gbeta = if want[2] {
        Some(gbeta.flatten_all()?)
    } else {
        None
    };
    Ok((gx, ggamma, gbeta))
}

fn row_forward_generic(
    x: &Tensor,
    gamma: Option<&Tensor>,
    beta: Option<&Tensor>,
    (rows, d): (usize, usize),
    eps: f64,
    center: bool,
) -> Result<(Tensor, Tensor, Tensor)> {
    let x2 = x.reshape((rows, d))?;
    let inv_d = 1.0 / d as f64;
    let (mean, xc) = if center {
        let mean = (x2.sum_keepdim(1)? * inv_d)?; // [rows, 1]
        let xc = x2.broadcast_sub(&mean)?;
        (mean, xc)
    } else {
        (Tensor::zeros((rows, 1), x.dtype(), x.device())?, x2)
    };
    let rstd = ((xc.sqr()?.sum_keepdim(1)? * inv_d)? + eps)?
        .sqrt()?
        .recip()?; // [rows, 1]
    let mut y = xc.broadcast_mul(&rstd)?;
    if let Some(g) = gamma {
        y = y.broadcast_mul(g)?;
    }
    if let Some(b) = beta {
        y = y.broadcast_add(b)?;
    }
    Ok((y.reshape(x.dims())?, mean, rstd))
}

fn row_backward_generic(
    g2: &Tensor,
    x: Option<(&Tensor, &Tensor, &Tensor)>,
    gamma: Option<&Tensor>,
    d: usize,
    center: bool,
    want: [bool; 3],
) -> Result<Grads3> {
    let inv_d = 1.0 / d as f64;
    let (mut gx, mut gg) = (None, None);
    if let Some((x, mean, rstd)) = x {
        let xhat = x.broadcast_sub(mean)?.broadcast_mul(rstd)?;
        if want[1] {
            gg = Some((g2 * &xhat)?.sum(0)?);
        }
        if want[0] {
            let gxh = match gamma {
                Some(gm) => g2.broadcast_mul(gm)?,
                None => g2.clone(),
            };
            let dot = ((&gxh * &xhat)?.sum_keepdim(1)? * inv_d)?;
            let mut t = gxh.sub(&xhat.broadcast_mul(&dot)?)?;
            if center {
                t = t.broadcast_sub(&(gxh.sum_keepdim(1)? * inv_d)?)?;
            }
            gx = Some(t.broadcast_mul(rstd)?);
        }
    }
    let gb = if want[2] { Some(g2.sum(0)?) } else { None };
    Ok((gx, gg, gb))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(n: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7919 % 101) as f32 / 50.0 - 1.0) * scale)
            .collect()
    }

    /// Batch norm's reductions gathered chunk by chunk ([`BnSums`], as a fused block and the
    /// chunked backward make them) do not depend on the chunking, bit for bit, so fused and
    /// composed gradients differ only where the chunks' weight gradients are summed; and they
    /// are the sums `Σ g`, `Σ g (x - mean) invstd`.
    #[test]
    fn chunked_sums_do_not_depend_on_the_chunking() -> Result<()> {
        let (n, c, s) = (5, 3, 7);
        // Samples of very different magnitudes, so that f64 sums depend on their order.
        let scale = [1e9f32, 1e-9, 3.0, -1e9, 1e-7];
        let g: Vec<f32> = ramp(n * c * s, 1.3)
            .iter()
            .enumerate()
            .map(|(i, v)| v * scale[i / (c * s)] + 1e-3 * i as f32)
            .collect();
        let xs = ramp(n * c * s + 3, 2.0)[3..].to_vec();
        let (m, k) = ([0.1f32, -0.2, 0.3], [1.5f32, 0.7, 2.0]);
        let gt = Tensor::from_vec(g.clone(), (n, c, s), &Device::Cpu)?;
        let x = Tensor::from_vec(xs.clone(), (n, c, s), &Device::Cpu)?;
        let mean = Tensor::from_vec(m.to_vec(), c, &Device::Cpu)?;
        let invstd = Tensor::from_vec(k.to_vec(), c, &Device::Cpu)?;
        let load =
            |first: usize, count: usize| -> Result<Tensor> { Ok(x.narrow(0, first, count)?) };
        let sums = |chunk| {
            bn_reductions::<f32>(
                &gt,
                Some((&load as RowLoader, &mean, &invstd)),
                (n, c, s),
                chunk,
            )
            .map(|(a, b, _)| (a, b.unwrap()))
        };
        let (one_g, one_gxh) = sums(n)?;
        for chunk in [1, 2, 3] {
            assert_eq!(
                sums(chunk)?,
                (one_g.clone(), one_gxh.clone()),
                "chunk {chunk}"
            );
        }
        for ci in 0..c {
            let (mut sg, mut sgx, mut mag) = (0f64, 0f64, 0f64);
            for ni in 0..n {
                for j in 0..s {
                    let at = (ni * c + ci) * s + j;
                    let (gv, xh) = (g[at] as f64, ((xs[at] - m[ci]) * k[ci]) as f64);
                    sg += gv;
                    sgx += gv * xh;
                    mag += (gv * xh).abs() + gv.abs();
                }
            }
            assert!((one_g[ci] - sg).abs() <= 1e-6 * mag, "Σ g, channel {ci}");
            assert!(
                (one_gxh[ci] - sgx).abs() <= 1e-6 * mag,
                "Σ g x̂, channel {ci}"
            );
        }
        Ok(())
    }
}
