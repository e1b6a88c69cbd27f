//! CPU-vs-GPU bit identity of the compression kernels (`kernels/quantize.cu`).
//!
//! Needs a GPU: build here with `scripts/build-cuda.sh --tests`, run on the GPU machine with
//! `scripts/gpu-check.sh` (or `cargo test --release --features cuda --test cuda` where a GPU
//! and the toolkit both exist). The `#[ignore]`d `bench_*` tests print `BENCH` lines that
//! gpu-check.sh gathers into its table.
#![cfg(feature = "cuda")]

use actrain::compress::cuda::{
    dequantize_cuda, dequantize_samples_cuda, fill_uniform_cuda, mask_pack_cuda, mask_unpack_cuda,
    quantize_cuda, quantize_cuda_variant, quantize_kernel_ms, quantize_variant_kernel_ms,
    uints_pack_cuda, uints_unpack_cuda, CudaCompressError, CudaQuantized, QUANTIZE_VARIANTS,
};
use actrain::compress::{
    self, dequantize_to_vec, uniform, BitMask, PackedUints, QuantError, QuantParams,
};
use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
use candle_core::{CudaDevice, DType, Device, Tensor};
use half::bf16;
use std::time::Instant;

fn gpu() -> Device {
    Device::new_cuda(0).expect("CUDA device 0 (these tests need a GPU)")
}

fn cuda(d: &Device) -> &CudaDevice {
    d.as_cuda_device().expect("cuda device")
}

/// Deterministic test data mixing the cases the quantizer treats differently: ordinary
/// ranges, offsets far larger than the spread, constant runs, subnormals, huge magnitudes,
/// ReLU-like zeros and small integers. Regions of 97 elements straddle group borders.
fn data(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|i| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let u = (s >> 40) as f32 / 16_777_216.0;
            match (i / 97 + seed as usize) % 8 {
                0 => u * 2.0 - 1.0,
                1 => 100.0 + u * 0.01,
                2 => 3.25,
                3 => (u - 0.5) * 1e-39,
                4 => (u - 0.3) * 1e30,
                5 => {
                    if s & 1 == 0 {
                        0.0
                    } else {
                        u
                    }
                }
                6 => ((s >> 8) % 17) as f32 - 8.0,
                _ => -7.5 + u * 1e-3,
            }
        })
        .collect()
}

/// bf16 equality up to the sign of zero: the CPU's own SIMD variants may store a group
/// minimum of +0 or -0 when a group holds both; both dequantize identically.
fn same_bf16(a: bf16, b: bf16) -> bool {
    a.to_bits() == b.to_bits() || (a.to_f32() == 0.0 && b.to_f32() == 0.0)
}

fn assert_bits_eq(gpu: &[f32], cpu: &[f32], what: &str) {
    assert_eq!(gpu.len(), cpu.len(), "{what}: length");
    for (i, (g, c)) in gpu.iter().zip(cpu).enumerate() {
        assert_eq!(
            g.to_bits(),
            c.to_bits(),
            "{what}: element {i}: gpu {g:e} cpu {c:e}"
        );
    }
}

fn assert_same_quant(q: &CudaQuantized, c: &compress::QuantizedTensor, what: &str) {
    assert_eq!(q.len, c.len(), "{what}: len");
    assert_eq!(q.stored_bytes(), c.stored_bytes(), "{what}: stored_bytes");
    let scales = q.scales_to_vec().unwrap();
    assert_eq!(scales.len(), c.scales().len(), "{what}: scales len");
    for (k, (g, h)) in scales.iter().zip(c.scales()).enumerate() {
        assert_eq!(g.to_bits(), h.to_bits(), "{what}: scale of group {k}");
    }
    let mins = q.mins_to_vec().unwrap();
    for (k, (g, h)) in mins.iter().zip(c.mins()).enumerate() {
        assert!(
            same_bf16(*g, *h),
            "{what}: min of group {k}: gpu {g} cpu {h}"
        );
    }
    let data = q.data_to_vec().unwrap();
    assert_eq!(data.len(), c.data().len(), "{what}: data len");
    if let Some(i) = data.iter().zip(c.data()).position(|(a, b)| a != b) {
        panic!(
            "{what}: code byte {i}: gpu {:#04x} cpu {:#04x}",
            data[i],
            c.data()[i]
        );
    }
}

fn quant_case(dev: &Device, n: usize, sl: usize, group: usize, bits: u8, seed: u64) {
    let x = data(n * sl, seed);
    let p = QuantParams {
        bits,
        group,
        seed: seed ^ 0xABCD,
        stream: seed.wrapping_mul(31) + 7,
    };
    let what = format!("n {n} sample_len {sl} group {group} bits {bits}");
    let cpu = compress::quantize(&x, sl, &p).unwrap();
    let t = Tensor::from_slice(&x, (n, sl), dev).unwrap();
    let q = quantize_cuda(&t, sl, &p).unwrap();
    assert_same_quant(&q, &cpu, &what);
    // Every compiled kernel variant, not only the production one (QUANTIZE_VARIANT).
    for &(name, _, _) in QUANTIZE_VARIANTS {
        let qv = quantize_cuda_variant(&t, sl, &p, name).unwrap();
        assert_same_quant(&qv, &cpu, &format!("{what} variant {name}"));
    }
    // Dequantize the GPU codes on the GPU, and the CPU codes on the GPU: both equal the CPU's.
    let want = dequantize_to_vec(&cpu);
    let got = dequantize_cuda(&q, (n, sl)).unwrap();
    assert_eq!(got.dims(), &[n, sl]);
    let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_bits_eq(&got, &want, &format!("{what}: dequantize"));
    let up = CudaQuantized::from_host(
        cuda(dev),
        bits,
        group,
        n * sl,
        sl,
        cpu.data(),
        cpu.mins(),
        cpu.scales(),
    )
    .unwrap();
    let got = dequantize_cuda(&up, n * sl)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_bits_eq(&got, &want, &format!("{what}: dequantize of CPU codes"));
}

#[test]
fn rng_matches_cpu() {
    let dev = gpu();
    for &(seed, stream, start) in &[
        (0u64, 0u64, 0u64),
        (1, 2, 3),
        (42, 7, 1_000_001),
        (u64::MAX, 5, u64::MAX - 700),
    ] {
        let got = fill_uniform_cuda(cuda(&dev), seed, stream, start, 1001).unwrap();
        for (j, g) in got.iter().enumerate() {
            let want = uniform(seed, stream, start.wrapping_add(j as u64));
            assert_eq!(
                g.to_bits(),
                want.to_bits(),
                "seed {seed} stream {stream} i {j}"
            );
        }
    }
    // The pinned values of src/compress/rng.rs.
    let got = fill_uniform_cuda(cuda(&dev), 0, 0, 0, 3).unwrap();
    let two24 = 16_777_216.0f32;
    assert_eq!(
        got,
        vec![2_474_990.0 / two24, 728_592.0 / two24, 6_663_816.0 / two24]
    );
}

#[test]
fn quantize_matches_cpu_every_width_and_odd_sizes() {
    let dev = gpu();
    // (n_samples, sample_len, group). The kernel's paths: team size T = 2..32 lanes per group
    // (groups 8..32 -> 2, 256 -> 16, >= 512 -> 32; up to 4 quads per lane), the register fast
    // path (16-byte aligned start, whole quads, group <= 512) and the general one (odd sample_len: unaligned group starts, odd flat indices
    // for the RNG pairs; tail groups of any length; groups > 256 re-read), bits 1's lane pairs
    // with an odd quad count. quant_case runs every kernel variant (QUANTIZE_VARIANTS: with and without the
    // next-group prefetch, whole-octet lanes at bits 1, whose odd-quad tails are the same
    // shapes) against the CPU.
    let shapes: &[(usize, usize, usize)] = &[
        (1, 1, 256),
        (1, 7, 8),
        (3, 7, 8),
        (2, 9, 8),
        (5, 3, 8),
        (2, 1001, 256),
        (5, 256, 256),
        (4, 257, 64),
        (3, 4099, 1024),
        (2, 96, 8),
        (1, 70_001, 256),
        (7, 3, 16),
        (2, 513, 520),
        (3, 200, 24),
        (5, 101, 24),
        (9, 52, 8),
        (4, 1024, 1024),
        (6, 1028, 1024),
        (3, 1030, 256),
        (2, 4096, 256),
        (33, 260, 128),
        (17, 255, 40),
        (2, 300, 4096),
        (3, 12, 8),
        // Fast-path boundaries of 4 quads per lane: group 512 (T = 32), 32 (T = 2), 48 and 136
        // (partly filled last round), 4-aligned tails with an odd quad count (76 = 64 + 12,
        // 20 = 16 + 4, 520 = 512 + 8).
        (3, 1536, 512),
        (2, 520, 512),
        (4, 96, 32),
        (3, 144, 48),
        (2, 272, 136),
        (5, 76, 64),
        (6, 20, 16),
    ];
    for bits in [1u8, 2, 4, 8] {
        for (k, &(n, sl, g)) in shapes.iter().enumerate() {
            quant_case(&dev, n, sl, g, bits, k as u64 + 10 * bits as u64);
        }
    }
}

/// Above 64K elements the CPU splits the work across threads (and inside long samples):
/// the result must not change, and neither may the GPU's.
#[test]
fn quantize_matches_cpu_large() {
    let dev = gpu();
    for bits in [1u8, 2, 4, 8] {
        quant_case(&dev, 16, 1 << 19, 256, bits, 3);
        quant_case(&dev, 3, 1_000_003, 4096, bits, 4);
        quant_case(&dev, 1000, 3_001, 256, bits, 5);
    }
}

#[test]
fn quantize_non_contiguous_and_offset_inputs() {
    let dev = gpu();
    let (n, sl) = (6, 515);
    let x = data(n * sl, 77);
    let p = QuantParams::new(2, 9, 11);
    // A transposed view: quantize_cuda must read it in row-major order.
    let t = Tensor::from_slice(&x, (sl, n), &dev).unwrap().t().unwrap();
    let xt = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let q = quantize_cuda(&t, sl, &p).unwrap();
    assert_same_quant(&q, &compress::quantize(&xt, sl, &p).unwrap(), "transposed");
    // A narrowed view with a non-zero start offset.
    let big = Tensor::from_slice(&x, (n, sl), &dev).unwrap();
    let part = big.narrow(0, 2, 3).unwrap();
    let xp = &x[2 * sl..5 * sl];
    let q = quantize_cuda(&part, sl, &p).unwrap();
    assert_same_quant(&q, &compress::quantize(xp, sl, &p).unwrap(), "narrowed");
}

#[test]
fn dequantize_samples_matches_cpu() {
    let dev = gpu();
    let (n, sl) = (9, 333);
    let x = data(n * sl, 5);
    let p = QuantParams::new(4, 1, 2);
    let cpu = compress::quantize(&x, sl, &p).unwrap();
    let q = quantize_cuda(&Tensor::from_slice(&x, (n, sl), &dev).unwrap(), sl, &p).unwrap();
    let all = dequantize_to_vec(&cpu);
    let none = dequantize_samples_cuda(&q, 4, 0, (0, sl)).unwrap();
    assert_eq!(none.dims(), &[0, sl]);
    for (first, count) in [(0, 1), (2, 3), (8, 1), (0, 9)] {
        let got = dequantize_samples_cuda(&q, first, count, (count, sl)).unwrap();
        let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_bits_eq(
            &got,
            &all[first * sl..(first + count) * sl],
            &format!("samples {first}+{count}"),
        );
    }
    assert!(dequantize_samples_cuda(&q, 8, 2, (2, sl)).is_err());
    // Every width, with odd sample lengths and first > 0: the data, mins and scales views then
    // start at any byte (u16 / u32 code loads fall back to bytes), outputs at any 4-byte offset.
    for bits in [1u8, 2, 4, 8] {
        for &(n, sl, group) in &[(7usize, 13usize, 8usize), (5, 333, 24), (6, 1001, 256)] {
            let x = data(n * sl, sl as u64 + bits as u64);
            let p = QuantParams {
                bits,
                group,
                seed: 3,
                stream: 4,
            };
            let cpu = compress::quantize(&x, sl, &p).unwrap();
            let all = dequantize_to_vec(&cpu);
            let q = quantize_cuda(&Tensor::from_slice(&x, (n, sl), &dev).unwrap(), sl, &p).unwrap();
            for (first, count) in [(1, 1), (1, n - 1), (3, 2), (n - 1, 1)] {
                let mut want = vec![0.0f32; count * sl];
                compress::dequantize_samples(&cpu, first, count, &mut want).unwrap();
                assert_bits_eq(&want, &all[first * sl..(first + count) * sl], "cpu samples");
                let got = dequantize_samples_cuda(&q, first, count, (count, sl)).unwrap();
                let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                assert_bits_eq(
                    &got,
                    &want,
                    &format!("bits {bits} sample_len {sl} group {group} samples {first}+{count}"),
                );
            }
        }
    }
}

/// Dequantize with uploaded (mins, scales) no quantizer stores, against the CPU's formula
/// `q as f32 / s + mn`: zero, negative, subnormal, infinite and NaN scales and signed-zero
/// mins. The kernel skips the division of a zero code only for positive finite scales
/// (0 / s = +0), so every other scale must still divide (0 / 0 = NaN, 0 / -1 = -0, ...).
#[test]
fn dequantize_any_scale_matches_formula() {
    let dev = gpu();
    let scales: [u16; 12] = [
        0x3F80, 0x4300, 0x7F7F, 0x0001, 0x0040, 0x0080, 0x0000, 0x8000, 0xBF80, 0x7F80, 0x7FC0,
        0x3C00,
    ];
    let mins: [u16; 5] = [0x0000, 0x8000, 0x3FC0, 0xC040, 0x7F00];
    for bits in [1u8, 2, 4, 8] {
        for &(n, sl, group) in &[(3usize, 96usize, 8usize), (4, 13, 8), (2, 77, 16)] {
            let gps = sl.div_ceil(group);
            let ng = n * gps;
            let sb = (sl * bits as usize).div_ceil(8);
            let data: Vec<u8> = (0..n * sb)
                .map(|i| (i as u32).wrapping_mul(2_654_435_761).rotate_left(7) as u8)
                .collect();
            // Every code value shows up: also all-zero bytes.
            let data: Vec<u8> = data
                .iter()
                .enumerate()
                .map(|(i, &b)| if i % 5 == 0 { 0 } else { b })
                .collect();
            let sc: Vec<bf16> = (0..ng)
                .map(|g| bf16::from_bits(scales[g % scales.len()]))
                .collect();
            let mn: Vec<bf16> = (0..ng)
                .map(|g| bf16::from_bits(mins[(g / 3) % mins.len()]))
                .collect();
            let mut want = vec![0.0f32; n * sl];
            for s in 0..n {
                for j in 0..sl {
                    let bit = j * bits as usize;
                    let code = (data[s * sb + bit / 8] >> (bit % 8)) & ((1u16 << bits) - 1) as u8;
                    let g = s * gps + j / group;
                    want[s * sl + j] = code as f32 / sc[g].to_f32() + mn[g].to_f32();
                }
            }
            let up = CudaQuantized::from_host(cuda(&dev), bits, group, n * sl, sl, &data, &mn, &sc)
                .unwrap();
            let got = dequantize_cuda(&up, n * sl)
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    g.to_bits() == w.to_bits() || (g.is_nan() && w.is_nan()),
                    "bits {bits} sample_len {sl} group {group}: element {i}: gpu {g:e} ({:#x}) \
                     want {w:e} ({:#x})",
                    g.to_bits(),
                    w.to_bits()
                );
            }
        }
    }
}

#[test]
fn empty_tensor() {
    let dev = gpu();
    // A zero-element view of real storage (zero-byte device allocations are invalid).
    let t = Tensor::zeros((2, 5), DType::F32, &dev)
        .unwrap()
        .narrow(0, 0, 0)
        .unwrap();
    let q = quantize_cuda(&t, 5, &QuantParams::default()).unwrap();
    assert_eq!(q.stored_bytes(), 0);
    assert_eq!(q.data_to_vec().unwrap(), Vec::<u8>::new());
    assert_eq!(q.mins_to_vec().unwrap(), Vec::<bf16>::new());
    let d = dequantize_cuda(&q, (0, 5)).unwrap();
    assert_eq!(d.dims(), &[0, 5]);
    let m = mask_pack_cuda(&t).unwrap();
    assert_eq!((m.len, m.stored_bytes()), (0, 0));
    assert_eq!(
        mask_unpack_cuda(&m, 1.0, 0.0, (0, 5)).unwrap().dims(),
        &[0, 5]
    );
}

fn quant_err(r: Result<CudaQuantized, CudaCompressError>) -> QuantError {
    match r {
        Err(CudaCompressError::Quant(e)) => e,
        Err(e) => panic!("expected a QuantError, got {e}"),
        Ok(_) => panic!("expected an error"),
    }
}

#[test]
fn errors_match_cpu() {
    let dev = gpu();
    let sl = 1000;
    let p = QuantParams::new(2, 0, 0);
    let cases: Vec<(Vec<(usize, f32)>, &str)> = vec![
        (vec![(777, f32::NAN)], "nan"),
        (
            vec![(1500, f32::INFINITY), (1800, f32::NAN)],
            "inf before nan",
        ),
        (
            vec![(1800, f32::NAN), (1500, f32::NEG_INFINITY)],
            "-inf before nan",
        ),
        (vec![(512, -f32::MAX), (513, f32::MAX)], "range overflow"),
        (
            vec![(300, -f32::MAX), (301, f32::MAX), (1900, f32::NAN)],
            "overflow before nan",
        ),
        (
            vec![
                (300, f32::NAN),
                (2000 + 256, -f32::MAX),
                (2000 + 257, f32::MAX),
            ],
            "nan before overflow",
        ),
    ];
    run_error_cases(&dev, sl, &p, cases);
    // Group 1024 (4 quads per lane, general path) with an odd sample_len (unaligned groups):
    // the first non-finite element of a group sits in a later lane / round than another one.
    let sl = 2053;
    let p = QuantParams {
        group: 1024,
        ..QuantParams::new(4, 0, 0)
    };
    let cases: Vec<(Vec<(usize, f32)>, &str)> = vec![
        (
            vec![(2053 + 700, f32::NAN), (2053 + 5, f32::INFINITY)],
            "late lane",
        ),
        (
            vec![(2053 + 1024 + 900, f32::NAN), (2053 + 1024 + 131, f32::NAN)],
            "later round first",
        ),
        (
            vec![(4 * 2053 - 1, f32::NAN), (4 * 2053 - 3, f32::NAN)],
            "tail group",
        ),
        (
            vec![(2 * 2053 + 3, -f32::MAX), (2 * 2053 + 1000, f32::MAX)],
            "overflow, unaligned group",
        ),
        (
            vec![
                (2 * 2053 + 1030, f32::NAN),
                (2053 + 2048, -f32::MAX),
                (2053 + 2050, f32::MAX),
            ],
            "tail group overflow before a later nan",
        ),
    ];
    run_error_cases(&dev, sl, &p, cases);
    // Group 8 (teams of 2 lanes, 16 groups per warp), aligned: errors of different teams of
    // one warp, the first in memory order wins.
    let sl = 64;
    let p = QuantParams {
        group: 8,
        ..QuantParams::new(1, 0, 0)
    };
    let cases: Vec<(Vec<(usize, f32)>, &str)> = vec![
        (
            vec![(64 + 7, f32::NAN), (64 + 9, f32::NEG_INFINITY)],
            "group 8 nan",
        ),
        (
            vec![(64 + 13, f32::NAN), (64 + 2, -f32::MAX), (64 + 5, f32::MAX)],
            "group 8 overflow",
        ),
        (
            vec![(64 + 30, f32::INFINITY), (64 + 29, f32::NAN)],
            "group 8 second quad",
        ),
    ];
    run_error_cases(&dev, sl, &p, cases);

    let t = Tensor::zeros(12, DType::F32, &dev).unwrap();
    for (p, sl) in [
        (
            QuantParams {
                bits: 3,
                ..QuantParams::default()
            },
            12,
        ),
        (
            QuantParams {
                group: 12,
                ..QuantParams::default()
            },
            12,
        ),
        (QuantParams::default(), 5),
        (QuantParams::default(), 0),
    ] {
        let want = compress::quantize(&[0.0; 12], sl, &p).unwrap_err();
        assert_eq!(quant_err(quantize_cuda(&t, sl, &p)), want);
    }
}

/// Pokes values into 4 samples of `data` and compares the GPU's error with the CPU's.
fn run_error_cases(
    dev: &Device,
    sl: usize,
    p: &QuantParams,
    cases: Vec<(Vec<(usize, f32)>, &str)>,
) {
    for (pokes, what) in cases {
        let mut x = data(4 * sl, 1);
        for &(i, v) in &pokes {
            x[i] = v;
        }
        let want = compress::quantize(&x, sl, p).unwrap_err();
        let t = Tensor::from_slice(&x, (4, sl), dev).unwrap();
        for &(name, _, _) in QUANTIZE_VARIANTS {
            let what = format!("{what} (variant {name})");
            let got = quant_err(quantize_cuda_variant(&t, sl, p, name));
            match (got, want) {
                (
                    QuantError::NonFinite {
                        index: a,
                        value: va,
                    },
                    QuantError::NonFinite {
                        index: b,
                        value: vb,
                    },
                ) => {
                    assert_eq!(a, b, "{what}");
                    assert_eq!(va.to_bits(), vb.to_bits(), "{what}");
                }
                (g, w) => assert_eq!(g, w, "{what}"),
            }
        }
    }
}

#[test]
fn mask_matches_cpu() {
    let dev = gpu();
    for len in [1usize, 31, 63, 64, 65, 131, 4096, 100_003, (1 << 20) + 5] {
        let mut x = data(len, len as u64);
        for (i, v) in x.iter_mut().enumerate() {
            match i % 11 {
                0 => *v = f32::NAN,
                1 => *v = -0.0,
                2 => *v = 0.0,
                3 => *v = -*v,
                _ => {}
            }
        }
        let cpu = BitMask::positive(&x);
        let m = mask_pack_cuda(&Tensor::from_slice(&x, len, &dev).unwrap()).unwrap();
        assert_eq!(m.stored_bytes(), cpu.stored_bytes());
        assert_eq!(m.words_to_vec().unwrap(), cpu.words(), "len {len}");
        let mut want = vec![0.0f32; len];
        cpu.select_into(&mut want, 1.0, 0.01).unwrap();
        let got = mask_unpack_cuda(&m, 1.0, 0.01, len).unwrap();
        assert_bits_eq(
            &got.to_vec1::<f32>().unwrap(),
            &want,
            &format!("mask len {len}"),
        );
    }
}

#[test]
fn uints_match_cpu() {
    let dev = gpu();
    for bits in 1..=8u8 {
        for len in [1usize, 7, 8, 9, 77, 4099, 100_001] {
            let v: Vec<u8> = (0..len as u64)
                .map(|i| ((i * 2_654_435_761 + 12345) >> 7) as u8 & ((1u16 << bits) - 1) as u8)
                .collect();
            let cpu = PackedUints::pack(&v, bits).unwrap();
            let t = Tensor::from_slice(&v, len, &dev).unwrap();
            let p = uints_pack_cuda(&t, bits).unwrap();
            assert_eq!(p.stored_bytes(), cpu.stored_bytes());
            assert_eq!(
                p.data_to_vec().unwrap(),
                cpu.data(),
                "bits {bits} len {len}"
            );
            let back = uints_unpack_cuda(&p, len).unwrap().to_vec1::<u8>().unwrap();
            assert_eq!(back, v, "bits {bits} len {len}");
            // Values not 16-byte aligned (a view 3 bytes into its buffer).
            if len > 3 {
                let view = Tensor::from_slice(&v, len, &dev)
                    .unwrap()
                    .narrow(0, 3, len - 3)
                    .unwrap();
                let cpu = PackedUints::pack(&v[3..], bits).unwrap();
                let p = uints_pack_cuda(&view, bits).unwrap();
                assert_eq!(
                    p.data_to_vec().unwrap(),
                    cpu.data(),
                    "bits {bits} len {len} view"
                );
            }
        }
        if bits < 8 {
            let mut v = vec![0u8; 5000];
            v[4000] = 1 << bits;
            v[1234] = 255;
            let want = PackedUints::pack(&v, bits).unwrap_err();
            let got = uints_pack_cuda(&Tensor::from_slice(&v, 5000, &dev).unwrap(), bits);
            match got {
                Err(CudaCompressError::Quant(e)) => assert_eq!(e, want),
                _ => panic!("bits {bits}: expected ValueTooLarge"),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Benchmarks (`#[ignore]`d). Each prints `BENCH` lines for scripts/gpu-check.sh's table:
// milliseconds (median of REPS timed runs after a warm-up), bytes moved (read + written,
// metadata included), GB/s (1e9 bytes) and that as a percentage of the device-to-device copy
// bandwidth measured in the same run (`BENCH copy`, also read + written).

const REPS: usize = 30;

fn median(mut v: Vec<f32>) -> f64 {
    assert!(!v.is_empty());
    v.sort_by(f32::total_cmp);
    v[v.len() / 2] as f64
}

/// GPU time of each of `reps` back-to-back calls of `f` (CUDA events recorded between the
/// calls on the device's stream, no host synchronisation in between), after one warm-up call.
/// Right for calls that only enqueue work (allocations from candle's stream-ordered pool,
/// launches); the median hides launch gaps at the start.
fn event_ms<F: FnMut()>(dev: &Device, reps: usize, mut f: F) -> f64 {
    let stream = cuda(dev).cuda_stream();
    let timing = Some(CUevent_flags::CU_EVENT_DEFAULT);
    f();
    let mut events = vec![stream.record_event(timing).unwrap()];
    for _ in 0..reps {
        f();
        events.push(stream.record_event(timing).unwrap());
    }
    let ms = events
        .windows(2)
        .map(|w| w[0].elapsed_ms(&w[1]).unwrap())
        .collect();
    median(ms)
}

/// Wall time of each of `reps` calls of `f` that synchronise themselves (quantize_cuda reads
/// its error flag), after one warm-up call.
fn host_ms<F: FnMut()>(dev: &Device, reps: usize, mut f: F) -> f64 {
    f();
    dev.synchronize().unwrap();
    let ms = (0..reps)
        .map(|_| {
            let t0 = Instant::now();
            f();
            t0.elapsed().as_secs_f32() * 1e3
        })
        .collect();
    median(ms)
}

/// Device-to-device copy of `bytes` bytes (cuMemcpyDtoDAsync on the device's stream): GB/s of
/// bytes read + written. The reference for every kernel's percentage.
fn copy_gbps(dev: &Device, bytes: usize) -> f64 {
    let stream = cuda(dev).cuda_stream();
    let src = stream.alloc_zeros::<u8>(bytes).unwrap();
    let mut dst = stream.alloc_zeros::<u8>(bytes).unwrap();
    let ms = event_ms(dev, REPS, || stream.memcpy_dtod(&src, &mut dst).unwrap());
    let gbps = 2.0 * bytes as f64 / (ms * 1e6);
    println!(
        "BENCH copy MB={:.1} ms={ms:.4} GBps={gbps:.0}",
        2.0 * bytes as f64 / 1e6
    );
    gbps
}

fn bench_line(what: &str, ms: f64, bytes: usize, copy: f64, extra: &str) {
    let gbps = bytes as f64 / (ms * 1e6);
    println!(
        "BENCH {what} ms={ms:.4} MB={:.1} GBps={gbps:.0} copy%={:.0}{extra}",
        bytes as f64 / 1e6,
        100.0 * gbps / copy
    );
}

/// Quantize / dequantize throughput at every width, 64M f32 (256 MiB), group 256.
/// `quantize`: the kernel alone (quantize_kernel_ms: back-to-back launches into preallocated
/// outputs); `call_ms`: the whole quantize_cuda call (allocations, kernel, one stream
/// synchronisation for the error flag), host clock. `quantize-<variant>`: each compiled kernel
/// variant alone (QUANTIZE_VARIANTS), for picking
/// QUANTIZE_VARIANT. `dequantize`: dequantize_cuda calls
/// (allocation from the pool + kernel), CUDA events.
/// `cargo test --release --features cuda --test cuda -- --ignored --nocapture bench_`
#[test]
#[ignore]
fn bench_quantize() {
    let dev = gpu();
    let (n, sl) = (64usize, 1usize << 20);
    let len = n * sl;
    let x = data(len, 9);
    let t = Tensor::from_slice(&x, (n, sl), &dev).unwrap();
    let copy = copy_gbps(&dev, len * 4);
    for bits in [1u8, 2, 4, 8] {
        let p = QuantParams::new(bits, 1, 2);
        let q = quantize_cuda(&t, sl, &p).unwrap();
        let moved = len * 4 + q.stored_bytes();
        let kernel = median(quantize_kernel_ms(&t, sl, &p, REPS).unwrap());
        // Every kernel variant (the production one is also the plain `quantize` line).
        for &(name, _, _) in QUANTIZE_VARIANTS {
            let ms = median(quantize_variant_kernel_ms(&t, sl, &p, name, REPS).unwrap());
            bench_line(&format!("quantize-{name} bits={bits}"), ms, moved, copy, "");
        }
        let call = host_ms(&dev, REPS, || {
            quantize_cuda(&t, sl, &p).unwrap();
        });
        bench_line(
            &format!("quantize bits={bits}"),
            kernel,
            moved,
            copy,
            &format!(" call_ms={call:.3}"),
        );
        let deq = event_ms(&dev, REPS, || {
            dequantize_cuda(&q, (n, sl)).unwrap();
        });
        bench_line(&format!("dequantize bits={bits}"), deq, moved, copy, "");
    }
}

/// mask_pack / mask_unpack throughput, 64M elements, CUDA events.
#[test]
#[ignore]
fn bench_masks() {
    let dev = gpu();
    let len = 1usize << 26;
    let x = data(len, 3);
    let t = Tensor::from_slice(&x, len, &dev).unwrap();
    let copy = copy_gbps(&dev, len * 4);
    let m = mask_pack_cuda(&t).unwrap();
    let moved = len * 4 + m.stored_bytes();
    let pack = event_ms(&dev, REPS, || {
        mask_pack_cuda(&t).unwrap();
    });
    bench_line("mask_pack", pack, moved, copy, "");
    let unpack = event_ms(&dev, REPS, || {
        mask_unpack_cuda(&m, 1.0, 0.0, len).unwrap();
    });
    bench_line("mask_unpack", unpack, moved, copy, "");
}

/// uints_pack / uints_unpack (pool argmax indices) throughput at widths 1/2/4/8, 256M values.
/// Pack: whole uints_pack_cuda calls (allocation, kernel, one synchronisation for the error
/// flag), host clock; unpack: uints_unpack_cuda calls, CUDA events.
#[test]
#[ignore]
fn bench_uints() {
    let dev = gpu();
    let len = 1usize << 28;
    let copy = copy_gbps(&dev, len);
    for bits in [1u8, 2, 4, 8] {
        let v: Vec<u8> = (0..len)
            .map(|i| {
                ((i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 59) as u8
                    & ((1u16 << bits) - 1) as u8
            })
            .collect();
        let t = Tensor::from_slice(&v, len, &dev).unwrap();
        let packed = uints_pack_cuda(&t, bits).unwrap();
        let moved = len + (len * bits as usize).div_ceil(8);
        let pack = host_ms(&dev, REPS, || {
            uints_pack_cuda(&t, bits).unwrap();
        });
        bench_line(&format!("uints_pack bits={bits}"), pack, moved, copy, "");
        let unpack = event_ms(&dev, REPS, || {
            uints_unpack_cuda(&packed, len).unwrap();
        });
        bench_line(
            &format!("uints_unpack bits={bits}"),
            unpack,
            moved,
            copy,
            "",
        );
    }
}
