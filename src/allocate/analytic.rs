//! Analytic sensitivities (ActNN-style): no extra passes, only quantities visible when the
//! tensor is saved.
//!
//! ActNN's coefficient for a linear/conv input is
//! `C_{l,n} = (K / (4·groups)) · (G / P) · Σ_i R_{n,i}² · ‖dY_n‖²`: the stochastic-rounding
//! noise energy of the context (`Σ_groups n_g·R_g²/4` bounds `Σ_elements Var(e)·(2^b−1)²`)
//! times how much the backward rule amplifies it (the squared output-gradient norm, spread
//! over the `P` positions and `K` kernel taps a conv input feeds).
//!
//! Both factors are at hand without extra passes: the noise energy per sample from the tensor
//! in `BitPlan::bits_for` ([`noise_energy_per_sample`], one pass over the data, about the cost
//! of the quantizer's own min/max pass), and `‖dY_n‖²` per sample from the tape, which reports
//! each saving node's output gradient in backward while an estimate is being gathered
//! ([`crate::tape::GradObservation`]). The sensitivity is `Σ_n ‖dY_n‖² E_n` times the op's
//! [`amplification`] (kernel taps over positions). An estimate is gathered during one normal
//! training step every `reallocate_every` steps and becomes the plan at the next step.
//!
//! Scope: the derivation holds for the inputs of linear/conv layers, whose noise enters the
//! weight gradient through `dY` directly. Every other saved tensor (norms, activations,
//! attention) keeps the uniform rung under the analytic estimator, and the linear/conv inputs
//! share the rest of the budget: modelling them as elementwise ops starved them (their
//! noise is amplified by the layers below, which this model does not see) and made the
//! gradient 100x noisier on resnet18 and gpt-char (`allocator_eval`). Per-sample bits, which
//! the per-sample factors would allow, need a per-sample packed format and are not built.
//! The numerical estimator stays the default.

use anyhow::Result;
use candle_core::{DType, Shape, Storage, Tensor};
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

/// [`noise_energy`] per sample (dim 0 is the batch; a rank ≤ 1 tensor is one sample).
pub fn noise_energy_per_sample(t: &Tensor, group: usize) -> Result<Vec<f64>> {
    let sample_len = match t.dims().first() {
        Some(&n) if n > 0 && t.rank() > 1 => t.elem_count() / n,
        _ => t.elem_count(),
    };
    with_f32(t, |x| {
        if sample_len == 0 {
            return Ok(Vec::new());
        }
        let per = |s: &[f32]| noise_energy_slice(s, s.len(), group);
        Ok(if x.len() >= PAR_MIN {
            x.par_chunks(sample_len).map(per).collect()
        } else {
            x.chunks(sample_len).map(per).collect()
        })
    })
}

/// ActNN's sensitivity of one saved tensor: `factor · Σ_n ‖dY_n‖² · E_n`, with `E_n` the
/// per-sample noise energy of the context and `‖dY_n‖²` the per-sample squared norm of the
/// output gradient of the node that read it. When the two disagree on the number of samples
/// (a context without a batch dimension), the totals are multiplied and spread over the
/// samples: `factor · ΣE · Σ‖dY‖² / n`.
pub fn analytic_sensitivity(energy: &[f64], per_sample_sq: &[f64], factor: f64) -> f64 {
    if energy.len() == per_sample_sq.len() {
        factor
            * energy
                .iter()
                .zip(per_sample_sq)
                .map(|(e, g)| e * g)
                .sum::<f64>()
    } else {
        let n = energy.len().max(per_sample_sq.len()).max(1) as f64;
        factor * energy.iter().sum::<f64>() * per_sample_sq.iter().sum::<f64>() / n
    }
}

/// How strongly an op's backward reads the rounding noise of its saved tensor, per unit of
/// `Σ_n ‖dY_n‖² E_n` (module docs):
/// * `conv2d` (input `[N, C, H, W]`, weight `[O, C/g, kh, kw]`): `dW = Σ_p dY_p ⊗ x_{p+k}`, so
///   the noise of each input element enters `kh·kw` taps: `kh·kw / (H·W)`;
/// * `linear`/`matmul` (input `[N, .., T, d]`): `dW = Σ_t dY_t ⊗ x_t`: `1 / T` (1 without tokens);
/// * anything else is treated as elementwise (`dX = dY ⊙ f'(x)`): `1 / elements per sample`.
pub fn amplification(op: &str, saved_shape: &[usize], input_shapes: &[Shape]) -> f64 {
    let per_sample = |d: &[usize]| -> f64 {
        if d.len() <= 1 {
            d.iter().product::<usize>().max(1) as f64
        } else {
            d[1..].iter().product::<usize>().max(1) as f64
        }
    };
    match op {
        "conv2d" if saved_shape.len() == 4 => {
            let taps = input_shapes
                .get(1)
                .filter(|w| w.rank() == 4)
                .map_or(1, |w| w.dims()[2] * w.dims()[3]);
            taps as f64 / (saved_shape[2] * saved_shape[3]).max(1) as f64
        }
        "linear" | "matmul" if saved_shape.len() >= 2 => {
            let d = *saved_shape.last().unwrap_or(&1);
            d.max(1) as f64 / per_sample(saved_shape)
        }
        _ => 1.0 / per_sample(saved_shape),
    }
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
    fn amplification_per_op() {
        let shapes =
            |v: &[&[usize]]| -> Vec<Shape> { v.iter().map(|d| Shape::from(d.to_vec())).collect() };
        // 3x3 conv on 8x8 inputs: 9 taps over 64 positions.
        let conv = amplification(
            "conv2d",
            &[4, 16, 8, 8],
            &shapes(&[&[4, 16, 8, 8], &[32, 16, 3, 3]]),
        );
        assert!((conv - 9.0 / 64.0).abs() < 1e-12);
        // Linear on [N, T, d]: 1/T; without tokens: 1.
        assert!((amplification("linear", &[4, 10, 32], &[]) - 0.1).abs() < 1e-12);
        assert!((amplification("linear", &[4, 32], &[]) - 1.0).abs() < 1e-12);
        // Elementwise: 1 / elements per sample.
        assert!((amplification("gelu", &[4, 10, 32], &[]) - 1.0 / 320.0).abs() < 1e-12);
    }

    #[test]
    fn sensitivity_pairs_samples() {
        assert!((analytic_sensitivity(&[1.0, 2.0], &[3.0, 4.0], 0.5) - 5.5).abs() < 1e-12);
        // No batch dimension on one side: totals spread over the samples.
        assert!((analytic_sensitivity(&[3.0], &[1.0, 1.0], 1.0) - 3.0).abs() < 1e-12);
        let t = Tensor::from_slice(&[0.0f32, 1.0, 0.0, 3.0], (2, 2), &candle_core::Device::Cpu)
            .unwrap();
        let e = noise_energy_per_sample(&t, 8).unwrap();
        assert_eq!(e, vec![2.0 * 1.0 / 4.0, 2.0 * 9.0 / 4.0]);
    }

    #[test]
    fn energy_of_known_ranges() {
        // Two samples of 4 elements, group 2: ranges 1, 3 | 0, 2 → 2·(1+9+0+4)/4 = 7.
        let x = [0.0, 1.0, 0.0, 3.0, 5.0, 5.0, -1.0, 1.0];
        assert!((noise_energy_slice(&x, 4, 2) - 7.0).abs() < 1e-12);
        let t = Tensor::from_slice(&x, (2, 4), &candle_core::Device::Cpu).unwrap();
        assert!((noise_energy(&t, 2).unwrap() - 7.0).abs() < 1e-12);
    }
}
