//! The compression policy: what `Tape::save` does with each context at a given level.
//!
//! Levels (modelled on ActNN/GACT's ladders): `L0` keeps fp32, `L1` 8-bit, `L2` 4-bit,
//! `L3` 2 bits on average, `L4` 1.5 bits on average; `--bits` sets any average. The bits of
//! each saved tensor come from a [`BitPlan`]: [`UniformPlan`] gives every tensor the ladder
//! rung that fits the budget; the gradient-variance allocator plugs in through the same trait.

use super::{
    dequantize, dequantize_samples, quantize, quantize_samples_into, BitMask, PackedUints,
    QuantParams, QuantizedTensor,
};
use crate::tape::{
    ContextPolicy, GradObservation, Packed, PackedContext, RowPacker, RowsRequest, SaveAs,
    SaveRequest,
};
use anyhow::{bail, Context as _, Result};
use candle_core::{DType, Device, Shape, Storage, Tensor};

/// The bit widths a tensor can get, from most to least precise; 32 = kept as fp32.
pub const LADDER: [u8; 5] = [32, 8, 4, 2, 1];

/// A compression level as the user names it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Level {
    L0,
    L1,
    L2,
    L3,
    L4,
    /// Any average budget in bits per element (`--bits 3`).
    Bits(f32),
}

impl Level {
    /// Average bits per compressed element this level aims for (32 = no compression).
    pub fn avg_bits(self) -> f32 {
        match self {
            Level::L0 => 32.0,
            Level::L1 => 8.0,
            Level::L2 => 4.0,
            Level::L3 => 2.0,
            Level::L4 => 1.5,
            Level::Bits(b) => b,
        }
    }
    /// Whether masks and indices are bit-packed (every level but L0, the fp32 baseline).
    pub fn compresses(self) -> bool {
        self.avg_bits() < 32.0
    }
    pub fn name(self) -> String {
        match self {
            Level::Bits(b) => format!("{b}bit"),
            l => format!("{l:?}"),
        }
    }
}

impl std::str::FromStr for Level {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.trim().to_ascii_uppercase().as_str() {
            "L0" => Level::L0,
            "L1" => Level::L1,
            "L2" => Level::L2,
            "L3" => Level::L3,
            "L4" => Level::L4,
            other => bail!("unknown level `{other}` (expected L0, L1, L2, L3 or L4)"),
        })
    }
}

/// Checks a `--bits` budget: between 1 and 32 bits per element.
pub fn bits_level(bits: f32) -> Result<Level> {
    if !(1.0..=32.0).contains(&bits) || !bits.is_finite() {
        bail!("--bits {bits}: the average budget must be between 1 and 32 bits per element");
    }
    Ok(Level::Bits(bits))
}

/// Chooses the bit width of each saved activation.
pub trait BitPlan {
    /// Bits (one of [`LADDER`]) for the tensor saved at `slot` this step.
    fn bits_for(&mut self, req: &SaveRequest) -> u8;
    fn begin_step(&mut self, _step: u64) {}
    /// Whether this step's backward should report output-gradient norms (analytic
    /// sensitivities); the tape skips the extra pass over the gradients otherwise.
    fn wants_output_grads(&self) -> bool {
        false
    }
    /// The node that saved a slot received its output gradient ([`GradObservation`]).
    fn observe_output_grad(&mut self, _obs: &GradObservation) {}
    /// Bits for a tensor of `elements` saved at `slot` that arrives in row chunks, so there
    /// is no whole tensor to look at; `None` when this step's plan needs to see it whole
    /// (then the tape gathers it and calls [`BitPlan::bits_for`]).
    fn bits_for_rows(&mut self, _op: &'static str, _slot: usize, _elements: usize) -> Option<u8> {
        None
    }
}

/// Every tensor gets the same rung: the most precise one within the average budget.
pub struct UniformPlan {
    bits: u8,
}

impl UniformPlan {
    pub fn new(avg_bits: f32) -> Self {
        let bits = LADDER
            .iter()
            .copied()
            .find(|&b| b as f32 <= avg_bits + 1e-6)
            .unwrap_or(1);
        Self { bits }
    }
}

impl BitPlan for UniformPlan {
    fn bits_for(&mut self, _req: &SaveRequest) -> u8 {
        self.bits
    }
    fn bits_for_rows(&mut self, _op: &'static str, _slot: usize, _elements: usize) -> Option<u8> {
        Some(self.bits)
    }
}

/// Settings of the compression policy.
#[derive(Clone, Debug)]
pub struct CompressConfig {
    pub level: Level,
    /// Elements per quantization group (within one sample).
    pub group: usize,
    /// Tensors with fewer elements stay fp32: metadata overhead would dominate.
    pub min_elements: usize,
    /// Ops whose contexts are never compressed (`--exclude-ops`).
    pub exclude_ops: Vec<String>,
    /// Run seed for the rounding noise.
    pub seed: u64,
}

impl Default for CompressConfig {
    fn default() -> Self {
        Self {
            level: Level::L3,
            group: super::DEFAULT_GROUP,
            min_elements: 1024,
            exclude_ops: Vec::new(),
            seed: 0,
        }
    }
}

/// The [`ContextPolicy`] behind every level.
pub struct CompressPolicy {
    cfg: CompressConfig,
    plan: Box<dyn BitPlan>,
}

impl CompressPolicy {
    /// Uniform allocation at the config's level.
    pub fn new(cfg: CompressConfig) -> Self {
        let plan = Box::new(UniformPlan::new(cfg.level.avg_bits()));
        Self { cfg, plan }
    }
    pub fn with_plan(cfg: CompressConfig, plan: Box<dyn BitPlan>) -> Self {
        Self { cfg, plan }
    }
    pub fn config(&self) -> &CompressConfig {
        &self.cfg
    }

    fn excluded(&self, op: &str) -> bool {
        self.cfg.exclude_ops.iter().any(|e| e == op)
    }

    /// The quantizer settings of the context saved at `slot` in `step`: the noise stream is
    /// the slot, under a seed that changes every step.
    fn quant_params(&self, bits: u8, step: u64, slot: usize) -> QuantParams {
        QuantParams {
            bits,
            group: self.cfg.group,
            seed: crate::tape::splitmix64(self.cfg.seed ^ step.rotate_left(32)),
            stream: slot as u64,
        }
    }
}

/// A quantized context filled a few samples at a time ([`ContextPolicy::pack_rows`]).
struct QuantRows {
    q: QuantizedTensor,
    params: QuantParams,
}

impl RowPacker for QuantRows {
    fn push(&mut self, first: usize, rows: &Tensor) -> Result<()> {
        with_f32(rows, |x| {
            Ok(quantize_samples_into(&mut self.q, first, x, &self.params)?)
        })
        .context("quantizing a saved context")
    }
    fn finish(self: Box<Self>) -> Result<Box<dyn PackedContext>> {
        Ok(Box::new(QuantContext(self.q)))
    }
}

impl ContextPolicy for CompressPolicy {
    fn begin_step(&mut self, step: u64) {
        self.plan.begin_step(step);
    }

    fn wants_output_grads(&self) -> bool {
        self.cfg.level.compresses() && self.plan.wants_output_grads()
    }

    fn observe_output_grad(&mut self, obs: &GradObservation) {
        self.plan.observe_output_grad(obs);
    }

    fn compresses_activations(&self) -> bool {
        self.cfg.level.compresses()
    }

    fn recomputes_contexts(&self) -> bool {
        self.cfg.level.compresses()
    }

    fn pack_rows(&mut self, req: &RowsRequest) -> Result<Option<Box<dyn RowPacker>>> {
        // Quantized into place: f32 activations of at least `min_elements` on the CPU. The
        // rest (fp32 levels, masks, other dtypes and devices) is gathered and packed whole.
        let elements = req.shape.elem_count();
        let n = req.shape.dims().first().copied().unwrap_or(0);
        if !self.cfg.level.compresses()
            || self.excluded(req.op)
            || req.kind != SaveAs::Activation
            || req.dtype != DType::F32
            || !req.device.is_cpu()
            || req.shape.rank() < 2
            || n == 0
            || elements < self.cfg.min_elements
        {
            return Ok(None);
        }
        let Some(bits) = self.plan.bits_for_rows(req.op, req.slot, elements) else {
            return Ok(None);
        };
        if bits >= 32 {
            return Ok(None);
        }
        let params = self.quant_params(bits, req.step, req.slot);
        let q = QuantizedTensor::for_samples(n, elements / n, &params)?;
        Ok(Some(Box::new(QuantRows { q, params })))
    }

    fn pack(&mut self, req: &SaveRequest) -> Result<Packed> {
        let t = req.tensor;
        if !self.cfg.level.compresses() || self.excluded(req.op) || t.elem_count() == 0 {
            return Ok(Packed::Full(t.clone()));
        }
        match req.kind {
            SaveAs::Exact => Ok(Packed::Full(t.clone())),
            #[cfg(feature = "cuda")]
            SaveAs::SignMask if t.device().is_cuda() => {
                super::cuda_context::pack_sign_mask(t).map(Packed::Compressed)
            }
            SaveAs::SignMask => {
                let mask = with_f32(t, |x| Ok(BitMask::positive(x)))?;
                Ok(Packed::Compressed(Box::new(MaskContext(mask))))
            }
            SaveAs::Index { bits } => {
                if t.dtype() != DType::U8 {
                    bail!("an index context must be a U8 tensor, got {:?}", t.dtype());
                }
                #[cfg(feature = "cuda")]
                if t.device().is_cuda() {
                    return super::cuda_context::pack_index(t, bits).map(Packed::Compressed);
                }
                let v = t.flatten_all()?.to_vec1::<u8>()?;
                let packed = PackedUints::pack(&v, bits)?;
                Ok(Packed::Compressed(Box::new(IndexContext(packed))))
            }
            SaveAs::Activation => {
                if t.elem_count() < self.cfg.min_elements || !t.dtype().is_float() {
                    return Ok(Packed::Full(t.clone()));
                }
                let bits = self.plan.bits_for(req);
                if bits >= 32 {
                    return Ok(Packed::Full(t.clone()));
                }
                // Groups stay inside one sample: dim 0 is the batch for every context we save.
                let sample_len = match t.dims().first() {
                    Some(&n) if n > 0 && t.rank() > 1 => t.elem_count() / n,
                    _ => t.elem_count(),
                };
                let params = self.quant_params(bits, req.step, req.slot);
                #[cfg(feature = "cuda")]
                if t.device().is_cuda() {
                    return super::cuda_context::pack_activation(t, sample_len, &params)
                        .map(Packed::Compressed);
                }
                let q = with_f32(t, |x| Ok(quantize(x, sample_len, &params)?))?;
                Ok(Packed::Compressed(Box::new(QuantContext(q))))
            }
        }
    }
}

/// Runs `f` on the tensor's elements as one contiguous f32 slice: borrowed from the tensor's
/// storage when it already is one (no fp32-sized copy on the save path), converted otherwise
/// (f64 gradient checks, strided views, other devices).
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

fn tensor_from_f32(v: Vec<f32>, shape: &Shape, dtype: DType, device: &Device) -> Result<Tensor> {
    let t = Tensor::from_vec(v, shape.clone(), &Device::Cpu)?;
    let t = if dtype == DType::F32 {
        t
    } else {
        t.to_dtype(dtype)?
    };
    Ok(if device.is_cpu() {
        t
    } else {
        t.to_device(device)?
    })
}

/// The shape of `count` rows of a context of `shape` quantized in `n_samples` samples, when
/// its rows are those samples (quantized per sample along dim 0); `None` otherwise.
pub(crate) fn sample_rows(shape: &Shape, n_samples: usize, count: usize) -> Option<Vec<usize>> {
    let mut dims = shape.dims().to_vec();
    if dims.first() != Some(&n_samples) {
        return None;
    }
    dims[0] = count;
    Some(dims)
}

/// Stored bits per element of a packed context, for reports.
pub(crate) fn bits_per_element(stored_bytes: usize, len: usize) -> f32 {
    (stored_bytes * 8) as f32 / len.max(1) as f32
}

struct QuantContext(QuantizedTensor);

impl PackedContext for QuantContext {
    fn unpack(&self, shape: &Shape, dtype: DType, device: &Device) -> Result<Tensor> {
        let mut out = vec![0f32; self.0.len()];
        dequantize(&self.0, &mut out).context("dequantizing a saved context")?;
        tensor_from_f32(out, shape, dtype, device)
    }
    fn unpack_rows(
        &self,
        shape: &Shape,
        dtype: DType,
        device: &Device,
        first: usize,
        count: usize,
    ) -> Result<Tensor> {
        let Some(dims) = sample_rows(shape, self.0.n_samples(), count) else {
            return Ok(self.unpack(shape, dtype, device)?.narrow(0, first, count)?);
        };
        let mut out = vec![0f32; count * self.0.sample_len()];
        dequantize_samples(&self.0, first, count, &mut out)
            .context("dequantizing a saved context")?;
        tensor_from_f32(out, &Shape::from_dims(&dims), dtype, device)
    }
    fn stored_bytes(&self) -> usize {
        self.0.stored_bytes()
    }
    fn bits(&self) -> f32 {
        self.0.bits_per_element() as f32
    }
    fn label(&self) -> String {
        format!("q{}", self.0.bits())
    }
}

/// Label of [`MaskContext`] in reports.
const MASK_LABEL: &str = "mask1";

/// A sign mask, one bit per element in the input's row-major order (so the bits of sample
/// `n` of a `[N, ..]` tensor are the contiguous range `n * row_len..(n + 1) * row_len`).
/// Unpacks to 0/1 of the requested dtype; asked for `U8` it gives 0/1 bytes directly (a
/// chunked backward then holds one byte per element of its chunk, no float mask).
struct MaskContext(BitMask);

impl MaskContext {
    /// Bits `start..start + shape.elem_count()` as a 0/1 tensor of `shape`.
    fn expand(&self, start: usize, shape: Shape, dtype: DType, device: &Device) -> Result<Tensor> {
        let n = shape.elem_count();
        let t = if dtype == DType::U8 {
            let mut out = vec![0u8; n];
            self.0
                .select_range_into(start, &mut out, 1, 0)
                .context("unpacking a saved mask")?;
            Tensor::from_vec(out, shape, &Device::Cpu)?
        } else {
            let mut out = vec![0f32; n];
            self.0
                .select_range_into(start, &mut out, 1.0, 0.0)
                .context("unpacking a saved mask")?;
            return tensor_from_f32(out, &shape, dtype, device);
        };
        Ok(if device.is_cpu() {
            t
        } else {
            t.to_device(device)?
        })
    }
}

/// Whether `c` is a bit-packed sign mask ([`MaskContext`]), whose `unpack_rows` expands only
/// the rows asked for (so reading it in row chunks costs no more than reading it whole).
pub(crate) fn is_bit_mask(c: &dyn PackedContext) -> bool {
    c.label() == MASK_LABEL
}

impl PackedContext for MaskContext {
    fn unpack(&self, shape: &Shape, dtype: DType, device: &Device) -> Result<Tensor> {
        if shape.elem_count() != self.0.len() {
            bail!(
                "saved mask holds {} bits, asked for shape {shape:?}",
                self.0.len()
            );
        }
        self.expand(0, shape.clone(), dtype, device)
    }
    fn unpack_rows(
        &self,
        shape: &Shape,
        dtype: DType,
        device: &Device,
        first: usize,
        count: usize,
    ) -> Result<Tensor> {
        let Some((&rows, rest)) = shape.dims().split_first() else {
            return Ok(self.unpack(shape, dtype, device)?.narrow(0, first, count)?);
        };
        if first + count > rows || shape.elem_count() != self.0.len() {
            bail!(
                "saved mask of shape {shape:?} ({} bits): rows {first}..{} asked for",
                self.0.len(),
                first + count
            );
        }
        let row_len: usize = rest.iter().product();
        let mut dims = shape.dims().to_vec();
        dims[0] = count;
        self.expand(first * row_len, Shape::from_dims(&dims), dtype, device)
    }
    fn stored_bytes(&self) -> usize {
        self.0.stored_bytes()
    }
    fn bits(&self) -> f32 {
        bits_per_element(self.0.stored_bytes(), self.0.len())
    }
    fn label(&self) -> String {
        MASK_LABEL.into()
    }
}

struct IndexContext(PackedUints);

impl PackedContext for IndexContext {
    fn unpack(&self, shape: &Shape, _dtype: DType, device: &Device) -> Result<Tensor> {
        let t = Tensor::from_vec(self.0.unpack(), shape.clone(), &Device::Cpu)?;
        Ok(if device.is_cpu() {
            t
        } else {
            t.to_device(device)?
        })
    }
    fn stored_bytes(&self) -> usize {
        self.0.stored_bytes()
    }
    fn bits(&self) -> f32 {
        bits_per_element(self.0.stored_bytes(), self.0.len())
    }
    fn label(&self) -> String {
        format!("idx{}", self.0.bits())
    }
}
