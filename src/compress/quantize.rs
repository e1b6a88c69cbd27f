//! Per-group stochastic-rounding quantizer (1/2/4/8 bits, bf16 min and scale per group).
//!
//! # Algorithm (per group of at most G contiguous elements inside one sample)
//!
//! ```text
//! B   = 2^bits - 1
//! mn  = bf16_round_toward_neg_inf(min(x))           // stored
//! r   = max(x) - mn                                 // f32
//! s   = r == 0 ? bf16::MAX                          // constant group: every q = 0, x' = mn exactly
//!              : largest bf16 <= B / r such that (max(x) - mn) * s <= B in f32   // stored
//! t   = (x - mn) * s                                // f32, in [0, B] by construction
//! q   = floor(t) + (u < t - floor(t))               // u = rng::uniform(seed, stream, flat index)
//! x'  = q / s + mn                                  // dequantize, f32 (IEEE division)
//! ```
//!
//! *Why round the metadata first, and in those directions:* dequantisation only sees the
//! stored bf16 `mn`/`s`, so quantising with the unrounded f32 values (as ActNN does) makes
//! `E[x']` differ from `x` by the rounding error. With the rounded values, `E[q] = t` gives
//! `E[x'] = x` up to f32 arithmetic. Rounding `mn` down keeps `x - mn >= 0`, and choosing `s`
//! down (re-checked against the f32 product) keeps `t <= B`, so every value maps into
//! `[0, B]` and no clamp ever fires; a clamp would pull the mean of the edge values inward
//! (bias). The price is a slightly coarser step, `1/s ~<= (max - min + 2^-7 |min|) / B * (1 + 2^-7)`:
//! a group whose offset dwarfs its spread (|min| >> max - min) loses resolution to the bf16
//! min, as in ActNN.
//!
//! *Why `floor(t) + (u < frac(t))` rather than `floor(t + u)`:* both are stochastic rounding
//! with `P(round up) = frac(t)`, but `t + u` is itself rounded to f32 near `t`'s magnitude
//! (ulp 2^-16 at t ~ 255), which biases the up-probability by up to half an ulp. The
//! comparison is exact, so the only residual bias is the 2^-24 resolution of `u`.
//!
//! CUDA parity: compute `t` with `__fsub_rn`/`__fmul_rn` (no FMA contraction) and `x'` with
//! `__fdiv_rn`/`__fadd_rn`; `floorf(t)` (equal to `(float)(int)t` since `0 <= t <= 255`).
//!
//! # Packed layout
//!
//! `n = len / sample_len` samples, `gps = ceil(sample_len / G)` groups per sample. Group
//! `(n, k)` covers flat elements `[n*sample_len + k*G, n*sample_len + min((k+1)*G, sample_len))`
//! and its metadata is `mins[n*gps + k]`, `scales[n*gps + k]`.
//! Each sample owns `sb = ceil(sample_len * bits / 8)` bytes starting at byte `n*sb`, holding a
//! dense little-endian bitstream: element `j` of the sample occupies stream bits
//! `[j*bits, (j+1)*bits)`, stream bit `k` being bit `k % 8` (LSB = 0) of byte `k / 8`.
//! Since `G*bits` is a multiple of 8, group `k` starts at byte `n*sb + k*G*bits/8`. Padding
//! bits at the end of a sample are zero. `stored_bytes = data + 2*mins + 2*scales`.

use half::bf16;
use rayon::prelude::*;

use super::cpu::{self, Isa};
use super::error::QuantError;
use super::rng;

/// Default group size: 256 elements share one bf16 min and scale (0.125 bit/element).
pub const DEFAULT_GROUP: usize = 256;

/// Largest accepted group size (keeps `group * bits` far from overflow).
pub const MAX_GROUP: usize = 1 << 30;

/// Elements processed per inner block (multiple of 8 so blocks pack into whole bytes).
const BLOCK: usize = 64;

/// Quantizer settings for one tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuantParams {
    /// Bits per element: 1, 2, 4 or 8.
    pub bits: u8,
    /// Group size G (positive multiple of 8, at most [`MAX_GROUP`]); groups never cross samples.
    pub group: usize,
    /// Run-level seed (e.g. per iteration).
    pub seed: u64,
    /// Tensor id: decorrelates the noise of different tensors under the same seed.
    pub stream: u64,
}

impl Default for QuantParams {
    fn default() -> Self {
        Self {
            bits: 2,
            group: DEFAULT_GROUP,
            seed: 0,
            stream: 0,
        }
    }
}

impl QuantParams {
    /// `bits` with the default group size.
    pub fn new(bits: u8, seed: u64, stream: u64) -> Self {
        Self {
            bits,
            group: DEFAULT_GROUP,
            seed,
            stream,
        }
    }

    fn validate(&self) -> Result<(), QuantError> {
        if !matches!(self.bits, 1 | 2 | 4 | 8) {
            return Err(QuantError::BadBits(self.bits));
        }
        if self.group == 0 || !self.group.is_multiple_of(8) || self.group > MAX_GROUP {
            return Err(QuantError::BadGroup(self.group));
        }
        Ok(())
    }
}

/// A quantized tensor: packed codes plus bf16 min and scale per group (layout: module doc).
#[derive(Clone, PartialEq)]
pub struct QuantizedTensor {
    bits: u8,
    group: usize,
    len: usize,
    sample_len: usize,
    mins: Vec<bf16>,
    scales: Vec<bf16>,
    data: Vec<u8>,
}

impl QuantizedTensor {
    /// Bytes actually held: packed codes + bf16 mins + bf16 scales.
    pub fn stored_bytes(&self) -> usize {
        self.data.len() + 2 * self.mins.len() + 2 * self.scales.len()
    }
    /// Average stored bits per element (0 for an empty tensor).
    pub fn bits_per_element(&self) -> f64 {
        if self.len == 0 {
            0.0
        } else {
            self.stored_bytes() as f64 * 8.0 / self.len as f64
        }
    }
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Bits per element of the codes.
    pub fn bits(&self) -> u8 {
        self.bits
    }
    pub fn group(&self) -> usize {
        self.group
    }
    pub fn sample_len(&self) -> usize {
        self.sample_len
    }
    pub fn n_samples(&self) -> usize {
        self.len.checked_div(self.sample_len).unwrap_or(0)
    }
    /// Per-group stored minimum (sample-major).
    pub fn mins(&self) -> &[bf16] {
        &self.mins
    }
    /// Per-group stored scale; the group's quantisation step is `1/scale` and its covered
    /// range `(2^bits - 1) / scale` (about 0 for constant groups, whose scale is bf16::MAX).
    pub fn scales(&self) -> &[bf16] {
        &self.scales
    }
    /// Packed codes.
    pub fn data(&self) -> &[u8] {
        &self.data
    }
}

/// Summary only: the payload can be megabytes.
impl std::fmt::Debug for QuantizedTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuantizedTensor")
            .field("bits", &self.bits)
            .field("group", &self.group)
            .field("len", &self.len)
            .field("sample_len", &self.sample_len)
            .field("stored_bytes", &self.stored_bytes())
            .finish_non_exhaustive()
    }
}

/// Quantizes `x` (contiguous, `len = n_samples * sample_len`) with counter-based noise.
pub fn quantize(
    x: &[f32],
    sample_len: usize,
    p: &QuantParams,
) -> Result<QuantizedTensor, QuantError> {
    let noise = CounterNoise {
        key: rng::stream_key(p.seed, p.stream),
    };
    quantize_impl(x, sample_len, p, &noise)
}

/// [`quantize`] with caller-supplied noise `u = noise(flat_index)`; `p.seed`/`p.stream` are
/// ignored. Exists so tests can show the unbiasedness check catches a biased rounding
/// (e.g. `|_| 0.5` is round-to-nearest). Not for production use.
#[doc(hidden)]
pub fn quantize_with_noise<F>(
    x: &[f32],
    sample_len: usize,
    p: &QuantParams,
    noise: F,
) -> Result<QuantizedTensor, QuantError>
where
    F: Fn(u64) -> f32 + Sync,
{
    quantize_impl(x, sample_len, p, &FnNoise(noise))
}

/// Dequantizes into `out` (`out.len()` must equal `q.len()`).
pub fn dequantize(q: &QuantizedTensor, out: &mut [f32]) -> Result<(), QuantError> {
    dequantize_parts(q, q.len, &q.data, &q.mins, &q.scales, out)
}

/// Dequantizes samples `first..first + count` only, into `out` (`count * sample_len`
/// elements). Backward passes that work in batch chunks unpack one chunk at a time, so the
/// full-precision temporary is a chunk, not the whole tensor.
pub fn dequantize_samples(
    q: &QuantizedTensor,
    first: usize,
    count: usize,
    out: &mut [f32],
) -> Result<(), QuantError> {
    if first + count > q.n_samples() {
        return Err(QuantError::BadShape {
            len: (first + count) * q.sample_len,
            sample_len: q.sample_len,
        });
    }
    let sample_bytes = (q.sample_len * q.bits as usize).div_ceil(8);
    let groups = q.sample_len.div_ceil(q.group);
    dequantize_parts(
        q,
        count * q.sample_len,
        &q.data[first * sample_bytes..(first + count) * sample_bytes],
        &q.mins[first * groups..(first + count) * groups],
        &q.scales[first * groups..(first + count) * groups],
        out,
    )
}

/// The dequantization kernel over whole samples given as slices of `q`'s buffers.
fn dequantize_parts(
    q: &QuantizedTensor,
    len: usize,
    data: &[u8],
    mins: &[bf16],
    scales: &[bf16],
    out: &mut [f32],
) -> Result<(), QuantError> {
    if out.len() != len {
        return Err(QuantError::LenMismatch {
            expected: len,
            got: out.len(),
        });
    }
    if len == 0 {
        return Ok(());
    }
    let isa = cpu::isa();
    if len <= cpu::PAR_MIN_ELEMS {
        let mut span = DeqSpan {
            out,
            seg_len: q.sample_len,
            data,
            mins,
            scales,
        };
        dequant_dispatch(isa, q.bits, q.group, &mut span);
        return Ok(());
    }
    let units = plan(len, q.sample_len, q.group, q.bits);
    let mut jobs = Vec::with_capacity(units.len());
    let (mut o, mut d, mut m, mut s) = (out, data, mins, scales);
    for u in &units {
        let (o0, o1) = o.split_at_mut(u.elems);
        let (d0, d1) = d.split_at(u.bytes);
        let (m0, m1) = m.split_at(u.groups);
        let (s0, s1) = s.split_at(u.groups);
        (o, d, m, s) = (o1, d1, m1, s1);
        jobs.push(DeqSpan {
            out: o0,
            seg_len: u.seg_len,
            data: d0,
            mins: m0,
            scales: s0,
        });
    }
    let (bits, group) = (q.bits, q.group);
    jobs.into_par_iter()
        .for_each(|mut span| dequant_dispatch(isa, bits, group, &mut span));
    Ok(())
}

/// Dequantizes into a new vector.
pub fn dequantize_to_vec(q: &QuantizedTensor) -> Vec<f32> {
    let mut out = vec![0.0; q.len];
    // Cannot fail: `out` has exactly `q.len()` elements.
    let _ = dequantize(q, &mut out);
    out
}

// ---------------------------------------------------------------------------------------------
// Noise sources

/// Fills a block of noise for consecutive flat indices.
trait Noise: Sync {
    fn fill(&self, start: u64, out: &mut [f32]);
}

struct CounterNoise {
    key: u64,
}

impl Noise for CounterNoise {
    #[inline(always)]
    fn fill(&self, start: u64, out: &mut [f32]) {
        rng::fill_uniform_keyed(self.key, start, out);
    }
}

struct FnNoise<F>(F);

impl<F: Fn(u64) -> f32 + Sync> Noise for FnNoise<F> {
    #[inline(always)]
    fn fill(&self, start: u64, out: &mut [f32]) {
        for (j, o) in out.iter_mut().enumerate() {
            *o = (self.0)(start.wrapping_add(j as u64));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Driver: validation, allocation, splitting into parallel units

fn quantize_impl<N: Noise>(
    x: &[f32],
    sample_len: usize,
    p: &QuantParams,
    noise: &N,
) -> Result<QuantizedTensor, QuantError> {
    p.validate()?;
    let len = x.len();
    if sample_len == 0 || !len.is_multiple_of(sample_len) {
        return Err(QuantError::BadShape { len, sample_len });
    }
    let mut q = QuantizedTensor::for_samples(len / sample_len, sample_len, p)?;
    let (data, mins, scales) = (&mut q.data[..], &mut q.mins[..], &mut q.scales[..]);
    quantize_spans(x, sample_len, p, noise, 0, data, mins, scales)?;
    Ok(q)
}

impl QuantizedTensor {
    /// An all-zero tensor of `n_samples` samples of `sample_len` elements at `p`'s bits and
    /// group, to be filled a few samples at a time by [`quantize_samples_into`].
    pub fn for_samples(
        n_samples: usize,
        sample_len: usize,
        p: &QuantParams,
    ) -> Result<Self, QuantError> {
        p.validate()?;
        if sample_len == 0 {
            return Err(QuantError::BadShape { len: 0, sample_len });
        }
        let gps = sample_len.div_ceil(p.group);
        let sb = (sample_len * p.bits as usize).div_ceil(8);
        Ok(QuantizedTensor {
            bits: p.bits,
            group: p.group,
            len: n_samples * sample_len,
            sample_len,
            mins: vec![bf16::ZERO; n_samples * gps],
            scales: vec![bf16::ZERO; n_samples * gps],
            data: vec![0u8; n_samples * sb],
        })
    }
}

/// Quantizes whole samples `first..first + x.len() / sample_len` of `q` from `x`. The noise
/// of each element is keyed by its flat index in the whole tensor, so filling `q` chunk by
/// chunk gives exactly the codes [`quantize`] gives for the whole tensor at once: an op that
/// computes its output a batch chunk at a time saves it without a whole fp32 copy.
pub fn quantize_samples_into(
    q: &mut QuantizedTensor,
    first: usize,
    x: &[f32],
    p: &QuantParams,
) -> Result<(), QuantError> {
    p.validate()?;
    let sample_len = q.sample_len;
    let count = x.len() / sample_len.max(1);
    if p.bits != q.bits
        || p.group != q.group
        || sample_len == 0
        || !x.len().is_multiple_of(sample_len)
        || first + count > q.n_samples()
    {
        return Err(QuantError::BadShape {
            len: (first + count) * sample_len,
            sample_len,
        });
    }
    let gps = sample_len.div_ceil(q.group);
    let sb = (sample_len * q.bits as usize).div_ceil(8);
    let data = &mut q.data[first * sb..(first + count) * sb];
    let mins = &mut q.mins[first * gps..(first + count) * gps];
    let scales = &mut q.scales[first * gps..(first + count) * gps];
    let noise = CounterNoise {
        key: rng::stream_key(p.seed, p.stream),
    };
    quantize_spans(
        x,
        sample_len,
        p,
        &noise,
        first * sample_len,
        data,
        mins,
        scales,
    )
}

/// The quantisation of `x` (whole samples) into its slices of the output buffers, in
/// parallel units; `index_base` is the flat index of `x[0]` in the whole tensor.
#[allow(clippy::too_many_arguments)]
fn quantize_spans<N: Noise>(
    x: &[f32],
    sample_len: usize,
    p: &QuantParams,
    noise: &N,
    index_base: usize,
    data: &mut [u8],
    mins: &mut [bf16],
    scales: &mut [bf16],
) -> Result<(), QuantError> {
    let len = x.len();
    if len == 0 {
        return Ok(());
    }
    let isa = cpu::isa();
    if len <= cpu::PAR_MIN_ELEMS {
        let mut span = QSpan {
            x,
            index0: index_base,
            seg_len: sample_len,
            data,
            mins,
            scales,
        };
        return quant_dispatch(isa, p.bits, p.group, noise, &mut span);
    }
    let units = plan(len, sample_len, p.group, p.bits);
    let mut jobs = Vec::with_capacity(units.len());
    let (mut xr, mut d, mut m, mut s) = (x, data, mins, scales);
    let mut index0 = index_base;
    for u in &units {
        let (x0, x1) = xr.split_at(u.elems);
        let (d0, d1) = d.split_at_mut(u.bytes);
        let (m0, m1) = m.split_at_mut(u.groups);
        let (s0, s1) = s.split_at_mut(u.groups);
        (xr, d, m, s) = (x1, d1, m1, s1);
        jobs.push(QSpan {
            x: x0,
            index0,
            seg_len: u.seg_len,
            data: d0,
            mins: m0,
            scales: s0,
        });
        index0 += u.elems;
    }
    let (bits, group) = (p.bits, p.group);
    let results: Vec<Result<(), QuantError>> = jobs
        .into_par_iter()
        .map(|mut span| quant_dispatch(isa, bits, group, noise, &mut span))
        .collect();
    // First error in memory order, so the reported index does not depend on scheduling.
    results.into_iter().collect::<Result<Vec<()>, _>>()?;
    Ok(())
}

/// A parallel work unit: `elems` consecutive elements made of equal segments of `seg_len`
/// (whole samples, or a run of whole groups inside one sample), so its codes occupy a
/// contiguous byte range and its metadata a contiguous group range.
#[derive(Debug)]
struct Unit {
    elems: usize,
    seg_len: usize,
    groups: usize,
    bytes: usize,
}

fn plan(len: usize, sample_len: usize, group: usize, bits: u8) -> Vec<Unit> {
    let bits = bits as usize;
    let n = len / sample_len;
    let mut units = Vec::new();
    if sample_len >= cpu::UNIT_ELEMS && sample_len > group {
        // Split each sample into runs of whole groups; the last run may end with a short group.
        let run = (cpu::UNIT_ELEMS / group).max(1) * group;
        for _ in 0..n {
            let mut off = 0;
            while off < sample_len {
                let elems = run.min(sample_len - off);
                units.push(Unit {
                    elems,
                    seg_len: elems,
                    groups: elems.div_ceil(group),
                    bytes: (elems * bits).div_ceil(8),
                });
                off += elems;
            }
        }
    } else {
        let per = (cpu::UNIT_ELEMS / sample_len).max(1);
        let (gps, sb) = (sample_len.div_ceil(group), (sample_len * bits).div_ceil(8));
        let mut left = n;
        while left > 0 {
            let k = per.min(left);
            units.push(Unit {
                elems: k * sample_len,
                seg_len: sample_len,
                groups: k * gps,
                bytes: k * sb,
            });
            left -= k;
        }
    }
    units
}

// ---------------------------------------------------------------------------------------------
// Kernels

/// Input and output slices of one unit of quantisation work.
struct QSpan<'a> {
    x: &'a [f32],
    /// Flat index of `x[0]` in the whole tensor (the RNG counter).
    index0: usize,
    seg_len: usize,
    data: &'a mut [u8],
    mins: &'a mut [bf16],
    scales: &'a mut [bf16],
}

struct DeqSpan<'a> {
    out: &'a mut [f32],
    seg_len: usize,
    data: &'a [u8],
    mins: &'a [bf16],
    scales: &'a [bf16],
}

fn quant_dispatch<N: Noise>(
    isa: Isa,
    bits: u8,
    group: usize,
    noise: &N,
    span: &mut QSpan,
) -> Result<(), QuantError> {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa()` returned Avx512 only after detecting every feature enabled below.
        Isa::Avx512 => unsafe { quant_avx512(bits, group, noise, span) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa()` returned Avx2 only after detecting avx2, fma and bmi2.
        Isa::Avx2 => unsafe { quant_avx2(bits, group, noise, span) },
        _ => quant_span::<{ cpu::ISA_GENERIC }, N>(bits, group, noise, span),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq,avx512bw,avx512vl,avx2,fma,bmi2")]
fn quant_avx512<N: Noise>(
    bits: u8,
    group: usize,
    noise: &N,
    span: &mut QSpan,
) -> Result<(), QuantError> {
    quant_span::<{ cpu::ISA_AVX512 }, N>(bits, group, noise, span)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,bmi2")]
fn quant_avx2<N: Noise>(
    bits: u8,
    group: usize,
    noise: &N,
    span: &mut QSpan,
) -> Result<(), QuantError> {
    quant_span::<{ cpu::ISA_AVX2 }, N>(bits, group, noise, span)
}

/// `ISA` is the level the caller was compiled for (selects the explicit-SIMD helpers).
#[inline(always)]
fn quant_span<const ISA: u8, N: Noise>(
    bits: u8,
    group: usize,
    noise: &N,
    span: &mut QSpan,
) -> Result<(), QuantError> {
    match bits {
        1 => quant_span_b::<ISA, 1, N>(group, noise, span),
        2 => quant_span_b::<ISA, 2, N>(group, noise, span),
        4 => quant_span_b::<ISA, 4, N>(group, noise, span),
        8 => quant_span_b::<ISA, 8, N>(group, noise, span),
        b => Err(QuantError::BadBits(b)),
    }
}

#[inline(always)]
fn quant_span_b<const ISA: u8, const BITS: usize, N: Noise>(
    group: usize,
    noise: &N,
    span: &mut QSpan,
) -> Result<(), QuantError> {
    let levels = ((1u32 << BITS) - 1) as f32;
    let seg_bytes = (span.seg_len * BITS).div_ceil(8);
    let group_bytes = group * BITS / 8;
    let mut meta = span.mins.iter_mut().zip(span.scales.iter_mut());
    let segs = span
        .x
        .chunks(span.seg_len)
        .zip(span.data.chunks_mut(seg_bytes));
    for (si, (xs, ds)) in segs.enumerate() {
        let seg_index = span.index0 + si * span.seg_len;
        for (k, (xg, dg)) in xs.chunks(group).zip(ds.chunks_mut(group_bytes)).enumerate() {
            let index = seg_index + k * group;
            let (mn, mx, bad) = cpu::min_max::<ISA>(xg);
            if bad {
                return Err(first_non_finite(xg, index));
            }
            let (mn_b, s_b) =
                group_params(mn, mx, levels).ok_or(QuantError::RangeOverflow { index })?;
            if let Some((m, s)) = meta.next() {
                (*m, *s) = (mn_b, s_b);
            }
            quant_group::<ISA, BITS, N>(xg, index as u64, mn_b.to_f32(), s_b.to_f32(), noise, dg);
        }
    }
    Ok(())
}

#[cold]
fn first_non_finite(x: &[f32], index: usize) -> QuantError {
    let (j, &value) = x
        .iter()
        .enumerate()
        .find(|(_, v)| !v.is_finite())
        .unwrap_or((0, &f32::NAN));
    QuantError::NonFinite {
        index: index + j,
        value,
    }
}

/// Rounds toward -inf to bf16 (truncating the magnitude of positives, growing negatives').
#[inline]
fn bf16_round_down(v: f32) -> bf16 {
    let bits = v.to_bits();
    let mut hi = (bits >> 16) as u16;
    if bits & 0xFFFF != 0 && bits >> 31 == 1 {
        hi += 1; // larger magnitude = more negative; -MAX rolls over to -inf (caught by caller)
    }
    bf16::from_bits(hi)
}

/// Stored (min, scale) for a group with true extrema `mn <= mx`; `None` if bf16/f32 cannot
/// represent them (|values| near f32::MAX). See the module doc for why these directions.
#[inline]
fn group_params(mn: f32, mx: f32, levels: f32) -> Option<(bf16, bf16)> {
    let mn_b = bf16_round_down(mn);
    let mn_f = mn_b.to_f32();
    let r = mx - mn_f;
    if !mn_f.is_finite() || !r.is_finite() {
        return None;
    }
    if r == 0.0 {
        // Exactly constant and bf16-representable: any positive scale gives t = 0, q = 0,
        // x' = mn exactly; MAX makes the implied range (levels / scale) ~ 0 for the allocator.
        return Some((mn_b, bf16::MAX));
    }
    let ideal = levels / r; // may be +inf for a subnormal range
    let mut s_bits = bf16_round_down(ideal).to_bits().min(bf16::MAX.to_bits());
    // f32 rounding of `levels / r` or of the product below can push t_max a hair above B;
    // step the scale down one bf16 ulp at a time until the largest element fits.
    while s_bits > 0 && (mx - mn_f) * bf16::from_bits(s_bits).to_f32() > levels {
        s_bits -= 1;
    }
    let s = bf16::from_bits(s_bits);
    let top = levels / s.to_f32() + mn_f; // largest dequantized value must stay finite
    if s_bits == 0 || !top.is_finite() {
        return None;
    }
    Some((mn_b, s))
}

/// Quantizes one group into its bytes (`out.len() == ceil(x.len() * BITS / 8)`).
#[inline(always)]
fn quant_group<const ISA: u8, const BITS: usize, N: Noise>(
    x: &[f32],
    index: u64,
    mn: f32,
    s: f32,
    noise: &N,
    out: &mut [u8],
) {
    let (xb, xr) = x.as_chunks::<BLOCK>();
    let (ob, or) = out.split_at_mut(xb.len() * BLOCK * BITS / 8);
    let mut u = [0.0f32; BLOCK];
    let mut idx = index;
    for (xc, oc) in xb.iter().zip(ob.chunks_exact_mut(BLOCK * BITS / 8)) {
        noise.fill(idx, &mut u);
        quant_block::<ISA, BITS>(xc, &u, mn, s, oc);
        idx += BLOCK as u64;
    }
    if !xr.is_empty() {
        // Short tail: pad with `mn` (t = 0, frac = 0 -> q = 0 whatever u), pack a full block,
        // keep only the bytes that belong to the group. Padding bits are thus zero.
        let mut xp = [mn; BLOCK];
        xp[..xr.len()].copy_from_slice(xr);
        u = [0.0; BLOCK];
        noise.fill(idx, &mut u[..xr.len()]);
        let mut tmp = [0u8; BLOCK];
        quant_block::<ISA, BITS>(&xp, &u, mn, s, &mut tmp[..BLOCK * BITS / 8]);
        or.copy_from_slice(&tmp[..or.len()]);
    }
}

/// 2^23: adding it to a float in [0, 2^23) rounds to an integer held in the low mantissa bits.
const MAGIC: f32 = 8_388_608.0;

#[inline(always)]
fn quant_block<const ISA: u8, const BITS: usize>(
    x: &[f32; BLOCK],
    u: &[f32; BLOCK],
    mn: f32,
    s: f32,
    out: &mut [u8],
) {
    let levels = ((1u32 << BITS) - 1) as f32;
    let mut q = [0u8; BLOCK];
    // Branch-free float arithmetic only: `as i32` would be a saturating (per-lane fixed-up)
    // conversion that LLVM scalarises. All steps are exact for t in [0, 255].
    for j in 0..BLOCK {
        let t = (x[j] - mn) * s;
        debug_assert!((0.0..=levels).contains(&t), "t = {t} outside [0, {levels}]");
        let fl = if ISA == cpu::ISA_GENERIC {
            // Baseline x86-64 has no vector floor (it would be a libm call per element).
            let r = (t + MAGIC) - MAGIC; // nearest integer
            if r > t {
                r - 1.0
            } else {
                r
            }
        } else {
            t.floor() // one vroundps / vrndscaleps
        };
        let qf = fl + if u[j] < t - fl { 1.0 } else { 0.0 }; // t - fl is exact
                                                             // Safety net only: t <= B and frac(B) = 0 already imply q <= B.
        let qf = if qf > levels { levels } else { qf };
        q[j] = (qf + MAGIC).to_bits() as u8;
    }
    pack_block::<BITS>(&q, out);
}

/// Packs `8/BITS` codes per byte, first code in the least significant bits: read the codes of
/// one output byte as a little-endian word (code k in byte k) and fold them together with
/// shift-or steps of `(8 - BITS) << i`, which keeps everything in SIMD lanes.
#[inline(always)]
fn pack_block<const BITS: usize>(q: &[u8; BLOCK], out: &mut [u8]) {
    match BITS {
        1 => {
            for (o, c) in out.iter_mut().zip(q.as_chunks::<8>().0) {
                let mut w = u64::from_le_bytes(*c);
                w |= w >> 7;
                w |= w >> 14;
                w |= w >> 28;
                *o = w as u8;
            }
        }
        2 => {
            for (o, c) in out.iter_mut().zip(q.as_chunks::<4>().0) {
                let mut w = u32::from_le_bytes(*c);
                w |= w >> 6;
                w |= w >> 12;
                *o = w as u8;
            }
        }
        4 => {
            for (o, c) in out.iter_mut().zip(q.as_chunks::<2>().0) {
                let w = u16::from_le_bytes(*c);
                *o = (w | (w >> 4)) as u8;
            }
        }
        _ => {
            for (o, &c) in out.iter_mut().zip(q) {
                *o = c;
            }
        }
    }
}

/// Inverse of [`pack_block`]: spread each byte's codes into the bytes of a word (masked
/// shift-or steps in reverse order), code k landing in byte k.
#[inline(always)]
fn unpack_block<const BITS: usize>(data: &[u8], q: &mut [u8; BLOCK]) {
    match BITS {
        1 => {
            for (c, &b) in q.as_chunks_mut::<8>().0.iter_mut().zip(data) {
                let mut w = b as u64;
                w = (w | (w << 28)) & 0x0000_000F_0000_000F;
                w = (w | (w << 14)) & 0x0003_0003_0003_0003;
                w = (w | (w << 7)) & 0x0101_0101_0101_0101;
                *c = w.to_le_bytes();
            }
        }
        2 => {
            for (c, &b) in q.as_chunks_mut::<4>().0.iter_mut().zip(data) {
                let mut w = b as u32;
                w = (w | (w << 12)) & 0x000F_000F;
                w = (w | (w << 6)) & 0x0303_0303;
                *c = w.to_le_bytes();
            }
        }
        4 => {
            for (c, &b) in q.as_chunks_mut::<2>().0.iter_mut().zip(data) {
                let w = b as u16;
                *c = ((w | (w << 4)) & 0x0F0F).to_le_bytes();
            }
        }
        _ => {
            for (c, &b) in q.iter_mut().zip(data) {
                *c = b;
            }
        }
    }
}

fn dequant_dispatch(isa: Isa, bits: u8, group: usize, span: &mut DeqSpan) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa()` returned Avx512 only after detecting every feature enabled below.
        Isa::Avx512 => unsafe { dequant_avx512(bits, group, span) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa()` returned Avx2 only after detecting avx2, fma and bmi2.
        Isa::Avx2 => unsafe { dequant_avx2(bits, group, span) },
        _ => dequant_span(bits, group, span),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512dq,avx512bw,avx512vl,avx2,fma,bmi2")]
fn dequant_avx512(bits: u8, group: usize, span: &mut DeqSpan) {
    dequant_span(bits, group, span)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,bmi2")]
fn dequant_avx2(bits: u8, group: usize, span: &mut DeqSpan) {
    dequant_span(bits, group, span)
}

#[inline(always)]
fn dequant_span(bits: u8, group: usize, span: &mut DeqSpan) {
    match bits {
        1 => dequant_span_b::<1>(group, span),
        2 => dequant_span_b::<2>(group, span),
        4 => dequant_span_b::<4>(group, span),
        _ => dequant_span_b::<8>(group, span),
    }
}

#[inline(always)]
fn dequant_span_b<const BITS: usize>(group: usize, span: &mut DeqSpan) {
    let seg_bytes = (span.seg_len * BITS).div_ceil(8);
    let group_bytes = group * BITS / 8;
    let mut meta = span.mins.iter().zip(span.scales.iter());
    let segs = span
        .out
        .chunks_mut(span.seg_len)
        .zip(span.data.chunks(seg_bytes));
    for (os, ds) in segs {
        for (og, dg) in os.chunks_mut(group).zip(ds.chunks(group_bytes)) {
            let Some((m, s)) = meta.next() else { return };
            dequant_group::<BITS>(dg, m.to_f32(), s.to_f32(), og);
        }
    }
}

#[inline(always)]
fn dequant_group<const BITS: usize>(data: &[u8], mn: f32, s: f32, out: &mut [f32]) {
    let (ob, or) = out.as_chunks_mut::<BLOCK>();
    let (db, dr) = data.split_at(ob.len() * BLOCK * BITS / 8);
    for (oc, dc) in ob.iter_mut().zip(db.chunks_exact(BLOCK * BITS / 8)) {
        dequant_block::<BITS>(dc, mn, s, oc);
    }
    if !or.is_empty() {
        let mut bytes = [0u8; BLOCK];
        bytes[..dr.len()].copy_from_slice(dr);
        let mut tmp = [0.0f32; BLOCK];
        dequant_block::<BITS>(&bytes[..BLOCK * BITS / 8], mn, s, &mut tmp);
        let n = or.len();
        or.copy_from_slice(&tmp[..n]);
    }
}

#[inline(always)]
fn dequant_block<const BITS: usize>(data: &[u8], mn: f32, s: f32, out: &mut [f32; BLOCK]) {
    let mut q = [0u8; BLOCK];
    unpack_block::<BITS>(data, &mut q);
    for j in 0..BLOCK {
        out[j] = q[j] as f32 / s + mn;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_down_directions() {
        for &v in &[
            0.3f32, -0.3, 1.0, -1.0, 123.456, -123.456, 1e-30, -1e-30, 0.0, -0.0,
        ] {
            let r = bf16_round_down(v).to_f32();
            assert!(r <= v, "{v} -> {r}");
            // within one bf16 ulp
            assert!((v - r).abs() <= v.abs() * (1.0 / 128.0), "{v} -> {r}");
        }
        assert!(bf16_round_down(-f32::MAX).to_f32().is_infinite());
    }

    #[test]
    fn params_cover_range() {
        let cases = [
            (0.0f32, 1.0f32),
            (-1.0, 1.0),
            (0.3, 0.30001),
            (-5.7, 100.2),
            (1e-40, 2e-40),
            (100.0, 100.1),
            (0.3, 0.3),
        ];
        for bits in [1u32, 2, 4, 8] {
            let levels = ((1u32 << bits) - 1) as f32;
            for &(mn, mx) in &cases {
                let (m, s) = group_params(mn, mx, levels).unwrap();
                let (m, s) = (m.to_f32(), s.to_f32());
                assert!(m <= mn);
                let t = (mx - m) * s;
                assert!((0.0..=levels).contains(&t), "{mn} {mx} bits {bits}: t {t}");
            }
        }
    }

    #[test]
    fn constant_representable_group_is_exact() {
        let (m, s) = group_params(0.5, 0.5, 3.0).unwrap();
        assert_eq!(m.to_f32(), 0.5);
        assert_eq!(s, bf16::MAX);
    }

    #[test]
    fn overflowing_range_is_an_error() {
        assert!(group_params(-f32::MAX, f32::MAX, 3.0).is_none());
        assert!(group_params(-f32::MAX, 0.0, 3.0).is_none());
    }

    /// Every instruction-set variant this CPU can run gives bit-identical results.
    #[test]
    fn isa_variants_agree() {
        let sl = 1001;
        let x: Vec<f32> = (0..3 * sl)
            .map(|i| ((i * 7919) % 1000) as f32 * 0.013 - 4.0 + (i % 3) as f32 * 100.0)
            .collect();
        let mut isas = vec![Isa::Generic];
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx2")
                && std::is_x86_feature_detected!("fma")
                && std::is_x86_feature_detected!("bmi2")
            {
                isas.push(Isa::Avx2);
            }
            if cpu::isa() == Isa::Avx512 {
                isas.push(Isa::Avx512);
            }
        }
        for bits in [1u8, 2, 4, 8] {
            let p = QuantParams::new(bits, 3, 4);
            let reference = quantize(&x, sl, &p).unwrap();
            let noise = CounterNoise {
                key: rng::stream_key(3, 4),
            };
            for &isa in &isas {
                let mut q = reference.clone();
                q.data.fill(0xAA);
                let mut span = QSpan {
                    x: &x,
                    index0: 0,
                    seg_len: sl,
                    data: &mut q.data,
                    mins: &mut q.mins,
                    scales: &mut q.scales,
                };
                quant_dispatch(isa, bits, p.group, &noise, &mut span).unwrap();
                assert_eq!(q, reference, "{isa:?} bits {bits}");
                let mut out = vec![0.0; x.len()];
                let mut span = DeqSpan {
                    out: &mut out,
                    seg_len: sl,
                    data: &q.data,
                    mins: &q.mins,
                    scales: &q.scales,
                };
                dequant_dispatch(isa, bits, p.group, &mut span);
                assert_eq!(out, dequantize_to_vec(&reference), "{isa:?} bits {bits}");
            }
        }
    }

    #[test]
    fn plan_covers_everything() {
        for &(len, sl, g, b) in &[
            (1usize << 20, 1usize << 20, 256usize, 2u8),
            ((1 << 17) + 3 * 7, (1 << 17) + 3 * 7, 256, 1),
            (300_000, 3, 8, 4),
            (100 * 70_001, 70_001, 256, 8),
            (1 << 18, 1 << 18, 1 << 20, 2),
        ] {
            let units = plan(len, sl, g, b);
            let elems: usize = units.iter().map(|u| u.elems).sum();
            let groups: usize = units.iter().map(|u| u.groups).sum();
            let bytes: usize = units.iter().map(|u| u.bytes).sum();
            let n = len / sl;
            assert_eq!(elems, len);
            assert_eq!(groups, n * sl.div_ceil(g));
            assert_eq!(bytes, n * (sl * b as usize).div_ceil(8));
        }
    }
}
