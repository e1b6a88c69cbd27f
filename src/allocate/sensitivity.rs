//! Numerical sensitivities (GACT-style): how much the parameter gradient moves when one saved
//! tensor's rounding noise changes, measured by re-running forward+backward on a sub-batch.
//!
//! Two estimators, both driven by a [`ProbePolicy`] (noise at a chosen bit width from a
//! stream keyed by (seed, slot), per-slot bits, per-slot reseeding or sign flips):
//!
//! * [`estimate_slots`] — GACT's Algorithm 1, `c_l = ½‖g(seed_l) − g(seed_l')‖² / S(b)`:
//!   one pass with every slot quantized, then one pass per *target* slot with only that slot
//!   reseeded (GACT's code spends three passes per tensor). The other slots sit at the
//!   **current plan's bits** with unchanged seeds: their noise cancels in the difference,
//!   but `c_l` includes how it amplifies slot `l`'s noise. This matters: on `gpt-char` the
//!   gradient error with *every* context at 1 bit is ~140× the sum of the errors with each
//!   context alone at 1 bit (noisy backward Jacobians multiply along the residual stream),
//!   so sensitivities measured around an all-exact point send too many tensors to 1 bit.
//!   `VariancePlan` measures a rotating subset of slots per re-allocation (every slot the
//!   first time), keeping the cost at a tenth of GACT's while each re-allocation sees the
//!   compounding of the previous plan.
//! * [`estimate_randomized`] — all slots from `1 + K` passes via the linearisation
//!   `g(x + e) ≈ g(x) + Σ_l J_l e_l`: pass 0 keeps every context exact (`g*`); pass `k`
//!   stores `x_l + s_l^k e_l` with a fixed rounding error `e_l` and random signs
//!   `s_l^k = ±1`, so `v_k = g_k − g* ≈ Σ_l s_l^k a_l`, `a_l = J_l e_l`. `s_l^k v_k` is an
//!   unbiased sample of `a_l`, and the U-statistic `Σ_{j≠k} s_l^j s_l^k ⟨v_j, v_k⟩ / (K(K−1))`
//!   estimates `‖a_l‖²` for every `l` at once (only the K×K Gram matrix is needed). Its
//!   noise is about `Σ_m ‖a_m‖² · √2 / K` for every slot, so with L ≫ K tensors the small
//!   sensitivities drown: with K = 8 its plans have 6× (ResNet-18, 38 tensors) and 3×
//!   (gpt-char, 47 tensors) the gradient variance of uniform 2 bits (`allocator_eval`); on
//!   the 6-tensor CNN it matches the exact estimator. A block-sparse recovery would help
//!   for linear-layer inputs (their noise only reaches their own weight's gradient), but the
//!   propagating contexts (norms, attention, GELU) all land in the same embedding and
//!   first-block gradients. Kept as an option and as evidence.
//!
//! The caller's forward+backward runs through a closure on a fresh [`Tape`] whose policy is
//! a [`ProbePolicy`]: the closure runs the model and the loss, calls `backward`, and returns
//! the parameter gradients ([`ParamGrads::of`]: references, not copies — the estimator keeps
//! one flattened copy, of the first pass, and compares later passes against it tensor by
//! tensor). It must not call `Tape::begin_step` (the estimator has begun the step, pinning
//! dropout masks to the same seed in every pass).

use super::solver::variance_factor;
use crate::compress::{dequantize_to_vec, quantize, QuantParams, QuantizedTensor, DEFAULT_GROUP};
use crate::tape::{
    splitmix64, ContextPolicy, KeepPolicy, Packed, PackedContext, ParamStore, SaveAs, SaveRequest,
    Tape,
};
use anyhow::{bail, Context as _, Result};
use candle_core::{DType, Device, Shape, Tensor};
use std::collections::{HashMap, HashSet};
use std::time::Instant;

/// Label of a probed context in the tape's context log (how the estimator learns which slots
/// it perturbed and their shapes).
pub const PROBE_LABEL: &str = "probe";

/// What a [`ProbePolicy`] stores for an eligible activation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ProbeMode {
    /// Stochastically rounded at the probe bits: what `CompressPolicy` would restore.
    Quantize,
    /// `x + s·(Q(x) − x)`, `s = ±1` from [`probe_sign`]`(sign_seed, slot)`: the rounding
    /// error of the same draw, mirrored for half of the tensors.
    Signed { sign_seed: u64 },
}

/// A [`ContextPolicy`] for sensitivity estimation: every saved float activation (or only the
/// slots given to [`ProbePolicy::only`]) gets rounding noise at a probe bit width from a
/// stream keyed by (seed, slot), so two passes differ exactly where the caller changes a seed
/// ([`ProbePolicy::reseed`]) or a sign. Masks, indices and exact contexts stay exact (the
/// training policy stores them losslessly too).
#[derive(Clone, Debug)]
pub struct ProbePolicy {
    bits: u8,
    /// Per-slot bits overriding `bits` (the operating point; 32 = keep exact).
    slot_bits: HashMap<usize, u8>,
    group: usize,
    seed: u64,
    mode: ProbeMode,
    eligible: Option<HashSet<usize>>,
    reseeded: HashSet<usize>,
    alt_seed: u64,
}

impl ProbePolicy {
    /// Stochastic rounding at `bits` (1, 2, 4 or 8) in groups of `group`, noise seed `seed`.
    pub fn quantize(bits: u8, group: usize, seed: u64) -> Self {
        Self {
            bits,
            slot_bits: HashMap::new(),
            group,
            seed,
            mode: ProbeMode::Quantize,
            eligible: None,
            reseeded: HashSet::new(),
            alt_seed: 0,
        }
    }
    /// Signed rounding errors (the randomized estimator's probe).
    pub fn signed(bits: u8, group: usize, seed: u64, sign_seed: u64) -> Self {
        Self {
            mode: ProbeMode::Signed { sign_seed },
            ..Self::quantize(bits, group, seed)
        }
    }
    /// Perturbs only these slots; every other context is kept exact.
    pub fn only(mut self, slots: HashSet<usize>) -> Self {
        self.eligible = Some(slots);
        self
    }
    /// Per-slot bit widths (e.g. the current plan: the operating point at which a slot's
    /// sensitivity is measured); 32 keeps the slot exact. Other slots use the probe bits.
    pub fn with_slot_bits(mut self, bits: HashMap<usize, u8>) -> Self {
        self.slot_bits = bits;
        self
    }
    /// Draws the noise of these slots from `alt_seed` instead of the policy's seed.
    pub fn reseed(mut self, slots: impl IntoIterator<Item = usize>, alt_seed: u64) -> Self {
        self.reseeded = slots.into_iter().collect();
        self.alt_seed = alt_seed;
        self
    }

    fn perturbs(&self, req: &SaveRequest) -> bool {
        req.kind == SaveAs::Activation
            && !req.is_param
            && req.tensor.dtype().is_float()
            && req.tensor.elem_count() > 0
            && self.eligible.as_ref().is_none_or(|s| s.contains(&req.slot))
    }
}

/// The ±1 sign of `slot` under `sign_seed` (Rademacher, from the splitmix hash).
pub fn probe_sign(sign_seed: u64, slot: usize) -> f32 {
    if splitmix64(sign_seed ^ splitmix64(slot as u64)) >> 63 == 0 {
        1.0
    } else {
        -1.0
    }
}

impl ContextPolicy for ProbePolicy {
    /// As the compressing levels whose plan it measures: the probe's tape must save (and
    /// number) the contexts a training step saves, and a rebuilt context's noise is its
    /// sources', which their sensitivities then include.
    fn recomputes_contexts(&self) -> bool {
        true
    }

    fn pack(&mut self, req: &SaveRequest) -> Result<Packed> {
        if !self.perturbs(req) {
            return Ok(Packed::Full(req.tensor.clone()));
        }
        let bits = self.slot_bits.get(&req.slot).copied().unwrap_or(self.bits);
        if bits >= 32 {
            return Ok(Packed::Full(req.tensor.clone()));
        }
        let t = req.tensor;
        let x = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        // Groups stay inside one sample, as in `CompressPolicy`.
        let sample_len = match t.dims().first() {
            Some(&n) if n > 0 && t.rank() > 1 => t.elem_count() / n,
            _ => t.elem_count(),
        };
        let seed = if self.reseeded.contains(&req.slot) {
            self.alt_seed
        } else {
            self.seed
        };
        let params = QuantParams {
            bits,
            group: self.group,
            seed,
            stream: req.slot as u64,
        };
        let q = quantize(&x, sample_len, &params).context("probe quantization")?;
        let ctx = match self.mode {
            ProbeMode::Signed { sign_seed } if probe_sign(sign_seed, req.slot) < 0.0 => {
                // The mirrored draw needs x itself: held in full.
                let mut out = dequantize_to_vec(&q);
                for (o, &xi) in out.iter_mut().zip(&x) {
                    *o = xi - (*o - xi);
                }
                let mirrored = Tensor::from_vec(out, t.shape().clone(), &Device::Cpu)?
                    .to_dtype(t.dtype())?
                    .to_device(t.device())?;
                ProbeContext::Full(mirrored)
            }
            // What the rounding restores is a function of the codes: kept as codes (the probe
            // bits, not fp32), so an estimation pass holds its activations compressed like a
            // training step rather than at full size.
            _ => ProbeContext::Codes(q),
        };
        Ok(Packed::Compressed(Box::new(ctx)))
    }
}

/// A perturbed activation: its codes at the probe bits (dequantized when read), or, for a
/// mirrored draw, the perturbed tensor itself.
enum ProbeContext {
    Codes(QuantizedTensor),
    Full(Tensor),
}

impl PackedContext for ProbeContext {
    fn unpack(&self, shape: &Shape, dtype: DType, device: &Device) -> Result<Tensor> {
        match self {
            Self::Codes(q) => Ok(Tensor::from_vec(dequantize_to_vec(q), shape, &Device::Cpu)?
                .to_dtype(dtype)?
                .to_device(device)?),
            Self::Full(t) => Ok(t.reshape(shape)?),
        }
    }
    fn stored_bytes(&self) -> usize {
        match self {
            Self::Codes(q) => q.stored_bytes(),
            Self::Full(t) => t.elem_count() * t.dtype().size_in_bytes(),
        }
    }
    fn bits(&self) -> f32 {
        match self {
            Self::Codes(q) => 8.0 * q.stored_bytes() as f32 / q.len().max(1) as f32,
            Self::Full(t) => (t.dtype().size_in_bytes() * 8) as f32,
        }
    }
    fn label(&self) -> String {
        PROBE_LABEL.into()
    }
}

/// Every trainable parameter's gradient, flattened in id order (zeros where a parameter got
/// none, so every pass yields a vector of the same layout).
pub fn flat_grad(params: &ParamStore) -> Result<Vec<f32>> {
    ParamGrads::of(params).flatten()
}

/// The trainable parameters' gradients after a pass, in id order: shared references to the
/// store's tensors (no copy), with each parameter's element count (`None`: it got no
/// gradient, read as zeros). Drop it before the next pass zeroes the store.
pub struct ParamGrads(Vec<(usize, Option<Tensor>)>);

impl ParamGrads {
    pub fn of(params: &ParamStore) -> Self {
        Self(
            params
                .iter()
                .filter(|(_, p)| p.trainable)
                .map(|(_, p)| (p.value.elem_count(), p.grad.clone()))
                .collect(),
        )
    }

    /// Elements of the flattened gradient.
    pub fn len(&self) -> usize {
        self.0.iter().map(|(n, _)| n).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// One vector, allocated once at its final size (grown by doubling it would briefly hold
    /// the old and the new buffer at the estimate's peak).
    pub fn flatten(&self) -> Result<Vec<f32>> {
        let mut g = Vec::with_capacity(self.len());
        self.for_each(|part| {
            g.extend_from_slice(part);
            Ok(())
        })?;
        Ok(g)
    }

    /// `Σ (self − flat)²` in f64, one parameter at a time (never a second flattened copy).
    pub fn sq_dist(&self, flat: &[f32]) -> Result<f64> {
        self.check_len(flat)?;
        let mut at = 0;
        let mut sum = 0f64;
        self.for_each(|part| {
            // Accumulated element by element in memory order: the same sum, to the bit, as
            // over two flattened vectors.
            for (a, b) in part.iter().zip(&flat[at..at + part.len()]) {
                sum += ((a - b) as f64).powi(2);
            }
            at += part.len();
            Ok(())
        })?;
        Ok(sum)
    }

    /// `self − flat`, flattened.
    pub fn minus(&self, flat: &[f32]) -> Result<Vec<f32>> {
        self.check_len(flat)?;
        let mut out = Vec::with_capacity(flat.len());
        self.for_each(|part| {
            let other = &flat[out.len()..out.len() + part.len()];
            out.extend(part.iter().zip(other).map(|(a, b)| a - b));
            Ok(())
        })?;
        Ok(out)
    }

    fn check_len(&self, flat: &[f32]) -> Result<()> {
        if self.len() != flat.len() {
            bail!(
                "gradient layout changed between passes ({} vs {} elements)",
                flat.len(),
                self.len()
            );
        }
        Ok(())
    }

    /// Calls `f` with each parameter's gradient as f32 values, in order (zeros for none).
    fn for_each(&self, mut f: impl FnMut(&[f32]) -> Result<()>) -> Result<()> {
        for (n, g) in &self.0 {
            match g {
                Some(t) => f(&t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)?,
                None => f(&vec![0.0; *n])?,
            }
        }
        Ok(())
    }
}

/// A saved tensor the probe perturbed.
#[derive(Clone, Debug, PartialEq)]
pub struct ProbedSlot {
    pub slot: usize,
    pub op: &'static str,
    pub shape: Vec<usize>,
}

/// Sensitivities of the probed slots.
#[derive(Clone, Debug)]
pub struct Sensitivities {
    /// `(slot, c_l)` with `c_l` the gradient variance per unit of `S(b)` (≥ 0).
    pub slots: Vec<(ProbedSlot, f64)>,
    /// Forward+backward passes run.
    pub passes: usize,
    /// Wall time of the estimation.
    pub seconds: f64,
    /// `Σ_l c_l` measured directly (trace of the sign-averaged Gram matrix, randomized
    /// estimator only): a check on the per-slot values, which sum to it in expectation.
    pub total: Option<f64>,
}

/// How the numerical estimator spends its passes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sampling {
    /// GACT's per-slot reseeding at the current plan's operating point, on a rotating
    /// subset of slots per re-allocation (every slot the first time): exact per slot,
    /// amortised over re-allocations. The default.
    Rotating,
    /// [`estimate_randomized`]: every slot from `1 + sign_passes` passes. Much cheaper for
    /// many tensors, but too noisy for the small sensitivities once L ≫ K (see the
    /// evaluation in the report); kept for comparison.
    Randomized,
}

/// Settings of the numerical estimator.
#[derive(Clone, Debug, PartialEq)]
pub struct NumericalConfig {
    pub sampling: Sampling,
    /// Bit width of the measured slot's noise.
    pub probe_bits: u8,
    /// Rotating: slots measured per re-allocation after the first (`None`: as many as keep
    /// the cost at a tenth of GACT's 3 passes per tensor, i.e. `⌊0.3·L⌋ − 1`, at least 1).
    pub slots_per_round: Option<usize>,
    /// Randomized: K, the sign patterns (passes beyond the exact one). At least 2.
    pub sign_passes: usize,
    /// Samples of the batch used for estimation (`VariancePlan::estimate`).
    pub sub_batch: usize,
    /// Quantization group, as in the compression policy.
    pub group: usize,
    pub seed: u64,
}

impl Default for NumericalConfig {
    fn default() -> Self {
        Self {
            sampling: Sampling::Rotating,
            probe_bits: 2,
            slots_per_round: None,
            sign_passes: 8,
            sub_batch: 8,
            group: DEFAULT_GROUP,
            seed: 0x5EED_A110C,
        }
    }
}

impl NumericalConfig {
    pub fn validate(&self) -> Result<()> {
        if !matches!(self.probe_bits, 1 | 2 | 4 | 8) {
            bail!("probe bits must be 1, 2, 4 or 8, got {}", self.probe_bits);
        }
        if self.sampling == Sampling::Randomized && self.sign_passes < 2 {
            bail!("the randomized estimator needs at least 2 sign passes");
        }
        if self.slots_per_round == Some(0) {
            bail!("at least one slot must be measured per re-allocation");
        }
        if self.sub_batch == 0 {
            bail!("the estimation sub-batch must hold at least one sample");
        }
        if self.group == 0 || !self.group.is_multiple_of(8) {
            bail!(
                "quantization group {} must be a positive multiple of 8",
                self.group
            );
        }
        Ok(())
    }

    /// Slots measured per rotating round for `l` quantized tensors.
    pub fn round_size(&self, l: usize) -> usize {
        self.slots_per_round
            .unwrap_or_else(|| ((3 * l) / 10).saturating_sub(1))
            .clamp(1, l.max(1))
    }
}

/// A fixed step for every probe tape, so dropout masks (keyed on the step) repeat.
const PROBE_STEP: u64 = 0x0A11_0CA7;

fn run_pass<P: ContextPolicy + 'static>(
    policy: P,
    tape_seed: u64,
    grad_fn: &mut impl FnMut(&mut Tape) -> Result<ParamGrads>,
) -> Result<(ParamGrads, Vec<ProbedSlot>)> {
    let mut tape = Tape::new(Box::new(policy)).with_seed(tape_seed);
    tape.set_step(PROBE_STEP);
    tape.begin_step();
    let g = grad_fn(&mut tape)?;
    let probed = tape
        .context_log()
        .iter()
        .filter(|r| r.repr == PROBE_LABEL)
        .map(|r| ProbedSlot {
            slot: r.slot,
            op: r.op,
            shape: r.shape.clone(),
        })
        .collect();
    Ok((g, probed))
}

fn check_same(reference: &[ProbedSlot], got: &[ProbedSlot], len: (usize, usize)) -> Result<()> {
    if len.0 != len.1 {
        bail!(
            "probe passes returned gradients of different lengths ({} vs {})",
            len.0,
            len.1
        );
    }
    if reference != got {
        bail!("the saved tensors changed between probe passes: the graph must be static");
    }
    Ok(())
}

/// The randomized estimator (module docs): `1 + cfg.sign_passes` passes for all slots.
/// `eligible` restricts the probe to these slots (the ones the training policy quantizes);
/// `round` varies the noise draw and the signs between re-allocations.
pub fn estimate_randomized(
    cfg: &NumericalConfig,
    eligible: Option<&HashSet<usize>>,
    round: u64,
    mut grad_fn: impl FnMut(&mut Tape) -> Result<ParamGrads>,
) -> Result<Sensitivities> {
    cfg.validate()?;
    if cfg.sign_passes < 2 {
        bail!("the randomized estimator needs at least 2 sign passes");
    }
    let t0 = Instant::now();
    let k = cfg.sign_passes;
    let g0 = run_pass(KeepPolicy, cfg.seed, &mut grad_fn)?.0.flatten()?;
    let noise_seed = splitmix64(cfg.seed ^ splitmix64(round));
    let mut diffs: Vec<Vec<f32>> = Vec::with_capacity(k);
    let mut slots: Option<Vec<ProbedSlot>> = None;
    let mut sign_seeds = Vec::with_capacity(k);
    for pass in 0..k {
        let sign_seed = splitmix64(noise_seed ^ splitmix64(0x5167_0000 + pass as u64));
        let mut policy = ProbePolicy::signed(cfg.probe_bits, cfg.group, noise_seed, sign_seed);
        if let Some(e) = eligible {
            policy = policy.only(e.clone());
        }
        let (g, probed) = run_pass(policy, cfg.seed, &mut grad_fn)?;
        match &slots {
            Some(s) => check_same(s, &probed, (g0.len(), g.len()))?,
            None => {
                check_same(&[], &[], (g0.len(), g.len()))?;
                slots = Some(probed);
            }
        }
        diffs.push(g.minus(&g0)?);
        sign_seeds.push(sign_seed);
    }
    let slots = slots.unwrap_or_default();
    // Gram matrix of the gradient differences, in f64.
    let mut gram = vec![0f64; k * k];
    for i in 0..k {
        for j in i..k {
            let d: f64 = diffs[i]
                .iter()
                .zip(&diffs[j])
                .map(|(a, b)| *a as f64 * *b as f64)
                .sum();
            gram[i * k + j] = d;
            gram[j * k + i] = d;
        }
    }
    let s = variance_factor(cfg.probe_bits);
    let pairs = (k * (k - 1)) as f64;
    let out = slots
        .into_iter()
        .map(|p| {
            let signs: Vec<f64> = sign_seeds
                .iter()
                .map(|&ss| probe_sign(ss, p.slot) as f64)
                .collect();
            let mut acc = 0.0;
            for i in 0..k {
                for j in 0..k {
                    if i != j {
                        acc += signs[i] * signs[j] * gram[i * k + j];
                    }
                }
            }
            let c = (acc / pairs).max(0.0) / s;
            (p, c)
        })
        .collect();
    let trace: f64 = (0..k).map(|i| gram[i * k + i]).sum();
    Ok(Sensitivities {
        slots: out,
        passes: k + 1,
        seconds: t0.elapsed().as_secs_f64(),
        total: Some(trace / k as f64 / s),
    })
}

/// What [`estimate_slots`] measures, and around which operating point.
#[derive(Clone, Debug)]
pub struct SlotProbe {
    /// Bit width of the measured slots' noise.
    pub bits: u8,
    pub group: usize,
    pub seed: u64,
    /// Only these slots carry noise (the ones the training policy quantizes); `None`: every
    /// float activation.
    pub eligible: Option<HashSet<usize>>,
    /// Bits of the slots not being measured (the current plan; 32 = kept). Their noise is
    /// drawn from the same seed in every pass, so it cancels in the differences, but the
    /// measured sensitivities include how it amplifies the measured slot's noise — the
    /// compounding that makes many 1-bit tensors together far worse than the sum of each
    /// alone. Slots missing here use `bits`.
    pub operating_point: HashMap<usize, u8>,
    /// Slots to measure; `None`: every probed slot.
    pub targets: Option<Vec<usize>>,
}

impl SlotProbe {
    pub fn new(bits: u8, group: usize, seed: u64) -> Self {
        Self {
            bits,
            group,
            seed,
            eligible: None,
            operating_point: HashMap::new(),
            targets: None,
        }
    }
}

/// GACT's Algorithm 1 on a set of target slots: one pass with every slot at its
/// operating-point bits (targets at the probe bits), then one pass per target with only that
/// target reseeded; `c_l = ½‖g0 − g_l‖² / S(bits)`. `1 + targets` passes.
pub fn estimate_slots(
    probe: &SlotProbe,
    mut grad_fn: impl FnMut(&mut Tape) -> Result<ParamGrads>,
) -> Result<Sensitivities> {
    if !matches!(probe.bits, 1 | 2 | 4 | 8) {
        bail!("probe bits must be 1, 2, 4 or 8, got {}", probe.bits);
    }
    let t0 = Instant::now();
    let mut point = probe.operating_point.clone();
    if let Some(t) = &probe.targets {
        for &slot in t {
            point.insert(slot, probe.bits);
        }
    }
    let base = || {
        let p = ProbePolicy::quantize(probe.bits, probe.group, probe.seed)
            .with_slot_bits(point.clone());
        match &probe.eligible {
            Some(e) => p.only(e.clone()),
            None => p,
        }
    };
    let (pass0, probed) = run_pass(base(), probe.seed, &mut grad_fn)?;
    let g0 = pass0.flatten()?;
    drop(pass0); // its tensors would otherwise stay alive beside the next passes' gradients
    let targets: Vec<ProbedSlot> = match &probe.targets {
        Some(t) => probed
            .iter()
            .filter(|p| t.contains(&p.slot))
            .cloned()
            .collect(),
        None => probed.clone(),
    };
    let s = variance_factor(probe.bits);
    let alt = splitmix64(probe.seed ^ 0xA17E_5EED);
    let mut out = Vec::with_capacity(targets.len());
    for p in targets {
        let (g1, again) = run_pass(base().reseed([p.slot], alt), probe.seed, &mut grad_fn)?;
        check_same(&probed, &again, (g0.len(), g1.len()))?;
        let d = g1.sq_dist(&g0)?;
        out.push((p, 0.5 * d / s));
    }
    Ok(Sensitivities {
        passes: 1 + out.len(),
        slots: out,
        seconds: t0.elapsed().as_secs_f64(),
        total: None,
    })
}

/// GACT's Algorithm 1 on every slot, all at `bits` (the reference of the tests and
/// `allocator_eval`): `1 + L` passes.
pub fn estimate_per_slot(
    bits: u8,
    group: usize,
    seed: u64,
    eligible: Option<&HashSet<usize>>,
    grad_fn: impl FnMut(&mut Tape) -> Result<ParamGrads>,
) -> Result<Sensitivities> {
    let mut probe = SlotProbe::new(bits, group, seed);
    probe.eligible = eligible.cloned();
    estimate_slots(&probe, grad_fn)
}
