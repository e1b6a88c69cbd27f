//! Runtime CPU-feature dispatch and work splitting shared by the CPU kernels.
//!
//! The crate is built for baseline x86-64 (SSE2), where `floor`, 64-bit multiplies and wide
//! compares do not vectorise. Kernels are written once as `#[inline(always)]` generic code and
//! instantiated inside `#[target_feature]` wrappers; [`isa`] picks one at run time. All
//! variants perform the same IEEE f32 operations (Rust never fuses mul+add), so results are
//! bit-identical whichever runs.

use std::sync::OnceLock;

/// Instruction-set level a kernel wrapper was compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Isa {
    /// AVX-512 F/DQ/BW/VL (native 64-bit lane multiplies for the RNG).
    Avx512,
    /// AVX2 + FMA + BMI2.
    Avx2,
    /// Whatever the crate was compiled for.
    Generic,
}

/// The best level this CPU supports (detected once).
pub(crate) fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(detect)
}

#[cfg(target_arch = "x86_64")]
fn detect() -> Isa {
    if std::is_x86_feature_detected!("avx512f")
        && std::is_x86_feature_detected!("avx512dq")
        && std::is_x86_feature_detected!("avx512bw")
        && std::is_x86_feature_detected!("avx512vl")
        && std::is_x86_feature_detected!("avx2")
        && std::is_x86_feature_detected!("fma")
        && std::is_x86_feature_detected!("bmi2")
    {
        Isa::Avx512
    } else if std::is_x86_feature_detected!("avx2")
        && std::is_x86_feature_detected!("fma")
        && std::is_x86_feature_detected!("bmi2")
    {
        Isa::Avx2
    } else {
        Isa::Generic
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> Isa {
    Isa::Generic
}

/// `Isa` as a const-generic tag for kernels instantiated inside a `#[target_feature]` wrapper.
pub(crate) const ISA_GENERIC: u8 = 0;
pub(crate) const ISA_AVX2: u8 = 1;
pub(crate) const ISA_AVX512: u8 = 2;

/// Tensors at most this long are processed on the calling thread: below it, rayon's
/// fork/join overhead is comparable to the work.
pub(crate) const PAR_MIN_ELEMS: usize = 1 << 16;

/// Target number of elements per parallel work unit.
pub(crate) const UNIT_ELEMS: usize = 1 << 16;

/// `(min, max, has_non_finite)` of a slice. NaN is invisible to min/max comparisons, so
/// non-finite values are detected separately: `v * 0` is NaN iff `v` is NaN or +-Inf.
///
/// LLVM does not reliably vectorise float min/max reductions (no fast-math), so the x86
/// variants use explicit intrinsics. `ISA` must not exceed what the calling wrapper enables.
#[inline(always)]
pub(crate) fn min_max<const ISA: u8>(x: &[f32]) -> (f32, f32, bool) {
    #[cfg(target_arch = "x86_64")]
    {
        if ISA == ISA_AVX512 {
            // SAFETY: only instantiated from `#[target_feature(enable = "avx512f,...")]`
            // wrappers that are called after runtime detection.
            return unsafe { min_max_avx512(x) };
        }
        if ISA == ISA_AVX2 {
            // SAFETY: as above, for avx2.
            return unsafe { min_max_avx2(x) };
        }
    }
    min_max_scalar(x)
}

#[inline(always)]
fn min_max_scalar(x: &[f32]) -> (f32, f32, bool) {
    let (mut mn, mut mx, mut chk) = (f32::INFINITY, f32::NEG_INFINITY, 0.0f32);
    for &v in x {
        mn = if v < mn { v } else { mn };
        mx = if v > mx { v } else { mx };
        chk += v * 0.0;
    }
    (mn, mx, !chk.is_finite())
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
fn min_max_avx512(x: &[f32]) -> (f32, f32, bool) {
    use std::arch::x86_64::*;
    let (chunks, rem) = x.as_chunks::<16>();
    let zero = _mm512_setzero_ps();
    let (mut lo, mut hi, mut chk) = (
        _mm512_set1_ps(f32::INFINITY),
        _mm512_set1_ps(f32::NEG_INFINITY),
        zero,
    );
    for c in chunks {
        // SAFETY: `c` is exactly 16 contiguous f32; unaligned load.
        let v = unsafe { _mm512_loadu_ps(c.as_ptr()) };
        lo = _mm512_min_ps(v, lo);
        hi = _mm512_max_ps(v, hi);
        chk = _mm512_add_ps(chk, _mm512_mul_ps(v, zero));
    }
    let (mn, mx, bad) = min_max_scalar(rem);
    (
        _mm512_reduce_min_ps(lo).min(mn),
        _mm512_reduce_max_ps(hi).max(mx),
        bad || !_mm512_reduce_add_ps(chk).is_finite(),
    )
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
fn min_max_avx2(x: &[f32]) -> (f32, f32, bool) {
    use std::arch::x86_64::*;
    let (chunks, rem) = x.as_chunks::<8>();
    let zero = _mm256_setzero_ps();
    let (mut lo, mut hi, mut chk) = (
        _mm256_set1_ps(f32::INFINITY),
        _mm256_set1_ps(f32::NEG_INFINITY),
        zero,
    );
    for c in chunks {
        // SAFETY: `c` is exactly 8 contiguous f32; unaligned load.
        let v = unsafe { _mm256_loadu_ps(c.as_ptr()) };
        lo = _mm256_min_ps(v, lo);
        hi = _mm256_max_ps(v, hi);
        chk = _mm256_add_ps(chk, _mm256_mul_ps(v, zero));
    }
    let (mut mn, mut mx, bad) = min_max_scalar(rem);
    let (mut l, mut h, mut k) = ([0.0f32; 8], [0.0f32; 8], [0.0f32; 8]);
    // SAFETY: each array holds exactly 8 f32; unaligned stores.
    unsafe {
        _mm256_storeu_ps(l.as_mut_ptr(), lo);
        _mm256_storeu_ps(h.as_mut_ptr(), hi);
        _mm256_storeu_ps(k.as_mut_ptr(), chk);
    }
    let mut acc = 0.0f32;
    for j in 0..8 {
        mn = mn.min(l[j]);
        mx = mx.max(h[j]);
        acc += k[j];
    }
    (mn, mx, bad || !acc.is_finite())
}
