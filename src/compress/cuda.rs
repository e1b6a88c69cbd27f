//! The compressors on the GPU (feature `cuda`): `kernels/quantize.cu` launched through candle's
//! CUDA backend. Bit-identical to the CPU versions in [`super::quantize`] and
//! [`super::bitpack`] (same RNG, same bf16 rounding, same packed layouts; `tests/cuda.rs`).
//!
//! * [`quantize_cuda`]`(t, sample_len, &QuantParams) -> CudaQuantized` (codes, bf16 mins and
//!   scales as `CudaSlice`s; [`CudaQuantized::into_parts`]) and [`dequantize_cuda`] /
//!   [`dequantize_samples_cuda`] back to an f32 tensor on the same device.
//! * [`mask_pack_cuda`] / [`mask_unpack_cuda`] ([`super::BitMask`] layout, `x > 0` mask) and
//!   [`uints_pack_cuda`] / [`uints_unpack_cuda`] ([`super::PackedUints`] layout).
//! * [`fill_uniform_cuda`]: the RNG itself, for parity checks.
//!
//! The PTX is built by `build.rs` with nvcc 13.0 and embedded; the module is loaded once per
//! device on first use (`get_or_load_custom_func`). Input-validation errors are the CPU's
//! [`QuantError`]s with the same indices (first error in memory order); detecting them costs
//! one 8-byte device-to-host copy (a stream synchronisation) per quantize / uint pack.
//! Tensors must be f32 (u8 for [`uints_pack_cuda`]); non-contiguous inputs are made
//! contiguous first.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    sys, CudaFunction, CudaSlice, CudaView, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, DType, Device, Shape, Storage, Tensor};
use half::bf16;

use super::error::QuantError;
use super::quantize::{QuantParams, MAX_GROUP};

/// PTX of `kernels/quantize.cu` (sm_90, PTX ISA 9.0), compiled by `build.rs`.
pub const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/quantize.ptx"));
/// Name under which candle caches the loaded module.
const MODULE: &str = "actrain_compress";
/// Threads per block of every kernel (a multiple of 32: `quantize` and `mask_pack` work per
/// warp).
const EBLOCK: u32 = 256;
/// Grid cap of the kernels launched with [`elem_cfg`] (they loop grid-stride).
const MAX_ELEM_BLOCKS: u64 = 1 << 16;
/// `err` value meaning "no error" (kernels atomicMin into it).
const NO_ERROR: u64 = u64::MAX;

/// Why a GPU compression call failed: a bad input (the CPU's error, same fields) or CUDA.
#[derive(Debug, thiserror::Error)]
pub enum CudaCompressError {
    #[error(transparent)]
    Quant(#[from] QuantError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, CudaCompressError>;

fn msg(s: String) -> CudaCompressError {
    CudaCompressError::Candle(candle_core::Error::Msg(s))
}

/// A quantized tensor resident on the GPU (layout: [`super::quantize`] module doc).
/// `mins`/`scales` hold bf16 bit patterns. Buffers of an empty tensor hold one unused
/// element (zero-byte device allocations are invalid); use the `*_len` accessors.
pub struct CudaQuantized {
    pub bits: u8,
    pub group: usize,
    pub len: usize,
    pub sample_len: usize,
    pub data: CudaSlice<u8>,
    pub mins: CudaSlice<u16>,
    pub scales: CudaSlice<u16>,
    device: CudaDevice,
}

impl std::fmt::Debug for CudaQuantized {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaQuantized")
            .field("bits", &self.bits)
            .field("group", &self.group)
            .field("len", &self.len)
            .field("sample_len", &self.sample_len)
            .field("stored_bytes", &self.stored_bytes())
            .finish_non_exhaustive()
    }
}

impl CudaQuantized {
    pub fn n_samples(&self) -> usize {
        self.len.checked_div(self.sample_len).unwrap_or(0)
    }
    /// Bytes of packed codes: `n_samples * ceil(sample_len * bits / 8)`.
    pub fn data_len(&self) -> usize {
        self.n_samples() * (self.sample_len * self.bits as usize).div_ceil(8)
    }
    /// Number of groups (= of mins = of scales).
    pub fn groups_len(&self) -> usize {
        self.n_samples() * self.sample_len.div_ceil(self.group.max(1))
    }
    /// Same accounting as the CPU's `QuantizedTensor::stored_bytes`.
    pub fn stored_bytes(&self) -> usize {
        self.data_len() + 4 * self.groups_len()
    }
    pub fn device(&self) -> &CudaDevice {
        &self.device
    }
    /// `(data, mins, scales)`.
    pub fn into_parts(self) -> (CudaSlice<u8>, CudaSlice<u16>, CudaSlice<u16>) {
        (self.data, self.mins, self.scales)
    }
    /// Copies the codes to the host (synchronises).
    pub fn data_to_vec(&self) -> Result<Vec<u8>> {
        dtoh(&self.device, &self.data.slice(..self.data_len()))
    }
    /// Copies the group minimums to the host (synchronises).
    pub fn mins_to_vec(&self) -> Result<Vec<bf16>> {
        let v = dtoh(&self.device, &self.mins.slice(..self.groups_len()))?;
        Ok(v.into_iter().map(bf16::from_bits).collect())
    }
    /// Copies the group scales to the host (synchronises).
    pub fn scales_to_vec(&self) -> Result<Vec<bf16>> {
        let v = dtoh(&self.device, &self.scales.slice(..self.groups_len()))?;
        Ok(v.into_iter().map(bf16::from_bits).collect())
    }

    /// Uploads host-side parts (e.g. a CPU `QuantizedTensor`'s `data()`, `mins()`,
    /// `scales()`), checking their lengths against the layout.
    #[allow(clippy::too_many_arguments)]
    pub fn from_host(
        device: &CudaDevice,
        bits: u8,
        group: usize,
        len: usize,
        sample_len: usize,
        data: &[u8],
        mins: &[bf16],
        scales: &[bf16],
    ) -> Result<Self> {
        validate(bits, group)?;
        check_shape(len, sample_len)?;
        let n = len / sample_len.max(1);
        let want_data = n * (sample_len * bits as usize).div_ceil(8);
        let want_groups = n * sample_len.div_ceil(group);
        for (got, want) in [
            (data.len(), want_data),
            (mins.len(), want_groups),
            (scales.len(), want_groups),
        ] {
            if got != want {
                return Err(QuantError::LenMismatch {
                    expected: want,
                    got,
                }
                .into());
            }
        }
        let bits16 = |v: &[bf16]| -> Vec<u16> {
            let mut b: Vec<u16> = v.iter().map(|x| x.to_bits()).collect();
            if b.is_empty() {
                b.push(0);
            }
            b
        };
        let mut d = data.to_vec();
        if d.is_empty() {
            d.push(0);
        }
        let stream = device.cuda_stream();
        Ok(Self {
            bits,
            group,
            len,
            sample_len,
            data: stream.clone_htod(&d).w()?,
            mins: stream.clone_htod(&bits16(mins)).w()?,
            scales: stream.clone_htod(&bits16(scales)).w()?,
            device: device.clone(),
        })
    }
}

/// A 1-bit-per-element mask on the GPU ([`super::BitMask`] layout: element `i` is bit
/// `i % 64` of `words[i / 64]`).
pub struct CudaBitMask {
    pub len: usize,
    /// `ceil(len / 64)` words (one unused word when `len == 0`).
    pub words: CudaSlice<u64>,
    device: CudaDevice,
}

impl CudaBitMask {
    pub fn words_len(&self) -> usize {
        self.len.div_ceil(64)
    }
    pub fn stored_bytes(&self) -> usize {
        8 * self.words_len()
    }
    pub fn words_to_vec(&self) -> Result<Vec<u64>> {
        dtoh(&self.device, &self.words.slice(..self.words_len()))
    }
}

/// Small unsigned integers densely packed on the GPU ([`super::PackedUints`] layout).
pub struct CudaPackedUints {
    pub bits: u8,
    pub len: usize,
    /// `ceil(len * bits / 8)` bytes (one unused byte when empty).
    pub data: CudaSlice<u8>,
    device: CudaDevice,
}

impl CudaPackedUints {
    pub fn data_len(&self) -> usize {
        (self.len * self.bits as usize).div_ceil(8)
    }
    pub fn stored_bytes(&self) -> usize {
        self.data_len()
    }
    pub fn data_to_vec(&self) -> Result<Vec<u8>> {
        dtoh(&self.device, &self.data.slice(..self.data_len()))
    }
}

// ---------------------------------------------------------------------------------------------
// Quantizer

/// Quantizes `t` (f32 on a CUDA device, `elem_count = n_samples * sample_len`, flattened in
/// row-major order) exactly as [`super::quantize`] does on the CPU. Synchronises once to read
/// the error flag.
pub fn quantize_cuda(t: &Tensor, sample_len: usize, p: &QuantParams) -> Result<CudaQuantized> {
    quantize_cuda_variant(t, sample_len, p, QUANTIZE_VARIANT)
}

/// Uninitialised code, min and scale buffers of a quantized tensor (one element at least:
/// zero-byte device allocations are invalid). The quantize kernel writes every element the
/// layout uses before anything reads them.
fn quantize_outputs(
    dev: &CudaDevice,
    data_len: usize,
    groups: usize,
) -> Result<(CudaSlice<u8>, CudaSlice<u16>, CudaSlice<u16>)> {
    // SAFETY: see above; the callers read only what a successful launch wrote.
    unsafe {
        Ok((
            dev.alloc::<u8>(data_len.max(1))?,
            dev.alloc::<u16>(groups.max(1))?,
            dev.alloc::<u16>(groups.max(1))?,
        ))
    }
}

/// The quantize kernel's compiled variants (`kernels/quantize.cu`, entries
/// `quantize_<name>_b<bits>`, one per width): name, QPL (quads per lane of its register fast path, which sets the team size) and threads
/// per block (its `__launch_bounds__`). All are bit-identical to the CPU (tests/cuda.rs runs
/// every one); they differ only in speed.
#[doc(hidden)]
pub const QUANTIZE_VARIANTS: &[(&str, u64, u32)] = &[("q8x", 8, 256), ("q4x", 4, 256)];

/// The variant [`quantize_cuda`] launches (a name from [`QUANTIZE_VARIANTS`]): the fastest
/// `BENCH quantize-<name>` of tests/cuda.rs's `bench_quantize` (every variant passes the same
/// parity tests). `q8x`: 8 quads per lane (four groups of 256 per warp), whole code bytes per
/// lane at 1 bit, one entry per width. On an H100 (2026-11-23) q8x gave 82/85/86/92% of a
/// device-to-device copy at 1/2/4/8 bits against q4x's 69/74/73/81% (kernels/quantize.cu
/// lists the variants dropped on the way).
pub const QUANTIZE_VARIANT: &str = "q8x";

/// [`quantize_cuda`] with the kernel variant `variant` (a name from [`QUANTIZE_VARIANTS`]).
/// Test / benchmark hook, not API.
#[doc(hidden)]
pub fn quantize_cuda_variant(
    t: &Tensor,
    sample_len: usize,
    p: &QuantParams,
    variant: &str,
) -> Result<CudaQuantized> {
    validate(p.bits, p.group)?;
    let len = t.elem_count();
    check_shape(len, sample_len)?;
    check_dtype(t, DType::F32, "quantize_cuda")?;
    let n = len / sample_len;
    let groups = n * sample_len.div_ceil(p.group);
    let data_len = n * (sample_len * p.bits as usize).div_ceil(8);
    with_view::<f32, _>(t, |dev, x| {
        let stream = dev.cuda_stream();
        // Every byte / group of a non-failing run is written by the kernel; on error the
        // buffers are dropped unread.
        let (mut data, mut mins, mut scales) = quantize_outputs(dev, data_len, groups)?;
        if len > 0 {
            let mut err = stream.clone_htod(&[NO_ERROR]).w()?;
            launch_quantize(
                dev,
                &x,
                sample_len,
                p,
                variant,
                &mut data,
                &mut mins,
                &mut scales,
                &mut err,
            )?;
            let code = dtoh(dev, &err)?[0];
            if code != NO_ERROR {
                let index = (code >> 1) as usize;
                return Err(if code & 1 == 0 {
                    let value = dtoh(dev, &x.slice(index..index + 1))?[0];
                    QuantError::NonFinite { index, value }
                } else {
                    QuantError::RangeOverflow { index }
                }
                .into());
            }
        }
        Ok(CudaQuantized {
            bits: p.bits,
            group: p.group,
            len,
            sample_len,
            data,
            mins,
            scales,
            device: dev.clone(),
        })
    })
}

/// Launches the quantize kernel `quantize_<variant>` (no synchronisation). `x` holds `n * sample_len` elements, `len > 0`,
/// parameters validated; the outputs have the layout's sizes.
#[allow(clippy::too_many_arguments)]
fn launch_quantize(
    dev: &CudaDevice,
    x: &CudaView<'_, f32>,
    sample_len: usize,
    p: &QuantParams,
    variant: &str,
    data: &mut CudaSlice<u8>,
    mins: &mut CudaSlice<u16>,
    scales: &mut CudaSlice<u16>,
    err: &mut CudaSlice<u64>,
) -> Result<()> {
    let n = x.len() / sample_len;
    let groups = (n * sample_len.div_ceil(p.group)) as u64;
    let &(_, qpl, threads) = QUANTIZE_VARIANTS
        .iter()
        .find(|(name, _, _)| *name == variant)
        .ok_or_else(|| msg(format!("unknown quantize kernel variant {variant:?}")))?;
    // One entry per width (`quantize_<variant>_b<bits>`): each is allocated its own registers.
    let func =
        dev.get_or_load_custom_func(&format!("quantize_{variant}_b{}", p.bits), MODULE, PTX)?;
    // A team of T lanes per group (the power of two >= group / (4 QPL), in 2..=32; QPL quads
    // per lane): 32 / T groups per warp, threads / 32 warps per block.
    let team = (p.group as u64 / 4)
        .div_ceil(qpl)
        .next_power_of_two()
        .clamp(2, 32);
    let groups_per_block = (32 / team) * (threads as u64 / 32);
    let cfg = wave_cfg_threads(dev, &func, groups.div_ceil(groups_per_block), threads)?;
    let (n64, sl, g) = (n as u64, sample_len as u64, p.group as u64);
    let mut b = func.builder();
    b.arg(x);
    b.arg(&n64);
    b.arg(&sl);
    b.arg(&g);
    // The RNG key (`rng::stream_key`) is derived here, once: computed in the kernel, nvcc
    // rematerialises its two mix64 in every round (~70 instructions per group).
    let key = super::rng::stream_key(p.seed, p.stream);
    b.arg(&key);
    b.arg(data);
    b.arg(mins);
    b.arg(scales);
    b.arg(err);
    // SAFETY: argument list matches `quantize_*` in kernels/quantize.cu; buffer sizes match the
    // layout; the kernel indexes only inside them.
    unsafe { b.launch(cfg) }.w()?;
    Ok(())
}

/// Benchmark hook, not API: times `reps` back-to-back launches of the quantize kernel alone
/// (outputs allocated once, error flag never read, so no host synchronisation between
/// launches) with CUDA events, after one warm-up launch. Returns each launch's milliseconds.
/// [`quantize_cuda`] adds to this the allocations and one stream synchronisation (it reads the
/// error flag).
#[doc(hidden)]
pub fn quantize_kernel_ms(
    t: &Tensor,
    sample_len: usize,
    p: &QuantParams,
    reps: usize,
) -> Result<Vec<f32>> {
    quantize_variant_kernel_ms(t, sample_len, p, QUANTIZE_VARIANT, reps)
}

/// [`quantize_kernel_ms`] of the kernel variant `variant` (a name from [`QUANTIZE_VARIANTS`]).
#[doc(hidden)]
pub fn quantize_variant_kernel_ms(
    t: &Tensor,
    sample_len: usize,
    p: &QuantParams,
    variant: &str,
    reps: usize,
) -> Result<Vec<f32>> {
    validate(p.bits, p.group)?;
    let len = t.elem_count();
    check_shape(len, sample_len)?;
    check_dtype(t, DType::F32, "quantize_kernel_ms")?;
    if len == 0 {
        return Ok(Vec::new());
    }
    let n = len / sample_len;
    let groups = n * sample_len.div_ceil(p.group);
    let data_len = n * (sample_len * p.bits as usize).div_ceil(8);
    with_view::<f32, _>(t, |dev, x| {
        let stream = dev.cuda_stream();
        // Written by the kernel, never read here.
        let (mut data, mut mins, mut scales) = quantize_outputs(dev, data_len, groups)?;
        let mut err = stream.clone_htod(&[NO_ERROR]).w()?;
        let mut launch = || {
            launch_quantize(
                dev,
                &x,
                sample_len,
                p,
                variant,
                &mut data,
                &mut mins,
                &mut scales,
                &mut err,
            )
        };
        launch()?;
        let timing = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
        let mut events = vec![stream.record_event(timing).w()?];
        for _ in 0..reps {
            launch()?;
            events.push(stream.record_event(timing).w()?);
        }
        let mut ms = Vec::with_capacity(reps);
        for w in events.windows(2) {
            ms.push(w[0].elapsed_ms(&w[1]).w()?);
        }
        Ok(ms)
    })
}

/// Dequantizes all of `q` into a new f32 tensor of `shape` (`shape.elem_count() == q.len`) on
/// `q`'s device; bit-identical to [`super::dequantize`].
pub fn dequantize_cuda<S: Into<Shape>>(q: &CudaQuantized, shape: S) -> Result<Tensor> {
    dequantize_samples_cuda(q, 0, q.n_samples(), shape)
}

/// Dequantizes samples `first..first + count` only (like `quantize::dequantize_samples`), into
/// a tensor of `shape` (`count * sample_len` elements).
pub fn dequantize_samples_cuda<S: Into<Shape>>(
    q: &CudaQuantized,
    first: usize,
    count: usize,
    shape: S,
) -> Result<Tensor> {
    let shape = shape.into();
    if first + count > q.n_samples() {
        return Err(QuantError::BadShape {
            len: (first + count) * q.sample_len,
            sample_len: q.sample_len,
        }
        .into());
    }
    let len = count * q.sample_len;
    if shape.elem_count() != len {
        return Err(QuantError::LenMismatch {
            expected: len,
            got: shape.elem_count(),
        }
        .into());
    }
    let dev = &q.device;
    // SAFETY: every element is written by the kernel before the tensor is handed out.
    let mut out = unsafe { dev.alloc::<f32>(len.max(1))? };
    if len > 0 {
        let sb = (q.sample_len * q.bits as usize).div_ceil(8);
        let gps = q.sample_len.div_ceil(q.group);
        let data = q.data.slice(first * sb..(first + count) * sb);
        let mins = q.mins.slice(first * gps..(first + count) * gps);
        let scales = q.scales.slice(first * gps..(first + count) * gps);
        let func = dev.get_or_load_custom_func("dequantize", MODULE, PTX)?;
        let (n64, sl, g, bits) = (
            count as u64,
            q.sample_len as u64,
            q.group as u64,
            q.bits as u32,
        );
        // One thread per quad (4 elements of a sample); the kernel splits a quad index with
        // these multiply-shift divisions (it divides in u64 itself when the count exceeds u32).
        let quads_per_sample = q.sample_len.div_ceil(4) as u64;
        let (qps_m, qps_l) = fast_div(quads_per_sample);
        let (qpg_m, qpg_l) = fast_div(q.group as u64 / 4);
        let cfg = wave_cfg(
            dev,
            &func,
            (count as u64 * quads_per_sample).div_ceil(EBLOCK as u64),
        )?;
        let mut b = func.builder();
        b.arg(&data);
        b.arg(&mins);
        b.arg(&scales);
        b.arg(&n64);
        b.arg(&sl);
        b.arg(&g);
        b.arg(&bits);
        b.arg(&mut out);
        b.arg(&qps_m);
        b.arg(&qps_l);
        b.arg(&qpg_m);
        b.arg(&qpg_l);
        // SAFETY: matches `dequantize` in kernels/quantize.cu; sizes from the layout.
        unsafe { b.launch(cfg) }.w()?;
    }
    Ok(wrap_tensor(out, dev, shape))
}

// ---------------------------------------------------------------------------------------------
// Masks and packed uints

/// [`super::BitMask::positive`] on the GPU: bit set where `x > 0` (NaN gives 0).
pub fn mask_pack_cuda(t: &Tensor) -> Result<CudaBitMask> {
    check_dtype(t, DType::F32, "mask_pack_cuda")?;
    let len = t.elem_count();
    let nw = len.div_ceil(64);
    with_view::<f32, _>(t, |dev, x| {
        // SAFETY: every word is written by the kernel.
        let mut words = unsafe { dev.alloc::<u64>(nw.max(1))? };
        if len > 0 {
            let func = dev.get_or_load_custom_func("mask_pack", MODULE, PTX)?;
            let len64 = len as u64;
            let mut b = func.builder();
            b.arg(&x);
            b.arg(&len64);
            b.arg(&mut words);
            // One warp per 4 words.
            let words_per_block = 4 * (EBLOCK / 32) as u64;
            let cfg = wave_cfg(dev, &func, (nw as u64).div_ceil(words_per_block))?;
            // SAFETY: matches `mask_pack` in kernels/quantize.cu; blockDim is a multiple of 32.
            unsafe { b.launch(cfg) }.w()?;
        }
        Ok(CudaBitMask {
            len,
            words,
            device: dev.clone(),
        })
    })
}

/// [`super::BitMask::select_into`] on the GPU: `if_set` where the bit is set, else `if_clear`,
/// as an f32 tensor of `shape`.
pub fn mask_unpack_cuda<S: Into<Shape>>(
    m: &CudaBitMask,
    if_set: f32,
    if_clear: f32,
    shape: S,
) -> Result<Tensor> {
    let shape = shape.into();
    if shape.elem_count() != m.len {
        return Err(QuantError::LenMismatch {
            expected: m.len,
            got: shape.elem_count(),
        }
        .into());
    }
    let dev = &m.device;
    // SAFETY: every element is written by the kernel.
    let mut out = unsafe { dev.alloc::<f32>(m.len.max(1))? };
    if m.len > 0 {
        let func = dev.get_or_load_custom_func("mask_unpack", MODULE, PTX)?;
        let len64 = m.len as u64;
        let mut b = func.builder();
        b.arg(&m.words);
        b.arg(&len64);
        b.arg(&if_set);
        b.arg(&if_clear);
        b.arg(&mut out);
        // One thread per 4 elements.
        let cfg = wave_cfg(dev, &func, (m.len as u64).div_ceil(4 * EBLOCK as u64))?;
        // SAFETY: matches `mask_unpack` in kernels/quantize.cu.
        unsafe { b.launch(cfg) }.w()?;
    }
    Ok(wrap_tensor(out, dev, shape))
}

/// [`super::PackedUints::pack`] on the GPU: `values` is a u8 tensor, every value `< 2^bits`
/// (`bits` in 1..=8); the first offending index is reported like on the CPU. Synchronises
/// once to read the error flag.
pub fn uints_pack_cuda(values: &Tensor, bits: u8) -> Result<CudaPackedUints> {
    if !(1..=8).contains(&bits) {
        return Err(QuantError::BadBits(bits).into());
    }
    check_dtype(values, DType::U8, "uints_pack_cuda")?;
    let len = values.elem_count();
    let nbytes = (len * bits as usize).div_ceil(8);
    with_view::<u8, _>(values, |dev, v| {
        // SAFETY: every byte is written by the kernel.
        let mut data = unsafe { dev.alloc::<u8>(nbytes.max(1))? };
        if len > 0 {
            let stream = dev.cuda_stream();
            let mut err = stream.clone_htod(&[NO_ERROR]).w()?;
            let func = dev.get_or_load_custom_func("uints_pack", MODULE, PTX)?;
            let (len64, bits32) = (len as u64, bits as u32);
            let mut b = func.builder();
            b.arg(&v);
            b.arg(&len64);
            b.arg(&bits32);
            b.arg(&mut data);
            b.arg(&mut err);
            // SAFETY: matches `uints_pack` in kernels/quantize.cu.
            unsafe { b.launch(elem_cfg(uints_threads(len, bits))) }.w()?;
            let index = dtoh(dev, &err)?[0];
            if index != NO_ERROR {
                let index = index as usize;
                let value = dtoh(dev, &v.slice(index..index + 1))?[0];
                return Err(QuantError::ValueTooLarge { index, value, bits }.into());
            }
        }
        Ok(CudaPackedUints {
            bits,
            len,
            data,
            device: dev.clone(),
        })
    })
}

/// [`super::PackedUints::unpack`] on the GPU, into a u8 tensor of `shape`.
pub fn uints_unpack_cuda<S: Into<Shape>>(p: &CudaPackedUints, shape: S) -> Result<Tensor> {
    let shape = shape.into();
    if shape.elem_count() != p.len {
        return Err(QuantError::LenMismatch {
            expected: p.len,
            got: shape.elem_count(),
        }
        .into());
    }
    let dev = &p.device;
    // SAFETY: every element is written by the kernel.
    let mut out = unsafe { dev.alloc::<u8>(p.len.max(1))? };
    if p.len > 0 {
        let func = dev.get_or_load_custom_func("uints_unpack", MODULE, PTX)?;
        let (len64, bits32) = (p.len as u64, p.bits as u32);
        let mut b = func.builder();
        b.arg(&p.data);
        b.arg(&len64);
        b.arg(&bits32);
        b.arg(&mut out);
        // SAFETY: matches `uints_unpack` in kernels/quantize.cu.
        unsafe { b.launch(elem_cfg(uints_threads(p.len, p.bits))) }.w()?;
    }
    Ok(wrap_tensor(out, dev, shape))
}

/// Threads `uints_pack` / `uints_unpack` want for `len` values of `bits` bits: one per chunk of
/// 16 values at widths 1/2/4/8 (their fast path), else one per value, which is at least one per
/// packed byte (both kernels are grid-stride, so this only sizes the grid).
fn uints_threads(len: usize, bits: u8) -> usize {
    match bits {
        1 | 2 | 4 | 8 => len.div_ceil(16),
        _ => len,
    }
}

/// `out[j] = rng::uniform(seed, stream, start + j)` computed on the GPU (parity checks).
pub fn fill_uniform_cuda(
    device: &CudaDevice,
    seed: u64,
    stream: u64,
    start: u64,
    len: usize,
) -> Result<Vec<f32>> {
    if len == 0 {
        return Ok(Vec::new());
    }
    // SAFETY: every element is written by the kernel.
    let mut out = unsafe { device.alloc::<f32>(len)? };
    let func = device.get_or_load_custom_func("rng_uniform", MODULE, PTX)?;
    let len64 = len as u64;
    let mut b = func.builder();
    b.arg(&seed);
    b.arg(&stream);
    b.arg(&start);
    b.arg(&len64);
    b.arg(&mut out);
    // SAFETY: matches `rng_uniform` in kernels/quantize.cu.
    unsafe { b.launch(elem_cfg(len)) }.w()?;
    dtoh(device, &out)
}

// ---------------------------------------------------------------------------------------------
// Helpers

/// The same checks as `QuantParams::validate` on the CPU.
fn validate(bits: u8, group: usize) -> Result<()> {
    if !matches!(bits, 1 | 2 | 4 | 8) {
        return Err(QuantError::BadBits(bits).into());
    }
    if group == 0 || !group.is_multiple_of(8) || group > MAX_GROUP {
        return Err(QuantError::BadGroup(group).into());
    }
    Ok(())
}

fn check_shape(len: usize, sample_len: usize) -> Result<()> {
    if sample_len == 0 || !len.is_multiple_of(sample_len) {
        return Err(QuantError::BadShape { len, sample_len }.into());
    }
    Ok(())
}

fn check_dtype(t: &Tensor, want: DType, op: &str) -> Result<()> {
    if t.dtype() != want {
        return Err(msg(format!(
            "{op}: expected a {want:?} tensor, got {:?}",
            t.dtype()
        )));
    }
    Ok(())
}

/// Runs `f` on the contiguous device view of `t`'s elements (holding the storage lock).
fn with_view<T, R>(
    t: &Tensor,
    f: impl FnOnce(&CudaDevice, CudaView<'_, T>) -> Result<R>,
) -> Result<R>
where
    T: CudaDType + DeviceRepr,
{
    if !matches!(t.device(), Device::Cuda(_)) {
        return Err(msg(format!(
            "expected a tensor on a CUDA device, got {:?}",
            t.device().location()
        )));
    }
    let t = if t.is_contiguous() {
        t.clone()
    } else {
        t.contiguous()?
    };
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(cs) = &*storage else {
        return Err(msg("expected CUDA storage".to_string()));
    };
    let (o1, o2) = layout
        .contiguous_offsets()
        .ok_or_else(|| msg("tensor is not contiguous".to_string()))?;
    let slice = cs.as_cuda_slice::<T>()?;
    f(cs.device(), slice.slice(o1..o2))
}

/// Copies a device buffer to the host (synchronises the stream; no copy when empty).
fn dtoh<T: DeviceRepr, S: DevicePtr<T>>(dev: &CudaDevice, src: &S) -> Result<Vec<T>> {
    if src.is_empty() {
        return Ok(Vec::new());
    }
    Ok(dev.cuda_stream().clone_dtoh(src).w()?)
}

/// `blocks` blocks of [`EBLOCK`] threads, capped at one wave (as many blocks as the device runs
/// at once): the kernels loop grid-stride, so their per-thread setup is paid once per thread.
fn wave_cfg(dev: &CudaDevice, func: &CudaFunction, blocks: u64) -> Result<LaunchConfig> {
    wave_cfg_threads(dev, func, blocks, EBLOCK)
}

/// [`wave_cfg`] with `threads` per block.
fn wave_cfg_threads(
    dev: &CudaDevice,
    func: &CudaFunction,
    blocks: u64,
    threads: u32,
) -> Result<LaunchConfig> {
    let sms = dev
        .cuda_stream()
        .context()
        .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .w()?;
    let per_sm = func
        .occupancy_max_active_blocks_per_multiprocessor(threads, 0, None)
        .w()?;
    let wave = (sms.max(1) as u64) * (per_sm.max(1) as u64);
    Ok(LaunchConfig {
        grid_dim: (blocks.clamp(1, wave) as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// `(m, l)` such that the kernels' `fast_div(n, m, l)` is `n / d` for every `n < 2^32`
/// (Granlund & Montgomery 1994, fig. 4.1: `m = floor(2^32 (2^l - d) / d) + 1`,
/// `l = ceil(log2 d)`). `d` is clamped into `1..=u32::MAX`; the kernels use the pair only when
/// their numerators fit in 32 bits, which bounds `d` too.
fn fast_div(d: u64) -> (u32, u32) {
    let d = d.clamp(1, u32::MAX as u64);
    let l = 64 - (d - 1).leading_zeros();
    let m = ((((1u128 << l) - d as u128) << 32) / d as u128 + 1) as u32;
    (m, l)
}

/// One thread per element, grid-stride beyond `MAX_ELEM_BLOCKS` blocks.
fn elem_cfg(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (
            (n as u64).div_ceil(EBLOCK as u64).clamp(1, MAX_ELEM_BLOCKS) as u32,
            1,
            1,
        ),
        block_dim: (EBLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Wraps a freshly written buffer as a tensor of `shape`. An empty result keeps its 1-element
/// placeholder buffer: candle allows storage larger than the layout needs.
fn wrap_tensor<T: CudaDType + DeviceRepr>(
    out: CudaSlice<T>,
    dev: &CudaDevice,
    shape: Shape,
) -> Tensor {
    let storage = CudaStorage::wrap_cuda_slice(out, dev.clone());
    Tensor::from_storage(Storage::Cuda(storage), shape, BackpropOp::none(), false)
}
