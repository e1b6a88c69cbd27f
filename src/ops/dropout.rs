//! Inverted dropout whose mask is a pure function of a seed, so backward regenerates it
//! instead of storing it: the context is 8 bytes of seed, not a tensor.

use super::activation::{CpuView, Real, PAR_CHUNK};
use crate::compress::rng::{fill_uniform_keyed, stream_key};
use crate::tape::{Tape, Value};
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

/// RNG stream the dropout mask is drawn from (the seed already differs per call).
const DROPOUT_STREAM: u64 = 0;

impl Tape {
    /// Inverted dropout: element `i` (row-major index) is kept iff
    /// `uniform(seed, 0, i) >= p` and kept values are scaled by `1 / (1 - p)`, so the
    /// expectation is unchanged. Identity in eval mode or for `p == 0`; `p` outside `[0, 1)`
    /// is an error. `seed = self.next_seed()` differs per call and per step.
    ///
    /// Context: **only the seed** (0 bytes of tensor storage, logged as "seed"): backward
    /// regenerates the same mask from it and computes `g * mask / (1 - p)`.
    pub fn dropout(&mut self, x: &Value, p: f64) -> Result<Value> {
        if !(0.0..1.0).contains(&p) {
            bail!(
                "dropout: p must be in [0, 1), got {p} (input {:?})",
                x.dims()
            );
        }
        if !self.is_training() || p == 0.0 {
            return Ok(x.clone());
        }
        let seed = self.next_seed();
        let y = apply_dropout_mask(x.tensor(), seed, p)?;
        if !self.needs_grad(&[x]) {
            return Ok(self.constant(y));
        }
        self.note_context("dropout", "seed", x.dims());
        self.record("dropout", &[x], y, move |g, _| {
            Ok(vec![Some(apply_dropout_mask(&g, seed, p)?)])
        })
    }
}

/// `t * keep(i) / (1 - p)` with `keep(i) = uniform(seed, 0, i) >= p` over the row-major
/// index `i`. One fused multi-threaded pass on contiguous CPU f32/f64 tensors; elsewhere the
/// mask is built on the host and multiplied with candle ops (same mask, bit for bit).
pub fn apply_dropout_mask(t: &Tensor, seed: u64, p: f64) -> Result<Tensor> {
    let scale = 1.0 / (1.0 - p);
    let fused = match t.dtype() {
        DType::F32 => fused_mask::<f32>(t, seed, p, scale)?,
        DType::F64 => fused_mask::<f64>(t, seed, p, scale)?,
        _ => None,
    };
    if let Some(y) = fused {
        return Ok(y);
    }
    let n = t.elem_count();
    let mask = match t.dtype() {
        DType::F64 => Tensor::from_vec(dropout_mask::<f64>(n, seed, p), t.shape(), &Device::Cpu)?,
        _ => Tensor::from_vec(dropout_mask::<f32>(n, seed, p), t.shape(), &Device::Cpu)?,
    };
    let mask = mask.to_dtype(t.dtype())?.to_device(t.device())?;
    Ok(t.mul(&mask)?)
}

/// The dropout mask for `n` elements, `0` or `1 / (1 - p)`, built on the host.
pub(crate) fn dropout_mask<T: Real>(n: usize, seed: u64, p: f64) -> Vec<T> {
    let key = stream_key(seed, DROPOUT_STREAM);
    let scale = T::c(1.0 / (1.0 - p));
    let zero = T::c(0.0);
    let mut out = vec![zero; n];
    out.par_chunks_mut(PAR_CHUNK).enumerate().for_each_init(
        || vec![0f32; PAR_CHUNK],
        |u, (c, o)| {
            let u = &mut u[..o.len()];
            fill_uniform_keyed(key, (c * PAR_CHUNK) as u64, u);
            for (o, &u) in o.iter_mut().zip(u.iter()) {
                *o = if keep(u, p) { scale } else { zero };
            }
        },
    );
    out
}

#[inline(always)]
fn keep(u: f32, p: f64) -> bool {
    u as f64 >= p
}

fn fused_mask<T: Real>(t: &Tensor, seed: u64, p: f64, scale: f64) -> Result<Option<Tensor>> {
    let Some(view) = CpuView::of(t) else {
        return Ok(None);
    };
    let src = view.slice::<T>()?;
    let key = stream_key(seed, DROPOUT_STREAM);
    let scale = T::c(scale);
    let zero = T::c(0.0);
    let mut out = vec![zero; src.len()];
    out.par_chunks_mut(PAR_CHUNK)
        .zip(src.par_chunks(PAR_CHUNK))
        .enumerate()
        .for_each_init(
            || vec![0f32; PAR_CHUNK],
            |u, (c, (o, s))| {
                let u = &mut u[..o.len()];
                fill_uniform_keyed(key, (c * PAR_CHUNK) as u64, u);
                for ((o, &s), &u) in o.iter_mut().zip(s).zip(u.iter()) {
                    *o = if keep(u, p) { s * scale } else { zero };
                }
            },
        );
    Ok(Some(Tensor::from_vec(out, t.shape(), &Device::Cpu)?))
}
