//! Pointwise activations: ReLU, LeakyReLU, GELU (tanh and erf forms), SiLU, sigmoid, tanh.
//!
//! Forward runs candle's unary ops (GELU and SiLU: the same formulas in a multi-threaded CPU
//! loop, [`cpu_map`]). Backward runs one fused, multi-threaded pass on the CPU (`g * f'(x)` in
//! a single loop, see [`cpu_zip`]) where the tensors are contiguous f32/f64, and the
//! equivalent chain of candle ops elsewhere (CUDA, other dtypes, strided layouts).
//!
//! This file also holds the small CPU-kernel toolkit the other ops of this family (dropout,
//! softmax, cross-entropy) share: [`Real`], [`CpuView`], [`cpu_map`], [`cpu_zip`], [`cpu_rows`].

use crate::tape::{SaveAs, Tape, Value};
use anyhow::{bail, Result};
use candle_core::{DType, Device, Layout, Storage, StorageRef, Tensor, WithDType};
use rayon::prelude::*;
use std::ops::{Add, AddAssign, Div, Mul, MulAssign, Neg, Sub, SubAssign};

/// Which formula [`Tape::gelu`] uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GeluApprox {
    /// `0.5 x (1 + tanh(√(2/π) (x + 0.044715 x³)))` (candle's `gelu`, GPT-2's "gelu_new").
    Tanh,
    /// `x Φ(x) = 0.5 x (1 + erf(x / √2))` (candle's `gelu_erf`, PyTorch's default).
    Erf,
}

impl Tape {
    /// `max(x, 0)`. Context: `x` as a sign mask (1 bit per element under compression):
    /// backward is `g * (x > 0)` and needs nothing else.
    pub fn relu(&mut self, x: &Value) -> Result<Value> {
        let y = x.tensor().relu()?;
        if !self.needs_grad(&[x]) {
            return Ok(self.constant(y));
        }
        let m = self.save("relu", x, SaveAs::SignMask)?;
        self.record("relu", &[x], y, move |g, _| {
            Ok(vec![Some(g.mul(&m.load()?)?)])
        })
    }

    /// `x` where `x > 0`, else `slope * x`. Context: `x` as a sign mask, like ReLU:
    /// backward is `g * (mask * (1 - slope) + slope)`.
    pub fn leaky_relu(&mut self, x: &Value, slope: f64) -> Result<Value> {
        if !slope.is_finite() {
            bail!(
                "leaky_relu: slope must be finite, got {slope} (input {:?})",
                x.dims()
            );
        }
        let t = x.tensor();
        let sx = t.affine(slope, 0.0)?;
        // For slope <= 1, max(x, slope x) picks x above 0 and slope x below; for slope > 1, min.
        let y = if slope <= 1.0 {
            t.maximum(&sx)?
        } else {
            t.minimum(&sx)?
        };
        drop(sx);
        if !self.needs_grad(&[x]) {
            return Ok(self.constant(y));
        }
        let m = self.save("leaky_relu", x, SaveAs::SignMask)?;
        self.record("leaky_relu", &[x], y, move |g, _| {
            let d = m.load()?.affine(1.0 - slope, slope)?;
            Ok(vec![Some(g.mul(&d)?)])
        })
    }

    /// GELU, in the `approx` form. Context: `x` (Activation). Backward is the analytic
    /// derivative of the chosen form, `g * gelu'(x)`. `gelu'` is nonlinear in `x`, so when the
    /// policy quantizes `x` with stochastic rounding the gradient is only approximately
    /// unbiased (the bias is second order in the rounding step: `½ gelu'''(x) Var[x̂]`).
    pub fn gelu(&mut self, x: &Value, approx: GeluApprox) -> Result<Value> {
        let t = x.tensor();
        let y = match approx {
            GeluApprox::Tanh => match cpu_map(t, &GeluTanh)? {
                Some(y) => y,
                None => t.gelu()?,
            },
            GeluApprox::Erf => match cpu_map(t, &GeluErf)? {
                Some(y) => y,
                None => t.gelu_erf()?,
            },
        };
        if !self.needs_grad(&[x]) {
            return Ok(self.constant(y));
        }
        let cx = self.save("gelu", x, SaveAs::Activation)?;
        self.record("gelu", &[x], y, move |g, _| {
            let x = cx.load()?;
            let gx = match approx {
                GeluApprox::Tanh => match cpu_zip(&x, &g, &GeluTanhGrad)? {
                    Some(t) => t,
                    None => g.mul(&gelu_tanh_derivative(&x)?)?,
                },
                GeluApprox::Erf => match cpu_zip(&x, &g, &GeluErfGrad)? {
                    Some(t) => t,
                    None => g.mul(&gelu_erf_derivative(&x)?)?,
                },
            };
            Ok(vec![Some(gx)])
        })
    }

    /// SiLU (swish), `x σ(x)`. Context: `x` (Activation); backward recomputes
    /// `σ(x) (1 + x (1 - σ(x)))`, which is nonlinear in `x`, so a quantized `x` gives an
    /// approximately (second-order) unbiased gradient.
    pub fn silu(&mut self, x: &Value) -> Result<Value> {
        let y = match cpu_map(x.tensor(), &Silu)? {
            Some(y) => y,
            None => x.tensor().silu()?,
        };
        if !self.needs_grad(&[x]) {
            return Ok(self.constant(y));
        }
        let cx = self.save("silu", x, SaveAs::Activation)?;
        self.record("silu", &[x], y, move |g, _| {
            let x = cx.load()?;
            let gx = match cpu_zip(&x, &g, &SiluGrad)? {
                Some(t) => t,
                None => {
                    let s = candle_nn::ops::sigmoid(&x)?;
                    let xs = (&x * &s)?;
                    let d = (&s * ((&x - &xs)? + 1.0)?)?;
                    g.mul(&d)?
                }
            };
            Ok(vec![Some(gx)])
        })
    }

    /// Logistic sigmoid `1 / (1 + e^-x)`. Context: its output `y` (Activation, shared with any
    /// later op that saves `y`); backward is `g y (1 - y)` — quadratic in `y`, so approximately
    /// unbiased under quantization.
    pub fn sigmoid(&mut self, x: &Value) -> Result<Value> {
        let y = candle_nn::ops::sigmoid(x.tensor())?;
        if !self.needs_grad(&[x]) {
            return Ok(self.constant(y));
        }
        let out = self.output(y);
        let cy = self.save("sigmoid", &out, SaveAs::Activation)?;
        self.record_output("sigmoid", &[x], out, move |g, _| {
            let y = cy.load()?;
            let gx = match cpu_zip(&y, &g, &SigmoidGrad)? {
                Some(t) => t,
                None => g.mul(&y.affine(-1.0, 1.0)?.mul(&y)?)?,
            };
            Ok(vec![Some(gx)])
        })
    }

    /// Hyperbolic tangent. Context: its output `y` (Activation, shareable); backward is
    /// `g (1 - y²)` — quadratic in `y`, so approximately unbiased under quantization.
    pub fn tanh(&mut self, x: &Value) -> Result<Value> {
        let y = x.tensor().tanh()?;
        if !self.needs_grad(&[x]) {
            return Ok(self.constant(y));
        }
        let out = self.output(y);
        let cy = self.save("tanh", &out, SaveAs::Activation)?;
        self.record_output("tanh", &[x], out, move |g, _| {
            let y = cy.load()?;
            let gx = match cpu_zip(&y, &g, &TanhGrad)? {
                Some(t) => t,
                None => g.mul(&y.sqr()?.affine(-1.0, 1.0)?)?,
            };
            Ok(vec![Some(gx)])
        })
    }
}

const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;
const GELU_K: f64 = 0.044_715;
const INV_SQRT_2PI: f64 = 0.398_942_280_401_432_7;

/// `d/dx gelu_tanh(x) = ½(1 + t) + ½ x (1 - t²) c (1 + 3k x²)`, `t = tanh(c (x + k x³))`,
/// with candle ops (any device).
fn gelu_tanh_derivative(x: &Tensor) -> Result<Tensor> {
    let c = SQRT_2_OVER_PI;
    let x2 = x.sqr()?;
    let t = x.mul(&x2.affine(GELU_K * c, c)?)?.tanh()?;
    let a = t.affine(0.5, 0.5)?;
    let b = t.sqr()?.affine(-1.0, 1.0)?;
    let inner = x2.affine(1.5 * GELU_K * c, 0.5 * c)?.mul(x)?;
    Ok(a.add(&b.mul(&inner)?)?)
}

/// `d/dx x Φ(x) = Φ(x) + x φ(x)` with candle ops (any device).
fn gelu_erf_derivative(x: &Tensor) -> Result<Tensor> {
    let cdf = x
        .affine(std::f64::consts::FRAC_1_SQRT_2, 0.0)?
        .erf()?
        .affine(0.5, 0.5)?;
    let pdf_x = x
        .sqr()?
        .affine(-0.5, 0.0)?
        .exp()?
        .mul(x)?
        .affine(INV_SQRT_2PI, 0.0)?;
    Ok(cdf.add(&pdf_x)?)
}

/// Forward kernels: the same formulas, in the same order, as candle's unary ops.
struct GeluTanh;
impl Unary for GeluTanh {
    #[inline(always)]
    fn apply<T: Real>(&self, v: T) -> T {
        let c = T::c(SQRT_2_OVER_PI);
        T::c(0.5) * v * (T::c(1.0) + (c * v * (T::c(1.0) + T::c(GELU_K) * v * v)).tanh())
    }
}

struct GeluErf;
impl Unary for GeluErf {
    #[inline(always)]
    fn apply<T: Real>(&self, v: T) -> T {
        ((v * T::c(std::f64::consts::FRAC_1_SQRT_2)).erf() + T::c(1.0)) * T::c(0.5) * v
    }
}

struct Silu;
impl Unary for Silu {
    #[inline(always)]
    fn apply<T: Real>(&self, v: T) -> T {
        v / (T::c(1.0) + (-v).exp())
    }
}

struct GeluTanhGrad;
impl Pointwise for GeluTanhGrad {
    #[inline(always)]
    fn apply<T: Real>(&self, x: T, g: T) -> T {
        let c = T::c(SQRT_2_OVER_PI);
        let k = T::c(GELU_K);
        let half = T::c(0.5);
        let one = T::c(1.0);
        let x2 = x * x;
        let t = (c * x * (one + k * x2)).tanh();
        let d = half * (one + t) + half * x * (one - t * t) * c * (one + T::c(3.0) * k * x2);
        g * d
    }
}

struct GeluErfGrad;
impl Pointwise for GeluErfGrad {
    #[inline(always)]
    fn apply<T: Real>(&self, x: T, g: T) -> T {
        let cdf = T::c(0.5) * (T::c(1.0) + (x * T::c(std::f64::consts::FRAC_1_SQRT_2)).erf());
        let pdf = T::c(INV_SQRT_2PI) * (T::c(-0.5) * x * x).exp();
        g * (cdf + x * pdf)
    }
}

struct SiluGrad;
impl Pointwise for SiluGrad {
    #[inline(always)]
    fn apply<T: Real>(&self, x: T, g: T) -> T {
        let one = T::c(1.0);
        let s = one / (one + (-x).exp());
        g * s * (one + x * (one - s))
    }
}

struct SigmoidGrad;
impl Pointwise for SigmoidGrad {
    #[inline(always)]
    fn apply<T: Real>(&self, y: T, g: T) -> T {
        g * y * (T::c(1.0) - y)
    }
}

struct TanhGrad;
impl Pointwise for TanhGrad {
    #[inline(always)]
    fn apply<T: Real>(&self, y: T, g: T) -> T {
        g * (T::c(1.0) - y * y)
    }
}

// ---------------------------------------------------------------------------------------------
// CPU kernel toolkit (shared by activation, dropout, softmax and loss).

/// The float types the fused CPU kernels run on (f32 for training, f64 for gradient checks).
pub(crate) trait Real:
    WithDType
    + Copy
    + Send
    + Sync
    + PartialOrd
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
    + Neg<Output = Self>
    + AddAssign
    + SubAssign
    + MulAssign
{
    /// A constant.
    fn c(v: f64) -> Self;
    fn exp(self) -> Self;
    fn ln(self) -> Self;
    fn tanh(self) -> Self;
    fn erf(self) -> Self;
}

impl Real for f32 {
    #[inline(always)]
    fn c(v: f64) -> Self {
        v as f32
    }
    #[inline(always)]
    fn exp(self) -> Self {
        f32::exp(self)
    }
    #[inline(always)]
    fn ln(self) -> Self {
        f32::ln(self)
    }
    #[inline(always)]
    fn tanh(self) -> Self {
        f32::tanh(self)
    }
    #[inline(always)]
    fn erf(self) -> Self {
        candle_core::cpu::erf::erf_f32(self)
    }
}

impl Real for f64 {
    #[inline(always)]
    fn c(v: f64) -> Self {
        v
    }
    #[inline(always)]
    fn exp(self) -> Self {
        f64::exp(self)
    }
    #[inline(always)]
    fn ln(self) -> Self {
        f64::ln(self)
    }
    #[inline(always)]
    fn tanh(self) -> Self {
        f64::tanh(self)
    }
    #[inline(always)]
    fn erf(self) -> Self {
        candle_core::cpu::erf::erf_f64(self)
    }
}

thread_local! {
    static FUSED_CPU: std::cell::Cell<bool> = const { std::cell::Cell::new(true) };
}

/// Turns the fused CPU kernels of this op family on (default) or off for the calling thread.
/// Off, every op takes its portable candle-ops path (the one CUDA uses), so tests can check
/// that path on a CPU-only machine.
pub fn set_fused_cpu_kernels(on: bool) {
    FUSED_CPU.with(|f| f.set(on));
}

/// Whether the fused CPU kernels are on for the calling thread.
pub fn fused_cpu_kernels() -> bool {
    FUSED_CPU.with(|f| f.get())
}

/// Elements per rayon task in the fused kernels: large enough to amortise scheduling.
pub(crate) const PAR_CHUNK: usize = 1 << 14;

/// Read access to the contiguous CPU storage of a tensor, without copying.
pub(crate) struct CpuView<'a> {
    guard: StorageRef<'a>,
    lo: usize,
    hi: usize,
}

impl<'a> CpuView<'a> {
    /// `None` unless `t` lives on the CPU with a contiguous layout (and the fused kernels are
    /// on, see [`set_fused_cpu_kernels`]).
    pub(crate) fn of(t: &'a Tensor) -> Option<Self> {
        if !t.device().is_cpu() || !fused_cpu_kernels() {
            return None;
        }
        let (guard, layout): (StorageRef<'a>, &Layout) = t.storage_and_layout();
        let (lo, hi) = layout.contiguous_offsets()?;
        if !matches!(&*guard, Storage::Cpu(_)) {
            return None;
        }
        Some(Self { guard, lo, hi })
    }

    /// The elements, in row-major order.
    pub(crate) fn slice<T: WithDType>(&self) -> Result<&[T]> {
        match &*self.guard {
            Storage::Cpu(c) => Ok(&c.as_slice::<T>()?[self.lo..self.hi]),
            _ => bail!("CpuView over a non-CPU storage"),
        }
    }
}

/// An elementwise binary function for [`cpu_zip`], generic over the float type.
pub(crate) trait Pointwise: Sync {
    fn apply<T: Real>(&self, a: T, b: T) -> T;
}

/// `out[i] = op(a[i], b[i])` in one multi-threaded pass when `a` and `b` are contiguous CPU
/// tensors of the same shape and dtype (f32 or f64); `Ok(None)` otherwise, so the caller falls
/// back to candle ops.
pub(crate) fn cpu_zip(a: &Tensor, b: &Tensor, op: &impl Pointwise) -> Result<Option<Tensor>> {
    if a.shape() != b.shape() || a.dtype() != b.dtype() {
        return Ok(None);
    }
    match a.dtype() {
        DType::F32 => cpu_zip_typed::<f32>(a, b, op),
        DType::F64 => cpu_zip_typed::<f64>(a, b, op),
        _ => Ok(None),
    }
}

fn cpu_zip_typed<T: Real>(a: &Tensor, b: &Tensor, op: &impl Pointwise) -> Result<Option<Tensor>> {
    let (Some(va), Some(vb)) = (CpuView::of(a), CpuView::of(b)) else {
        return Ok(None);
    };
    let (sa, sb) = (va.slice::<T>()?, vb.slice::<T>()?);
    let out: Vec<T> = sa
        .par_iter()
        .zip(sb.par_iter())
        .with_min_len(PAR_CHUNK)
        .map(|(&x, &y)| op.apply(x, y))
        .collect();
    Ok(Some(Tensor::from_vec(out, a.shape(), &Device::Cpu)?))
}

/// An elementwise unary function for [`cpu_map`], generic over the float type.
pub(crate) trait Unary: Sync {
    fn apply<T: Real>(&self, a: T) -> T;
}

/// `out[i] = op(a[i])` in one multi-threaded pass on a contiguous CPU f32/f64 tensor;
/// `Ok(None)` otherwise.
pub(crate) fn cpu_map(a: &Tensor, op: &impl Unary) -> Result<Option<Tensor>> {
    match a.dtype() {
        DType::F32 => cpu_map_typed::<f32>(a, op),
        DType::F64 => cpu_map_typed::<f64>(a, op),
        _ => Ok(None),
    }
}

fn cpu_map_typed<T: Real>(a: &Tensor, op: &impl Unary) -> Result<Option<Tensor>> {
    let Some(va) = CpuView::of(a) else {
        return Ok(None);
    };
    let out: Vec<T> = va
        .slice::<T>()?
        .par_iter()
        .with_min_len(PAR_CHUNK)
        .map(|&x| op.apply(x))
        .collect();
    Ok(Some(Tensor::from_vec(out, a.shape(), &Device::Cpu)?))
}

/// A function of whole rows for [`cpu_rows`]: `out` and every input row have `cols` elements.
pub(crate) trait RowOp: Sync {
    fn apply<T: Real>(&self, inputs: &[&[T]], out: &mut [T]);
}

/// Applies `op` row by row (rows of the last dim, `cols` wide) over contiguous CPU f32/f64
/// tensors of one shape and dtype, rows in parallel; `Ok(None)` if not applicable.
pub(crate) fn cpu_rows(inputs: &[&Tensor], cols: usize, op: &impl RowOp) -> Result<Option<Tensor>> {
    let Some(first) = inputs.first() else {
        return Ok(None);
    };
    if cols == 0
        || inputs
            .iter()
            .any(|t| t.shape() != first.shape() || t.dtype() != first.dtype())
    {
        return Ok(None);
    }
    match first.dtype() {
        DType::F32 => cpu_rows_typed::<f32>(inputs, cols, op),
        DType::F64 => cpu_rows_typed::<f64>(inputs, cols, op),
        _ => Ok(None),
    }
}

fn cpu_rows_typed<T: Real>(
    inputs: &[&Tensor],
    cols: usize,
    op: &impl RowOp,
) -> Result<Option<Tensor>> {
    let mut views = Vec::with_capacity(inputs.len());
    for t in inputs {
        match CpuView::of(t) {
            Some(v) => views.push(v),
            None => return Ok(None),
        }
    }
    let slices: Vec<&[T]> = views
        .iter()
        .map(|v| v.slice::<T>())
        .collect::<Result<_>>()?;
    let n = slices[0].len();
    let mut out = vec![T::c(0.0); n];
    let min_rows = (PAR_CHUNK / cols).max(1);
    out.par_chunks_mut(cols)
        .enumerate()
        .with_min_len(min_rows)
        .for_each_init(
            || Vec::with_capacity(slices.len()),
            |rows: &mut Vec<&[T]>, (r, o)| {
                rows.clear();
                rows.extend(slices.iter().map(|s| &s[r * cols..(r + 1) * cols]));
                op.apply(rows, o);
            },
        );
    Ok(Some(Tensor::from_vec(
        out,
        inputs[0].shape(),
        &Device::Cpu,
    )?))
}
