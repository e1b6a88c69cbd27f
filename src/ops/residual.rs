//! A residual block's sum with its projection shortcut, `h + batch_norm(conv1x1(x))`, as one
//! node.
//!
//! Composed, backward runs the sum, the shortcut's batch norm and its convolution one after
//! another: the sum hands its output gradient `g` to both branches (shared, so neither may
//! write into it), the batch norm makes its input gradient beside it, and the strided conv
//! makes `x`'s gradient (four times the size of a stride-2 output) beside both. At the
//! downsampling block that is the step's peak: `g`, the batch-norm gradient and `x`'s
//! gradient at once, next to the contexts not yet freed. Fused, the batch norm's
//! reductions run first over the whole batch, then each chunk of samples goes through the
//! batch norm's and the conv's backward into rows of `x`'s gradient, so the batch-norm
//! gradient exists for one chunk only; and `g` goes on to the main branch as it came
//! (owned), so its batch norm writes into it in place.
//!
//! A basic block with an identity shortcut, `x + BN2(conv2(relu(BN1(conv1(x)))))`, is one
//! node too. Composed, its backward holds the sum's gradient `g` (the shortcut's share, which
//! becomes `x`'s gradient) and the main branch's own layer-sized gradient beside it — the
//! step's peak in ResNet-18's first stage. Fused, nothing layer-sized but `g` exists: BN2's
//! reductions run over `g`; a first pass over batch chunks takes each chunk back through BN2,
//! conv2 and the ReLU mask to gather BN1's reductions (and conv2's weight gradient); a second
//! pass recomputes those chunks, takes them on through BN1 and conv1 and adds the result
//! into `g`'s rows, which then are `x`'s gradient. The price is conv2's input gradient
//! computed twice.
//!
//! The contexts, their slots and their codes are exactly those of the composed ops (the
//! convs' inputs and weights, the batch norms' inputs, statistics and `gamma`, the ReLU's
//! mask), so profiles, the bit allocator and the rounding noise see no difference; gradients
//! differ from the composed ops only in the order the chunks' weight gradients are summed.

use super::activation::{add_in_place, fused_cpu_kernels, mask_rows, relu_in_place, relu_output};
use super::conv::{
    check_conv2d, chunk_rows, conv2d_forward, conv2d_forward_over, conv2d_grad_input,
    conv2d_grad_weight, Conv2dParams,
};
use super::norm::{batch_norm_output, bn_forward, BatchNormStats, BnChunkGrad, BnOutput, BnSums};
use super::{accumulate, row_chunks};
use crate::tape::{Grad, SaveAs, Saved, Tape, Value};
use anyhow::{anyhow, bail, Result};
use candle_core::Tensor;

/// A projection shortcut: a 1x1 conv (`conv.w: [Cout, Cin, 1, 1]`) with `stride`, then
/// batch norm.
#[derive(Clone, Copy)]
pub struct ProjectionShortcut<'a> {
    pub conv: ConvBn<'a>,
    pub stride: usize,
}

/// A conv without bias and the batch norm after it, by reference: `w: [Cout, Cin, kh, kw]`,
/// then `gamma`, `beta` (`[Cout]`), `momentum` and `eps`.
#[derive(Clone, Copy)]
pub struct ConvBn<'a> {
    pub w: &'a Value,
    pub gamma: &'a Value,
    pub beta: &'a Value,
    pub momentum: f64,
    pub eps: f64,
}

impl<'a> ConvBn<'a> {
    /// With PyTorch's batch-norm defaults (momentum 0.1, eps 1e-5).
    pub fn new(w: &'a Value, gamma: &'a Value, beta: &'a Value) -> Self {
        Self {
            w,
            gamma,
            beta,
            momentum: 0.1,
            eps: 1e-5,
        }
    }
}

impl Tape {
    /// `x + BN2(conv2(relu(BN1(conv1(x)))))` (a basic residual block before its last ReLU),
    /// `x` handed over by the caller, both convs with `p` and the output shape of `x`, the
    /// batch norms' running statistics in `run1` and `run2`. One node whose backward runs in
    /// batch chunks and holds no layer-sized tensor but the gradient it returns (see the
    /// module doc) on the CPU at L1–L4 in training, where the batch spans several chunks;
    /// otherwise, elsewhere, and while an analytic sensitivity estimate is gathered
    /// ([`Tape::fuses_in_chunks`]), the ops one after another.
    pub fn identity_block(
        &mut self,
        x: Value,
        c1: &ConvBn,
        c2: &ConvBn,
        p: Conv2dParams,
        run1: &mut BatchNormStats,
        run2: &mut BatchNormStats,
    ) -> Result<Value> {
        let xd = x.dims().to_vec();
        let keeps_shape = |w: &Value| {
            xd.len() == 4
                && w.dims().len() == 4
                && w.dims()[0] == xd[1]
                && check_conv2d(&xd, w.dims(), None, p).is_ok_and(|hw| hw == (xd[2], xd[3]))
        };
        let params = [c1.w, c1.gamma, c1.beta, c2.w, c2.gamma, c2.beta];
        let tensors: Vec<&Tensor> = std::iter::once(x.tensor())
            .chain(params.iter().map(|v| v.tensor()))
            .collect();
        let n = xd.first().copied().unwrap_or(0);
        // Per sample of a chunk: the unfolded columns (kh·kw inputs) and about five
        // sample-sized tensors (BN2's gradient, conv2's input or input gradient, BN1's input,
        // conv1's input, the input-gradient part).
        let sample = x.tensor().elem_count() / n.max(1) * x.dtype().size_in_bytes();
        let taps = c1.w.dims().iter().skip(2).product::<usize>().max(1);
        let chunk = chunk_rows(n, (taps + 5) * sample);
        let fused = self.fuses_in_chunks()
            && self.is_training()
            && fused_cpu_kernels()
            && x.is_tracked()
            && params.iter().all(|v| v.is_tracked())
            && keeps_shape(c1.w)
            && keeps_shape(c2.w)
            && BnChunkGrad::applies(&tensors)
            && chunk < n;
        if !fused {
            let c = self.conv2d(&x, c1.w, None, p)?;
            let b = self.batch_norm_owned(c, c1.gamma, c1.beta, run1, c1.momentum, c1.eps)?;
            let a = self.relu_owned(b)?;
            let c = self.conv2d_owned(a, c2.w, None, p)?;
            let b = self.batch_norm_owned(c, c2.gamma, c2.beta, run2, c2.momentum, c2.eps)?;
            return self.add_owned(b, &x);
        }
        let (h, w) = (xd[2], xd[3]);
        let (kh, kw) = (c1.w.dims()[2], c1.w.dims()[3]);
        let (kh2, kw2) = (c2.w.dims()[2], c2.w.dims()[3]);
        // The composed ops' saves in their order: conv2d (x, w1), batch_norm (its input,
        // mean, invstd, gamma), relu (the mask), conv2d (its input, rebuilt where the policy
        // rebuilds, and w2), batch_norm; the sum saves nothing.
        let cx1 = self.save("conv2d", &x, SaveAs::Activation)?;
        let cw1 = self.save("conv2d", c1.w, SaveAs::Activation)?;
        let c = conv2d_forward(x.tensor(), c1.w.tensor(), p)?;
        let (sc1, cm1, ci1, cg1, b1) = self.bn_saved(c, c1, run1)?;
        let m1 = self.save_derived("relu", &b1, SaveAs::SignMask)?;
        let a1 = if !m1.stored_as_is() && relu_in_place(&b1)? {
            b1
        } else {
            b1.relu()?
        };
        let ca1 = if self.recomputes_contexts() {
            let r = relu_output(
                batch_norm_output(
                    sc1.clone(),
                    cm1.clone(),
                    ci1.clone(),
                    c1.gamma.tensor().clone(),
                    c1.beta.tensor().clone(),
                ),
                m1.clone(),
            );
            let at = self.log_place();
            self.recomputed_context_at(at, "conv2d", r, a1.dims(), a1.dtype(), a1.device())
        } else {
            self.save_derived("conv2d", &a1, SaveAs::Activation)?
        };
        let cw2 = self.save("conv2d", c2.w, SaveAs::Activation)?;
        let c = if ca1.stored_as_is() {
            conv2d_forward(&a1, c2.w.tensor(), p)?
        } else {
            conv2d_forward_over(a1, c2.w.tensor(), p)?
        };
        let (sc2, cm2, ci2, cg2, y) = self.bn_saved(c, c2, run2)?;
        if !add_in_place(&y, x.tensor())? {
            bail!("identity block: the sum could not be formed in place");
        }
        let inputs = [&x, c1.w, c1.gamma, c1.beta, c2.w, c2.gamma, c2.beta];
        self.record_grad("basic_block", &inputs, y, move |g, _needs| {
            // `g` becomes `x`'s gradient (the shortcut's share plus the main branch's), so
            // it must be ours to write into.
            let g = if g.is_owned() && g.tensor().is_contiguous() {
                g.into_tensor()
            } else {
                g.tensor().force_contiguous()?
            };
            let (w1, w2) = (cw1.load()?, cw2.load()?);
            let (gamma1, gamma2) = (cg1.load()?, cg2.load()?);
            let (mean1, invstd1) = (cm1.load()?, ci1.load()?);
            let bn2 = BnChunkGrad::new(&g, &sc2, &cm2, &ci2, &gamma2)?;
            // A chunk's gradient at conv2's input, after the ReLU's mask.
            let at_relu = |first: usize, len: usize, gw2: Option<&mut Option<Tensor>>| {
                let g2 = bn2.rows(&g, first, len)?;
                if let Some(gw2) = gw2 {
                    let a = ca1.load_rows(first, len)?;
                    accumulate(gw2, conv2d_grad_weight(&a, &g2, kh2, kw2, p)?)?;
                }
                let g3 = conv2d_grad_input(&g2, &w2, h, w, p)?.contiguous()?;
                drop(g2);
                mask_rows(&m1, g3, first, len, 1.0, 0.0)
            };
            // Pass 1: BN1's reductions and conv2's weight gradient.
            let mut gw2 = None;
            let mut sums1 = BnSums::new(xd[1]);
            for (first, len) in row_chunks(n, chunk) {
                let g3 = at_relu(first, len, Some(&mut gw2))?;
                let xc = sc1.load_rows(first, len)?.contiguous()?;
                sums1.add(&g3, &xc, &mean1, &invstd1)?;
            }
            let bn1 = BnChunkGrad::from_sums(sums1, &sc1, &cm1, &ci1, &gamma1)?;
            // Pass 2: the same chunks on through BN1 and conv1, into `g`'s rows (each chunk
            // reads its rows of `g` before it writes them).
            let mut gw1 = None;
            for (first, len) in row_chunks(n, chunk) {
                let g4 = bn1.apply(at_relu(first, len, None)?, first, len)?;
                let xs = cx1.load_rows(first, len)?;
                accumulate(&mut gw1, conv2d_grad_weight(&xs, &g4, kh, kw, p)?)?;
                drop(xs);
                let part = conv2d_grad_input(&g4, &w1, h, w, p)?.contiguous()?;
                let rows = g.narrow(0, first, len)?;
                if !add_in_place(&rows, &part)? {
                    bail!("identity block: a gradient chunk could not be added in place");
                }
            }
            Ok(vec![
                Some(Grad::owned(g)),
                gw1.map(Grad::owned),
                Some(Grad::owned(bn1.gamma_grad.clone())),
                Some(Grad::owned(bn1.beta_grad.clone())),
                gw2.map(Grad::owned),
                Some(Grad::owned(bn2.gamma_grad.clone())),
                Some(Grad::owned(bn2.beta_grad.clone())),
            ])
        })
    }

    /// Batch norm of a conv's output `c` (ours) inside a fused block, with the composed op's
    /// saves in its order (input, mean, invstd, gamma): the contexts, and the output (in
    /// `c`'s buffer where the input's context is a compressed copy).
    #[allow(clippy::type_complexity)]
    fn bn_saved(
        &mut self,
        c: Tensor,
        cb: &ConvBn,
        running: &mut BatchNormStats,
    ) -> Result<(Saved, Saved, Saved, Saved, Tensor)> {
        let dims = c.dims();
        if dims[0] * dims[2..].iter().product::<usize>() < 2 {
            bail!("batch_norm: training needs more than one value per channel, got input {dims:?}");
        }
        let sx = self.save_derived("batch_norm", &c, SaveAs::Activation)?;
        let in_place = !sx.stored_as_is();
        let BnOutput { y, mean, invstd } = bn_forward(
            &c,
            cb.gamma.tensor(),
            cb.beta.tensor(),
            running,
            (cb.momentum, cb.eps),
            true,
            in_place,
        )?;
        drop(c);
        let cm = self.save_derived("batch_norm", &mean, SaveAs::Exact)?;
        let ci = self.save_derived("batch_norm", &invstd, SaveAs::Exact)?;
        let cg = self.save("batch_norm", cb.gamma, SaveAs::Activation)?;
        Ok((sx, cm, ci, cg, y))
    }

    /// `h + batch_norm(conv2d(x, w))` with the shortcut `sc`, `h` (the main branch's output)
    /// handed over by the caller, `running` the batch norm's running statistics. One node
    /// whose backward runs the shortcut in batch chunks (see the module doc) on the CPU at
    /// L1–L4 in training; otherwise, elsewhere, and while an analytic sensitivity estimate is
    /// gathered ([`Tape::fuses_in_chunks`]), conv, batch norm and sum one after another.
    pub fn projection_shortcut_add(
        &mut self,
        h: Value,
        x: &Value,
        sc: &ProjectionShortcut,
        running: &mut BatchNormStats,
    ) -> Result<Value> {
        let p = Conv2dParams {
            stride: sc.stride,
            ..Default::default()
        };
        let wd = sc.conv.w.dims();
        if wd.len() != 4 || wd[2] != 1 || wd[3] != 1 {
            bail!("projection shortcut: the conv must be 1x1, got weight {wd:?}");
        }
        let tensors = [
            h.tensor(),
            x.tensor(),
            sc.conv.w.tensor(),
            sc.conv.gamma.tensor(),
        ];
        let fused = self.fuses_in_chunks()
            && self.is_training()
            && fused_cpu_kernels()
            // The conv's output is tracked, so the batch norm saves what the composed one does.
            && self.needs_grad(&[x, sc.conv.w])
            && BnChunkGrad::applies(&tensors)
            && sc.conv.beta.tensor().dtype() == x.dtype();
        if !fused {
            let c = self.conv2d(x, sc.conv.w, None, p)?;
            let s = self.batch_norm_owned(
                c,
                sc.conv.gamma,
                sc.conv.beta,
                running,
                sc.conv.momentum,
                sc.conv.eps,
            )?;
            let y = self.add_owned(h, &s)?;
            return Ok(y);
        }
        let (n, cin, hh, ww) = x.tensor().dims4().map_err(|_| {
            anyhow!(
                "projection shortcut: the input must be [N, C, H, W], got {:?}",
                x.dims()
            )
        })?;
        // The composed ops' saves in their order: conv2d (x, w), batch_norm (its input, mean,
        // invstd, gamma); the sum saves nothing.
        let cx = if sc.conv.w.is_tracked() {
            Some(self.save("conv2d", x, SaveAs::Activation)?)
        } else {
            None
        };
        let cw = if x.is_tracked() {
            Some(self.save("conv2d", sc.conv.w, SaveAs::Activation)?)
        } else {
            None
        };
        let c = conv2d_forward(x.tensor(), sc.conv.w.tensor(), p)?;
        if c.shape() != h.shape() {
            bail!(
                "projection shortcut: the conv's output {:?} does not match the main branch's {:?}",
                c.dims(),
                h.dims()
            );
        }
        let (sbn, cm, ci, cg, s) = self.bn_saved(c, &sc.conv, running)?;
        // The sum into the main branch's buffer where nothing needs it as it is.
        let y = if self.may_overwrite(&h, None) && add_in_place(h.tensor(), &s)? {
            h.tensor().clone()
        } else {
            (h.tensor() + &s)?
        };
        drop(s);
        let inputs = [&h, x, sc.conv.w, sc.conv.gamma, sc.conv.beta];
        self.record_grad_into("residual_add", &inputs, y, move |g, needs, acc| {
            let gt = g.tensor().clone();
            let gamma = cg.load()?;
            let bn = BnChunkGrad::new(&gt, &sbn, &cm, &ci, &gamma)?;
            let want_x = needs[1] && cw.is_some();
            let want_w = needs[2] && cx.is_some();
            // `x`'s gradient gathered so far, to add into; else one new buffer.
            let into = if want_x {
                acc[1].take_if(|a| {
                    let a = a.tensor();
                    a.device().is_cpu() && a.is_contiguous() && a.dtype() == gt.dtype()
                })
            } else {
                None
            };
            let gx = match (&into, want_x) {
                (Some(a), _) => Some(a.tensor().clone()),
                (None, true) => Some(Tensor::zeros((n, cin, hh, ww), gt.dtype(), gt.device())?),
                (None, false) => None,
            };
            drop(into);
            let mut gw: Option<Tensor> = None;
            if want_x || want_w {
                let w = cw.as_ref().map(|cw| cw.load()).transpose()?;
                // A chunk holds its batch-norm gradient, its unpacked input (and the weight
                // gradient's transposed copy of it) and its input gradient: within the
                // convolutions' workspace.
                let per_sample =
                    (gt.elem_count() / n.max(1) + 3 * cin * hh * ww) * gt.dtype().size_in_bytes();
                for (first, len) in row_chunks(n, chunk_rows(n, per_sample)) {
                    let gbn = bn.rows(&gt, first, len)?;
                    if let Some(cx) = cx.as_ref().filter(|_| want_w) {
                        let xs = cx.load_rows(first, len)?;
                        accumulate(&mut gw, conv2d_grad_weight(&xs, &gbn, 1, 1, p)?)?;
                    }
                    if let (Some(gx), Some(w)) = (&gx, &w) {
                        let part = conv2d_grad_input(&gbn, w, hh, ww, p)?.contiguous()?;
                        let rows = gx.narrow(0, first, len)?;
                        if !add_in_place(&rows, &part)? {
                            gx.slice_set(&(&rows + &part)?, 0, first)?;
                        }
                    }
                }
            }
            drop(gt);
            // `g` goes on to `h` as it came: its ownership is `h`'s alone now.
            Ok(vec![
                needs[0].then_some(g),
                gx.map(Grad::owned),
                gw.map(Grad::owned),
                needs[3].then(|| Grad::owned(bn.gamma_grad.clone())),
                needs[4].then(|| Grad::owned(bn.beta_grad.clone())),
            ])
        })
    }
}
