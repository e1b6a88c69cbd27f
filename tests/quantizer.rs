//! Integration tests of `actrain::compress`: error bounds, unbiasedness, variance, layout,
//! reproducibility, errors, masks and packed uints.

use actrain::compress::{
    dequantize, dequantize_to_vec, fill_uniform, quantize, quantize_samples_into,
    quantize_with_noise, uniform, BitMask, PackedUints, QuantError, QuantParams, QuantizedTensor,
};

const WIDTHS: [u8; 4] = [1, 2, 4, 8];

/// Deterministic test data from the crate's own RNG: `kind` 0 mixed, 1 negative, 2 positive,
/// 3 ReLU-like (half exact zeros), 4 large offset with a small spread.
fn data(n: usize, kind: u32, seed: u64) -> Vec<f32> {
    let mut u = vec![0.0f32; n];
    fill_uniform(seed, 999, 0, &mut u);
    u.iter()
        .enumerate()
        .map(|(i, &v)| {
            let g = (v - 0.5) * 4.0 * (1.0 + (i % 7) as f32);
            match kind {
                0 => g,
                1 => -g.abs() - 0.1,
                2 => g.abs() + 3.0,
                3 => g.max(0.0),
                _ => 1000.0 + v,
            }
        })
        .collect()
}

fn p(bits: u8, group: usize, seed: u64, stream: u64) -> QuantParams {
    QuantParams {
        bits,
        group,
        seed,
        stream,
    }
}

/// Calls `f(flat_range, group_index)` for every group, following the documented grouping.
fn for_each_group(
    len: usize,
    sample_len: usize,
    group: usize,
    mut f: impl FnMut(std::ops::Range<usize>, usize),
) {
    let mut g = 0;
    for s in 0..len / sample_len {
        let mut off = 0;
        while off < sample_len {
            let end = (off + group).min(sample_len);
            f(s * sample_len + off..s * sample_len + end, g);
            g += 1;
            off = end;
        }
    }
}

/// Decodes the codes using only the layout documented in `compress::quantize`.
fn decode_codes(q: &QuantizedTensor) -> Vec<u8> {
    let (b, sl) = (q.bits() as usize, q.sample_len());
    let sb = (sl * b).div_ceil(8);
    let mut out = Vec::with_capacity(q.len());
    for s in 0..q.n_samples() {
        for j in 0..sl {
            let bit = j * b;
            let byte = q.data()[s * sb + bit / 8];
            out.push((byte >> (bit % 8)) & ((1u16 << b) - 1) as u8);
        }
    }
    out
}

/// Stored scale and min of each element's group.
fn per_element_meta(q: &QuantizedTensor) -> (Vec<f32>, Vec<f32>) {
    let (mut scale, mut mn) = (vec![0.0; q.len()], vec![0.0; q.len()]);
    for_each_group(q.len(), q.sample_len(), q.group(), |r, g| {
        for i in r {
            scale[i] = q.scales()[g].to_f32();
            mn[i] = q.mins()[g].to_f32();
        }
    });
    (scale, mn)
}

#[test]
fn round_trip_error_bound() {
    let sizes = [1usize, 7, 255, 256, 257, 1000, 4097];
    for &n in &sizes {
        for sample_len in [n, 1, 7, 257].into_iter().filter(|s| n % s == 0) {
            for kind in 0..5 {
                let x = data(n, kind, n as u64);
                for bits in WIDTHS {
                    let levels = ((1u32 << bits) - 1) as f32;
                    let q = quantize(&x, sample_len, &p(bits, 256, 1, 2)).unwrap();
                    let y = dequantize_to_vec(&q);
                    for_each_group(n, sample_len, 256, |r, g| {
                        let xs = &x[r.clone()];
                        let mn = xs.iter().copied().fold(f32::INFINITY, f32::min);
                        let mx = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                        let (m, s) = (q.mins()[g].to_f32(), q.scales()[g].to_f32());
                        let step = 1.0 / s;
                        // stored metadata: min rounded down, range still covered
                        assert!(m <= mn && (mx - m) * s <= levels);
                        // step is the ideal range/B up to bf16 precision of min and scale
                        let ideal = (mx - mn + mn.abs() / 128.0) / levels;
                        assert!(
                            mx == m || step <= ideal * (1.0 + 1.0 / 64.0),
                            "step {step} ideal {ideal}"
                        );
                        for i in r {
                            let err = (y[i] - x[i]).abs();
                            let slack = 4.0 * f32::EPSILON * (x[i].abs() + m.abs() + step * levels);
                            assert!(
                                err <= step + slack,
                                "n {n} bits {bits} kind {kind} i {i}: {} vs {}",
                                y[i],
                                x[i]
                            );
                        }
                        // for data near zero (|min| <= range) the bound is range/B up to 2%
                        if mn.abs() <= mx - mn && mx > mn {
                            assert!(step <= (mx - mn) / levels * 1.02);
                        }
                    });
                }
            }
        }
    }
}

#[test]
fn constant_groups() {
    for bits in WIDTHS {
        // bf16-representable constants (ReLU zeros, 0.5, -3): reproduced exactly
        for c in [0.0f32, 0.5, -3.0] {
            let x = vec![c; 300];
            let q = quantize(&x, 300, &p(bits, 256, 3, 4)).unwrap();
            assert_eq!(dequantize_to_vec(&q), x);
            assert!(q.data().iter().all(|&b| b == 0));
        }
        // not representable in bf16: stochastic between neighbours, within one step
        let x = vec![0.3f32; 300];
        let q = quantize(&x, 300, &p(bits, 256, 3, 4)).unwrap();
        let y = dequantize_to_vec(&q);
        let step = 1.0 / q.scales()[0].to_f32();
        assert!(y.iter().all(|&v| (v - 0.3).abs() <= step * 1.0001));
    }
}

/// Fails if the mean over `draws` quantizations (seed = draw index) differs from `x` by more
/// than 5 standard errors of stochastic rounding (plus f32 rounding slack), at any element.
fn check_unbiased(
    x: &[f32],
    bits: u8,
    draws: u64,
    quant: impl Fn(u64) -> QuantizedTensor,
) -> Result<(), String> {
    let mut sum = vec![0.0f64; x.len()];
    let mut first = None;
    for seed in 0..draws {
        let q = quant(seed);
        for (s, v) in sum.iter_mut().zip(dequantize_to_vec(&q)) {
            *s += v as f64;
        }
        first.get_or_insert(q);
    }
    let q = first.ok_or("no draws")?;
    let levels = ((1u32 << bits) - 1) as f32;
    let (scale, mn) = per_element_meta(&q);
    for i in 0..x.len() {
        let step = 1.0 / scale[i] as f64;
        let t = (x[i] - mn[i]) * scale[i];
        let frac = (t - t.floor()) as f64;
        let se = (frac * (1.0 - frac) / draws as f64).sqrt() * step;
        let slack =
            8.0 * f32::EPSILON as f64 * ((x[i].abs() + mn[i].abs()) as f64 + step * levels as f64);
        let mean = sum[i] / draws as f64;
        if (mean - x[i] as f64).abs() > 5.0 * se + slack {
            return Err(format!(
                "element {i}: mean {mean} vs x {} (frac {frac}, se {se})",
                x[i]
            ));
        }
    }
    Ok(())
}

#[test]
fn unbiased_at_every_width() {
    let x = data(600, 0, 11);
    for bits in WIDTHS {
        check_unbiased(&x, bits, 2000, |seed| {
            quantize(&x, 300, &p(bits, 256, seed, 5)).unwrap()
        })
        .unwrap_or_else(|e| panic!("bits {bits}: {e}"));
    }
}

#[test]
fn bias_check_detects_biased_rounding() {
    let x = data(600, 0, 11);
    for bits in WIDTHS {
        // round to nearest (u = 0.5 always)
        let nearest = check_unbiased(&x, bits, 2000, |_| {
            quantize_with_noise(&x, 300, &p(bits, 256, 0, 0), |_| 0.5).unwrap()
        });
        assert!(nearest.is_err(), "bits {bits}: round-to-nearest passed");
        // shifted noise u in [0.25, 1.25)
        let shifted = check_unbiased(&x, bits, 2000, |seed| {
            quantize_with_noise(&x, 300, &p(bits, 256, 0, 0), move |i| {
                uniform(seed, 5, i) + 0.25
            })
            .unwrap()
        });
        assert!(shifted.is_err(), "bits {bits}: shifted noise passed");
        // and the same hook with the real noise passes (the hook itself is not biased)
        check_unbiased(&x, bits, 2000, |seed| {
            quantize_with_noise(&x, 300, &p(bits, 256, 0, 0), move |i| uniform(seed, 5, i)).unwrap()
        })
        .unwrap();
    }
}

#[test]
fn variance_matches_theory() {
    let x = data(512, 0, 21);
    let draws = 2000u64;
    for bits in WIDTHS {
        let mut sum = vec![0.0f64; x.len()];
        let mut sum2 = vec![0.0f64; x.len()];
        let q0 = quantize(&x, 512, &p(bits, 256, 0, 9)).unwrap();
        for seed in 0..draws {
            let y = dequantize_to_vec(&quantize(&x, 512, &p(bits, 256, seed, 9)).unwrap());
            for i in 0..x.len() {
                sum[i] += y[i] as f64;
                sum2[i] += (y[i] as f64).powi(2);
            }
        }
        let (scale, mn) = per_element_meta(&q0);
        let (mut tot_emp, mut tot_th, mut bound) = (0.0, 0.0, 0.0);
        let levels = ((1u32 << bits) - 1) as f64;
        for i in 0..x.len() {
            let t = (x[i] - mn[i]) * scale[i];
            let f = (t - t.floor()) as f64;
            let h = 1.0 / scale[i] as f64;
            // design bound: range^2 / (4 B^2), range = B * step
            bound += h * h / 4.0;
            let th = f * (1.0 - f) * h * h;
            let n = draws as f64;
            let mean = sum[i] / n;
            let emp = (sum2[i] / n - mean * mean) * n / (n - 1.0);
            // std error of a Bernoulli sample variance: sqrt((mu4 - sigma^4) / n)
            let mu4 = f * (1.0 - f) * (1.0 - 3.0 * f + 3.0 * f * f) * h.powi(4);
            // plus the second-order term (p_hat - p)^2 that dominates near frac = 1/2
            let se = ((mu4 - th * th).max(0.0) / n).sqrt() + 5.0 * th / n;
            let slack = 1e-5 * h * h
                + (8.0 * f32::EPSILON as f64 * (x[i].abs() as f64 + h * levels)).powi(2);
            assert!(
                (emp - th).abs() <= 5.0 * se + slack,
                "bits {bits} el {i}: var {emp} vs {th}"
            );
            tot_emp += emp;
            tot_th += th;
        }
        assert!(
            (tot_emp / tot_th - 1.0).abs() < 0.03,
            "bits {bits}: {tot_emp} vs {tot_th}"
        );
        assert!(
            tot_emp <= bound * 1.01,
            "bits {bits}: {tot_emp} above range^2/(4B^2) sum {bound}"
        );
    }
}

#[test]
fn codes_match_reference_and_layout() {
    // covers the parallel path (> 64K elements), several sample shapes and short groups
    let cases = [
        (1usize << 17, 1usize << 17),
        (1 << 17, 1000 + 24),
        (3 * 70_001, 70_001),
        (5000, 5000),
        (200_000, 5),
    ];
    for &(n, sl) in &cases {
        let n = n - n % sl;
        let x = data(n, 0, 5);
        for bits in WIDTHS {
            for group in [8usize, 256, 1000] {
                let params = p(bits, group, 42, 7);
                let q = quantize(&x, sl, &params).unwrap();
                assert_eq!(q.data().len(), (n / sl) * (sl * bits as usize).div_ceil(8));
                let codes = decode_codes(&q);
                let levels = (1u32 << bits) - 1;
                for_each_group(n, sl, group, |r, g| {
                    let (m, s) = (q.mins()[g].to_f32(), q.scales()[g].to_f32());
                    for i in r {
                        let t = (x[i] - m) * s;
                        let fl = t.floor();
                        let up = uniform(42, 7, i as u64) < t - fl;
                        let want = (fl as u32 + up as u32).min(levels) as u8;
                        assert_eq!(codes[i], want, "n {n} sl {sl} bits {bits} G {group} i {i}");
                    }
                });
                // padding bits at the end of each sample are zero
                let sb = (sl * bits as usize).div_ceil(8);
                let used = sl * bits as usize % 8;
                if used != 0 {
                    for s in 0..n / sl {
                        assert_eq!(q.data()[s * sb + sb - 1] >> used, 0);
                    }
                }
                // dequantize matches q / s + mn computed from the decoded codes
                let y = dequantize_to_vec(&q);
                for_each_group(n, sl, group, |r, g| {
                    let (m, s) = (q.mins()[g].to_f32(), q.scales()[g].to_f32());
                    for i in r {
                        assert_eq!(y[i], codes[i] as f32 / s + m);
                    }
                });
            }
        }
    }
}

#[test]
fn non_finite_reports_index() {
    for &n in &[100usize, 300_000] {
        for (pos, bad) in [
            (0usize, f32::NAN),
            (57, f32::INFINITY),
            (n - 1, f32::NEG_INFINITY),
            (n / 2 + 3, f32::NAN),
        ] {
            let mut x = data(n, 0, 1);
            x[pos] = bad;
            if n > 1000 {
                x[n - 2] = f32::NAN; // a later bad value must not win in the parallel path
            }
            let pos = pos.min(if n > 1000 { n - 2 } else { pos });
            match quantize(&x, n, &QuantParams::default()) {
                Err(QuantError::NonFinite { index, value }) => {
                    assert_eq!(index, pos);
                    assert_eq!(value.to_bits(), x[pos].to_bits());
                }
                other => panic!("expected NonFinite, got {other:?}"),
            }
        }
    }
}

#[test]
fn bad_parameters_are_errors() {
    let x = data(64, 0, 1);
    for b in [0u8, 3, 5, 16] {
        assert_eq!(
            quantize(&x, 64, &p(b, 256, 0, 0)),
            Err(QuantError::BadBits(b))
        );
    }
    for g in [0usize, 12, 255, (1 << 30) + 8, usize::MAX - 7] {
        assert_eq!(
            quantize(&x, 64, &p(2, g, 0, 0)),
            Err(QuantError::BadGroup(g))
        );
    }
    assert!(matches!(
        quantize(&x, 0, &QuantParams::default()),
        Err(QuantError::BadShape { .. })
    ));
    assert!(matches!(
        quantize(&x, 60, &QuantParams::default()),
        Err(QuantError::BadShape { .. })
    ));
    assert!(matches!(
        quantize(&[-f32::MAX, f32::MAX], 2, &QuantParams::default()),
        Err(QuantError::RangeOverflow { index: 0 })
    ));
    let q = quantize(&x, 64, &QuantParams::default()).unwrap();
    assert_eq!(
        dequantize(&q, &mut [0.0; 63]),
        Err(QuantError::LenMismatch {
            expected: 64,
            got: 63
        })
    );
    // empty tensor
    let e = quantize(&[], 16, &QuantParams::default()).unwrap();
    assert!(e.is_empty() && e.stored_bytes() == 0 && dequantize_to_vec(&e).is_empty());
}

#[test]
fn stored_bytes_2bit() {
    let x = data(256 * 1000, 0, 2);
    for sl in [256usize, 256 * 1000] {
        let q = quantize(&x, sl, &p(2, 256, 0, 0)).unwrap();
        assert_eq!(q.stored_bytes(), 256 * 1000 * 2 / 8 + 1000 * 4);
        assert_eq!(q.bits_per_element(), 2.125);
        let ratio = (x.len() * 4) as f64 / q.stored_bytes() as f64;
        assert!((ratio - 15.06).abs() < 0.005, "{ratio}");
    }
    for (bits, bpe) in [(1u8, 1.125), (4, 4.125), (8, 8.125)] {
        assert_eq!(
            quantize(&x, 256, &p(bits, 256, 0, 0))
                .unwrap()
                .bits_per_element(),
            bpe
        );
    }
}

#[test]
fn reproducible_per_seed_and_stream() {
    let x = data(100_000, 0, 3);
    for bits in WIDTHS {
        let a = quantize(&x, 1000, &p(bits, 256, 1, 2)).unwrap();
        let b = quantize(&x, 1000, &p(bits, 256, 1, 2)).unwrap();
        assert_eq!(a, b);
        let c = quantize(&x, 1000, &p(bits, 256, 1, 3)).unwrap();
        let d = quantize(&x, 1000, &p(bits, 256, 2, 2)).unwrap();
        assert_ne!(a.data(), c.data());
        assert_ne!(a.data(), d.data());
        assert_eq!(a.mins(), c.mins());
    }
}

fn corr(a: &[f32], b: &[f32]) -> f64 {
    let n = a.len() as f64;
    let (ma, mb) = (
        a.iter().map(|&v| v as f64).sum::<f64>() / n,
        b.iter().map(|&v| v as f64).sum::<f64>() / n,
    );
    let cov: f64 = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| (x as f64 - ma) * (y as f64 - mb))
        .sum();
    let va: f64 = a.iter().map(|&x| (x as f64 - ma).powi(2)).sum();
    let vb: f64 = b.iter().map(|&y| (y as f64 - mb).powi(2)).sum();
    cov / (va * vb).sqrt()
}

#[test]
fn rng_statistics() {
    let n = 1 << 20;
    let mut a = vec![0.0f32; n + 1];
    fill_uniform(0, 0, 0, &mut a);
    let mean = a.iter().map(|&v| v as f64).sum::<f64>() / a.len() as f64;
    let var = a.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / a.len() as f64;
    let tol = 5.0 / (n as f64).sqrt();
    assert!(
        (mean - 0.5).abs() < tol * (1.0f64 / 12.0).sqrt(),
        "mean {mean}"
    );
    assert!(
        (var - 1.0 / 12.0).abs() < 5.0 * (1.0 / 180.0 / n as f64).sqrt(),
        "var {var}"
    );
    assert!(corr(&a[..n], &a[1..]).abs() < tol, "lag-1 correlation");
    for (seed, stream) in [(0u64, 1u64), (1, 0), (0, u64::MAX), (12345, 2)] {
        let mut b = vec![0.0f32; n];
        fill_uniform(seed, stream, 0, &mut b);
        assert!(corr(&a[..n], &b).abs() < tol, "({seed},{stream}) vs (0,0)");
    }
    // uniform histogram (16 bins) chi-square, 15 dof: 99.99% quantile ~ 44
    let mut hist = [0usize; 16];
    for &v in &a[..n] {
        hist[(v * 16.0) as usize] += 1;
    }
    let e = n as f64 / 16.0;
    let chi2: f64 = hist.iter().map(|&h| (h as f64 - e).powi(2) / e).sum();
    assert!(chi2 < 44.0, "chi2 {chi2}");
    assert_eq!(a[77], uniform(0, 0, 77));
    // even/odd elements share one 64-bit hash: their joint 16x16 histogram must be flat
    // (chi-square, 255 dof: mean 255, sd 22.6; 370 is ~5 sd)
    let mut joint = vec![0usize; 256];
    for p in a[..n].chunks_exact(2) {
        joint[(p[0] * 16.0) as usize * 16 + (p[1] * 16.0) as usize] += 1;
    }
    let e = (n / 2) as f64 / 256.0;
    let chi2: f64 = joint.iter().map(|&h| (h as f64 - e).powi(2) / e).sum();
    assert!(chi2 < 370.0, "pair chi2 {chi2}");
    let (even, odd): (Vec<f32>, Vec<f32>) = a[..n].chunks_exact(2).map(|p| (p[0], p[1])).unzip();
    assert!(
        corr(&even, &odd).abs() < 5.0 / ((n / 2) as f64).sqrt(),
        "even/odd correlation"
    );
}

#[test]
fn masks_round_trip() {
    for n in [0usize, 1, 63, 64, 65, 1001, 200_003] {
        let x = data(n, 0, 8);
        let m = BitMask::positive(&x);
        assert_eq!(m.len(), n);
        assert_eq!(m.stored_bytes(), n.div_ceil(64) * 8);
        let f = m.to_f32_vec();
        let mut lr = vec![0.0; n];
        m.select_into(&mut lr, 1.0, 0.01).unwrap();
        for i in 0..n {
            assert_eq!(f[i], if x[i] > 0.0 { 1.0 } else { 0.0 });
            assert_eq!(lr[i], if x[i] > 0.0 { 1.0 } else { 0.01 });
        }
        assert_eq!(m.count_ones(), x.iter().filter(|&&v| v > 0.0).count());
        assert!(m.to_f32_into(&mut vec![0.0; n + 1]).is_err());
    }
}

#[test]
fn packed_uints_round_trip() {
    for n in [0usize, 1, 7, 9, 1001, 200_003] {
        for bits in 1..=8u8 {
            let v: Vec<u8> = (0..n)
                .map(|i| ((i * 2_654_435_761usize) >> 7) as u8 & ((1u16 << bits) - 1) as u8)
                .collect();
            let p = PackedUints::pack(&v, bits).unwrap();
            assert_eq!(p.stored_bytes(), (n * bits as usize).div_ceil(8));
            assert_eq!(p.unpack(), v);
        }
    }
    // max-pool 3x3 argmax: 4 bits
    let idx: Vec<u8> = (0..1001).map(|i| (i % 9) as u8).collect();
    let p = PackedUints::pack(&idx, 4).unwrap();
    assert_eq!(p.stored_bytes(), 501);
    assert_eq!(p.get(1000), Some((1000 % 9) as u8));
    assert_eq!(
        PackedUints::pack(&idx, 3),
        Err(QuantError::ValueTooLarge {
            index: 8,
            value: 8,
            bits: 3
        })
    );
    let mut big = vec![0u8; 200_000];
    big[150_001] = 200;
    big[199_999] = 255;
    assert_eq!(
        PackedUints::pack(&big, 7),
        Err(QuantError::ValueTooLarge {
            index: 150_001,
            value: 200,
            bits: 7
        })
    );
    assert_eq!(PackedUints::pack(&idx, 0), Err(QuantError::BadBits(0)));
    assert_eq!(PackedUints::pack(&idx, 9), Err(QuantError::BadBits(9)));
}

/// Unpacking a range of samples gives exactly those rows of the full unpack (chunked backward
/// passes rely on it), at every width and for samples that are not a multiple of the group.
#[test]
fn dequantize_samples_matches_full_dequantize() {
    use actrain::compress::{dequantize_samples, dequantize_to_vec, quantize, QuantParams};
    for bits in [1u8, 2, 4, 8] {
        for sample_len in [7usize, 256, 300, 1000] {
            let n = 9;
            let x: Vec<f32> = (0..n * sample_len)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
                .collect();
            let q = quantize(&x, sample_len, &QuantParams::new(bits, 3, 4)).unwrap();
            let full = dequantize_to_vec(&q);
            for (first, count) in [(0, 1), (2, 3), (8, 1), (0, 9)] {
                let mut part = vec![0f32; count * sample_len];
                dequantize_samples(&q, first, count, &mut part).unwrap();
                assert_eq!(
                    part,
                    full[first * sample_len..(first + count) * sample_len],
                    "bits {bits} len {sample_len} rows {first}+{count}"
                );
            }
            let mut too_far = vec![0f32; 2 * sample_len];
            assert!(dequantize_samples(&q, 8, 2, &mut too_far).is_err());
        }
    }
}

/// Filling a tensor a few samples at a time (`quantize_samples_into`, how an op saves an
/// output it computes in batch chunks) gives exactly the codes and metadata of quantizing it
/// whole: the noise is keyed by the flat index in the whole tensor. Covers every width,
/// samples that end in a short group, uneven chunks, and tensors large enough to be split
/// into parallel units.
#[test]
fn quantizing_in_sample_chunks_is_bit_identical_to_whole() {
    for &bits in &WIDTHS {
        for &(n, sample_len, group) in &[(7, 300, 256), (5, 64, 64), (3, 70_000, 256), (9, 1, 8)] {
            let x = data(n * sample_len, 0, 40 + bits as u64);
            let params = p(bits, group, 123, 7);
            let whole = quantize(&x, sample_len, &params).unwrap();
            for chunk in [1, 2, 4, n] {
                let mut q = QuantizedTensor::for_samples(n, sample_len, &params).unwrap();
                let mut first = 0;
                while first < n {
                    let len = chunk.min(n - first);
                    let part = &x[first * sample_len..(first + len) * sample_len];
                    quantize_samples_into(&mut q, first, part, &params).unwrap();
                    first += len;
                }
                let what = format!("bits {bits}, {n}x{sample_len}, group {group}, chunk {chunk}");
                assert_eq!(q.data(), whole.data(), "{what}: codes");
                assert_eq!(q.mins(), whole.mins(), "{what}: mins");
                assert_eq!(q.scales(), whole.scales(), "{what}: scales");
                assert_eq!(q.len(), whole.len(), "{what}: len");
            }
        }
    }
}

/// A chunk that does not fit the tensor, or other quantizer settings, is an error, not a
/// silent write elsewhere.
#[test]
fn quantizing_in_sample_chunks_rejects_mismatches() {
    let params = p(2, 64, 1, 1);
    let mut q = QuantizedTensor::for_samples(4, 100, &params).unwrap();
    let x = data(200, 0, 3);
    assert!(
        quantize_samples_into(&mut q, 3, &x, &params).is_err(),
        "past the end"
    );
    assert!(
        quantize_samples_into(&mut q, 0, &x[..150], &params).is_err(),
        "partial sample"
    );
    assert!(
        quantize_samples_into(&mut q, 0, &x, &p(4, 64, 1, 1)).is_err(),
        "other bits"
    );
    assert!(
        quantize_samples_into(&mut q, 0, &x, &p(2, 128, 1, 1)).is_err(),
        "other group"
    );
    assert!(quantize_samples_into(&mut q, 2, &x, &params).is_ok());
}
