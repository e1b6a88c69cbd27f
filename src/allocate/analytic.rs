//! Analytic sensitivities (ActNN-style): no extra passes, only quantities visible when the
//! tensor is saved.
//!
//! ActNN's coefficient for a linear/conv input is
//! `C_{l,n} = (K / (4·groups)) · (G / P) · Σ_i R_{n,i}² · ‖dY_n‖²`: the stochastic-rounding
//! noise energy of the context (`Σ_groups n_g·R_g²/4` bounds `Σ_elements Var(e)·(2^b−1)²`)
//! times how much the backward rule amplifies it (the squared output-gradient norm, spread
//! over the `P` positions and `K` kernel taps a conv input feeds).
//!
//! What we can compute: the noise-energy term, exactly, from the tensor in `BitPlan::bits_for`
//! ([`noise_energy`], one pass over the data, about the cost of the quantizer's own min/max
//! pass). What is missing: the tape gives no access to `‖dY‖²` per node (its backward
//! consumes output gradients without a hook) and a `SaveRequest` names the op but not its
//! kernel size, so the amplification factor is a per-slot weight that defaults to 1. With
//! weight 1 the estimator allocates by noise energy alone: tensors with wide per-group ranges
//! keep more bits. That is not enough: at 2 bits it changes nothing on the CNNs (every
//! per-element energy within the 16× that a 2→1 move needs) and makes gpt-char's gradient
//! 4.5× noisier than uniform bits (it starves layer-norm and attention contexts whose
//! noise is small but amplified); at 1.5 bits it still beats the 1-bit uniform rung by
//! 2–90× (`allocator_eval`). A backward hook reporting `‖dY‖²` for the node that saved each
//! slot would complete it (then `weight_l = ‖dY_l‖² · K_l / P_l`); until then the numerical
//! estimator is the default.

use anyhow::Result;
use candle_core::{DType, Storage, Tensor};
use rayon::prelude::*;

/// Minimum elements before the range pass goes parallel.
const PAR_MIN: usize = 1 << 16;

/// `Σ_groups n_g · range_g² / 4` over groups of `group` elements inside each sample (dim 0 is
/// the batch, as in the compression policy): the total rounding-noise variance of the tensor
/// per unit of `S(b)`. Non-finite ranges count as 0 (the compressor rejects such tensors).
pub fn noise_energy(t: &Tensor, group: usize) -> Result<f64> {
    let sample_len = match t.dims().first() {
        Some(&n) if n > 0 && t.rank() > 1 => t.elem_count() / n,
        _ => t.elem_count(),
    };
    with_f32(t, |x| Ok(noise_energy_slice(x, sample_len, group)))
}

/// [`noise_energy`] on a flat slice of `len = n · sample_len` elements.
pub fn noise_energy_slice(x: &[f32], sample_len: usize, group: usize) -> f64 {
    if x.is_empty() || sample_len == 0 || group == 0 {
        return 0.0;
    }
    let sample = |s: &[f32]| -> f64 {
        s.chunks(group)
            .map(|g| {
                let (mn, mx) = g
                    .iter()
                    .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| {
                        (a.min(v), b.max(v))
                    });
                let r = (mx as f64) - (mn as f64);
                if r.is_finite() {
                    g.len() as f64 * r * r / 4.0
                } else {
                    0.0
                }
            })
            .sum()
    };
    if x.len() >= PAR_MIN {
        x.par_chunks(sample_len).map(sample).sum()
    } else {
        x.chunks(sample_len).map(sample).sum()
    }
}

/// Runs `f` on the tensor as one contiguous f32 slice, borrowed when it already is one (no
/// copy on the save path), converted otherwise.
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    if t.dtype() == DType::F32 && t.device().is_cpu() {
        let (storage, layout) = t.storage_and_layout();
        if let (Storage::Cpu(cpu), Some((a, b))) = (&*storage, layout.contiguous_offsets()) {
            return f(&cpu.as_slice::<f32>()?[a..b]);
        }
    }
    let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    f(&v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn energy_of_known_ranges() {
        // Two samples of 4 elements, group 2: ranges 1, 3 | 0, 2 → 2·(1+9+0+4)/4 = 7.
        let x = [0.0, 1.0, 0.0, 3.0, 5.0, 5.0, -1.0, 1.0];
        assert!((noise_energy_slice(&x, 4, 2) - 7.0).abs() < 1e-12);
        let t = Tensor::from_slice(&x, (2, 4), &candle_core::Device::Cpu).unwrap();
        assert!((noise_energy(&t, 2).unwrap() - 7.0).abs() < 1e-12);
    }
}
