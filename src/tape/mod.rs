//! actrain's reverse-mode engine.
//!
//! Forward runs candle ops on plain tensors (candle records no graph). Each differentiable op
//! pushes one [`Node`]: its input ids and a backward rule that owns only the context the op
//! saved through [`Tape::save`]. The tape never holds forward outputs: when the caller drops a
//! [`Value`], its tensor is freed. [`Tape::backward`] pops nodes in reverse, takes the output
//! gradient out of the frontier, runs the rule (which unpacks its context into temporaries)
//! and drops the node — and with it the context — before the next one.
//!
//! Gradients in flight are [`Grad`]s: a tensor plus whether its storage is the gradient's
//! alone. Rules recorded with [`Tape::record_grad`] may write their input gradient into an
//! owned output gradient (batch norm, the pointwise activations) and mark what they allocate
//! as owned; where two gradients meet at a fork the tape adds one into the other when it is
//! owned. So a rule costs one layer-sized tensor (its output gradient) instead of two or three.

pub mod context;
pub mod gradcheck;
pub mod params;

pub use context::{
    ContextPolicy, ContextRecord, GradObservation, KeepPolicy, Packed, PackedContext, Recompute,
    RowPacker, RowsRequest, SaveAs, SaveRequest, Saved,
};
pub use params::{Param, ParamId, ParamStore};

use anyhow::{bail, Context as _, Result};
use candle_core::{DType, Device, Shape, Tensor};
use context::SavedEntry;
use std::cell::Cell;
use std::collections::HashMap;
use std::rc::{Rc, Weak};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ValueId(u64);

/// A tensor produced on the tape. `tracked` values (parameters and anything computed from
/// them) get gradients; untracked ones (data) are constants.
#[derive(Clone, Debug)]
pub struct Value {
    id: ValueId,
    tensor: Tensor,
    tracked: bool,
}

impl Value {
    pub fn id(&self) -> ValueId {
        self.id
    }
    pub fn tensor(&self) -> &Tensor {
        &self.tensor
    }
    pub fn into_tensor(self) -> Tensor {
        self.tensor
    }
    pub fn is_tracked(&self) -> bool {
        self.tracked
    }
    pub fn dims(&self) -> &[usize] {
        self.tensor.dims()
    }
    pub fn shape(&self) -> &Shape {
        self.tensor.shape()
    }
    pub fn dtype(&self) -> DType {
        self.tensor.dtype()
    }
    pub fn rank(&self) -> usize {
        self.tensor.rank()
    }
}

/// Gradients of a node's inputs, in input order; `None` where an input needs none.
pub type InputGrads = Vec<Option<Tensor>>;
type BackwardFn = Box<dyn FnOnce(Tensor, &[bool]) -> Result<InputGrads>>;
type GradBackwardFn = Box<dyn FnOnce(Grad, &[bool]) -> Result<Vec<Option<Grad>>>>;
type GradIntoBackwardFn =
    Box<dyn FnOnce(Grad, &[bool], &mut [Option<Grad>]) -> Result<Vec<Option<Grad>>>>;

/// A gradient in flight during backward: the tensor, and whether its storage belongs to the
/// gradient alone.
///
/// An *owned* gradient's storage is referenced by nothing else — no other gradient, context,
/// forward tensor or parameter — so a backward rule (see [`Tape::record_grad`]) may write
/// its input gradient into it in place, and the tape adds a second contribution at a fork
/// into it instead of allocating the sum. A *shared* one may alias anything (the same tensor
/// handed to both inputs of an add, a view of another gradient) and is only read.
#[derive(Debug)]
pub struct Grad {
    tensor: Tensor,
    owned: bool,
}

impl Grad {
    /// A gradient that may share its storage: never written in place.
    pub fn shared(tensor: Tensor) -> Self {
        Self {
            tensor,
            owned: false,
        }
    }
    /// A gradient whose storage nothing else references. The caller vouches for it: only
    /// for a tensor it has just allocated (or one it was handed as owned and wrote into) and
    /// of which it keeps no other handle or view.
    pub fn owned(tensor: Tensor) -> Self {
        Self {
            tensor,
            owned: true,
        }
    }
    pub fn tensor(&self) -> &Tensor {
        &self.tensor
    }
    pub fn is_owned(&self) -> bool {
        self.owned
    }
    pub fn into_tensor(self) -> Tensor {
        self.tensor
    }
    /// Applies `f` to the tensor and keeps the ownership: for a view of it (reshape,
    /// transpose) or a new tensor made from it, where `f` keeps no other handle.
    pub fn map_view(self, f: impl FnOnce(Tensor) -> Result<Tensor>) -> Result<Grad> {
        Ok(Grad {
            tensor: f(self.tensor)?,
            owned: self.owned,
        })
    }
    fn bytes(&self) -> usize {
        self.tensor.elem_count() * self.tensor.dtype().size_in_bytes()
    }
}

/// A node's backward rule: plain (tensors in and out, nothing written in place),
/// ownership-aware ([`Grad`] in and out), or ownership-aware and handed the gradients its
/// inputs have already gathered (see [`Tape::record_grad_into`]).
enum Rule {
    Plain(BackwardFn),
    Grad(GradBackwardFn),
    GradInto(GradIntoBackwardFn),
}

struct Node {
    op: &'static str,
    output: ValueId,
    inputs: Vec<ValueId>,
    input_shapes: Vec<Shape>,
    /// `needs[i]`: input i is tracked, so its gradient is wanted.
    needs: Vec<bool>,
    backward: Rule,
    /// `(slot, shape)` of the contexts this node's op saved through the policy (what
    /// [`ContextPolicy::observe_output_grad`] reports on).
    slots: Vec<(usize, Vec<usize>)>,
}

pub struct Tape {
    nodes: Vec<Node>,
    /// Policy-packed saves since the last recorded node: they belong to the next one.
    unclaimed_slots: Vec<(usize, Vec<usize>)>,
    next_id: u64,
    recording: bool,
    training: bool,
    policy: Box<dyn ContextPolicy>,
    dedup: HashMap<(ValueId, u8), Weak<SavedEntry>>,
    /// Op outputs a later save may rebuild from contexts already saved
    /// ([`Tape::offer_recompute`]); cleared when backward starts, so no offer keeps a
    /// context alive past the node that saved it.
    recompute: HashMap<ValueId, Rc<dyn Recompute>>,
    param_of: HashMap<ValueId, ParamId>,
    records: Vec<ContextRecord>,
    slot: usize,
    step: u64,
    seed: u64,
    seed_counter: u64,
    live_context: Rc<Cell<usize>>,
    scope: Rc<str>,
}

/// A place in the context log ([`Tape::log_place`]): the slot the next save would take and
/// how many lines were already logged under it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LogPlace {
    slot: usize,
    earlier: usize,
}

/// A context being saved in row chunks ([`Tape::begin_save_rows`]).
pub struct RowSave {
    op: &'static str,
    kind: SaveAs,
    slot: usize,
    shape: Shape,
    dtype: DType,
    device: Device,
    /// Rows pushed so far (they must come in order, each once).
    filled: usize,
    sink: RowSink,
}

enum RowSink {
    /// The policy quantizes each chunk into place.
    Packer(Box<dyn RowPacker>),
    /// The rows are copied into the whole tensor, which the policy then packs as usual.
    Gather(Tensor),
}

impl RowSave {
    /// Rows `first..first + rows.dims()[0]`; chunks come in order, starting at row 0.
    pub fn push(&mut self, first: usize, rows: &Tensor) -> Result<()> {
        let n = rows.dims().first().copied().unwrap_or(0);
        if first != self.filled
            || rows.dims().get(1..) != self.shape.dims().get(1..)
            || first + n > self.shape.dims()[0]
            || rows.dtype() != self.dtype
        {
            bail!(
                "{}: rows {first}..{} of shape {:?} ({:?}) do not continue a context of shape {:?} ({:?}) filled to row {}",
                self.op,
                first + n,
                rows.dims(),
                rows.dtype(),
                self.shape.dims(),
                self.dtype,
                self.filled
            );
        }
        match &mut self.sink {
            RowSink::Packer(p) => p.push(first, rows)?,
            RowSink::Gather(t) => t.slice_set(&rows.contiguous()?, 0, first)?,
        }
        self.filled += n;
        Ok(())
    }
}

impl Default for Tape {
    fn default() -> Self {
        Self::new(Box::new(KeepPolicy))
    }
}

impl Tape {
    pub fn new(policy: Box<dyn ContextPolicy>) -> Self {
        Self {
            nodes: Vec::new(),
            unclaimed_slots: Vec::new(),
            next_id: 0,
            recording: true,
            training: true,
            policy,
            dedup: HashMap::new(),
            recompute: HashMap::new(),
            param_of: HashMap::new(),
            records: Vec::new(),
            slot: 0,
            step: 0,
            seed: 0,
            seed_counter: 0,
            live_context: Rc::new(Cell::new(0)),
            scope: Rc::from(""),
        }
    }

    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Training mode: record nodes, batch norm uses batch statistics, dropout drops.
    pub fn train_mode(&mut self) {
        self.training = true;
        self.recording = true;
    }
    /// Evaluation: nothing is recorded or saved; batch norm uses running statistics.
    pub fn eval_mode(&mut self) {
        self.training = false;
        self.recording = false;
    }
    pub fn is_training(&self) -> bool {
        self.training
    }
    pub fn is_recording(&self) -> bool {
        self.recording
    }
    /// Turns recording off (or on) without changing train/eval semantics.
    pub fn set_recording(&mut self, on: bool) {
        self.recording = on;
    }

    pub fn step(&self) -> u64 {
        self.step
    }

    /// Restores the step counter (resuming a run): rounding noise and dropout masks are keyed
    /// on it, so a resumed run draws exactly what the uninterrupted one would have.
    pub fn set_step(&mut self, step: u64) {
        self.step = step;
    }

    /// Starts a new step: clears what the previous one left (log, dedup table, unused nodes)
    /// and lets the policy re-plan.
    pub fn begin_step(&mut self) {
        self.nodes.clear();
        self.unclaimed_slots.clear();
        self.dedup.clear();
        self.recompute.clear();
        self.param_of.clear();
        self.records.clear();
        self.slot = 0;
        self.seed_counter = 0;
        self.step += 1;
        self.policy.begin_step(self.step);
    }

    /// A seed unique to this op call in this step (dropout regenerates its mask from it).
    pub fn next_seed(&mut self) -> u64 {
        self.seed_counter += 1;
        splitmix64(self.seed ^ splitmix64(self.step) ^ splitmix64(self.seed_counter << 1 | 1))
    }

    fn fresh_id(&mut self) -> ValueId {
        self.next_id += 1;
        ValueId(self.next_id)
    }

    /// Wraps data (inputs, labels): a constant, never differentiated.
    pub fn constant(&mut self, tensor: Tensor) -> Value {
        let id = self.fresh_id();
        Value {
            id,
            tensor,
            tracked: false,
        }
    }

    /// A parameter as a tape value; backward accumulates its gradient into the store.
    pub fn param(&mut self, store: &ParamStore, id: ParamId) -> Value {
        let p = store.get(id);
        let vid = self.fresh_id();
        let tracked = p.trainable && self.recording;
        if tracked {
            self.param_of.insert(vid, id);
        }
        Value {
            id: vid,
            tensor: p.value.clone(),
            tracked,
        }
    }

    /// Whether an op may run a block of layers fused in batch chunks, saving its hidden
    /// tensors with [`Tape::begin_save_rows`]: activations are compressed (at L0 the whole
    /// tensors are kept anyway, and the composed ops are faster), and this step's backward
    /// does not report each saving node's output gradient to the policy (an analytic
    /// sensitivity estimate): a fused node would report one gradient for contexts that
    /// different layers read.
    pub(crate) fn fuses_in_chunks(&self) -> bool {
        self.policy.compresses_activations() && !self.policy.wants_output_grads()
    }

    /// True when an op over these inputs must record a node (and so save context).
    pub fn needs_grad(&self, inputs: &[&Value]) -> bool {
        self.recording && inputs.iter().any(|v| v.tracked)
    }

    /// The door every saved tensor passes through. `value` identifies the tensor for
    /// deduplication: the same value saved for the same purpose by two ops is stored once.
    pub fn save(&mut self, op: &'static str, value: &Value, kind: SaveAs) -> Result<Saved> {
        let key = (value.id, kind.tag());
        if let Some(entry) = self.dedup.get(&key).and_then(Weak::upgrade) {
            self.push_record(ContextRecord {
                slot: self.slot,
                scope: self.scope.clone(),
                op,
                repr: "shared".into(),
                shape: value.dims().to_vec(),
                bits: 0.0,
                stored_bytes: 0,
                uncompressed_bytes: 0,
                shared: true,
            });
            return Ok(Saved(entry));
        }
        let saved = match self.recompute.get(&value.id) {
            Some(r) if kind == SaveAs::Activation => {
                let (r, t, at) = (r.clone(), &value.tensor, self.log_place());
                self.recomputed_context_at(at, op, r, t.dims(), t.dtype(), t.device())
            }
            _ => {
                let is_param = self.param_of.contains_key(&value.id);
                self.save_tensor(op, &value.tensor, kind, is_param)?
            }
        };
        self.dedup.insert(key, Rc::downgrade(&saved.0));
        Ok(saved)
    }

    /// Offers `value` (an op's output) as rebuildable from contexts already saved: a later
    /// [`Tape::save`] of it as an activation gets `r` — no storage of its own, no slot —
    /// where the policy rebuilds such contexts ([`ContextPolicy::recomputes_contexts`],
    /// L1–L4); elsewhere the offer is ignored and the save stores the tensor as usual.
    pub fn offer_recompute(&mut self, value: &Value, r: Rc<dyn Recompute>) {
        if self.recording && self.policy.recomputes_contexts() {
            self.recompute.insert(value.id, r);
        }
    }

    /// The recompute offered for `value`, if any (a shape op passes it on to its output).
    pub(crate) fn recompute_of(&self, value: &Value) -> Option<Rc<dyn Recompute>> {
        self.recompute.get(&value.id).cloned()
    }

    /// Whether contexts that other contexts determine are rebuilt rather than stored (see
    /// [`ContextPolicy::recomputes_contexts`]); fused ops that save in rows ask before
    /// deciding to save or to rebuild, so they take the composed ops' slots.
    pub(crate) fn recomputes_contexts(&self) -> bool {
        self.policy.recomputes_contexts()
    }

    /// Where the next line of the context log goes: a fused op notes it for a context it can
    /// only build later (see [`Tape::recomputed_context_at`]).
    pub(crate) fn log_place(&self) -> LogPlace {
        let earlier = self
            .records
            .iter()
            .rev()
            .take_while(|r| r.slot == self.slot)
            .count();
        LogPlace {
            slot: self.slot,
            earlier,
        }
    }

    /// A context rebuilt by `r` (a tensor of `shape`/`dtype` on `device`), logged like a
    /// deduplicated save — no slot of its own, no stored bytes, and what L0 would store for
    /// it as its uncompressed size — where the log stood at `at` ([`Tape::log_place`]: a
    /// fused op builds the rebuild from contexts it finishes after its other saves): after
    /// the lines logged by then, before those logged since.
    pub(crate) fn recomputed_context_at(
        &mut self,
        at: LogPlace,
        op: &'static str,
        r: Rc<dyn Recompute>,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Saved {
        let shape = Shape::from_dims(shape);
        let rec = ContextRecord {
            slot: at.slot,
            scope: self.scope.clone(),
            op,
            repr: r.label(),
            shape: shape.dims().to_vec(),
            bits: 0.0,
            stored_bytes: 0,
            uncompressed_bytes: shape.elem_count() * dtype.size_in_bytes(),
            shared: false,
        };
        let pos = self.records.partition_point(|r| r.slot < at.slot) + at.earlier;
        self.records.insert(pos.min(self.records.len()), rec);
        Saved(Rc::new(SavedEntry {
            kind: SaveAs::Activation,
            packed: Packed::Recomputed(r),
            shape,
            dtype,
            device: device.clone(),
            bytes: 0,
            live: self.live_context.clone(),
        }))
    }

    /// Whether an op handed `x` by value may write its output into `x`'s buffer (a forward
    /// op "in place"): `x` is a tracked op output on the CPU, not a parameter, contiguous, and
    /// no context of this tape — `own`, the op's, or any other op's — holds it as it is
    /// (at L0, or a mask kept as the tensor); at L1–L4 contexts are compressed copies, so
    /// the fp32 tensor is dead once the op has read it. The caller vouches that it keeps no
    /// other handle or view of `x` (as for [`Grad::owned`]).
    pub fn may_overwrite(&self, x: &Value, own: Option<&Saved>) -> bool {
        x.tracked
            && crate::ops::activation::fused_cpu_kernels()
            && x.tensor.device().is_cpu()
            && x.tensor.is_contiguous()
            && !self.param_of.contains_key(&x.id)
            && own.is_none_or(|s| !s.stored_as_is())
            && (0..SaveAs::TAGS).all(|tag| {
                self.dedup
                    .get(&(x.id, tag))
                    .and_then(Weak::upgrade)
                    .is_none_or(|e| !matches!(e.packed, Packed::Full(_)))
            })
    }

    /// Saves a tensor the op derived itself (e.g. argmax positions); no deduplication.
    pub fn save_derived(&mut self, op: &'static str, t: &Tensor, kind: SaveAs) -> Result<Saved> {
        self.save_tensor(op, t, kind, false)
    }

    fn save_tensor(
        &mut self,
        op: &'static str,
        t: &Tensor,
        kind: SaveAs,
        is_param: bool,
    ) -> Result<Saved> {
        crate::memory::check_budget()?;
        let slot = self.slot;
        self.slot += 1;
        // Only while the policy gathers output-gradient norms (an analytic estimate).
        if !is_param && kind != SaveAs::Exact && self.policy.wants_output_grads() {
            self.unclaimed_slots.push((slot, t.dims().to_vec()));
        }
        let packed = self.pack_at(op, t, kind, is_param, slot)?;
        Ok(self.store(op, kind, packed, t, is_param, slot))
    }

    /// Asks the policy to pack `t` as the context of `slot`.
    fn pack_at(
        &mut self,
        op: &'static str,
        t: &Tensor,
        kind: SaveAs,
        is_param: bool,
        slot: usize,
    ) -> Result<Packed> {
        // Parameters are stored by reference and exact contexts as they are, whatever the
        // policy: compressing either would save nothing or break correctness.
        if is_param || kind == SaveAs::Exact {
            return Ok(Packed::Full(t.clone()));
        }
        let req = SaveRequest {
            op,
            kind,
            tensor: t,
            slot,
            step: self.step,
            is_param,
        };
        self.policy
            .pack(&req)
            .with_context(|| format!("saving the context of op `{op}`"))
    }

    /// Logs a packed context of the tensor `like` (its shape, dtype and device) and hands
    /// out its handle.
    fn store(
        &mut self,
        op: &'static str,
        kind: SaveAs,
        packed: Packed,
        like: &Tensor,
        is_param: bool,
        slot: usize,
    ) -> Saved {
        self.store_as(
            op,
            kind,
            packed,
            like.shape(),
            like.dtype(),
            like.device(),
            is_param,
            slot,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn store_as(
        &mut self,
        op: &'static str,
        kind: SaveAs,
        packed: Packed,
        shape: &Shape,
        dtype: DType,
        device: &Device,
        is_param: bool,
        slot: usize,
    ) -> Saved {
        let uncompressed_bytes = if is_param {
            0
        } else {
            shape.elem_count() * dtype.size_in_bytes()
        };
        let (repr, bits, stored_bytes) = match &packed {
            Packed::Full(_) if is_param => ("param".to_string(), 0.0, 0),
            Packed::Full(full) => {
                let b = full.elem_count() * full.dtype().size_in_bytes();
                let label = format!("{:?}", full.dtype()).to_lowercase();
                (label, (full.dtype().size_in_bytes() * 8) as f32, b)
            }
            Packed::Compressed(c) => (c.label(), c.bits(), c.stored_bytes()),
            Packed::Recomputed(r) => (r.label(), 0.0, 0),
        };
        self.push_record(ContextRecord {
            slot,
            scope: self.scope.clone(),
            op,
            repr,
            shape: shape.dims().to_vec(),
            bits,
            stored_bytes,
            uncompressed_bytes,
            shared: false,
        });
        self.live_context
            .set(self.live_context.get() + stored_bytes);
        Saved(Rc::new(SavedEntry {
            kind,
            packed,
            shape: shape.clone(),
            dtype,
            device: device.clone(),
            bytes: stored_bytes,
            live: self.live_context.clone(),
        }))
    }

    /// Starts a context the op will hand over a few rows (samples) at a time — an output it
    /// computes in batch chunks — so no whole fp32 copy of it need exist: at L1–L4 on the CPU
    /// each chunk is quantized into place, with exactly the codes a whole-tensor save would
    /// give; policies that keep or inspect whole tensors get the rows gathered. Push every
    /// row with [`RowSave::push`], then [`Tape::finish_save_rows`]. Takes the next slot now.
    pub fn begin_save_rows(
        &mut self,
        op: &'static str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
        kind: SaveAs,
    ) -> Result<RowSave> {
        crate::memory::check_budget()?;
        if shape.is_empty() {
            bail!("{op}: a context saved in rows needs a batch dimension, got a scalar");
        }
        let slot = self.slot;
        self.slot += 1;
        if kind != SaveAs::Exact && self.policy.wants_output_grads() {
            self.unclaimed_slots.push((slot, shape.to_vec()));
        }
        let shape = Shape::from_dims(shape);
        let packer = if kind == SaveAs::Exact {
            None
        } else {
            let req = RowsRequest {
                op,
                kind,
                shape: &shape,
                dtype,
                device,
                slot,
                step: self.step,
            };
            self.policy
                .pack_rows(&req)
                .with_context(|| format!("saving the context of op `{op}`"))?
        };
        let sink = match packer {
            Some(p) => RowSink::Packer(p),
            None => RowSink::Gather(Tensor::zeros(&shape, dtype, device)?),
        };
        Ok(RowSave {
            op,
            kind,
            slot,
            shape,
            dtype,
            device: device.clone(),
            filled: 0,
            sink,
        })
    }

    /// Ends a [`Tape::begin_save_rows`] context once every row was pushed.
    pub fn finish_save_rows(&mut self, rows: RowSave) -> Result<Saved> {
        let RowSave {
            op,
            kind,
            slot,
            shape,
            dtype,
            device,
            filled,
            sink,
        } = rows;
        let n = shape.dims()[0];
        if filled != n {
            bail!("{op}: {filled} of the context's {n} rows were saved");
        }
        crate::memory::check_budget()?;
        Ok(match sink {
            RowSink::Packer(p) => {
                let c = p
                    .finish()
                    .with_context(|| format!("saving the context of op `{op}`"))?;
                self.store_as(
                    op,
                    kind,
                    Packed::Compressed(c),
                    &shape,
                    dtype,
                    &device,
                    false,
                    slot,
                )
            }
            RowSink::Gather(t) => {
                let packed = self.pack_at(op, &t, kind, false, slot)?;
                self.store(op, kind, packed, &t, false, slot)
            }
        })
    }

    /// Adds a line to the context log in slot order: a context saved in rows is logged when
    /// it is finished, after saves that took later slots, and goes back to its place.
    fn push_record(&mut self, rec: ContextRecord) {
        let at = self.records.partition_point(|r| r.slot <= rec.slot);
        self.records.insert(at, rec);
    }

    /// Logs that an op reads a context another op of this step already saved (a fused op
    /// reusing a tensor it saved in rows: what [`Tape::save`] logs for a deduplicated save).
    pub(crate) fn note_shared(&mut self, op: &'static str, shape: &[usize]) {
        self.push_record(ContextRecord {
            slot: self.slot,
            scope: self.scope.clone(),
            op,
            repr: "shared".into(),
            shape: shape.to_vec(),
            bits: 0.0,
            stored_bytes: 0,
            uncompressed_bytes: 0,
            shared: true,
        });
    }

    /// Logs a context that costs no tensor storage (a dropout seed, a shape) so reports show it.
    pub fn note_context(&mut self, op: &'static str, repr: &str, shape: &[usize]) {
        self.push_record(ContextRecord {
            slot: self.slot,
            scope: self.scope.clone(),
            op,
            repr: repr.to_string(),
            shape: shape.to_vec(),
            bits: 0.0,
            stored_bytes: 0,
            uncompressed_bytes: 0,
            shared: false,
        });
    }

    /// Names the layer whose ops run next; context records carry it for reports.
    pub fn set_scope(&mut self, scope: &str) {
        if &*self.scope != scope {
            self.scope = Rc::from(scope);
        }
    }

    /// Bytes of saved context still alive (the "activations" bucket). Parameters saved by
    /// reference count zero; a deduplicated save counts once.
    pub fn live_context_bytes(&self) -> usize {
        self.live_context.get()
    }

    /// What was saved since the step began.
    pub fn context_log(&self) -> &[ContextRecord] {
        &self.records
    }

    /// Records a node. Ops call this after computing `output` (and saving context only if
    /// [`Tape::needs_grad`] said so). Returns the output as a tape value.
    pub fn record<F>(
        &mut self,
        op: &'static str,
        inputs: &[&Value],
        output: Tensor,
        backward: F,
    ) -> Result<Value>
    where
        F: FnOnce(Tensor, &[bool]) -> Result<InputGrads> + 'static,
    {
        self.record_rule(op, inputs, output, || Rule::Plain(Box::new(backward)))
    }

    /// Records `output` with the rule `make` builds, or (no input needs a gradient) returns
    /// it as a constant without building the rule.
    fn record_rule(
        &mut self,
        op: &'static str,
        inputs: &[&Value],
        output: Tensor,
        make: impl FnOnce() -> Rule,
    ) -> Result<Value> {
        if !self.needs_grad(inputs) {
            crate::memory::check_budget()?;
            return Ok(self.constant(output));
        }
        let out = self.output(output);
        self.push_node(op, inputs, out, make())
    }

    /// The output of an op that saves its own output (sigmoid, softmax, exp): create the value
    /// first with [`Tape::output`], save it (so a later op saving the same tensor shares the
    /// storage), then record with this.
    pub fn record_output<F>(
        &mut self,
        op: &'static str,
        inputs: &[&Value],
        out: Value,
        backward: F,
    ) -> Result<Value>
    where
        F: FnOnce(Tensor, &[bool]) -> Result<InputGrads> + 'static,
    {
        self.push_node(op, inputs, out, Rule::Plain(Box::new(backward)))
    }

    /// Like [`Tape::record`], for a rule that takes its output gradient as a [`Grad`] and
    /// returns its input gradients as [`Grad`]s: it may write into an owned output gradient
    /// in place, and marks the gradients it allocated itself as owned so the next rule (or a
    /// fork's accumulation) can do the same.
    pub fn record_grad<F>(
        &mut self,
        op: &'static str,
        inputs: &[&Value],
        output: Tensor,
        backward: F,
    ) -> Result<Value>
    where
        F: FnOnce(Grad, &[bool]) -> Result<Vec<Option<Grad>>> + 'static,
    {
        self.record_rule(op, inputs, output, || Rule::Grad(Box::new(backward)))
    }

    /// Like [`Tape::record_grad`], for a rule that can add an input's gradient into the one
    /// that input has already gathered from the consumers processed before it (a fork: a
    /// residual block's input gets the shortcut's gradient first). Backward hands the rule
    /// `acc[i]`: that owned, same-shape gradient, or `None`. A rule that takes `acc[i]` and
    /// adds its contribution into it returns the sum as input `i`'s gradient; one that
    /// leaves it returns its contribution as usual and the tape adds the two (a rule that
    /// takes `acc[i]` must return a gradient for input `i`, or that sum is lost). Where the
    /// contribution is larger than the output gradient (a strided convolution), this saves
    /// a buffer of the input's size.
    pub fn record_grad_into<F>(
        &mut self,
        op: &'static str,
        inputs: &[&Value],
        output: Tensor,
        backward: F,
    ) -> Result<Value>
    where
        F: FnOnce(Grad, &[bool], &mut [Option<Grad>]) -> Result<Vec<Option<Grad>>> + 'static,
    {
        self.record_rule(op, inputs, output, || Rule::GradInto(Box::new(backward)))
    }

    /// [`Tape::record_output`] for an ownership-aware rule (see [`Tape::record_grad`]).
    pub fn record_output_grad<F>(
        &mut self,
        op: &'static str,
        inputs: &[&Value],
        out: Value,
        backward: F,
    ) -> Result<Value>
    where
        F: FnOnce(Grad, &[bool]) -> Result<Vec<Option<Grad>>> + 'static,
    {
        self.push_node(op, inputs, out, Rule::Grad(Box::new(backward)))
    }

    fn push_node(
        &mut self,
        op: &'static str,
        inputs: &[&Value],
        out: Value,
        backward: Rule,
    ) -> Result<Value> {
        crate::memory::check_budget()?;
        if !self.needs_grad(inputs) {
            return Ok(Value {
                tracked: false,
                ..out
            });
        }
        let slots = std::mem::take(&mut self.unclaimed_slots);
        self.nodes.push(Node {
            op,
            output: out.id,
            inputs: inputs.iter().map(|v| v.id).collect(),
            input_shapes: inputs.iter().map(|v| v.shape().clone()).collect(),
            needs: inputs.iter().map(|v| v.tracked).collect(),
            backward,
            slots,
        });
        Ok(out)
    }

    /// A fresh tracked value for an op's output, before the op is recorded.
    pub fn output(&mut self, tensor: Tensor) -> Value {
        let id = self.fresh_id();
        Value {
            id,
            tensor,
            tracked: true,
        }
    }

    /// Number of nodes waiting for backward.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Reverse pass from a scalar `loss`; parameter gradients are added into `params`.
    pub fn backward(&mut self, loss: &Value, params: &mut ParamStore) -> Result<()> {
        self.backward_with(loss, params, |_| {})
    }

    /// Like [`Tape::backward`], calling `after_node` once each node's context has been
    /// dropped (profiles and tests use it to watch memory shrink node by node).
    pub fn backward_with(
        &mut self,
        loss: &Value,
        params: &mut ParamStore,
        mut after_node: impl FnMut(&BackwardProgress),
    ) -> Result<()> {
        if loss.tensor.elem_count() != 1 {
            bail!(
                "backward needs a scalar loss, got shape {:?}",
                loss.tensor.dims()
            );
        }
        self.recompute.clear();
        let result = self.run_backward(loss, params, &mut after_node);
        // Whatever happened, nothing of this step's graph may outlive backward.
        self.nodes.clear();
        self.unclaimed_slots.clear();
        self.dedup.clear();
        self.param_of.clear();
        result
    }

    fn run_backward(
        &mut self,
        loss: &Value,
        params: &mut ParamStore,
        after_node: &mut impl FnMut(&BackwardProgress),
    ) -> Result<()> {
        if !loss.tracked {
            return Ok(());
        }
        let mut frontier: HashMap<ValueId, Grad> = HashMap::new();
        frontier.insert(loss.id, Grad::owned(loss.tensor.ones_like()?));
        while let Some(node) = self.nodes.pop() {
            let Node {
                op,
                output,
                inputs,
                input_shapes,
                needs,
                backward,
                slots,
            } = node;
            let Some(grad_out) = frontier.remove(&output) else {
                drop(backward);
                self.report(op, &frontier, after_node);
                continue;
            };
            if !slots.is_empty() && self.policy.wants_output_grads() {
                let per_sample_sq = per_sample_sq_norms(grad_out.tensor())?;
                for (slot, shape) in &slots {
                    self.policy.observe_output_grad(&GradObservation {
                        slot: *slot,
                        op,
                        saved_shape: shape,
                        input_shapes: &input_shapes,
                        per_sample_sq: &per_sample_sq,
                    });
                }
            }
            let grads: Vec<Option<Grad>> = match backward {
                Rule::Plain(f) => f(grad_out.into_tensor(), &needs)
                    .with_context(|| format!("backward of op `{op}`"))?
                    .into_iter()
                    .map(|g| g.map(Grad::shared))
                    .collect(),
                Rule::Grad(f) => {
                    f(grad_out, &needs).with_context(|| format!("backward of op `{op}`"))?
                }
                Rule::GradInto(f) => {
                    // Offer each input's gathered gradient where the rule may write into it:
                    // owned, not a parameter's, and the input appears once in this node.
                    let mut acc: Vec<Option<Grad>> = inputs
                        .iter()
                        .enumerate()
                        .map(|(i, id)| {
                            let offer = needs[i]
                                && !self.param_of.contains_key(id)
                                && inputs.iter().filter(|&j| j == id).count() == 1
                                && frontier.get(id).is_some_and(Grad::is_owned);
                            if offer {
                                frontier.remove(id)
                            } else {
                                None
                            }
                        })
                        .collect();
                    let result = f(grad_out, &needs, &mut acc);
                    // What the rule left goes back, to be summed below as usual.
                    for (i, a) in acc.into_iter().enumerate() {
                        if let Some(a) = a {
                            frontier.insert(inputs[i], a);
                        }
                    }
                    result.with_context(|| format!("backward of op `{op}`"))?
                }
            };
            if grads.len() != inputs.len() {
                bail!(
                    "backward of `{op}` returned {} gradients for {} inputs",
                    grads.len(),
                    inputs.len()
                );
            }
            for (i, g) in grads.into_iter().enumerate() {
                let Some(g) = g else { continue };
                if !needs[i] {
                    continue;
                }
                if g.tensor().shape() != &input_shapes[i] {
                    bail!(
                        "backward of `{op}`: gradient for input {i} has shape {:?}, input has {:?}",
                        g.tensor().dims(),
                        input_shapes[i].dims()
                    );
                }
                let id = inputs[i];
                if let Some(&pid) = self.param_of.get(&id) {
                    params.accumulate_grad(pid, g.into_tensor())?;
                } else if let Some(prev) = frontier.remove(&id) {
                    frontier.insert(id, add_grads(prev, g)?);
                } else {
                    frontier.insert(id, g);
                }
            }
            self.report(op, &frontier, after_node);
        }
        Ok(())
    }

    fn report(
        &self,
        op: &'static str,
        frontier: &HashMap<ValueId, Grad>,
        after_node: &mut impl FnMut(&BackwardProgress),
    ) {
        after_node(&BackwardProgress {
            op,
            nodes_left: self.nodes.len(),
            live_context_bytes: self.live_context.get(),
            frontier_bytes: frontier.values().map(Grad::bytes).sum(),
        });
    }
}

/// `Σ g[n, ..]²` per sample (dim 0), in f64; one entry for a tensor of rank ≤ 1.
fn per_sample_sq_norms(g: &Tensor) -> Result<Vec<f64>> {
    let n = if g.rank() <= 1 { 1 } else { g.dims()[0] };
    if g.dtype() == candle_core::DType::F32 && n > 0 {
        if let (candle_core::Storage::Cpu(cpu), Some((a, b))) =
            (&*g.storage_and_layout().0, g.layout().contiguous_offsets())
        {
            let x = &cpu.as_slice::<f32>()?[a..b];
            let len = x.len() / n;
            return Ok(x
                .chunks(len.max(1))
                .map(|c| c.iter().map(|&v| (v as f64) * (v as f64)).sum())
                .collect());
        }
    }
    let g = g.to_dtype(candle_core::DType::F64)?;
    if g.rank() <= 1 {
        return Ok(vec![g.sqr()?.sum_all()?.to_scalar::<f64>()?]);
    }
    let n = g.dims()[0];
    Ok(g.reshape((n, ()))?.sqr()?.sum(1)?.to_vec1::<f64>()?)
}

/// The sum of two gradient contributions to one value (a fork): written into whichever is
/// owned (on the CPU), so the sum costs no third tensor; a new, owned tensor otherwise.
fn add_grads(a: Grad, b: Grad) -> Result<Grad> {
    let (dst, src) = match (a.owned, b.owned) {
        (true, _) => (a, b),
        (false, true) => (b, a),
        (false, false) => return Ok(Grad::owned((a.tensor + b.tensor)?)),
    };
    if crate::ops::activation::add_in_place(&dst.tensor, &src.tensor)? {
        return Ok(dst);
    }
    Ok(Grad::owned((dst.tensor + src.tensor)?))
}

/// Where backward stands after a node: what is left of the context and of the gradients
/// waiting to be consumed.
#[derive(Clone, Debug)]
pub struct BackwardProgress {
    pub op: &'static str,
    pub nodes_left: usize,
    pub live_context_bytes: usize,
    pub frontier_bytes: usize,
}

/// A 64-bit mixer (splitmix64's finaliser) for deriving seeds.
pub fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use std::cell::RefCell;

    /// `y = 2 x` recorded with [`Tape::record_grad_into`]: the rule notes whether it was
    /// offered `x`'s gathered gradient and, if so, adds its own contribution into it.
    fn double_into(tape: &mut Tape, x: &Value, offered: Rc<RefCell<Vec<bool>>>) -> Value {
        let y = (x.tensor() * 2.0).unwrap();
        tape.record_grad_into("double", &[x], y, move |g, _, acc| {
            let mine = (g.tensor() * 2.0)?;
            offered.borrow_mut().push(acc[0].is_some());
            Ok(vec![Some(match acc[0].take() {
                Some(a) => {
                    let sum = (a.tensor() + &mine)?;
                    Grad::owned(sum)
                }
                None => Grad::owned(mine),
            })])
        })
        .unwrap()
    }

    /// A context saved in rows must get every row once, in order, with the declared shape
    /// and dtype; anything else is an error naming the op, and finishing early is one too.
    #[test]
    fn rows_saved_out_of_order_or_incomplete_are_errors() {
        let mut tape = Tape::new(Box::new(KeepPolicy));
        let dev = Device::Cpu;
        let rows = |n: usize| Tensor::ones((n, 3), DType::F32, &dev).unwrap();
        let mut r = tape
            .begin_save_rows("op_x", &[4, 3], DType::F32, &dev, SaveAs::Activation)
            .unwrap();
        let e = r.push(1, &rows(1)).unwrap_err().to_string();
        assert!(e.contains("op_x") && e.contains("filled to row 0"), "{e}");
        r.push(0, &rows(2)).unwrap();
        let wide = Tensor::ones((1, 4), DType::F32, &dev).unwrap();
        assert!(r.push(2, &wide).is_err(), "wrong row shape");
        let f64_rows = Tensor::ones((1, 3), DType::F64, &dev).unwrap();
        assert!(r.push(2, &f64_rows).is_err(), "wrong dtype");
        assert!(r.push(2, &rows(3)).is_err(), "past the last row");
        let e = tape.finish_save_rows(r).err().unwrap().to_string();
        assert!(e.contains("2 of the context's 4 rows"), "{e}");
        // Complete: the gathered context is the rows, in order.
        let mut r = tape
            .begin_save_rows("op_x", &[4, 3], DType::F32, &dev, SaveAs::Activation)
            .unwrap();
        let t = Tensor::arange(0f32, 12., &dev)
            .unwrap()
            .reshape((4, 3))
            .unwrap();
        r.push(0, &t.narrow(0, 0, 3).unwrap()).unwrap();
        r.push(3, &t.narrow(0, 3, 1).unwrap()).unwrap();
        let saved = tape.finish_save_rows(r).unwrap();
        let back: Vec<f32> = saved
            .load()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(back, (0..12).map(|v| v as f32).collect::<Vec<_>>());
    }

    #[test]
    fn a_rule_is_offered_the_owned_gradient_its_input_has_gathered() {
        let mut store = ParamStore::new();
        let p = store
            .add("p", Tensor::new(&[1f32, 2., 3.], &Device::Cpu).unwrap())
            .unwrap();
        let mut tape = Tape::new(Box::new(KeepPolicy));
        let w = tape.param(&store, p);
        // x = 3 w; loss = sum(2 x) + sum(2 x): backward reaches the second `double` first,
        // which is offered nothing and returns a new (owned) gradient of x, then the first,
        // which is offered that one.
        let x = tape.scale(&w, 3.0).unwrap();
        let offered = Rc::new(RefCell::new(Vec::new()));
        let a = double_into(&mut tape, &x, offered.clone());
        let b = double_into(&mut tape, &x, offered.clone());
        let s = tape.add(&a, &b).unwrap();
        let loss = tape.sum_all(&s).unwrap();
        tape.backward(&loss, &mut store).unwrap();
        assert_eq!(*offered.borrow(), vec![false, true]);
        // d loss / d w = 3 (2 + 2) = 12 per element.
        let g: Vec<f32> = store.grad(p).unwrap().to_vec1().unwrap();
        assert_eq!(g, vec![12.0; 3]);
    }

    #[test]
    fn a_parameter_or_a_shared_gradient_is_not_offered() {
        let mut store = ParamStore::new();
        let p = store
            .add("p", Tensor::new(&[1f32, 2.], &Device::Cpu).unwrap())
            .unwrap();
        let mut tape = Tape::new(Box::new(KeepPolicy));
        let w = tape.param(&store, p);
        let offered = Rc::new(RefCell::new(Vec::new()));
        // Straight on a parameter: its gradient goes to the store, never offered.
        let a = double_into(&mut tape, &w, offered.clone());
        // On a value whose other consumer passes its gradient through unchanged (an add
        // hands out the shared output gradient): not owned, so not offered.
        let x = tape.scale(&w, 1.0).unwrap();
        let b = double_into(&mut tape, &x, offered.clone());
        let c = tape.add(&b, &x).unwrap();
        let s = tape.add(&a, &c).unwrap();
        let loss = tape.sum_all(&s).unwrap();
        tape.backward(&loss, &mut store).unwrap();
        assert_eq!(*offered.borrow(), vec![false, false]);
        let g: Vec<f32> = store.grad(p).unwrap().to_vec1().unwrap();
        assert_eq!(g, vec![5.0; 2]);
    }
}
