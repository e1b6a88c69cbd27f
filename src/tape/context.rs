//! The one door every saved tensor passes through.
//!
//! An op calls [`Tape::save`](super::Tape::save) with what it needs for backward and *what it
//! needs it for* ([`SaveAs`]); the tape asks the [`ContextPolicy`] how to store it and hands back
//! a [`Saved`] handle. The handle is reference counted: a tensor saved by two ops (same value id,
//! same purpose) is stored once, and the storage is freed the moment the last backward rule that
//! holds it has run.

use anyhow::Result;
use candle_core::{DType, Device, Shape, Tensor};
use std::cell::Cell;
use std::rc::Rc;

/// Why an op keeps a tensor; this decides which cheaper representations are allowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SaveAs {
    /// A float tensor that backward multiplies with (matmul/conv input, norm input,
    /// softmax output): may be quantized, stays unbiased under stochastic rounding.
    Activation,
    /// Backward needs only `x > 0` (ReLU, LeakyReLU): may be kept as a 1-bit mask.
    /// [`Saved::load`] returns a 0/1 tensor of the saved dtype whatever the storage.
    SignMask,
    /// Must be exact (per-channel statistics, tiny tensors): never compressed.
    Exact,
    /// Small unsigned integers below `2^bits` (max-pool argmax inside its window), given as
    /// a `U8` tensor; may be bit-packed. [`Saved::load`] returns the `U8` tensor.
    Index { bits: u8 },
}

impl SaveAs {
    /// Number of distinct [`SaveAs::tag`]s (`0..TAGS`).
    pub(crate) const TAGS: u8 = 4;

    pub(crate) fn tag(self) -> u8 {
        match self {
            SaveAs::Activation => 0,
            SaveAs::SignMask => 1,
            SaveAs::Exact => 2,
            SaveAs::Index { .. } => 3,
        }
    }
}

/// A compressed representation produced by a policy (quantized tensor, bit mask, ...).
/// The tape does not need to know the format, only how to get a tensor back and its size.
pub trait PackedContext {
    /// Rebuilds a tensor of `shape`/`dtype` on `device` (dequantized for [`SaveAs::Activation`],
    /// 0/1 for [`SaveAs::SignMask`], `U8` for [`SaveAs::Index`]).
    ///
    /// For [`SaveAs::SignMask`] the result must be a new tensor that shares no storage with
    /// the context (a mask is materialised anyway): backward rules overwrite it in place
    /// ([`Saved::load_owned`]) instead of allocating their output next to it.
    fn unpack(&self, shape: &Shape, dtype: DType, device: &Device) -> Result<Tensor>;
    /// Rows `first..first + count` of dim 0 only (`shape` is the full shape). Chunked
    /// backward passes use it so the unpacked temporary is one chunk; the default unpacks
    /// everything and narrows.
    fn unpack_rows(
        &self,
        shape: &Shape,
        dtype: DType,
        device: &Device,
        first: usize,
        count: usize,
    ) -> Result<Tensor> {
        Ok(self.unpack(shape, dtype, device)?.narrow(0, first, count)?)
    }
    /// Bytes this representation really holds.
    fn stored_bytes(&self) -> usize;
    /// Average stored bits per element, including metadata.
    fn bits(&self) -> f32;
    /// Short label for reports: "q2", "mask1", "idx4", ...
    fn label(&self) -> String;
}

/// A context rebuilt in backward from contexts other ops saved, instead of stored: a layer
/// norm's output from the norm's saved input and statistics (an affine function of it, so a
/// quantized input gives an unbiased output), the attention output from its saved `P` and
/// `v` (a product of two independently rounded factors, unbiased too). It holds the handles
/// it reads, so they live as long as it does.
pub trait Recompute {
    /// Rows `first..first + count` of dim 0 of the tensor, a new tensor.
    fn rows(&self, first: usize, count: usize) -> Result<Tensor>;
    /// What it is rebuilt from, for reports: "from layer_norm", ...
    fn label(&self) -> String;
}

/// How a context is held.
pub enum Packed {
    /// The tensor as it is (a reference to the forward tensor: no copy is made).
    Full(Tensor),
    /// Anything a compression policy produced.
    Compressed(Box<dyn PackedContext>),
    /// Nothing of its own: rebuilt from other contexts when read (see [`Recompute`]).
    Recomputed(Rc<dyn Recompute>),
}

/// What a policy is asked to store.
pub struct SaveRequest<'a> {
    pub op: &'static str,
    pub kind: SaveAs,
    pub tensor: &'a Tensor,
    /// Position of this save within the step (0, 1, 2, ...): stable across steps for a static
    /// graph, so the bit allocator can key per-tensor decisions and RNG streams on it.
    pub slot: usize,
    /// Training step counter; mixed into the rounding noise so each step draws fresh noise.
    pub step: u64,
    /// A parameter (weights are never compressed; stored by reference).
    pub is_param: bool,
}

/// What a policy is asked to store when the tensor arrives a few rows (samples) at a time:
/// an op that computes its output in batch chunks saves it without a whole fp32 copy.
pub struct RowsRequest<'a> {
    pub op: &'static str,
    pub kind: SaveAs,
    /// The whole tensor's shape; dim 0 is the batch the chunks split.
    pub shape: &'a Shape,
    pub dtype: DType,
    pub device: &'a Device,
    pub slot: usize,
    pub step: u64,
}

/// A context being filled in row chunks (see [`ContextPolicy::pack_rows`]).
pub trait RowPacker {
    /// Rows `first..first + rows.dims()[0]` of the tensor.
    fn push(&mut self, first: usize, rows: &Tensor) -> Result<()>;
    /// The finished context, once every row has been pushed.
    fn finish(self: Box<Self>) -> Result<Box<dyn PackedContext>>;
}

/// In backward, the output gradient of a node that saved `slot` (analytic sensitivities:
/// ActNN weighs a context's rounding noise by how strongly the gradient reads it).
pub struct GradObservation<'a> {
    pub slot: usize,
    pub op: &'static str,
    /// Shape of the saved tensor.
    pub saved_shape: &'a [usize],
    /// Shapes of the node's inputs (a conv's weight gives its kernel taps).
    pub input_shapes: &'a [Shape],
    /// `‖dY_n‖²` per sample of the output gradient (one entry for a tensor without a batch).
    pub per_sample_sq: &'a [f64],
}

/// Decides how each saved tensor is stored. The compression module implements levels L0..L4.
pub trait ContextPolicy {
    fn pack(&mut self, req: &SaveRequest) -> Result<Packed>;
    /// Called once per step before the forward pass (allocators re-plan here).
    fn begin_step(&mut self, _step: u64) {}
    /// Whether this step's backward should call [`ContextPolicy::observe_output_grad`]; the
    /// tape skips the pass over the gradients otherwise.
    fn wants_output_grads(&self) -> bool {
        false
    }
    fn observe_output_grad(&mut self, _obs: &GradObservation) {}
    /// A packer for a tensor that arrives in row chunks, or `None` when this policy needs the
    /// whole tensor (it keeps it as it is, or looks at all of it to decide): the tape then
    /// gathers the rows and calls [`ContextPolicy::pack`] as for any save. Whatever the
    /// answer, the stored context must be what `pack` would have made of the whole tensor.
    fn pack_rows(&mut self, _req: &RowsRequest) -> Result<Option<Box<dyn RowPacker>>> {
        Ok(None)
    }
    /// Whether a context that another op's contexts determine (a [`Recompute`] offered with
    /// [`Tape::offer_recompute`](super::Tape::offer_recompute)) is rebuilt in backward rather
    /// than stored: at L1–L4, where the contexts are compressed anyway. L0 stays the fp32
    /// baseline a framework that stores each op's tensors would hold.
    fn recomputes_contexts(&self) -> bool {
        false
    }
    /// Whether activations are stored compressed (L1–L4). Ops that fuse layers into batch
    /// chunks only pay off then: with contexts kept as they are, the whole tensors exist
    /// anyway and the chunks would only add copies and per-op costs.
    fn compresses_activations(&self) -> bool {
        false
    }
}

/// Stores every context as it is: the fp32 baseline (L0), and what gradient checks use.
#[derive(Default, Clone, Copy)]
pub struct KeepPolicy;

impl ContextPolicy for KeepPolicy {
    fn pack(&mut self, req: &SaveRequest) -> Result<Packed> {
        Ok(Packed::Full(req.tensor.clone()))
    }
}

pub(crate) struct SavedEntry {
    pub(crate) kind: SaveAs,
    pub(crate) packed: Packed,
    pub(crate) shape: Shape,
    pub(crate) dtype: DType,
    pub(crate) device: Device,
    /// Bytes this entry adds to the tape's live-context total, given back on drop.
    pub(crate) bytes: usize,
    pub(crate) live: Rc<Cell<usize>>,
}

impl Drop for SavedEntry {
    fn drop(&mut self) {
        self.live.set(self.live.get() - self.bytes);
    }
}

/// Handle to a stored context. Cloning shares the storage; dropping the last handle frees it.
#[derive(Clone)]
pub struct Saved(pub(crate) Rc<SavedEntry>);

impl Saved {
    /// Unpacks into a temporary tensor for the backward rule.
    pub fn load(&self) -> Result<Tensor> {
        let e = &*self.0;
        match (&e.packed, e.kind) {
            (Packed::Full(t), SaveAs::SignMask) => Ok(t.gt(0.0)?.to_dtype(e.dtype)?),
            (Packed::Full(t), _) => Ok(t.clone()),
            (Packed::Compressed(c), _) => c.unpack(&e.shape, e.dtype, &e.device),
            (Packed::Recomputed(r), _) => rebuild_rows(r.as_ref(), e, 0, self.rows()),
        }
    }
    /// Like [`Saved::load`], but the tensor is the caller's alone, so a backward rule may write
    /// its result into it in place (ReLU multiplies the gradient into its unpacked mask, so the
    /// mask is the output buffer, not one more tensor beside it). A mask is built fresh either
    /// way (see [`PackedContext::unpack`]); any other context is copied unless the copy would
    /// be pointless, so prefer [`Saved::load`] there.
    pub fn load_owned(&self) -> Result<Tensor> {
        let e = &*self.0;
        match (&e.packed, e.kind) {
            (Packed::Full(t), SaveAs::SignMask) => Ok(t.gt(0.0)?.to_dtype(e.dtype)?),
            (Packed::Compressed(c), SaveAs::SignMask) => c.unpack(&e.shape, e.dtype, &e.device),
            (Packed::Full(t), _) => Ok(t.copy()?),
            (Packed::Compressed(c), _) => Ok(c.unpack(&e.shape, e.dtype, &e.device)?.copy()?),
            // A new tensor already.
            (Packed::Recomputed(r), _) => rebuild_rows(r.as_ref(), e, 0, self.rows()),
        }
    }

    /// Whether the context is the tensor itself (no compression): loading it costs nothing,
    /// and the tensor's storage must not be overwritten while the context lives.
    pub fn stored_as_is(&self) -> bool {
        matches!(self.0.packed, Packed::Full(_))
    }

    /// Number of rows (dim 0) [`Saved::load_rows`] can be asked for; 1 for a scalar.
    pub fn rows(&self) -> usize {
        self.0.shape.dims().first().copied().unwrap_or(1)
    }

    /// Whether backward rules should read this context in row chunks ([`Saved::load_rows`])
    /// rather than whole: true for a tensor kept as it is (a row range is a view) and for a
    /// compressed activation of rank > 1 (the compression policy quantizes those per sample,
    /// so a chunk dequantizes only its rows; a [`PackedContext`] without its own
    /// `unpack_rows` is still correct, only slower), and for a sign mask of rank > 1 (its
    /// bits are laid out per sample, so a row range expands only those bits), and for a
    /// recomputed context of rank > 1 (rebuilt from its sources' rows). False for packed
    /// indices, whose format unpacks whole.
    pub fn loads_rows_cheaply(&self) -> bool {
        let e = &*self.0;
        match (&e.packed, e.kind) {
            (Packed::Full(_), _) => true,
            (Packed::Recomputed(_), _) => e.shape.rank() > 1,
            (Packed::Compressed(_), SaveAs::Activation | SaveAs::SignMask) => e.shape.rank() > 1,
            _ => false,
        }
    }

    /// Unpacks rows `first..first + count` of dim 0 (a batch chunk).
    pub fn load_rows(&self, first: usize, count: usize) -> Result<Tensor> {
        let e = &*self.0;
        match (&e.packed, e.kind) {
            (Packed::Full(t), SaveAs::SignMask) => {
                Ok(t.narrow(0, first, count)?.gt(0.0)?.to_dtype(e.dtype)?)
            }
            (Packed::Full(t), _) => Ok(t.narrow(0, first, count)?),
            (Packed::Compressed(c), _) => c.unpack_rows(&e.shape, e.dtype, &e.device, first, count),
            (Packed::Recomputed(r), _) => rebuild_rows(r.as_ref(), e, first, count),
        }
    }
    pub fn shape(&self) -> &Shape {
        &self.0.shape
    }
}

/// Rows `first..first + count` of a rebuilt context, made a chunk of rows at a time into one
/// new tensor: a rebuild reads sources larger than its result (`P` and `v` for `P v`) and
/// makes temporaries, which a whole-tensor read would hold all at once.
fn rebuild_rows(r: &dyn Recompute, e: &SavedEntry, first: usize, count: usize) -> Result<Tensor> {
    let rows = e.shape.dims().first().copied().unwrap_or(1).max(1);
    let row_bytes = e.shape.elem_count() / rows * e.dtype.size_in_bytes();
    let chunk = crate::ops::chunk_rows_for(count, row_bytes);
    if chunk >= count {
        return r.rows(first, count);
    }
    let mut dims = e.shape.dims().to_vec();
    dims[0] = count;
    let out = Tensor::zeros(dims, e.dtype, &e.device)?;
    for start in (0..count).step_by(chunk) {
        let n = chunk.min(count - start);
        out.slice_set(&r.rows(first + start, n)?, 0, start)?;
    }
    Ok(out)
}

/// One line of the context log: what an op saved and what it cost. `profile-memory` prints these.
#[derive(Clone, Debug)]
pub struct ContextRecord {
    pub slot: usize,
    /// The model layer that was running (set with `Tape::set_scope`), e.g. `layer1.0`.
    pub scope: Rc<str>,
    pub op: &'static str,
    /// "fp32", "q2", "mask1", "idx4", "param", "seed", "shape", "from layer_norm", ...
    pub repr: String,
    pub shape: Vec<usize>,
    pub bits: f32,
    pub stored_bytes: usize,
    /// What this save costs uncompressed, i.e. what L0 stores for it: the tensor's own bytes
    /// (0 for a shared save, a parameter reference, or a seed/shape note, which L0 stores the
    /// same way). Compression ratios are `uncompressed_bytes / stored_bytes`.
    pub uncompressed_bytes: usize,
    /// Already stored by an earlier op (deduplicated): costs nothing extra.
    pub shared: bool,
}
