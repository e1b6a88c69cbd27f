//! 2-D pooling over `[N, C, H, W]`: max pool (keeps only the argmax position inside each
//! window, 2-4 bits per output), average pool and global average pool (keep only a shape).
//!
//! Max and average pooling run their own CPU kernels over contiguous f32/f64 planes, one
//! `(n, c)` plane per rayon task: candle's max pool gives no argmax, and a kernel that walks
//! the windows once is also cheaper than candle's pad + pool for the padded average pool.
//! Other float dtypes are computed in f32; tensors on another device make a round trip
//! through the CPU (a CUDA kernel would replace that).

use crate::tape::{SaveAs, Tape, Value};
use anyhow::{bail, Result};
use candle_core::{DType, Device, Storage, Tensor};
use rayon::prelude::*;

/// Geometry of a square pooling window over one `[H, W]` plane.
#[derive(Clone, Copy, Debug)]
struct Pool2d {
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
    k: usize,
    s: usize,
    p: usize,
}

impl Pool2d {
    fn new(op: &str, dims: &[usize], k: usize, s: usize, p: usize) -> Result<Self> {
        if dims.len() != 4 {
            bail!("{op}: input must be [N, C, H, W], got shape {dims:?}");
        }
        if k == 0 || s == 0 {
            bail!("{op}: kernel ({k}) and stride ({s}) must be at least 1 (input {dims:?})");
        }
        if 2 * p > k {
            bail!("{op}: padding {p} must be at most half the kernel {k} (input {dims:?})");
        }
        let (h, w) = (dims[2], dims[3]);
        if h + 2 * p < k || w + 2 * p < k {
            bail!("{op}: kernel {k} (padding {p}) is larger than the input plane {h}x{w} (input {dims:?})");
        }
        Ok(Self {
            h,
            w,
            oh: (h + 2 * p - k) / s + 1,
            ow: (w + 2 * p - k) / s + 1,
            k,
            s,
            p,
        })
    }

    /// The window rows (or columns) of output row `o` that fall inside `0..len`: `(first
    /// input index, first kernel offset, count)`.
    #[inline]
    fn span(&self, o: usize, len: usize) -> (usize, usize, usize) {
        let start = (o * self.s) as isize - self.p as isize;
        let lo = start.max(0) as usize;
        let hi = ((start + self.k as isize) as usize).min(len);
        (lo, (lo as isize - start) as usize, hi.saturating_sub(lo))
    }
}

/// The float element types the CPU kernels handle (f32, f64).
trait PoolElem: candle_core::WithDType + Send + Sync {
    const NEG_INF: Self;
}

impl PoolElem for f32 {
    const NEG_INF: Self = f32::NEG_INFINITY;
}

impl PoolElem for f64 {
    const NEG_INF: Self = f64::NEG_INFINITY;
}

/// Runs `f` on the contiguous CPU data of `t` (which must be contiguous, on the CPU, of
/// element type `T`).
fn with_slice<T: candle_core::WithDType, R>(
    t: &Tensor,
    f: impl FnOnce(&[T]) -> Result<R>,
) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        bail!("pooling kernel: expected a CPU tensor");
    };
    let Some((a, b)) = layout.contiguous_offsets() else {
        bail!("pooling kernel: expected a contiguous tensor");
    };
    f(&cpu.as_slice::<T>()?[a..b])
}

/// The tensor as the kernels want it: contiguous, on the CPU, in f32 or f64. Returns the
/// original device and dtype to convert results back.
fn to_kernel_input(op: &str, x: &Tensor) -> Result<(Tensor, Device, DType)> {
    let (device, dtype) = (x.device().clone(), x.dtype());
    let mut t = x.to_device(&Device::Cpu)?;
    if !matches!(dtype, DType::F32 | DType::F64) {
        if !dtype.is_float() {
            bail!(
                "{op}: needs a float tensor, got {dtype:?} of shape {:?}",
                x.dims()
            );
        }
        t = t.to_dtype(DType::F32)?;
    }
    Ok((t.contiguous()?, device, dtype))
}

fn from_kernel_output(t: Tensor, device: &Device, dtype: DType) -> Result<Tensor> {
    Ok(t.to_dtype(dtype)?.to_device(device)?)
}

/// Max pool forward over planes of `x` (`planes * h * w` elements): the maxima and their
/// position `ky * k + kx` inside the window. Ties: the first maximum in row-major window
/// order wins (strict `>`); a NaN wins over any number (like PyTorch), the first NaN first.
fn max_pool_fwd<T: PoolElem>(x: &[T], planes: usize, g: Pool2d) -> (Vec<T>, Vec<u8>) {
    let (hw, ohw) = (g.h * g.w, g.oh * g.ow);
    let mut out = vec![T::zero(); planes * ohw];
    let mut idx = vec![0u8; planes * ohw];
    out.par_chunks_mut(ohw)
        .zip(idx.par_chunks_mut(ohw))
        .zip(x.par_chunks(hw))
        .for_each(|((out, idx), x)| {
            for oy in 0..g.oh {
                let (iy0, ky0, ny) = g.span(oy, g.h);
                for ox in 0..g.ow {
                    let (ix0, kx0, nx) = g.span(ox, g.w);
                    let mut best = T::NEG_INF;
                    let mut best_i = ky0 * g.k + kx0;
                    let mut best_nan = false;
                    for dy in 0..ny {
                        let row = &x[(iy0 + dy) * g.w + ix0..][..nx];
                        for (dx, &v) in row.iter().enumerate() {
                            #[allow(clippy::eq_op)]
                            let is_nan = v != v;
                            if !best_nan && (v > best || is_nan) {
                                best = v;
                                best_i = (ky0 + dy) * g.k + kx0 + dx;
                                best_nan = is_nan;
                            }
                        }
                    }
                    out[oy * g.ow + ox] = best;
                    idx[oy * g.ow + ox] = best_i as u8;
                }
            }
        });
    (out, idx)
}

/// Max pool backward: each output gradient goes to its argmax; overlapping windows add up.
fn max_pool_bwd<T: PoolElem>(gy: &[T], idx: &[u8], planes: usize, g: Pool2d) -> Vec<T> {
    let (hw, ohw) = (g.h * g.w, g.oh * g.ow);
    let mut gx = vec![T::zero(); planes * hw];
    gx.par_chunks_mut(hw)
        .zip(gy.par_chunks(ohw))
        .zip(idx.par_chunks(ohw))
        .for_each(|((gx, gy), idx)| {
            for oy in 0..g.oh {
                for ox in 0..g.ow {
                    let o = oy * g.ow + ox;
                    let i = idx[o] as usize;
                    // In range by construction: the argmax was a real (unpadded) element.
                    let iy = oy * g.s + i / g.k - g.p;
                    let ix = ox * g.s + i % g.k - g.p;
                    let slot = &mut gx[iy * g.w + ix];
                    *slot += gy[o];
                }
            }
        });
    gx
}

/// Average pool forward with zero padding counted in the divisor (`k * k` always).
fn avg_pool_fwd<T: PoolElem>(x: &[T], planes: usize, g: Pool2d) -> Vec<T> {
    let (hw, ohw) = (g.h * g.w, g.oh * g.ow);
    let inv = T::from_f64(1.0 / (g.k * g.k) as f64);
    let mut out = vec![T::zero(); planes * ohw];
    out.par_chunks_mut(ohw)
        .zip(x.par_chunks(hw))
        .for_each(|(out, x)| {
            for oy in 0..g.oh {
                let (iy0, _, ny) = g.span(oy, g.h);
                for ox in 0..g.ow {
                    let (ix0, _, nx) = g.span(ox, g.w);
                    let mut acc = T::zero();
                    for dy in 0..ny {
                        for &v in &x[(iy0 + dy) * g.w + ix0..][..nx] {
                            acc += v;
                        }
                    }
                    out[oy * g.ow + ox] = acc * inv;
                }
            }
        });
    out
}

/// Average pool backward: each output gradient, divided by `k * k`, goes to every real
/// element of its window.
fn avg_pool_bwd<T: PoolElem>(gy: &[T], planes: usize, g: Pool2d) -> Vec<T> {
    let (hw, ohw) = (g.h * g.w, g.oh * g.ow);
    let inv = T::from_f64(1.0 / (g.k * g.k) as f64);
    let mut gx = vec![T::zero(); planes * hw];
    gx.par_chunks_mut(hw)
        .zip(gy.par_chunks(ohw))
        .for_each(|(gx, gy)| {
            for oy in 0..g.oh {
                let (iy0, _, ny) = g.span(oy, g.h);
                for ox in 0..g.ow {
                    let (ix0, _, nx) = g.span(ox, g.w);
                    let v = gy[oy * g.ow + ox] * inv;
                    for dy in 0..ny {
                        for slot in &mut gx[(iy0 + dy) * g.w + ix0..][..nx] {
                            *slot += v;
                        }
                    }
                }
            }
        });
    gx
}

/// Bits needed for a window position `0..k*k` (at least 1).
fn index_bits(k: usize) -> u8 {
    let n = k * k;
    let mut bits = 0u8;
    while (1usize << bits) < n {
        bits += 1;
    }
    bits.max(1)
}

impl Tape {
    /// 2-D max pooling of `x: [N, C, H, W]` with a square `kernel`, `stride` and `padding`
    /// (padding is -inf, as in PyTorch; at most `kernel / 2`). Output `[N, C, OH, OW]` with
    /// `OH = (H + 2 padding - kernel) / stride + 1`. Ties inside a window: the first maximum
    /// in row-major window order gets the gradient.
    ///
    /// Context: only the argmax position inside each window, `ky * kernel + kx`, as a `U8`
    /// tensor of the output's shape saved as [`SaveAs::Index`] with
    /// `ceil(log2(kernel²))` bits (4 bits for 3x3, 2 for 2x2): backward only has to know
    /// where each output came from, so the input itself is never kept (8x-16x less than
    /// fp32, and exact).
    pub fn max_pool2d(
        &mut self,
        x: &Value,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Value> {
        let op = "max_pool2d";
        let dims = x.dims().to_vec();
        let g = Pool2d::new(op, &dims, kernel, stride, padding)?;
        if kernel * kernel > 256 {
            bail!("{op}: kernel {kernel} has more than 256 window positions (input {dims:?})");
        }
        let planes = dims[0] * dims[1];
        let out_dims = [dims[0], dims[1], g.oh, g.ow];
        let (xt, device, dtype) = to_kernel_input(op, x.tensor())?;
        let (y, idx) = match xt.dtype() {
            DType::F32 => with_slice::<f32, _>(&xt, |s| {
                let (y, i) = max_pool_fwd(s, planes, g);
                Ok((Tensor::from_vec(y, &out_dims, &Device::Cpu)?, i))
            })?,
            _ => with_slice::<f64, _>(&xt, |s| {
                let (y, i) = max_pool_fwd(s, planes, g);
                Ok((Tensor::from_vec(y, &out_dims, &Device::Cpu)?, i))
            })?,
        };
        drop(xt);
        let y = from_kernel_output(y, &device, dtype)?;
        if !self.needs_grad(&[x]) {
            return Ok(self.constant(y));
        }
        let idx = Tensor::from_vec(idx, &out_dims, &Device::Cpu)?.to_device(&device)?;
        let saved = self.save_derived(
            op,
            &idx,
            SaveAs::Index {
                bits: index_bits(kernel),
            },
        )?;
        drop(idx);
        self.record(op, &[x], y, move |gy, _| {
            let (gy, device, dtype) = to_kernel_input(op, &gy)?;
            let idx = saved.load()?.to_device(&Device::Cpu)?.contiguous()?;
            let gx = with_slice::<u8, _>(&idx, |idx| match gy.dtype() {
                DType::F32 => with_slice::<f32, _>(&gy, |gy| {
                    Ok(Tensor::from_vec(
                        max_pool_bwd(gy, idx, planes, g),
                        dims.as_slice(),
                        &Device::Cpu,
                    )?)
                }),
                _ => with_slice::<f64, _>(&gy, |gy| {
                    Ok(Tensor::from_vec(
                        max_pool_bwd(gy, idx, planes, g),
                        dims.as_slice(),
                        &Device::Cpu,
                    )?)
                }),
            })?;
            Ok(vec![Some(from_kernel_output(gx, &device, dtype)?)])
        })
    }

    /// 2-D average pooling of `x: [N, C, H, W]` with a square `kernel`, `stride` and zero
    /// `padding` (at most `kernel / 2`); the padding counts in the divisor, which is always
    /// `kernel²` (PyTorch's `count_include_pad=True`).
    ///
    /// Context: the input shape only (backward spreads each output gradient evenly over its
    /// window, which depends on nothing else).
    pub fn avg_pool2d(
        &mut self,
        x: &Value,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Value> {
        let op = "avg_pool2d";
        let dims = x.dims().to_vec();
        let g = Pool2d::new(op, &dims, kernel, stride, padding)?;
        let planes = dims[0] * dims[1];
        let out_dims = [dims[0], dims[1], g.oh, g.ow];
        let (xt, device, dtype) = to_kernel_input(op, x.tensor())?;
        let y = match xt.dtype() {
            DType::F32 => with_slice::<f32, _>(&xt, |s| {
                Ok(Tensor::from_vec(
                    avg_pool_fwd(s, planes, g),
                    &out_dims,
                    &Device::Cpu,
                )?)
            })?,
            _ => with_slice::<f64, _>(&xt, |s| {
                Ok(Tensor::from_vec(
                    avg_pool_fwd(s, planes, g),
                    &out_dims,
                    &Device::Cpu,
                )?)
            })?,
        };
        drop(xt);
        let y = from_kernel_output(y, &device, dtype)?;
        if !self.needs_grad(&[x]) {
            return Ok(self.constant(y));
        }
        self.note_context(op, "shape", &dims);
        self.record(op, &[x], y, move |gy, _| {
            let (gy, device, dtype) = to_kernel_input(op, &gy)?;
            let gx = match gy.dtype() {
                DType::F32 => with_slice::<f32, _>(&gy, |gy| {
                    Ok(Tensor::from_vec(
                        avg_pool_bwd(gy, planes, g),
                        dims.as_slice(),
                        &Device::Cpu,
                    )?)
                })?,
                _ => with_slice::<f64, _>(&gy, |gy| {
                    Ok(Tensor::from_vec(
                        avg_pool_bwd(gy, planes, g),
                        dims.as_slice(),
                        &Device::Cpu,
                    )?)
                })?,
            };
            Ok(vec![Some(from_kernel_output(gx, &device, dtype)?)])
        })
    }

    /// Global average pooling: `[N, C, H, W] -> [N, C]`, the mean of each plane.
    ///
    /// Context: the input shape only (the gradient of a mean is the output gradient spread
    /// evenly, `g / (H W)`), logged with `note_context`.
    pub fn global_avg_pool(&mut self, x: &Value) -> Result<Value> {
        let op = "global_avg_pool";
        let dims = x.dims().to_vec();
        if dims.len() != 4 {
            bail!("{op}: input must be [N, C, H, W], got shape {dims:?}");
        }
        let (n, c, h, w) = (dims[0], dims[1], dims[2], dims[3]);
        if h * w == 0 {
            bail!("{op}: empty plane in input {dims:?}");
        }
        let inv = 1.0 / (h * w) as f64;
        let y = x
            .tensor()
            .reshape((n, c, h * w))?
            .sum(2)?
            .affine(inv, 0.0)?;
        if !self.needs_grad(&[x]) {
            return Ok(self.constant(y));
        }
        self.note_context(op, "shape", &dims);
        self.record(op, &[x], y, move |gy, _| {
            let gx = gy
                .affine(inv, 0.0)?
                .reshape((n, c, 1, 1))?
                .broadcast_as((n, c, h, w))?
                .contiguous()?;
            Ok(vec![Some(gx)])
        })
    }
}
