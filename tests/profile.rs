//! profile-memory: the per-saved-tensor rows add up to the activations bucket, buckets are the
//! exact tensor sizes, and L3's activations are a fraction of L0's.

use actrain::compress::policy::Level;
use actrain::memory::profile::{profile_step, MemoryProfile};
use actrain::model::{load_def, random_batch, InputSpec, Model, ModelDef};
use std::sync::Mutex;

/// The allocator is process-wide: the profiles in this file must not overlap.
static SERIAL: Mutex<()> = Mutex::new(());

#[test]
fn rows_add_up_to_the_totals() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let spec = InputSpec {
        sample_shape: vec![1, 8, 8],
        tokens: false,
        vocab: None,
        num_outputs: 10,
        graph: false,
    };
    let def = load_def("cnn").unwrap();
    let (x, y) = random_batch(&spec, 32, 3).unwrap();
    let mut acts = Vec::new();
    for level in [Level::L0, Level::L3] {
        let mut model = Model::build(&def, &spec, 1).unwrap();
        let p = profile_step(&mut model, level, &x, &y, 1).unwrap();
        let stored: usize = p.rows.iter().map(|r| r.stored_bytes).sum();
        let uncompressed: usize = p.rows.iter().map(|r| r.uncompressed_bytes).sum();
        assert_eq!(
            stored, p.activations,
            "{level:?}: rows vs activations bucket"
        );
        assert_eq!(
            uncompressed, p.activations_uncompressed,
            "{level:?}: rows vs uncompressed total"
        );
        let (params, buffers, _) = model.params.bytes();
        assert_eq!(p.parameters, params);
        assert_eq!(p.buffers, buffers);
        assert_eq!(p.gradients, p.parameters, "every parameter got a gradient");
        assert_eq!(
            p.optimizer_state, p.parameters,
            "SGD momentum: one buffer per parameter"
        );
        assert!(
            p.rows.iter().all(|r| !r.layer.is_empty()),
            "every row names its layer"
        );
        assert_eq!(p.phases.len(), 3);
        assert!(p.peak_bytes >= p.parameters + p.optimizer_state + p.activations);
        acts.push(p.activations);
    }
    assert!(
        acts[1] * 10 < acts[0],
        "L3 activations {} vs L0 {}",
        acts[1],
        acts[0]
    );
}

/// A small ResNet: 3x3 stem to 16 channels, two identity blocks, one stride-2 block to 32.
const TINY_RESNET: &str = r#"
name = "tiny-resnet"
description = "regression model for the step's transient memory"

[[layer]]
name = "stem"
op = "conv2d"
out = 16
kernel = 3
padding = 1
bias = false

[[layer]]
name = "stem_bn"
op = "batch_norm"

[[layer]]
name = "stem_relu"
op = "relu"

[[layer]]
name = "block1"
op = "residual_block"
out = 16

[[layer]]
name = "block2"
op = "residual_block"
out = 16

[[layer]]
name = "block3"
op = "residual_block"
out = 32
stride = 2

[[layer]]
name = "gap"
op = "global_avg_pool"

[[layer]]
name = "head"
op = "linear"
out = "classes"
"#;

/// Peak of `phase` above the steady state, in units of `unit` bytes.
fn phase_peak(p: &MemoryProfile, phase: &str, unit: f64) -> f64 {
    p.phases
        .iter()
        .find(|ph| ph.phase == phase)
        .map(|ph| ph.peak_bytes as f64 / unit)
        .unwrap_or_else(|| panic!("no {phase} phase in the profile"))
}

/// The forward and backward peaks of a profile, in units of `unit` bytes.
fn phase_peaks(p: &MemoryProfile, unit: f64) -> (f64, f64) {
    (
        phase_peak(p, "forward", unit),
        phase_peak(p, "backward", unit),
    )
}

/// Issue #5 ("peak under control"): at L3 the fp32 temporaries of a step, not the saved
/// context, set the peak. Pins the forward and backward peaks above the steady state (they
/// include the saved context and, in backward, the parameter gradients) in units of one
/// layer-sized activation `L` (`[64, 16, 32, 32]` f32, 4 MiB). In forward a block's ops
/// write over their own inputs (conv chunk by chunk, then batch norm, ReLU, the sum), so an
/// identity block holds its input and one more tensor: 2.76L measured with the second conv's
/// input rebuilt rather than stored (2.99L storing it, 3.75L while each op allocated its
/// output, 6.74L while a block kept every intermediate). In backward an identity block is
/// one node that holds only the gradient it returns, and the downsampling block's shortcut
/// runs in chunks into its input's gradient: 2.73L (3.46L with the composed ops holding the
/// skip gradient and the main branch's, 4.63L with three layer-sized tensors per rule). The
/// bounds leave 7% and 10% headroom and fail at the previous 2.99L and 3.46L. The conv
/// workspace is made small (one sample per im2col chunk) so candle's fixed-size workspaces
/// do not blur the count, whatever the number of threads.
#[test]
fn l3_step_transients_stay_within_a_few_layer_sizes() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let spec = InputSpec {
        sample_shape: vec![3, 32, 32],
        tokens: false,
        vocab: None,
        num_outputs: 10,
        graph: false,
    };
    let def = ModelDef::parse(TINY_RESNET, "tiny-resnet").unwrap();
    let batch = 64;
    let layer = (batch * 16 * 32 * 32 * 4) as f64;
    let (x, y) = random_batch(&spec, batch, 5).unwrap();
    actrain::ops::conv::set_workspace_bytes(256 << 10);
    let mut model = Model::build(&def, &spec, 1).unwrap();
    let p = profile_step(&mut model, Level::L3, &x, &y, 1);
    actrain::ops::conv::set_workspace_bytes(actrain::ops::conv::DEFAULT_WORKSPACE_BYTES);
    let p = p.unwrap();
    let (fwd, bwd) = phase_peaks(&p, layer);
    println!("L3 transients: forward {fwd:.2} L, backward {bwd:.2} L");
    assert!(
        fwd <= 2.95,
        "forward peak above steady state: {fwd:.2} layer sizes"
    );
    assert!(
        bwd <= 3.0,
        "backward peak above steady state: {bwd:.2} layer sizes"
    );
}

/// A small GPT: two causal pre-norm blocks of dim 64 (MLP hidden 256), 2 heads.
const TINY_GPT: &str = r#"
name = "tiny-gpt"
description = "regression model for the step's transient memory"

[[layer]]
name = "embed"
op = "embedding"
dim = 64

[[layer]]
name = "pos"
op = "pos_embedding"
max_len = 64

[[layer]]
name = "block0"
op = "transformer_block"
heads = 2
causal = true

[[layer]]
name = "block1"
op = "transformer_block"
heads = 2
causal = true

[[layer]]
name = "norm"
op = "layer_norm"

[[layer]]
name = "head"
op = "linear"
out = "classes"
"#;

/// The same for a transformer, in units of the MLP's hidden activation `H` (`[64, 32, 256]`
/// f32, 2 MiB), the widest tensor of a block: 2.11H forward and 2.97H backward are measured
/// (the MLP's GELU computed into its linear layer's output, the attention softmax into its
/// scores and its backward into dP, GELU's backward into the owned gradient, the attention
/// input freed before the scores exist and the residual sums written into the branch
/// outputs); 2.37H forward before the last two, and before any of it 4.37H and 3.84H. The
/// bounds leave 10% and 15% headroom (the forward one fails at the old 2.37H).
///
/// With 128 KiB chunks (a batch 16 times the chunk, as for a real model at its max batch)
/// the attention and the MLP run fused in batch chunks, their hidden tensors saved chunk by
/// chunk, their outputs added into the residual stream in place and their layer norms run a
/// chunk at a time inside them: 1.13H forward and 1.10H backward, against 2.11H and 2.40H
/// composed (1.47H / 1.35H with the branches alone fused, 1.22H / 1.35H with the residual
/// sums too; bounds 1.2H and 1.25H).
#[test]
fn l3_transformer_step_transients_stay_within_a_few_hidden_sizes() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (batch, seq, vocab) = (64, 32, 16);
    let spec = InputSpec {
        sample_shape: vec![seq],
        tokens: true,
        vocab: Some(vocab),
        num_outputs: vocab,
        graph: false,
    };
    let def = ModelDef::parse(TINY_GPT, "tiny-gpt").unwrap();
    let hidden = (batch * seq * 256 * 4) as f64;
    let (x, y) = random_batch(&spec, batch, 5).unwrap();
    let mut model = Model::build(&def, &spec, 1).unwrap();
    let p = profile_step(&mut model, Level::L3, &x, &y, 1).unwrap();
    let (fwd, bwd) = phase_peaks(&p, hidden);
    println!("L3 transients: forward {fwd:.2} H, backward {bwd:.2} H");
    actrain::ops::set_context_chunk_bytes(Some(128 << 10));
    let p = profile_step(&mut model, Level::L3, &x, &y, 1);
    actrain::ops::set_context_chunk_bytes(None);
    let p = p.unwrap();
    let (cf, cb) = phase_peaks(&p, hidden);
    println!("L3 transients in 128 KiB chunks: forward {cf:.2} H, backward {cb:.2} H");
    assert!(
        cf <= 1.2,
        "forward peak above steady state in 128 KiB chunks: {cf:.2} hidden sizes"
    );
    assert!(
        cb <= 1.25,
        "backward peak above steady state in 128 KiB chunks: {cb:.2} hidden sizes"
    );
    assert!(
        fwd <= 2.3,
        "forward peak above steady state: {fwd:.2} hidden sizes"
    );
    assert!(
        bwd <= 3.4,
        "backward peak above steady state: {bwd:.2} hidden sizes"
    );
}
