//! 2-D convolution with stride, padding, dilation and groups.
//!
//! Forward is candle's `conv2d`. Backward: the input gradient is a transposed convolution of
//! the output gradient with the weight (one per group: candle's `conv_transpose2d` has no
//! groups), the weight gradient a convolution of the input with the output gradient as kernel
//! — all groups in one grouped `conv2d` by moving the batch into the channel dim. Where the
//! input and output have one per-sample size and the output gradient is owned, the input
//! gradient is written into the output gradient's rows chunk by chunk (after the weight
//! gradient, which reads all of it).

use crate::tape::{Grad, SaveAs, Tape, Value};
use anyhow::{bail, Result};
use candle_core::Tensor;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Convolution hyper-parameters (square: the same in both spatial dims).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv2dParams {
    pub stride: usize,
    pub padding: usize,
    pub dilation: usize,
    pub groups: usize,
}

impl Default for Conv2dParams {
    fn default() -> Self {
        Self {
            stride: 1,
            padding: 0,
            dilation: 1,
            groups: 1,
        }
    }
}

/// Checks shapes and returns `(out_h, out_w)`.
pub(crate) fn check_conv2d(
    x: &[usize],
    w: &[usize],
    b: Option<&[usize]>,
    p: Conv2dParams,
) -> Result<(usize, usize)> {
    let op = "conv2d";
    if x.len() != 4 || w.len() != 4 {
        bail!("{op}: input must be [N, Cin, H, W] and weight [Cout, Cin/groups, kh, kw], got {x:?} and {w:?}");
    }
    if p.stride == 0 || p.dilation == 0 || p.groups == 0 {
        bail!("{op}: stride, dilation and groups must be at least 1, got {p:?} (input {x:?}, weight {w:?})");
    }
    let (cin, h, wd) = (x[1], x[2], x[3]);
    let (cout, cin_g, kh, kw) = (w[0], w[1], w[2], w[3]);
    if cin % p.groups != 0 || cout % p.groups != 0 || cin_g * p.groups != cin {
        bail!(
            "{op}: input {x:?} and weight {w:?} do not fit groups = {}: need Cin = {} * groups and Cout divisible by groups",
            p.groups,
            cin_g
        );
    }
    if let Some(b) = b {
        if b != [cout] {
            bail!("{op}: bias must be [{cout}], got {b:?} (weight {w:?})");
        }
    }
    let (eh, ew) = (
        p.dilation * (kh.max(1) - 1) + 1,
        p.dilation * (kw.max(1) - 1) + 1,
    );
    if kh == 0 || kw == 0 || h + 2 * p.padding < eh || wd + 2 * p.padding < ew {
        bail!(
            "{op}: kernel {kh}x{kw} (dilation {}) does not fit the padded input {}x{} (input {x:?}, weight {w:?})",
            p.dilation,
            h + 2 * p.padding,
            wd + 2 * p.padding
        );
    }
    Ok((
        (h + 2 * p.padding - eh) / p.stride + 1,
        (wd + 2 * p.padding - ew) / p.stride + 1,
    ))
}

/// Gradient of the input, `[N, Cin, h, w]`: the transposed convolution of `g` with `w`.
pub(crate) fn conv2d_grad_input(
    g: &Tensor,
    w: &Tensor,
    h: usize,
    wd: usize,
    p: Conv2dParams,
) -> Result<Tensor> {
    let (_, cout, oh, ow) = g.dims4()?;
    let (_, cin_g, kh, kw) = w.dims4()?;
    let reach = p.dilation * (kh - 1);
    if p.stride == 1 && kh == kw && reach >= p.padding {
        // Stride 1: the transposed convolution is a plain convolution of `g` with the
        // flipped, channel-transposed weight and padding `d (k - 1) - pad` — candle's
        // im2col + gemm conv2d, about twice as fast on the CPU as its direct
        // conv_transpose2d kernel, and it takes groups in one call.
        let cout_g = cout / p.groups;
        let flip = Tensor::from_vec((0..kh as u32).rev().collect::<Vec<_>>(), kh, w.device())?;
        let wt = w
            .reshape((p.groups, cout_g, cin_g, kh, kw))?
            .transpose(1, 2)?
            .reshape((p.groups * cin_g, cout_g, kh, kw))?
            .index_select(&flip, 2)?
            .index_select(&flip, 3)?;
        return Ok(g.conv2d(&wt, reach - p.padding, 1, p.dilation, p.groups)?);
    }
    // conv_transpose2d's output is (o - 1) s + d (k - 1) + 1 - 2 pad + output_padding; the
    // stride may drop up to s - 1 trailing rows/columns of the input, which output_padding
    // gives back. It is one number for both dims, so take the larger and crop the other.
    let full = |o: usize, k: usize| (o - 1) * p.stride + p.dilation * (k - 1) + 1 - 2 * p.padding;
    let (op_h, op_w) = (h - full(oh, kh), wd - full(ow, kw));
    let out_pad = op_h.max(op_w);
    let run = |g: &Tensor, w: &Tensor| -> Result<Tensor> {
        let gx = g.conv_transpose2d(w, p.padding, out_pad, p.stride, p.dilation)?;
        let gx = if op_h != out_pad {
            gx.narrow(2, 0, h)?
        } else {
            gx
        };
        Ok(if op_w != out_pad {
            gx.narrow(3, 0, wd)?
        } else {
            gx
        })
    };
    if p.groups == 1 {
        return run(g, w);
    }
    let cout_g = cout / p.groups;
    let parts = (0..p.groups)
        .map(|i| {
            run(
                &g.narrow(1, i * cout_g, cout_g)?,
                &w.narrow(0, i * cout_g, cout_g)?,
            )
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::cat(&parts, 1)?)
}

/// Gradient of the weight: `gw[co, ci, ky, kx] = Σ_{n,oy,ox} x[n, ci', oy s + ky d - pad, ..]
/// g[n, co, oy, ox]`, a convolution of `x` (batch and channels swapped) with `g` as kernel,
/// stride and dilation swapped. For groups the batch goes into the channel dim so that one
/// grouped convolution does every group: input `[Cin/G, G*N, H, W]`, kernel `[Cout, N, OH, OW]`.
pub(crate) fn conv2d_grad_weight(
    x: &Tensor,
    g: &Tensor,
    kh: usize,
    kw: usize,
    p: Conv2dParams,
) -> Result<Tensor> {
    let (n, cin, h, wd) = x.dims4()?;
    let cin_g = cin / p.groups;
    let xt = if p.groups == 1 {
        x.transpose(0, 1)?
    } else {
        x.reshape((n, p.groups, cin_g, h, wd))?
            .permute((2, 1, 0, 3, 4))?
            .contiguous()?
            .reshape((cin_g, p.groups * n, h, wd))?
    };
    let gw = xt.conv2d(
        &g.transpose(0, 1)?,
        p.padding,
        p.dilation,
        p.stride,
        p.groups,
    )?;
    // The result can be larger than the kernel when the stride dropped trailing rows.
    let gw = gw.transpose(0, 1)?;
    let (_, _, gh, gwd) = gw.dims4()?;
    let gw = if gh != kh { gw.narrow(2, 0, kh)? } else { gw };
    let gw = if gwd != kw { gw.narrow(3, 0, kw)? } else { gw };
    Ok(gw.contiguous()?)
}

/// Bytes of im2col workspace one convolution call may use (default 8 MiB). candle's CPU conv unfolds the
/// input into `Cin·kh·kw × OH·OW` columns per sample — 9x the input for a 3x3 kernel — and the
/// weight gradient does the same; over a whole batch that workspace, not the saved context,
/// would dominate peak memory. Larger batches run in chunks of samples instead.
pub const DEFAULT_WORKSPACE_BYTES: usize = 8 << 20;
static WORKSPACE_BYTES: AtomicUsize = AtomicUsize::new(DEFAULT_WORKSPACE_BYTES);

/// Sets the per-call im2col workspace (process-wide); smaller means more, smaller chunks.
pub fn set_workspace_bytes(bytes: usize) {
    WORKSPACE_BYTES.store(bytes.max(1), Ordering::Relaxed);
}

/// Samples per chunk so that a chunk's unfolded columns fit the workspace (for fused ops
/// whose chunks are convolutions, with `per_sample` all of a chunk's temporaries).
pub(crate) fn chunk_rows(n: usize, per_sample: usize) -> usize {
    (WORKSPACE_BYTES.load(Ordering::Relaxed) / per_sample.max(1)).clamp(1, n.max(1))
}

/// Runs `f` on consecutive batch chunks of `n` rows and writes each result into rows of one
/// preallocated `[n, ..dims]` tensor, so only one chunk's temporaries live at a time.
fn chunked_rows(
    n: usize,
    chunk: usize,
    like: &Tensor,
    dims: &[usize],
    mut f: impl FnMut(usize, usize) -> Result<Tensor>,
) -> Result<Tensor> {
    if chunk >= n {
        return f(0, n);
    }
    let mut full = vec![n];
    full.extend_from_slice(dims);
    let out = Tensor::zeros(full, like.dtype(), like.device())?;
    fill_rows(&out, chunk, f)?;
    Ok(out)
}

/// Writes `f(first, len)` into rows `first..first + len` of `out` for consecutive chunks of
/// at most `chunk` rows (`out` may be the buffer `f` reads, where chunk `i` reads only its
/// own rows: the rows after it are still intact).
fn fill_rows(
    out: &Tensor,
    chunk: usize,
    mut f: impl FnMut(usize, usize) -> Result<Tensor>,
) -> Result<()> {
    for (first, len) in super::row_chunks(out.dim(0)?, chunk) {
        out.slice_set(&f(first, len)?.contiguous()?, 0, first)?;
    }
    Ok(())
}

/// Samples per chunk of a forward convolution of `x` with `w` into `(oh, ow)` outputs. Per
/// sample of a chunk: the unfolded columns, candle's gemm output and its reordered copy,
/// and (strided or padded) a copy of the input rows. For a 1x1 kernel the columns are small
/// and those copies, not the columns, are what grows with the chunk.
fn forward_chunk_rows(x: &Tensor, w: &Tensor, (oh, ow): (usize, usize)) -> usize {
    let (xd, wd) = (x.dims(), w.dims());
    let elem = x.dtype().size_in_bytes();
    let cols_in = xd[1] * wd[2] * wd[3] * oh * ow * elem;
    let x_sample = xd[1] * xd[2] * xd[3] * elem;
    let g_sample = wd[0] * oh * ow * elem;
    chunk_rows(xd[0], cols_in + 2 * g_sample + x_sample)
}

/// The convolution of `x: [N, Cin, H, W]` with `w` (no bias), a batch chunk at a time into
/// one new `[N, Cout, OH, OW]` tensor, for fused ops that run a conv inside their node.
pub(crate) fn conv2d_forward(x: &Tensor, w: &Tensor, p: Conv2dParams) -> Result<Tensor> {
    let (oh, ow) = check_conv2d(x.dims(), w.dims(), None, p)?;
    let chunk = forward_chunk_rows(x, w, (oh, ow));
    chunked_rows(x.dim(0)?, chunk, x, &[w.dim(0)?, oh, ow], |s, len| {
        Ok(x.narrow(0, s, len)?
            .conv2d(w, p.padding, p.stride, p.dilation, p.groups)?)
    })
}

/// [`conv2d_forward`] of an `x` the caller hands over and nothing else reads: where the
/// output has the input's per-sample size and the batch runs in several chunks, each chunk's
/// output is written over the rows of `x` it was computed from (which nothing reads again),
/// so the layer costs one buffer, not two.
pub(crate) fn conv2d_forward_over(x: Tensor, w: &Tensor, p: Conv2dParams) -> Result<Tensor> {
    let (oh, ow) = check_conv2d(x.dims(), w.dims(), None, p)?;
    let (n, cout) = (x.dim(0)?, w.dim(0)?);
    let chunk = forward_chunk_rows(&x, w, (oh, ow));
    if chunk >= n || cout * oh * ow != x.elem_count() / n.max(1) || !x.is_contiguous() {
        return conv2d_forward(&x, w, p);
    }
    let y = x.reshape((n, cout, oh, ow))?;
    fill_rows(&y, chunk, |s, len| {
        Ok(x.narrow(0, s, len)?
            .conv2d(w, p.padding, p.stride, p.dilation, p.groups)?)
    })?;
    Ok(y)
}

impl Tape {
    /// 2-D convolution (cross-correlation, like PyTorch) of `x: [N, Cin, H, W]` with
    /// `w: [Cout, Cin/groups, kh, kw]` plus an optional bias `b: [Cout]`, with zero padding,
    /// stride, dilation and groups from `p`. Output `[N, Cout, OH, OW]` with
    /// `OH = (H + 2 padding - dilation (kh - 1) - 1) / stride + 1`.
    ///
    /// Context: `x` as [`SaveAs::Activation`], only if `w` needs a gradient (the weight
    /// gradient is linear in `x`, so a stochastically rounded `x` keeps it unbiased); `w`
    /// (a parameter, stored by reference, no copy) only if `x` needs a gradient. The bias
    /// gradient needs nothing.
    pub fn conv2d(
        &mut self,
        x: &Value,
        w: &Value,
        b: Option<&Value>,
        p: Conv2dParams,
    ) -> Result<Value> {
        self.conv2d_impl(x, w, b, p, false)
    }

    /// [`Tape::conv2d`] of an input handed over by the caller, which keeps no other handle or
    /// view of it. Where no context holds `x` as it is (L1–L4, see [`Tape::may_overwrite`]),
    /// the output has the input's per-sample size (3x3, stride 1, padding 1, `Cin = Cout`) and
    /// the batch runs in several chunks, each chunk's output is written over the rows of `x`
    /// it was computed from, which nothing reads again: the layer costs one buffer, not two.
    pub fn conv2d_owned(
        &mut self,
        x: Value,
        w: &Value,
        b: Option<&Value>,
        p: Conv2dParams,
    ) -> Result<Value> {
        self.conv2d_impl(&x, w, b, p, true)
    }

    fn conv2d_impl(
        &mut self,
        x: &Value,
        w: &Value,
        b: Option<&Value>,
        p: Conv2dParams,
        owned: bool,
    ) -> Result<Value> {
        let op = "conv2d";
        if x.dtype() != w.dtype() || b.is_some_and(|b| b.dtype() != x.dtype()) {
            bail!(
                "{op}: dtypes differ: input {:?}, weight {:?}, bias {:?}",
                x.dtype(),
                w.dtype(),
                b.map(|b| b.dtype())
            );
        }
        let (oh, ow) = check_conv2d(x.dims(), w.dims(), b.map(|b| b.dims()), p)?;
        let (n, cin) = (x.dims()[0], x.dims()[1]);
        let (cout, kh, kw) = (w.dims()[0], w.dims()[2], w.dims()[3]);
        let elem = x.dtype().size_in_bytes();
        // Unfolded columns per sample: forward and weight gradient read the input this way.
        let cols_in = cin * kh * kw * oh * ow * elem;
        // The input gradient unfolds the output gradient over the input's positions.
        let cols_out = cout * kh * kw * x.dims()[2] * x.dims()[3] * elem;
        let inputs: Vec<&Value> = match b {
            Some(b) => vec![x, w, b],
            None => vec![x, w],
        };
        let needs_grad = self.needs_grad(&inputs);
        // Contexts first, so that the output may take the input's buffer afterwards.
        let cx = if needs_grad && w.is_tracked() {
            Some(self.save(op, x, SaveAs::Activation)?)
        } else {
            None
        };
        let cw = if needs_grad && x.is_tracked() {
            Some(self.save(op, w, SaveAs::Activation)?)
        } else {
            None
        };
        let (xt, wt) = (x.tensor(), w.tensor());
        let (h, wd) = (x.dims()[2], x.dims()[3]);
        let x_sample_bytes = cin * h * wd * elem;
        let g_sample_bytes = cout * oh * ow * elem;
        // The output takes the input's buffer (chunk by chunk) where nothing reads it as it is.
        let over_input = owned && b.is_none() && self.may_overwrite(x, cx.as_ref());
        let mut y = if over_input {
            conv2d_forward_over(xt.clone(), wt, p)?
        } else {
            conv2d_forward(xt, wt, p)?
        };
        if let Some(b) = b {
            y = y.broadcast_add(&b.tensor().reshape((1, cout, 1, 1))?)?;
        }
        if !needs_grad {
            return Ok(self.constant(y));
        }
        self.record_grad_into(op, &inputs, y, move |g, needs, acc| {
            let owned = g.is_owned();
            let want_gx = cw.is_some() && needs[0];
            let want_gw = cx.is_some() && needs[1];
            // The input's gradient gathered so far (a residual block's shortcut), to add
            // this one into chunk by chunk instead of allocating it. Taken only when the
            // input gradient is computed, so that it is always handed back.
            let into = if want_gx && crate::ops::activation::fused_cpu_kernels() {
                acc[0].take_if(|a| {
                    let a = a.tensor();
                    a.device().is_cpu() && a.is_contiguous() && a.dtype() == g.tensor().dtype()
                })
            } else {
                None
            };
            let g = g.into_tensor();
            let gb = if needs.len() == 3 && needs[2] {
                Some(g.sum((0, 2, 3))?)
            } else {
                None
            };
            let gx_chunk = chunk_rows(n, cols_out);
            // Which gradient to compute first: the one computed second is held while the
            // other's chunks (unpacked input, unfolded columns) come and go, so the smaller
            // result goes first — the weight gradient, except where the weight outweighs
            // the whole input gradient (512-channel layers at a small batch).
            let gw_first =
                !want_gw || cout * (cin / p.groups) * kh * kw * elem < n * x_sample_bytes;
            // With the weight gradient done, an owned output gradient of the input's
            // per-sample size (a 3x3 conv with padding 1, stride 1, Cin = Cout) takes the
            // input gradient chunk by chunk in its own rows: chunk `s..s+len` reads only
            // those rows of `g`, so the rows after it are still intact. That saves one
            // layer-sized buffer where the batch runs in several chunks (in one chunk the
            // result exists whole beside `g` anyway).
            let in_place = want_gx
                && into.is_none()
                && gw_first
                && owned
                && gx_chunk < n
                && x_sample_bytes == g_sample_bytes
                && g.is_contiguous();
            let weight_grad = || -> Result<Option<Tensor>> {
                let Some(cx) = cx.as_ref().filter(|_| want_gw) else {
                    return Ok(None);
                };
                // Sum of per-chunk weight gradients; each chunk of the (possibly quantized)
                // input is unpacked on its own. Besides the unfolded columns, a chunk holds
                // its unpacked input, candle's reordered copy of it and a copy of its output
                // gradient (the weight-gradient convolution's kernel): for a 1x1 kernel
                // those, not the columns, are what grows with the chunk.
                let per_sample = cols_in.max(2 * x_sample_bytes + g_sample_bytes);
                let chunk = chunk_rows(n, per_sample);
                let mut acc: Option<Tensor> = None;
                for (s, len) in super::row_chunks(n, chunk) {
                    let xs = if len == n {
                        cx.load()?
                    } else {
                        cx.load_rows(s, len)?
                    };
                    let part = conv2d_grad_weight(&xs, &g.narrow(0, s, len)?, kh, kw, p)?;
                    acc = Some(match acc {
                        None => part,
                        Some(a) => (a + part)?,
                    });
                }
                Ok(acc)
            };
            let input_grad = || -> Result<Option<Tensor>> {
                let Some(cw) = cw.as_ref().filter(|_| want_gx) else {
                    return Ok(None);
                };
                let w = cw.load()?;
                let grad_input =
                    |s: usize, len: usize| conv2d_grad_input(&g.narrow(0, s, len)?, &w, h, wd, p);
                if let Some(into) = into {
                    let dst = into.tensor();
                    for (s, len) in super::row_chunks(n, gx_chunk) {
                        let part = grad_input(s, len)?.contiguous()?;
                        let rows = dst.narrow(0, s, len)?;
                        if !crate::ops::activation::add_in_place(&rows, &part)? {
                            dst.slice_set(&(&rows + &part)?, 0, s)?;
                        }
                    }
                    return Ok(Some(into.into_tensor()));
                }
                if !in_place {
                    return Ok(Some(chunked_rows(
                        n,
                        gx_chunk,
                        &g,
                        &[cin, h, wd],
                        grad_input,
                    )?));
                }
                let gx = g.reshape((n, cin, h, wd))?;
                fill_rows(&gx, gx_chunk, grad_input)?;
                Ok(Some(gx))
            };
            let (gx, gw) = if gw_first {
                let gw = weight_grad()?;
                (input_grad()?, gw)
            } else {
                let gx = input_grad()?;
                (gx, weight_grad()?)
            };
            drop(g);
            // New tensors (the input gradient a convolution's output, the chunks' buffer, or
            // the owned output gradient's storage, of which `g` was the last other handle).
            let mut grads = vec![gx.map(Grad::owned), gw.map(Grad::owned)];
            if let Some(gb) = gb {
                grads.push(Some(Grad::owned(gb)));
            } else if needs.len() == 3 {
                grads.push(None);
            }
            Ok(grads)
        })
    }
}
