//! Throughput of the CPU quantizer next to a memcpy of the same fp32 bytes.
//!
//! `cargo run --release --example quant_bench [-- <million elements> <repeats>]`
//!
//! Input: 64 samples x 64 channels x 64 x 64 (16M f32 = 64 MiB) of conv-like activations
//! (per-channel scale and shift, half the channels ReLU'd). GB/s counts fp32 input bytes; every
//! figure is the best of several repeats.

use std::hint::black_box;
use std::time::Instant;

use actrain::compress::{dequantize, fill_uniform, quantize, QuantParams};

fn best_of<F: FnMut()>(repeats: usize, mut f: F) -> f64 {
    let mut best = f64::INFINITY;
    for _ in 0..repeats {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed().as_secs_f64());
    }
    best
}

fn activations(n: usize, channel_len: usize) -> Vec<f32> {
    let mut u = vec![0.0f32; 4 * n];
    fill_uniform(123, 0, 0, &mut u);
    (0..n)
        .map(|i| {
            let c = (i / channel_len) % 64;
            // Irwin-Hall(4) ~ Gaussian
            let g = (u[4 * i] + u[4 * i + 1] + u[4 * i + 2] + u[4 * i + 3] - 2.0) * 1.732;
            let v = g * (0.25 + 0.1 * (c % 8) as f32) + 0.05 * (c as f32 - 32.0);
            if c.is_multiple_of(2) {
                v.max(0.0)
            } else {
                v
            }
        })
        .collect()
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let millions: f64 = args.get(1).map_or(Ok(16.777216), |s| s.parse())?;
    let repeats: usize = args.get(2).map_or(Ok(7), |s| s.parse())?;
    let channel_len = 64 * 64;
    let sample_len = 64 * channel_len;
    let n = ((millions * 1e6) as usize / sample_len).max(1) * sample_len;
    let gb = (n * 4) as f64 / 1e9;

    let x = activations(n, channel_len);
    let mut dst = vec![1.0f32; n];
    let memcpy = best_of(repeats, || {
        dst.copy_from_slice(black_box(&x));
        black_box(&dst);
    });
    let mc_gbs = gb / memcpy;

    println!(
        "{} elements ({:.0} MiB fp32), sample_len {sample_len}, group 256, {} rayon threads, best of {repeats}\n",
        n,
        (n * 4) as f64 / (1 << 20) as f64,
        rayon::current_num_threads()
    );
    println!("| op | bits | bits/elem stored | ms | GB/s (fp32) | x memcpy |");
    println!("|---|---|---|---|---|---|");
    println!(
        "| memcpy (copy_from_slice) | 32 | 32 | {:.2} | {:.2} | 1.00 |",
        memcpy * 1e3,
        mc_gbs
    );
    for bits in [1u8, 2, 4, 8] {
        let p = QuantParams::new(bits, 7, 1);
        let mut q = quantize(&x, sample_len, &p)?;
        let tq = best_of(repeats, || {
            q = quantize(black_box(&x), sample_len, &p).expect("finite input");
        });
        let td = best_of(repeats, || {
            dequantize(black_box(&q), &mut dst).expect("sizes match");
        });
        // sanity: error within one step of the widest group
        let max_err = x
            .iter()
            .zip(&dst)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        let max_step = q
            .scales()
            .iter()
            .map(|s| 1.0 / s.to_f32())
            .fold(0.0f32, f32::max);
        anyhow::ensure!(
            max_err <= max_step * 1.001,
            "error {max_err} > step {max_step}"
        );
        for (op, t) in [("quantize+pack", tq), ("unpack+dequantize", td)] {
            println!(
                "| {op} | {bits} | {:.3} | {:.2} | {:.2} | {:.2} |",
                q.bits_per_element(),
                t * 1e3,
                gb / t,
                (gb / t) / mc_gbs
            );
        }
    }
    Ok(())
}
