//! Pointwise activations: ReLU, LeakyReLU, GELU (tanh and erf forms), SiLU, sigmoid, tanh.
//!
//! Forward runs candle's unary ops (GELU and SiLU: the same formulas in a multi-threaded CPU
//! loop, [`cpu_map`]). Backward runs one fused, multi-threaded pass on the CPU (`g * f'(x)` in
//! a single loop) where the tensors are contiguous f32/f64, and the equivalent chain of
//! candle ops elsewhere (CUDA, other dtypes, strided layouts). On the CPU the backward writes
//! into the output gradient itself when the tape hands it over as owned, reading the saved
//! context in row chunks ([`chunked_zip`]); ReLU and LeakyReLU read their sign mask straight
//! from the saved input (L0) or a bit-packed mask in row chunks of 0/1 bytes
//! ([`chunked_mask`]), never as a layer-sized float mask. [`Tape::linear_gelu`] computes an
//! MLP's GELU into the linear layer's output buffer.
//!
//! This file also holds the small CPU-kernel toolkit the other ops of this family (dropout,
//! softmax, cross-entropy) share: [`Real`], [`CpuView`], [`cpu_map`], [`cpu_zip`], [`cpu_rows`],
//! and the in-place helpers ([`zip_in_place`], [`map_in_place`], [`add_bias_rows`]).

use crate::compress::policy::is_bit_mask;
use crate::tape::{Grad, Packed, Recompute, SaveAs, Saved, Tape, Value};
use anyhow::{bail, Result};
use candle_core::{
    CpuStorage, DType, Device, InplaceOp1, InplaceOp2, Layout, Storage, StorageRef, Tensor,
    WithDType,
};
use rayon::prelude::*;
use std::ops::{Add, AddAssign, Div, Mul, MulAssign, Neg, Sub, SubAssign};
use std::rc::Rc;

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
        let offer = self.masked_offer("relu", x, &m, 1.0, 0.0);
        let y = self.record_grad("relu", &[x], y, move |g, _| {
            Ok(vec![Some(mask_backward(&m, g, 1.0, 0.0)?)])
        })?;
        self.offer_masked(&y, offer);
        Ok(y)
    }

    /// [`Tape::relu`] of a value handed over by the caller, which keeps no other handle or
    /// view of it: where no context holds `x` as it is (L1–L4, see [`Tape::may_overwrite`])
    /// the result is written into `x`'s own buffer, so the step holds one tensor, not two.
    pub fn relu_owned(&mut self, x: Value) -> Result<Value> {
        if !self.needs_grad(&[&x]) {
            return self.relu(&x);
        }
        let m = self.save("relu", &x, SaveAs::SignMask)?;
        let y = if self.may_overwrite(&x, Some(&m)) && map_in_place(x.tensor(), &Relu)? {
            x.tensor().clone()
        } else {
            x.tensor().relu()?
        };
        let offer = self.masked_offer("relu", &x, &m, 1.0, 0.0);
        let y = self.record_grad("relu", &[&x], y, move |g, _| {
            Ok(vec![Some(mask_backward(&m, g, 1.0, 0.0)?)])
        })?;
        self.offer_masked(&y, offer);
        Ok(y)
    }

    /// Where `x` is offered as rebuildable (a batch norm's output), the rebuild of this
    /// ReLU's output (or LeakyReLU's): `x`'s rebuild times the op's own exact mask `m`.
    fn masked_offer(
        &self,
        op: &'static str,
        x: &Value,
        m: &Saved,
        mul: f64,
        add: f64,
    ) -> Option<MaskedOutput> {
        // On the host only: a GPU's saved mask unpacks whole, so every row chunk of the
        // rebuild would expand all of it.
        if !x.tensor().device().is_cpu() {
            return None;
        }
        Some(MaskedOutput {
            inner: self.recompute_of(x)?,
            mask: m.clone(),
            mul,
            add,
            op,
        })
    }

    fn offer_masked(&mut self, y: &Value, offer: Option<MaskedOutput>) {
        if let Some(r) = offer {
            self.offer_recompute(y, Rc::new(r));
        }
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
        let offer = self.masked_offer("leaky_relu", x, &m, 1.0 - slope, slope);
        let y = self.record_grad("leaky_relu", &[x], y, move |g, _| {
            Ok(vec![Some(mask_backward(&m, g, 1.0 - slope, slope)?)])
        })?;
        self.offer_masked(&y, offer);
        Ok(y)
    }

    /// GELU, in the `approx` form. Context: `x` (Activation). Backward is the analytic
    /// derivative of the chosen form, `g * gelu'(x)`. `gelu'` is nonlinear in `x`, so when the
    /// policy quantizes `x` with stochastic rounding the gradient is only approximately
    /// unbiased (the bias is second order in the rounding step: `½ gelu'''(x) Var[x̂]`).
    pub fn gelu(&mut self, x: &Value, approx: GeluApprox) -> Result<Value> {
        let y = gelu_forward(x.tensor(), approx)?;
        if !self.needs_grad(&[x]) {
            return Ok(self.constant(y));
        }
        let cx = self.save("gelu", x, SaveAs::Activation)?;
        self.record_grad("gelu", &[x], y, move |g, _| {
            Ok(vec![Some(gelu_backward(&cx, g, approx)?)])
        })
    }

    /// `gelu(linear(x, w, b))`, for an MLP's first layer: the same two nodes and contexts as
    /// [`Tape::linear`] then [`Tape::gelu`], but the pre-activation exists only inside this
    /// call, so where the policy compressed its context (nothing else holds it) GELU is
    /// computed into its buffer in place — one hidden-sized tensor at the MLP's widest point
    /// instead of two. With the context kept as it is (L0) the output is a new tensor.
    pub fn linear_gelu(
        &mut self,
        x: &Value,
        w: &Value,
        b: Option<&Value>,
        approx: GeluApprox,
    ) -> Result<Value> {
        let h = self.linear(x, w, b)?;
        // `h` is a fresh tensor that only this binding holds (`linear` keeps no handle on
        // its output): once its context is saved it is ours to overwrite.
        let cx = if self.needs_grad(&[&h]) {
            Some(self.save("gelu", &h, SaveAs::Activation)?)
        } else {
            None
        };
        let free = cx.as_ref().is_none_or(|c| !c.stored_as_is());
        let in_place = free
            && match approx {
                GeluApprox::Tanh => map_in_place(h.tensor(), &GeluTanh)?,
                GeluApprox::Erf => map_in_place(h.tensor(), &GeluErf)?,
            };
        let y = if in_place {
            h.tensor().clone()
        } else {
            gelu_forward(h.tensor(), approx)?
        };
        let Some(cx) = cx else {
            return Ok(self.constant(y));
        };
        let out = self.output(y);
        self.record_output_grad("gelu", &[&h], out, move |g, _| {
            Ok(vec![Some(gelu_backward(&cx, g, approx)?)])
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
        self.record_grad("silu", &[x], y, move |g, _| {
            let gx = pointwise_backward(&cx, g, &SiluGrad, |x, g| {
                let s = candle_nn::ops::sigmoid(x)?;
                let xs = (x * &s)?;
                let d = (&s * ((x - &xs)? + 1.0)?)?;
                Ok(g.mul(&d)?)
            })?;
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
        self.record_output_grad("sigmoid", &[x], out, move |g, _| {
            let gx = pointwise_backward(&cy, g, &SigmoidGrad, |y, g| {
                Ok(g.mul(&y.affine(-1.0, 1.0)?.mul(y)?)?)
            })?;
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
        self.record_output_grad("tanh", &[x], out, move |g, _| {
            let gx = pointwise_backward(&cy, g, &TanhGrad, |y, g| {
                Ok(g.mul(&y.sqr()?.affine(-1.0, 1.0)?)?)
            })?;
            Ok(vec![Some(gx)])
        })
    }
}

/// GELU of `t` into a new tensor (the fused CPU loop, or candle's op elsewhere).
fn gelu_forward(t: &Tensor, approx: GeluApprox) -> Result<Tensor> {
    Ok(match approx {
        GeluApprox::Tanh => match cpu_map(t, &GeluTanh)? {
            Some(y) => y,
            None => t.gelu()?,
        },
        GeluApprox::Erf => match cpu_map(t, &GeluErf)? {
            Some(y) => y,
            None => t.gelu_erf()?,
        },
    })
}

/// `gelu(h)` of a tensor the caller owns: written over `h` on the CPU, a new tensor elsewhere.
pub(crate) fn gelu_owned(h: Tensor, approx: GeluApprox) -> Result<Tensor> {
    let in_place = match approx {
        GeluApprox::Tanh => map_in_place(&h, &GeluTanh)?,
        GeluApprox::Erf => map_in_place(&h, &GeluErf)?,
    };
    if in_place {
        Ok(h)
    } else {
        gelu_forward(&h, approx)
    }
}

/// `g * gelu'(h)` for a gradient `g` the caller owns: written over `g` on the CPU.
pub(crate) fn gelu_grad_owned(h: &Tensor, g: Tensor, approx: GeluApprox) -> Result<Tensor> {
    let in_place = match approx {
        GeluApprox::Tanh => zip_in_place(&g, h, &Swap(&GeluTanhGrad))?,
        GeluApprox::Erf => zip_in_place(&g, h, &Swap(&GeluErfGrad))?,
    };
    if in_place {
        return Ok(g);
    }
    Ok(match approx {
        GeluApprox::Tanh => g.mul(&gelu_tanh_derivative(h)?)?,
        GeluApprox::Erf => g.mul(&gelu_erf_derivative(h)?)?,
    })
}

/// `g * gelu'(x)` with `x` the saved input.
fn gelu_backward(cx: &Saved, g: Grad, approx: GeluApprox) -> Result<Grad> {
    match approx {
        GeluApprox::Tanh => pointwise_backward(cx, g, &GeluTanhGrad, |x, g| {
            Ok(g.mul(&gelu_tanh_derivative(x)?)?)
        }),
        GeluApprox::Erf => pointwise_backward(cx, g, &GeluErfGrad, |x, g| {
            Ok(g.mul(&gelu_erf_derivative(x)?)?)
        }),
    }
}

/// `g * (m * mul + add)`, `m` the sign mask saved by ReLU / LeakyReLU: on the CPU through
/// [`chunked_mask`] (in place into an owned `g`), elsewhere by unpacking the mask whole
/// ([`mask_grad`]).
fn mask_backward(m: &Saved, g: Grad, mul: f64, add: f64) -> Result<Grad> {
    match chunked_mask(m, &g, mul, add)? {
        Some(ZipOut::InPlace) => Ok(Grad::owned(g.into_tensor())),
        Some(ZipOut::New(t)) => Ok(Grad::owned(t)),
        None => Ok(Grad::owned(mask_grad(
            m.load_owned()?,
            g.tensor(),
            mul,
            add,
        )?)),
    }
}

/// `g * (m * mul + add)` for a sign mask `m` saved with [`SaveAs::SignMask`], on the CPU
/// without a float mask: a context kept as it is (L0) is the forward input itself, read
/// whole as `x > 0`; a bit-packed mask ([`is_bit_mask`]) is expanded a row chunk at a time
/// into 0/1 bytes ([`crate::ops::CONTEXT_CHUNK_BYTES`] of them at most). The result goes into
/// `g`'s own buffer when `g` is owned, else into one new buffer. Contiguous f32/f64 gradients
/// only; `Ok(None)`, with `g` untouched, where it does not apply (another device, another
/// mask format).
pub(crate) fn chunked_mask(m: &Saved, g: &Grad, mul: f64, add: f64) -> Result<Option<ZipOut>> {
    let gt = g.tensor();
    let applies = fused_cpu_kernels()
        && m.shape() == gt.shape()
        && gt.rank() > 0
        && gt.device().is_cpu()
        && gt.is_contiguous()
        && matches!(gt.dtype(), DType::F32 | DType::F64);
    if !applies {
        return Ok(None);
    }
    let scale = MaskScale { mul, add };
    match &m.0.packed {
        Packed::Full(x) => {
            let sign = SignScale(&scale);
            if x.dtype() != gt.dtype() || !x.device().is_cpu() || !x.is_contiguous() {
                return Ok(None);
            }
            if g.is_owned() {
                gt.inplace_op2(x, &ZipInPlace(&Swap(&sign)))?;
                return Ok(Some(ZipOut::InPlace));
            }
            Ok(cpu_zip(x, gt, &sign)?.map(ZipOut::New))
        }
        Packed::Compressed(c) if is_bit_mask(c.as_ref()) => {
            let rows = m.rows();
            let n = gt.elem_count();
            if rows == 0 || !n.is_multiple_of(rows) {
                return Ok(None);
            }
            let row_len = n / rows;
            let chunk = super::chunk_rows_for(rows, row_len);
            let load = |first: usize, count: usize| -> Result<Tensor> {
                c.unpack_rows(m.shape(), DType::U8, &Device::Cpu, first, count)
            };
            // An owned gradient takes the product in place; a shared one is copied once
            // into the new buffer that then takes it (the copy is the result, no more).
            let (dst, out) = if g.is_owned() {
                (gt.clone(), ZipOut::InPlace)
            } else {
                let t = gt.copy()?;
                (t.clone(), ZipOut::New(t))
            };
            let op = MaskInPlace(&scale);
            let mut first = 0;
            while first < rows {
                let count = chunk.min(rows - first);
                let bits = load(first, count)?;
                dst.narrow(0, first, count)?.inplace_op2(&bits, &op)?;
                first += count;
            }
            Ok(Some(out))
        }
        Packed::Compressed(_) | Packed::Recomputed(_) => Ok(None),
    }
}

/// A ReLU's (or LeakyReLU's) output rebuilt as `inner ⊙ (m · mul + add)`: `inner` rebuilds
/// the op's input (a batch norm's output from its saved input) and `m` is the op's own sign
/// mask, exact, so the result is linear in what `inner` reads — unbiased where that is. A
/// conv after `conv → batch norm → ReLU` then stores nothing of its input.
struct MaskedOutput {
    inner: Rc<dyn Recompute>,
    mask: Saved,
    mul: f64,
    add: f64,
    op: &'static str,
}

impl Recompute for MaskedOutput {
    fn rows(&self, first: usize, count: usize) -> Result<Tensor> {
        // A new tensor (the `Recompute` contract): the mask may go into it in place.
        let y = self.inner.rows(first, count)?;
        mask_rows(&self.mask, y, first, count, self.mul, self.add)
    }

    fn label(&self) -> String {
        format!("{}, {}", self.inner.label(), self.op)
    }
}

/// The rebuild of a ReLU's output whose input `inner` rebuilds, with the ReLU's saved sign
/// mask `mask` (see [`MaskedOutput`]): what a conv after conv → batch norm → ReLU saves.
pub(crate) fn relu_output(inner: Rc<dyn Recompute>, mask: Saved) -> Rc<dyn Recompute> {
    Rc::new(MaskedOutput {
        inner,
        mask,
        mul: 1.0,
        add: 0.0,
        op: "relu",
    })
}

/// `t ⊙ (m · mul + add)` for rows `first..first + count` of the saved sign mask `m`, `t` a
/// new tensor of those rows that the caller hands over: on the CPU the bit-packed mask is
/// expanded into 0/1 bytes and multiplied into `t` in place.
pub(crate) fn mask_rows(
    m: &Saved,
    t: Tensor,
    first: usize,
    count: usize,
    mul: f64,
    add: f64,
) -> Result<Tensor> {
    let fused = fused_cpu_kernels()
        && t.device().is_cpu()
        && t.is_contiguous()
        && matches!(t.dtype(), DType::F32 | DType::F64);
    if let Packed::Compressed(c) = &m.0.packed {
        if fused && is_bit_mask(c.as_ref()) {
            let bits = c.unpack_rows(m.shape(), DType::U8, &Device::Cpu, first, count)?;
            t.inplace_op2(&bits, &MaskInPlace(&MaskScale { mul, add }))?;
            return Ok(t);
        }
    }
    let mv = m.load_rows(first, count)?.to_dtype(t.dtype())?;
    let mv = if (mul, add) == (1.0, 0.0) {
        mv
    } else {
        mv.affine(mul, add)?
    };
    Ok(t.mul(&mv)?)
}

/// `max(t, 0)` written into `t`'s own buffer (contiguous CPU f32/f64); false, with `t`
/// untouched, where that does not apply.
pub(crate) fn relu_in_place(t: &Tensor) -> Result<bool> {
    map_in_place(t, &Relu)
}

/// `g * ((x > 0) * mul + add)` for the forward input `x` (as `apply(x, g)`), the same
/// arithmetic as [`MaskScale`] on a 0/1 mask.
struct SignScale<'a>(&'a MaskScale);

impl Pointwise for SignScale<'_> {
    #[inline(always)]
    fn apply<T: Real>(&self, x: T, g: T) -> T {
        let m = if x > T::c(0.0) { T::c(1.0) } else { T::c(0.0) };
        self.0.apply(m, g)
    }
}

/// `dst[i] = dst[i] * (m[i] * mul + add)` in place, `dst` an f32/f64 gradient chunk the
/// caller owns and `m` its 0/1 `U8` mask chunk (both contiguous, one length).
struct MaskInPlace<'a>(&'a MaskScale);

impl MaskInPlace<'_> {
    fn run<T: Real>(&self, dst: &mut [T], m: &[u8]) {
        dst.par_chunks_mut(PAR_CHUNK)
            .zip(m.par_chunks(PAR_CHUNK))
            .for_each(|(d, m)| {
                for (d, &b) in d.iter_mut().zip(m) {
                    let mv = if b != 0 { T::c(1.0) } else { T::c(0.0) };
                    *d = self.0.apply(mv, *d);
                }
            });
    }
}

impl InplaceOp2 for MaskInPlace<'_> {
    fn name(&self) -> &'static str {
        "mask_in_place"
    }
    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dl: &Layout,
        src: &CpuStorage,
        sl: &Layout,
    ) -> candle_core::Result<()> {
        let (dr, sr) = super::inplace_ranges("mask_in_place", dl, sl, true)?;
        match (dst, src) {
            (CpuStorage::F32(d), CpuStorage::U8(s)) => self.run(&mut d[dr], &s[sr]),
            (CpuStorage::F64(d), CpuStorage::U8(s)) => self.run(&mut d[dr], &s[sr]),
            _ => candle_core::bail!("mask_in_place: needs an f32/f64 gradient and a u8 mask"),
        }
        Ok(())
    }
}

/// `g * (mask * mul + add)` for a 0/1 `mask` the caller owns (from [`Saved::load_owned`]):
/// ReLU is `(1, 0)`, LeakyReLU `(1 - slope, slope)`. On the CPU the product is written into
/// the mask's own buffer in one pass, so backward holds the output gradient and one more
/// tensor, not three; elsewhere it runs as candle ops (the same arithmetic, bit for bit).
pub(crate) fn mask_grad(mask: Tensor, g: &Tensor, mul: f64, add: f64) -> Result<Tensor> {
    let fused = fused_cpu_kernels()
        && mask.device().is_cpu()
        && g.device().is_cpu()
        && mask.shape() == g.shape()
        && mask.dtype() == g.dtype()
        && matches!(g.dtype(), DType::F32 | DType::F64)
        && mask.is_contiguous()
        && g.is_contiguous();
    if fused {
        mask.inplace_op2(g, &ZipInPlace(&MaskScale { mul, add }))?;
        return Ok(mask);
    }
    let d = if (mul, add) == (1.0, 0.0) {
        mask
    } else {
        mask.affine(mul, add)?
    };
    Ok(g.mul(&d)?)
}

/// `g * (m * mul + add)` for a 0/1 mask `m`.
struct MaskScale {
    mul: f64,
    add: f64,
}

impl Pointwise for MaskScale {
    #[inline(always)]
    fn apply<T: Real>(&self, m: T, g: T) -> T {
        g * (m * T::c(self.mul) + T::c(self.add))
    }
}

/// `gx = op(ctx, g)` elementwise, `ctx` the saved tensor (the input, or for sigmoid/tanh
/// the output): the backward of a pointwise activation. On the CPU ([`chunked_zip`]) it is
/// written into `g` itself when `g` is owned, else into one new buffer, reading the context
/// in row chunks either way; elsewhere `fallback(ctx, g)` runs as candle ops.
fn pointwise_backward<P: Pointwise>(
    saved: &Saved,
    g: Grad,
    op: &P,
    fallback: impl FnOnce(&Tensor, &Tensor) -> Result<Tensor>,
) -> Result<Grad> {
    match chunked_zip(saved, &g, op)? {
        Some(ZipOut::InPlace) => return Ok(Grad::owned(g.into_tensor())),
        Some(ZipOut::New(t)) => return Ok(Grad::owned(t)),
        None => {}
    }
    let g = g.into_tensor();
    let ctx = saved.load()?;
    Ok(Grad::owned(match cpu_zip(&ctx, &g, op)? {
        Some(t) => t,
        None => fallback(&ctx, &g)?,
    }))
}

/// Where [`chunked_zip`] put its result.
pub(crate) enum ZipOut {
    /// Into the (owned) gradient's own buffer.
    InPlace,
    /// Into this new tensor.
    New(Tensor),
}

/// `op(b, a)`: the arguments of `P` swapped.
struct Swap<'a, P: Pointwise>(&'a P);

impl<P: Pointwise> Pointwise for Swap<'_, P> {
    #[inline(always)]
    fn apply<T: Real>(&self, a: T, b: T) -> T {
        self.0.apply(b, a)
    }
}

/// `out[i] = op(ctx[i], g[i])` on the CPU, with the saved context read in row chunks
/// ([`Saved::load_rows`]) where a chunk unpacks only its rows: written into `g`'s own buffer
/// when `g` is owned (backward then holds `g` and one chunk), else into one new buffer (`g`,
/// its input gradient and one chunk — not the whole unpacked context besides). Contiguous
/// f32/f64 only; `Ok(None)`, with `g` untouched, where it does not apply.
pub(crate) fn chunked_zip(saved: &Saved, g: &Grad, op: &impl Pointwise) -> Result<Option<ZipOut>> {
    let gt = g.tensor();
    let applies = fused_cpu_kernels()
        && saved.shape() == gt.shape()
        && gt.rank() > 0
        && gt.device().is_cpu()
        && gt.is_contiguous()
        && (g.is_owned() || saved.loads_rows_cheaply());
    if !applies {
        return Ok(None);
    }
    match gt.dtype() {
        DType::F32 => chunked_zip_typed::<f32>(saved, g, op),
        DType::F64 => chunked_zip_typed::<f64>(saved, g, op),
        _ => Ok(None),
    }
}

fn chunked_zip_typed<T: Real>(
    saved: &Saved,
    g: &Grad,
    op: &impl Pointwise,
) -> Result<Option<ZipOut>> {
    let gt = g.tensor();
    let rows = saved.rows();
    let n = gt.elem_count();
    if rows == 0 || !n.is_multiple_of(rows) {
        return Ok(None);
    }
    let row_len = n / rows;
    let chunk = if saved.loads_rows_cheaply() {
        super::chunk_rows_for(rows, row_len * std::mem::size_of::<T>())
    } else {
        rows
    };
    let load = |first: usize, count: usize| -> Result<Tensor> {
        if count == rows {
            saved.load()
        } else {
            saved.load_rows(first, count)
        }
    };
    if g.is_owned() {
        let mut first = 0;
        while first < rows {
            let count = chunk.min(rows - first);
            let ctx = load(first, count)?.contiguous()?;
            gt.narrow(0, first, count)?
                .inplace_op2(&ctx, &ZipInPlace(&Swap(op)))?;
            first += count;
        }
        return Ok(Some(ZipOut::InPlace));
    }
    let Some(vg) = CpuView::of(gt) else {
        return Ok(None);
    };
    let gs = vg.slice::<T>()?;
    let mut out = vec![T::c(0.0); n];
    let mut first = 0;
    while first < rows {
        let count = chunk.min(rows - first);
        let ctx = load(first, count)?;
        let Some(vc) = CpuView::of(&ctx) else {
            return Ok(None);
        };
        let (lo, hi) = (first * row_len, (first + count) * row_len);
        out[lo..hi]
            .par_iter_mut()
            .zip(vc.slice::<T>()?.par_iter().zip(gs[lo..hi].par_iter()))
            .with_min_len(PAR_CHUNK)
            .for_each(|(o, (&x, &gv))| *o = op.apply(x, gv));
        first += count;
    }
    Ok(Some(ZipOut::New(Tensor::from_vec(
        out,
        gt.shape(),
        &Device::Cpu,
    )?)))
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
struct Relu;
impl Unary for Relu {
    #[inline(always)]
    fn apply<T: Real>(&self, v: T) -> T {
        if v > T::c(0.0) {
            v
        } else {
            T::c(0.0)
        }
    }
}

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

/// `dst[i] = op(dst[i], src[i])` in place, for [`Tensor::inplace_op2`] on contiguous CPU
/// f32/f64 tensors of one length. Only for a `dst` the caller owns (a tensor it just created
/// or unpacked): nothing else may see its storage change.
pub(crate) struct ZipInPlace<'a, P: Pointwise>(pub(crate) &'a P);

impl<P: Pointwise> ZipInPlace<'_, P> {
    fn run<T: Real>(&self, dst: &mut [T], src: &[T]) {
        dst.par_chunks_mut(PAR_CHUNK)
            .zip(src.par_chunks(PAR_CHUNK))
            .for_each(|(d, s)| {
                for (d, &v) in d.iter_mut().zip(s) {
                    *d = self.0.apply(*d, v);
                }
            });
    }
}

impl<P: Pointwise> InplaceOp2 for ZipInPlace<'_, P> {
    fn name(&self) -> &'static str {
        "zip_in_place"
    }
    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dl: &Layout,
        src: &CpuStorage,
        sl: &Layout,
    ) -> candle_core::Result<()> {
        let (dr, sr) = super::inplace_ranges("zip_in_place", dl, sl, true)?;
        match (dst, src) {
            (CpuStorage::F32(d), CpuStorage::F32(s)) => self.run(&mut d[dr], &s[sr]),
            (CpuStorage::F64(d), CpuStorage::F64(s)) => self.run(&mut d[dr], &s[sr]),
            _ => candle_core::bail!("zip_in_place: needs two f32 or two f64 tensors"),
        }
        Ok(())
    }
}

/// `a[i] = op(a[i], b[i])` written into `a`'s buffer when both are contiguous CPU f32/f64
/// tensors of one shape (returns true); false, and nothing changed, otherwise. `a` must be
/// the caller's own tensor (see [`ZipInPlace`]).
pub(crate) fn zip_in_place(a: &Tensor, b: &Tensor, op: &impl Pointwise) -> Result<bool> {
    let ok = fused_cpu_kernels()
        && a.device().is_cpu()
        && b.device().is_cpu()
        && a.shape() == b.shape()
        && a.dtype() == b.dtype()
        && matches!(a.dtype(), DType::F32 | DType::F64)
        && a.is_contiguous()
        && b.is_contiguous();
    if ok {
        a.inplace_op2(b, &ZipInPlace(op))?;
    }
    Ok(ok)
}

/// `a + b`.
struct Sum;

impl Pointwise for Sum {
    #[inline(always)]
    fn apply<T: Real>(&self, a: T, b: T) -> T {
        a + b
    }
}

/// `a += b` into `a`'s own buffer (see [`zip_in_place`]; `a` must be the caller's alone).
/// Returns false, with nothing changed, where the CPU kernel does not apply.
pub(crate) fn add_in_place(a: &Tensor, b: &Tensor) -> Result<bool> {
    zip_in_place(a, b, &Sum)
}

/// `dst[r, j] += bias[j]` over the rows of a contiguous CPU f32/f64 matrix, in place.
pub(crate) struct AddRowsInPlace;

impl AddRowsInPlace {
    fn run<T: Real>(dst: &mut [T], bias: &[T]) {
        let cols = bias.len().max(1);
        let rows_per_task = (PAR_CHUNK / cols).max(1);
        dst.par_chunks_mut(rows_per_task * cols).for_each(|d| {
            for row in d.chunks_mut(cols) {
                for (d, &b) in row.iter_mut().zip(bias) {
                    *d += b;
                }
            }
        });
    }
}

impl InplaceOp2 for AddRowsInPlace {
    fn name(&self) -> &'static str {
        "add_rows_in_place"
    }
    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dl: &Layout,
        src: &CpuStorage,
        sl: &Layout,
    ) -> candle_core::Result<()> {
        let (dr, sr) = super::inplace_ranges("add_rows_in_place", dl, sl, false)?;
        let cols = sr.len();
        if cols == 0 || (dr.len()) % cols != 0 {
            candle_core::bail!(
                "add_rows_in_place: {} elements are not rows of {cols}",
                dr.len()
            );
        }
        match (dst, src) {
            (CpuStorage::F32(d), CpuStorage::F32(s)) => Self::run(&mut d[dr], &s[sr]),
            (CpuStorage::F64(d), CpuStorage::F64(s)) => Self::run(&mut d[dr], &s[sr]),
            _ => candle_core::bail!("add_rows_in_place: needs two f32 or two f64 tensors"),
        }
        Ok(())
    }
}

/// `y + bias` broadcast over the rows of `y: [.., D]` (`bias: [D]`). On the CPU the bias is
/// added into `y`'s own buffer, so `y` must be the caller's own fresh tensor (a matmul
/// result); elsewhere a new tensor.
pub(crate) fn add_bias_rows(y: Tensor, bias: &Tensor) -> Result<Tensor> {
    let fused = fused_cpu_kernels()
        && y.device().is_cpu()
        && bias.device().is_cpu()
        && y.dtype() == bias.dtype()
        && matches!(y.dtype(), DType::F32 | DType::F64)
        && bias.rank() == 1
        && y.dims().last() == Some(&bias.elem_count())
        && y.is_contiguous()
        && bias.is_contiguous();
    if fused {
        y.inplace_op2(bias, &AddRowsInPlace)?;
        return Ok(y);
    }
    Ok(y.broadcast_add(bias)?)
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

/// `t[i] = op(t[i])` in place, for [`Tensor::inplace_op1`] on contiguous CPU f32/f64 storage.
struct MapInPlace<'a, U: Unary>(&'a U);

impl<U: Unary> MapInPlace<'_, U> {
    fn run<T: Real>(&self, d: &mut [T]) {
        d.par_chunks_mut(PAR_CHUNK).for_each(|d| {
            for v in d.iter_mut() {
                *v = self.0.apply(*v);
            }
        });
    }
}

impl<U: Unary> InplaceOp1 for MapInPlace<'_, U> {
    fn name(&self) -> &'static str {
        "map_in_place"
    }
    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> candle_core::Result<()> {
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("map_in_place: the tensor must be contiguous");
        };
        match s {
            CpuStorage::F32(v) => self.run(&mut v[a..b]),
            CpuStorage::F64(v) => self.run(&mut v[a..b]),
            _ => candle_core::bail!("map_in_place: needs f32 or f64"),
        }
        Ok(())
    }
}

/// `t[i] = op(t[i])` written into `t`'s own buffer when it is a contiguous CPU f32/f64
/// tensor (returns true); false, with nothing changed, otherwise. `t` must be the caller's
/// alone: nothing else may see its storage change.
pub(crate) fn map_in_place(t: &Tensor, op: &impl Unary) -> Result<bool> {
    let ok = fused_cpu_kernels()
        && t.device().is_cpu()
        && matches!(t.dtype(), DType::F32 | DType::F64)
        && t.is_contiguous();
    if ok {
        t.inplace_op1(&MapInPlace(op))?;
    }
    Ok(ok)
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
