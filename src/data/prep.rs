//! Shared preparation steps: seeded train/test splits, row gathering, per-channel
//! standardisation and the `limit` cap. Done on plain `Vec`s before any tensor exists, so
//! loaders stay simple and every statistic comes from the training split only (the test
//! split must not leak into normalisation).

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};

use super::rng::permutation;
use super::Split;

/// Number of test samples for `n` samples: `round(n * fraction)`, but at least one of each
/// side whenever `n >= 2` and the fraction is positive, so neither split is silently empty.
pub fn test_count(n: usize, fraction: f32) -> usize {
    if fraction <= 0.0 || n < 2 {
        return 0;
    }
    let t = (n as f64 * fraction as f64).round() as usize;
    t.clamp(1, n - 1)
}

/// Seeded split of `0..n` into (train, test) index lists, each sorted ascending so the
/// stored order does not depend on the shuffle (the `Batcher` shuffles per epoch anyway).
pub fn split_indices(n: usize, fraction: f32, seed: u64) -> (Vec<u32>, Vec<u32>) {
    let perm = permutation(n, seed);
    let n_test = test_count(n, fraction);
    let mut test = perm[..n_test].to_vec();
    let mut train = perm[n_test..].to_vec();
    train.sort_unstable();
    test.sort_unstable();
    (train, test)
}

/// Copies the rows `idx` (each `row_len` long) out of `data`. Indices come from
/// `split_indices` over the same row count, so they are in range by construction.
pub fn gather<T: Copy>(data: &[T], row_len: usize, idx: &[u32]) -> Vec<T> {
    let mut out = Vec::with_capacity(idx.len() * row_len);
    for &i in idx {
        let start = i as usize * row_len;
        if let Some(row) = data.get(start..start + row_len) {
            out.extend_from_slice(row);
        }
    }
    out
}

/// Caps a row-major buffer of `row_len`-long rows at `limit` rows.
pub fn truncate_rows<T>(data: &mut Vec<T>, row_len: usize, limit: Option<usize>) {
    if let Some(l) = limit {
        data.truncate(l.saturating_mul(row_len));
    }
}

/// Standardises samples laid out as `[N, channels, plane]` with per-channel mean and std
/// measured on `train`, applied to both splits. A constant channel keeps std 1 so no NaN
/// appears. Returns the (mean, std) per channel for logging.
pub fn standardise(
    train: &mut [f32],
    test: &mut [f32],
    sample_len: usize,
    channels: usize,
) -> Vec<(f32, f32)> {
    let channels = channels.max(1);
    let plane = (sample_len / channels).max(1);
    let mut sum = vec![0f64; channels];
    let mut sq = vec![0f64; channels];
    let mut count = vec![0u64; channels];
    for (i, &v) in train.iter().enumerate() {
        let c = ((i % sample_len.max(1)) / plane).min(channels - 1);
        sum[c] += v as f64;
        sq[c] += v as f64 * v as f64;
        count[c] += 1;
    }
    let stats: Vec<(f32, f32)> = (0..channels)
        .map(|c| {
            if count[c] == 0 {
                return (0.0, 1.0);
            }
            let mean = sum[c] / count[c] as f64;
            let var = (sq[c] / count[c] as f64 - mean * mean).max(0.0);
            let std = var.sqrt();
            (mean as f32, if std > 1e-8 { std as f32 } else { 1.0 })
        })
        .collect();
    for buf in [train, test] {
        for (i, v) in buf.iter_mut().enumerate() {
            let c = ((i % sample_len.max(1)) / plane).min(channels - 1);
            let (m, s) = stats[c];
            *v = (*v - m) / s;
        }
    }
    stats
}

/// Builds a `Split` of f32 inputs `[N, ...sample_shape]` and u32 labels `[N]` on the CPU.
pub fn image_split(x: Vec<f32>, sample_shape: &[usize], y: Vec<u32>) -> Result<Split> {
    let n = y.len();
    let sample_len: usize = sample_shape.iter().product();
    if x.len() != n * sample_len {
        bail!(
            "internal: {} input values for {n} samples of shape {sample_shape:?}",
            x.len()
        );
    }
    let mut shape = vec![n];
    shape.extend_from_slice(sample_shape);
    Ok(Split {
        x: Tensor::from_vec(x, shape, &Device::Cpu)?,
        y: Tensor::from_vec(y, n, &Device::Cpu)?,
    })
}

/// Builds a `Split` of u32 token ids `[N, seq_len]` and u32 targets `[N, seq_len]`.
pub fn token_split(x: Vec<u32>, y: Vec<u32>, seq_len: usize) -> Result<Split> {
    if x.len() != y.len() || seq_len == 0 || !x.len().is_multiple_of(seq_len) {
        bail!(
            "internal: {} inputs and {} targets for sequences of length {seq_len}",
            x.len(),
            y.len()
        );
    }
    let n = x.len() / seq_len;
    Ok(Split {
        x: Tensor::from_vec(x, (n, seq_len), &Device::Cpu)?,
        y: Tensor::from_vec(y, (n, seq_len), &Device::Cpu)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_count_keeps_both_sides_non_empty() {
        assert_eq!(test_count(10, 0.2), 2);
        assert_eq!(test_count(2, 0.01), 1);
        assert_eq!(test_count(2, 0.99), 1);
        assert_eq!(test_count(1, 0.5), 0);
        assert_eq!(test_count(10, 0.0), 0);
    }

    #[test]
    fn split_is_a_partition() {
        let (tr, te) = split_indices(50, 0.2, 1);
        assert_eq!((tr.len(), te.len()), (40, 10));
        let mut all: Vec<u32> = tr.iter().chain(&te).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..50).collect::<Vec<u32>>());
    }

    #[test]
    fn standardise_per_channel() {
        // 2 samples, 2 channels of 2 values: channel 0 = 1..4, channel 1 constant 5.
        let mut tr = vec![1.0, 2.0, 5.0, 5.0, 3.0, 4.0, 5.0, 5.0];
        let mut te = vec![2.5, 2.5, 5.0, 5.0];
        let stats = standardise(&mut tr, &mut te, 4, 2);
        assert!((stats[0].0 - 2.5).abs() < 1e-6);
        assert_eq!(stats[1], (5.0, 1.0));
        assert_eq!(te, vec![0.0, 0.0, 0.0, 0.0]);
        let m: f32 = [tr[0], tr[1], tr[4], tr[5]].iter().sum::<f32>() / 4.0;
        assert!(m.abs() < 1e-6);
    }
}
