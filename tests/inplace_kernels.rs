//! The memory-saving backward and forward kernels against the composed candle-op reference:
//! batch norm's chunked/in-place backward, the pointwise activations' chunked/in-place
//! backward, ReLU's in-place mask product, the linear layer's in-place bias and chunked
//! weight gradient, `linear_gelu`, in-place gradient accumulation at forks, residual blocks
//! written over their own inputs, and attention's backward in batch chunks.
//!
//! Each case runs one graph twice on the same inputs under the same compression policy (L3,
//! so contexts are really quantized and unpacked in row chunks): once with the CPU kernels
//! on and a tiny context chunk (every saved tensor is read in several chunks), once on the
//! portable candle-ops path (`set_fused_cpu_kernels(false)`, `force_generic_norm_kernels`),
//! and compares outputs and every input gradient within 1e-5 relative. Each graph feeds the
//! op under test either an *owned* output gradient (it comes from a linear layer, so the
//! kernels write in place) or a *shared* one (it passes through an add), so both kernel
//! paths are checked.

mod common;

use actrain::compress::policy::{CompressConfig, CompressPolicy, Level};
use actrain::ops::activation::{set_fused_cpu_kernels, GeluApprox};
use actrain::ops::attention::MultiHeadAttention;
use actrain::ops::mlp::Mlp;
use actrain::ops::norm::{force_generic_norm_kernels, BatchNormStats};
use actrain::ops::set_context_chunk_bytes;
use actrain::tape::gradcheck::{max_rel_diff, random_tensor};
use actrain::tape::{ParamStore, Tape, Value};
use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use common::{prenorm_block, prenorm_block_inputs, rand32};

const TOL: f64 = 1e-5;

/// The forward output and the gradient of every input of `f` under `loss = Σ out ⊙ R`
/// (`None` for an input the graph does not use).
struct Run {
    out: Tensor,
    grads: Vec<Option<Tensor>>,
}

/// Which implementation a run uses.
#[derive(Clone, Copy, Debug)]
enum Path {
    /// CPU kernels on, contexts read in chunks of at most `chunk` bytes.
    Kernels { chunk: usize },
    /// The portable candle-ops path (what CUDA runs).
    Reference,
}

fn run(
    path: Path,
    level: Level,
    inputs: &[Tensor],
    f: &dyn Fn(&mut Tape, &[Value]) -> Result<Value>,
) -> Result<Run> {
    match path {
        Path::Kernels { chunk } => {
            set_fused_cpu_kernels(true);
            force_generic_norm_kernels(false);
            set_context_chunk_bytes(Some(chunk));
        }
        Path::Reference => {
            set_fused_cpu_kernels(false);
            force_generic_norm_kernels(true);
            set_context_chunk_bytes(None);
        }
    }
    let result = run_inner(level, inputs, f);
    set_fused_cpu_kernels(true);
    force_generic_norm_kernels(false);
    set_context_chunk_bytes(None);
    result
}

fn run_inner(
    level: Level,
    inputs: &[Tensor],
    f: &dyn Fn(&mut Tape, &[Value]) -> Result<Value>,
) -> Result<Run> {
    let (mut store, ids, mut tape, vals) = tape_with_inputs(level, inputs)?;
    let out = f(&mut tape, &vals)?;
    let r = tape.constant(random_tensor(out.dims(), 99)?.to_dtype(out.dtype())?);
    let prod = tape.mul(&out, &r)?;
    let loss = tape.sum_all(&prod)?;
    tape.backward(&loss, &mut store)?;
    let grads = ids.iter().map(|&id| store.grad(id).cloned()).collect();
    Ok(Run {
        out: out.into_tensor(),
        grads,
    })
}

/// A tape at `level` (seed 11, every tensor eligible for compression) that has begun a step,
/// with `inputs` as parameters of a store.
fn tape_with_inputs(
    level: Level,
    inputs: &[Tensor],
) -> Result<(ParamStore, Vec<actrain::tape::ParamId>, Tape, Vec<Value>)> {
    let mut store = ParamStore::new();
    let ids = inputs
        .iter()
        .enumerate()
        .map(|(i, t)| store.add(format!("in{i}"), t.clone()))
        .collect::<Result<Vec<_>>>()?;
    let policy = CompressPolicy::new(CompressConfig {
        level,
        seed: 11,
        min_elements: 0,
        ..Default::default()
    });
    let mut tape = Tape::new(Box::new(policy)).with_seed(11);
    tape.begin_step();
    let vals: Vec<Value> = ids.iter().map(|&id| tape.param(&store, id)).collect();
    Ok((store, ids, tape, vals))
}

/// `max |a - b| / max |b|`: the difference relative to the tensor's scale (an elementwise
/// relative error is meaningless for f32 sums that cancel to near zero).
fn scaled_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    let flat = |t: &Tensor| -> Vec<f64> {
        t.to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let (a, b) = (flat(a), flat(b));
    let scale = b.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-30);
    a.iter()
        .zip(&b)
        .fold(0f64, |m, (x, y)| m.max((x - y).abs()))
        / scale
}

/// Runs `f` both ways (at L3, and at L0 where contexts are the tensors themselves), in f64
/// (elementwise relative error) and in f32 (error relative to each tensor's scale), and
/// asserts the output and every gradient agree within [`TOL`].
fn check(what: &str, inputs: &[Tensor], f: impl Fn(&mut Tape, &[Value]) -> Result<Value>) {
    for dtype in [DType::F64, DType::F32] {
        let inputs: Vec<Tensor> = inputs.iter().map(|t| t.to_dtype(dtype).unwrap()).collect();
        let diff = |a: &Tensor, b: &Tensor| match dtype {
            DType::F64 => max_rel_diff(a, b).unwrap(),
            _ => scaled_diff(a, b),
        };
        for level in [Level::L3, Level::L0] {
            let what = format!("{what} ({level:?}, {dtype:?})");
            // 512 bytes: a few rows per chunk for every tensor below.
            let k = run(Path::Kernels { chunk: 512 }, level, &inputs, &f)
                .unwrap_or_else(|e| panic!("{what}, kernels: {e:#}"));
            let r = run(Path::Reference, level, &inputs, &f)
                .unwrap_or_else(|e| panic!("{what}, reference: {e:#}"));
            let d = diff(&k.out, &r.out);
            assert!(d <= TOL, "{what}: outputs differ by {d:.2e}");
            for (i, (a, b)) in k.grads.iter().zip(&r.grads).enumerate() {
                match (a, b) {
                    (Some(a), Some(b)) => {
                        let d = diff(a, b);
                        assert!(d <= TOL, "{what}: gradient of input {i} differs by {d:.2e}");
                    }
                    (None, None) => {}
                    _ => panic!("{what}: input {i} has a gradient on one path only"),
                }
            }
        }
    }
}

/// Feeds `y` to the rest of the graph so that `y`'s gradient arrives owned (through a linear
/// layer over the last dim, weight `w`) or shared (through an add with a constant).
fn downstream(tape: &mut Tape, y: &Value, w: Option<&Value>) -> Result<Value> {
    match w {
        Some(w) => tape.linear(y, w, None),
        None => {
            let c = tape.constant(y.tensor().ones_like()?);
            tape.add(y, &c)
        }
    }
}

/// Layer norm and RMS norm read a compressed input a chunk of samples at a time in backward
/// and write the input gradient into the rows of an owned output gradient (or a new buffer
/// when the gradient is shared): the same output and gradients as the portable whole-tensor
/// path, at L3 and L0, with and without the affine parameters.
#[test]
fn last_dim_norm_backward_in_chunks_and_in_place_matches_candle_ops() {
    let x = rand32(&[4, 5, 8], 60, 2.0);
    let gamma = rand32(&[8], 61, 1.0);
    let beta = rand32(&[8], 62, 1.0);
    let wl = rand32(&[8, 8], 63, 0.5);
    for rms in [false, true] {
        for affine in [true, false] {
            for owned in [true, false] {
                let f = move |t: &mut Tape, v: &[Value]| -> Result<Value> {
                    // A non-parameter input, so that the context is quantized at L3.
                    let xin = t.scale(&v[0], 1.5)?;
                    let (g, b) = if affine {
                        (Some(&v[1]), Some(&v[2]))
                    } else {
                        (None, None)
                    };
                    let y = if rms {
                        t.rms_norm(&xin, g, 1e-5)?
                    } else {
                        t.layer_norm(&xin, g, b, 1e-5)?
                    };
                    downstream(t, &y, owned.then_some(&v[3]))
                };
                let what = format!("rms {rms}, affine {affine}, owned gradient {owned}");
                check(
                    &what,
                    &[x.clone(), gamma.clone(), beta.clone(), wl.clone()],
                    f,
                );
            }
        }
    }
}

#[test]
fn batch_norm_backward_in_chunks_and_in_place_matches_candle_ops() {
    let (n, c, h, w) = (6, 3, 5, 7);
    let x = rand32(&[n, c, h, w], 1, 2.0);
    let gamma = rand32(&[c], 2, 1.0);
    let beta = rand32(&[c], 3, 1.0);
    let wl = rand32(&[w, w], 4, 0.5);
    for training in [true, false] {
        for owned in [true, false] {
            let f = move |t: &mut Tape, v: &[Value]| -> Result<Value> {
                // A non-parameter input, so that batch norm's context is quantized at L3.
                let xin = t.scale(&v[0], 1.5)?;
                let dt = v[0].dtype();
                let mut stats = BatchNormStats::new(c, dt, &Device::Cpu)?;
                if !training {
                    t.eval_mode();
                    t.set_recording(true);
                    stats.mean = rand32(&[c], 5, 0.3).to_dtype(dt)?;
                    stats.var = (rand32(&[c], 6, 0.4) + 1.0)?.to_dtype(dt)?;
                }
                let y = t.batch_norm(&xin, &v[1], &v[2], &mut stats, 0.1, 1e-5)?;
                downstream(t, &y, owned.then_some(&v[3]))
            };
            check(
                &format!("batch_norm training={training} owned={owned}"),
                &[x.clone(), gamma.clone(), beta.clone(), wl.clone()],
                f,
            );
        }
    }
}

#[test]
fn pointwise_backward_in_chunks_and_in_place_matches_candle_ops() {
    type Act = fn(&mut Tape, &Value) -> Result<Value>;
    let acts: [(&str, Act); 8] = [
        ("relu", |t, x| t.relu(x)),
        ("leaky_relu", |t, x| t.leaky_relu(x, 0.1)),
        ("gelu(tanh)", |t, x| t.gelu(x, GeluApprox::Tanh)),
        ("gelu(erf)", |t, x| t.gelu(x, GeluApprox::Erf)),
        ("silu", |t, x| t.silu(x)),
        ("sigmoid", |t, x| t.sigmoid(x)),
        ("tanh", |t, x| t.tanh(x)),
        ("relu(relu)", |t, x| {
            let h = t.relu(x)?;
            t.relu(&h)
        }),
    ];
    let x = rand32(&[5, 4, 9], 7, 3.0);
    let wl = rand32(&[9, 9], 8, 0.5);
    for (name, act) in acts {
        for owned in [true, false] {
            let f = move |t: &mut Tape, v: &[Value]| -> Result<Value> {
                let xin = t.scale(&v[0], 1.0)?;
                let y = act(t, &xin)?;
                downstream(t, &y, owned.then_some(&v[1]))
            };
            check(
                &format!("{name} owned={owned}"),
                &[x.clone(), wl.clone()],
                f,
            );
        }
    }
}

/// ReLU / LeakyReLU backward reading a bit-packed mask a few rows at a time (down to one
/// row per chunk) into an owned or a shared gradient, for per-sample sizes that are not
/// multiples of 8 (rows start mid-byte and mid-word), against the portable path that unpacks
/// the mask whole.
#[test]
fn relu_mask_backward_in_row_chunks_matches_the_whole_mask() {
    type Act = fn(&mut Tape, &Value) -> Result<Value>;
    let acts: [(&str, Act); 3] = [
        ("relu", |t, x| t.relu(x)),
        ("leaky_relu", |t, x| t.leaky_relu(x, 0.1)),
        ("leaky_relu(1.5)", |t, x| t.leaky_relu(x, 1.5)),
    ];
    let shapes: [&[usize]; 4] = [&[7, 3, 5], &[4, 13], &[9, 2, 7, 5], &[3, 67]];
    for (k, dims) in shapes.into_iter().enumerate() {
        let x = rand32(dims, 20 + k as u64, 2.0);
        let last = *dims.last().unwrap();
        let wl = rand32(&[last, last], 30 + k as u64, 0.5);
        for (name, act) in acts {
            for owned in [true, false] {
                let f = move |t: &mut Tape, v: &[Value]| -> Result<Value> {
                    let xin = t.scale(&v[0], 1.0)?;
                    let y = act(t, &xin)?;
                    downstream(t, &y, owned.then_some(&v[1]))
                };
                for level in [Level::L3, Level::L0] {
                    let inputs = [x.clone(), wl.clone()];
                    let r = run(Path::Reference, level, &inputs, &f).unwrap();
                    // 1 byte: one row per chunk; 40: a few rows; whole: one chunk.
                    for chunk in [1, 40, 1 << 20] {
                        let what = format!("{name} {dims:?} owned={owned} {level:?} chunk {chunk}");
                        let kr = run(Path::Kernels { chunk }, level, &inputs, &f).unwrap();
                        assert_eq!(scaled_diff(&kr.out, &r.out), 0.0, "{what}: output");
                        // The input's gradient is the mask product itself: exact. The
                        // linear weight's gradient may sum in another order.
                        let (a, b) = (kr.grads[0].as_ref().unwrap(), r.grads[0].as_ref().unwrap());
                        let d = scaled_diff(a, b);
                        assert!(d <= TOL, "{what}: input gradient differs by {d:.2e}");
                    }
                }
            }
        }
    }
}

#[test]
fn linear_in_place_bias_and_chunked_weight_gradient_match_candle_ops() {
    let x = rand32(&[6, 5, 8], 9, 1.0);
    let w = rand32(&[7, 8], 10, 0.5);
    let b = rand32(&[7], 11, 0.5);
    check("linear", &[x, w, b], |t, v| {
        let xin = t.scale(&v[0], 1.0)?;
        t.linear(&xin, &v[1], Some(&v[2]))
    });
}

#[test]
fn linear_gelu_is_linear_then_gelu() {
    let x = rand32(&[4, 6, 8], 12, 1.0);
    let w = rand32(&[16, 8], 13, 0.5);
    let b = rand32(&[16], 14, 0.5);
    let w2 = rand32(&[5, 16], 15, 0.5);
    let inputs = [x, w, b, w2];
    for approx in [GeluApprox::Tanh, GeluApprox::Erf] {
        for level in [Level::L0, Level::L3] {
            let fused = run(
                Path::Kernels { chunk: 512 },
                level,
                &inputs,
                &move |t: &mut Tape, v: &[Value]| {
                    let h = t.linear_gelu(&v[0], &v[1], Some(&v[2]), approx)?;
                    t.linear(&h, &v[3], None)
                },
            )
            .unwrap();
            let composed = run(
                Path::Kernels { chunk: 512 },
                level,
                &inputs,
                &move |t: &mut Tape, v: &[Value]| {
                    let h = t.linear(&v[0], &v[1], Some(&v[2]))?;
                    let h = t.gelu(&h, approx)?;
                    t.linear(&h, &v[3], None)
                },
            )
            .unwrap();
            // The same ops on the same values in the same order: equal to the last bit.
            assert_eq!(
                max_rel_diff(&fused.out, &composed.out).unwrap(),
                0.0,
                "{approx:?} {level:?}: outputs"
            );
            for (i, (a, b)) in fused.grads.iter().zip(&composed.grads).enumerate() {
                let (a, b) = (a.as_ref().unwrap(), b.as_ref().unwrap());
                assert_eq!(
                    max_rel_diff(a, b).unwrap(),
                    0.0,
                    "{approx:?} {level:?}: gradient of input {i}"
                );
            }
        }
        check(&format!("linear_gelu {approx:?}"), &inputs, move |t, v| {
            let h = t.linear_gelu(&v[0], &v[1], Some(&v[2]), approx)?;
            t.linear(&h, &v[3], None)
        });
    }
}

/// The fused MLP (`Tape::mlp`: forward and backward in batch chunks, hidden contexts
/// quantized chunk by chunk) against `linear → gelu → linear` composed: the same contexts in
/// the same slots (so at L3 the same codes — different rounding noise would move the
/// gradients by percents, not by the 1e-6 of a different summation order), the same output
/// and gradients, with and without biases and with a frozen input.
#[test]
fn mlp_is_linear_gelu_linear_in_batch_chunks() {
    let x = rand32(&[4, 6, 8], 21, 1.0);
    let w1 = rand32(&[16, 8], 22, 0.5);
    let b1 = rand32(&[16], 23, 0.5);
    let w2 = rand32(&[5, 16], 24, 0.5);
    let b2 = rand32(&[5], 25, 0.5);
    let inputs = [x, w1, b1, w2, b2];
    let mlp = |approx: GeluApprox, biases: bool| {
        move |t: &mut Tape, v: &[Value]| {
            let m = Mlp {
                w1: &v[1],
                b1: biases.then_some(&v[2]),
                w2: &v[3],
                b2: biases.then_some(&v[4]),
                approx,
            };
            t.mlp(&v[0], &m)
        }
    };
    let composed = |approx: GeluApprox, biases: bool| {
        move |t: &mut Tape, v: &[Value]| {
            let h = t.linear(&v[0], &v[1], biases.then_some(&v[2]))?;
            let h = t.gelu(&h, approx)?;
            t.linear(&h, &v[3], biases.then_some(&v[4]))
        }
    };
    for approx in [GeluApprox::Tanh, GeluApprox::Erf] {
        for biases in [true, false] {
            for level in [Level::L0, Level::L3] {
                let what = format!("{approx:?}, biases {biases}, {level:?}");
                // 512 bytes: one sample (6 rows of 16 hidden units) per chunk.
                let (f, c) = (mlp(approx, biases), composed(approx, biases));
                let fused = run(Path::Kernels { chunk: 512 }, level, &inputs, &f).unwrap();
                let comp = run(Path::Kernels { chunk: 512 }, level, &inputs, &c).unwrap();
                let d = scaled_diff(&fused.out, &comp.out);
                assert!(d <= 1e-6, "{what}: outputs differ by {d:.2e}");
                for (i, (a, b)) in fused.grads.iter().zip(&comp.grads).enumerate() {
                    match (a, b) {
                        (Some(a), Some(b)) => {
                            let d = scaled_diff(a, b);
                            assert!(
                                d <= 1e-5,
                                "{what}: gradient of input {i} differs by {d:.2e}"
                            );
                        }
                        (None, None) => {}
                        _ => panic!("{what}: gradient of input {i} present on one side only"),
                    }
                }
                assert_eq!(
                    context_summary(level, &inputs, &f, true),
                    context_summary(level, &inputs, &c, true),
                    "{what}: saved contexts"
                );
            }
            check(
                &format!("mlp {approx:?} biases {biases}"),
                &inputs,
                mlp(approx, biases),
            );
        }
    }
}

/// The residual sums of a pre-norm transformer block fused into the attention and the MLP
/// (`multi_head_attention_residual`, `mlp_residual`: each chunk's output added into the
/// residual stream's buffer, which at L3 only a compressed context needs): the same output and
/// gradients as the composed ops and a separate add, at L3 (in place) and L0 (where the norm
/// keeps the residual as it is, so the sum is a separate op).
#[test]
fn residual_sums_fused_into_attention_and_mlp_match_the_composed_ops() {
    let inputs = [
        rand32(&[4, 6, 8], 70, 1.0),
        rand32(&[8, 8], 71, 0.5),
        rand32(&[8, 8], 72, 0.5),
        rand32(&[8, 8], 73, 0.5),
        rand32(&[8, 8], 74, 0.5),
        rand32(&[16, 8], 75, 0.5),
        rand32(&[16], 76, 0.5),
        rand32(&[8, 16], 77, 0.5),
        rand32(&[8], 78, 0.5),
    ];
    check(
        "pre-norm block: attention and MLP residual sums",
        &inputs,
        |t, v| {
            let x = t.scale(&v[0], 1.0)?;
            let n1 = t.layer_norm(&x, None, None, 1e-5)?;
            let attn = MultiHeadAttention {
                heads: 2,
                causal: true,
                ..MultiHeadAttention::new(&v[1], &v[2], &v[3], &v[4], 2)
            };
            let x1 = t.multi_head_attention_residual(n1, &attn, x)?;
            let n2 = t.layer_norm(&x1, None, None, 1e-5)?;
            let mlp = Mlp {
                w1: &v[5],
                b1: Some(&v[6]),
                w2: &v[7],
                b2: Some(&v[8]),
                approx: GeluApprox::Tanh,
            };
            t.mlp_residual(n2, &mlp, x1)
        },
    );
}

/// The two halves of a pre-norm transformer block fused with their layer norms
/// (`prenorm_attention_residual`, `prenorm_mlp_residual`: the norm computed a chunk at a
/// time, the sum added into the residual stream): the same output and gradients as
/// `layer_norm` + the composed ops + an add, and at L3 the same context log, line by line
/// in the same order (a profile reads it so).
#[test]
fn prenorm_halves_fused_with_their_norms_match_the_composed_ops() {
    let inputs = prenorm_block_inputs();
    let f = |t: &mut Tape, v: &[Value]| prenorm_block(t, v, true);
    let log = |fused: bool| {
        set_context_chunk_bytes(Some(512));
        set_fused_cpu_kernels(fused);
        let (_s, _i, mut tape, vals) = tape_with_inputs(Level::L3, &inputs).unwrap();
        f(&mut tape, &vals).unwrap();
        set_context_chunk_bytes(None);
        set_fused_cpu_kernels(true);
        tape.context_log()
            .iter()
            .map(|r| {
                (
                    r.slot,
                    r.op,
                    r.repr.clone(),
                    r.shape.clone(),
                    r.stored_bytes,
                )
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(log(true), log(false), "context log, fused vs composed");
    check("pre-norm halves fused with their norms", &inputs, f);
}

/// Shapes that do not chain are errors naming the MLP and the shapes, on every path.
#[test]
fn mlp_shape_errors_name_the_op_and_shapes() {
    let mut tape = Tape::default();
    let x = tape.constant(rand32(&[2, 3, 8], 80, 1.0));
    let w1 = tape.constant(rand32(&[16, 8], 81, 1.0));
    let w2_bad = tape.constant(rand32(&[8, 12], 82, 1.0));
    let w2 = tape.constant(rand32(&[8, 16], 83, 1.0));
    let m = |w2| Mlp {
        w1: &w1,
        b1: None,
        w2,
        b2: None,
        approx: GeluApprox::Tanh,
    };
    let e = tape.mlp(&x, &m(&w2_bad)).unwrap_err().to_string();
    assert!(
        e.contains("mlp") && e.contains("[8, 12]") && e.contains("16"),
        "{e}"
    );
    let x_bad = tape.constant(rand32(&[2, 3, 7], 84, 1.0));
    let e = tape.mlp(&x_bad, &m(&w2)).unwrap_err().to_string();
    assert!(e.contains("mlp") && e.contains("[2, 3, 7]"), "{e}");
    assert_eq!(tape.mlp(&x, &m(&w2)).unwrap().dims(), &[2, 3, 8]);
}

/// `(slot, op, repr, shape, stored bytes)` of every context `f` saves at `level`, in slot order.
fn context_summary(
    level: Level,
    inputs: &[Tensor],
    f: &dyn Fn(&mut Tape, &[Value]) -> Result<Value>,
    fused: bool,
) -> Vec<(usize, String, String, Vec<usize>, usize)> {
    set_context_chunk_bytes(Some(512));
    set_fused_cpu_kernels(fused);
    let (_store, _ids, mut tape, vals) = tape_with_inputs(level, inputs).unwrap();
    f(&mut tape, &vals).unwrap();
    set_context_chunk_bytes(None);
    set_fused_cpu_kernels(true);
    let mut log: Vec<_> = tape
        .context_log()
        .iter()
        .map(|r| {
            (
                r.slot,
                r.op.to_string(),
                r.repr.clone(),
                r.shape.clone(),
                r.stored_bytes,
            )
        })
        .collect();
    log.sort();
    log
}

#[test]
fn gradients_meeting_at_forks_add_up_in_place() {
    let x = rand32(&[4, 3, 8], 16, 1.0);
    let w1 = rand32(&[8, 8], 17, 0.5);
    let w2 = rand32(&[8, 8], 18, 0.5);
    let w3 = rand32(&[8, 8], 19, 0.5);
    // Three owned contributions (linear input gradients), and one shared one (an add).
    check("fork", &[x, w1, w2, w3], |t, v| {
        let h = t.scale(&v[0], 1.0)?;
        let a = t.linear(&h, &v[1], None)?;
        let b = t.linear(&h, &v[2], None)?;
        let c = t.linear(&h, &v[3], None)?;
        let ab = t.add(&a, &b)?;
        let abc = t.add(&ab, &c)?;
        let g = t.gelu(&abc, GeluApprox::Tanh)?;
        t.add(&g, &h)
    });
}

#[test]
fn residual_block_matches_candle_ops() {
    use actrain::ops::conv::Conv2dParams;
    let x = rand32(&[4, 3, 6, 6], 20, 1.0);
    let w1 = rand32(&[3, 3, 3, 3], 21, 0.4);
    let w2 = rand32(&[3, 3, 3, 3], 22, 0.4);
    let g1 = rand32(&[3], 23, 1.0);
    let b1 = rand32(&[3], 24, 1.0);
    check(
        "conv-bn-relu-conv-bn-add-relu",
        &[x, w1, w2, g1, b1],
        |t, v| {
            let p = Conv2dParams {
                padding: 1,
                ..Default::default()
            };
            let x = t.scale(&v[0], 1.0)?;
            let mut s1 = BatchNormStats::new(3, v[0].dtype(), &Device::Cpu)?;
            let mut s2 = BatchNormStats::new(3, v[0].dtype(), &Device::Cpu)?;
            let h = t.conv2d(&x, &v[1], None, p)?;
            let h = t.batch_norm(&h, &v[3], &v[4], &mut s1, 0.1, 1e-5)?;
            let h = t.relu(&h)?;
            let h = t.conv2d(&h, &v[2], None, p)?;
            let h = t.batch_norm(&h, &v[3], &v[4], &mut s2, 0.1, 1e-5)?;
            let y = t.add(&h, &x)?;
            t.relu(&y)
        },
    );
}

/// The forward ops that take their input by value (`conv2d_owned`, `batch_norm_owned`,
/// `relu_owned`, `add_owned`) write their output over it at L3, where the contexts are
/// compressed copies — the convolution chunk by chunk (a tiny workspace makes every sample a
/// chunk) — and must compute exactly what the ordinary ops compute; at L0, where the
/// contexts are the tensors themselves, they must leave them alone. The stride-2 block with
/// a projection shortcut also checks the convolution that adds its input gradient into the
/// one the shortcut already gathered.
#[test]
fn residual_blocks_written_in_place_match_candle_ops() {
    use actrain::ops::conv::{set_workspace_bytes, Conv2dParams, DEFAULT_WORKSPACE_BYTES};
    let x = rand32(&[4, 3, 6, 6], 30, 1.0);
    let w1 = rand32(&[3, 3, 3, 3], 31, 0.4);
    let w2 = rand32(&[3, 3, 3, 3], 32, 0.4);
    let w3 = rand32(&[6, 3, 3, 3], 33, 0.4);
    let w4 = rand32(&[6, 3, 1, 1], 34, 0.4);
    let g1 = rand32(&[3], 35, 1.0);
    let b1 = rand32(&[3], 36, 1.0);
    let g2 = rand32(&[6], 37, 1.0);
    let b2 = rand32(&[6], 38, 1.0);
    set_workspace_bytes(1024);
    check(
        "identity block in place, then a stride-2 block",
        &[x, w1, w2, g1, b1, w3, w4, g2, b2],
        |t, v| {
            let p = Conv2dParams {
                padding: 1,
                ..Default::default()
            };
            let stats = |c| BatchNormStats::new(c, v[0].dtype(), &Device::Cpu);
            let (mut s1, mut s2, mut s3, mut s4) = (stats(3)?, stats(3)?, stats(6)?, stats(6)?);
            let x = t.scale(&v[0], 1.0)?;
            // Identity block: only the block input is shared (with the shortcut).
            let h = t.conv2d(&x, &v[1], None, p)?;
            let h = t.batch_norm_owned(h, &v[3], &v[4], &mut s1, 0.1, 1e-5)?;
            let h = t.relu_owned(h)?;
            let h = t.conv2d_owned(h, &v[2], None, p)?;
            let h = t.batch_norm_owned(h, &v[3], &v[4], &mut s2, 0.1, 1e-5)?;
            let y = t.add_owned(h, &x)?;
            drop(x);
            let x = t.relu_owned(y)?;
            // Stride-2 block with a 1x1 projection shortcut, recorded after the main branch
            // so that backward reaches the shortcut first.
            let s2p = Conv2dParams {
                padding: 1,
                stride: 2,
                ..Default::default()
            };
            let h = t.conv2d(&x, &v[5], None, s2p)?;
            let h = t.batch_norm_owned(h, &v[7], &v[8], &mut s3, 0.1, 1e-5)?;
            let h = t.relu_owned(h)?;
            let sc = t.conv2d(
                &x,
                &v[6],
                None,
                Conv2dParams {
                    stride: 2,
                    ..Default::default()
                },
            )?;
            let sc = t.batch_norm_owned(sc, &v[7], &v[8], &mut s4, 0.1, 1e-5)?;
            let y = t.add_owned(h, &sc)?;
            t.relu_owned(y)
        },
    );
    set_workspace_bytes(DEFAULT_WORKSPACE_BYTES);
}

/// Attention's backward runs in batch chunks (each chunk unpacks only its own rows of P, q,
/// k and v, so only a chunk's score-sized P and dP exist at a time): the same gradients as
/// the whole batch at once. Causal and not, with every input's gradient wanted.
#[test]
fn multi_head_attention_in_batch_chunks_matches_the_composed_ops() {
    let inputs = [
        rand32(&[3, 5, 8], 50, 1.0),
        rand32(&[8, 8], 51, 0.5),
        rand32(&[8], 52, 0.5),
        rand32(&[8, 8], 53, 0.5),
        rand32(&[8, 8], 55, 0.5),
        rand32(&[8], 56, 0.5),
        rand32(&[6, 8], 57, 0.5),
        rand32(&[6], 58, 0.5),
    ];
    // No key bias: its gradient is zero up to rounding (softmax ignores a constant shift per
    // query row), so no relative comparison of it means anything.
    for causal in [false, true] {
        let f = move |t: &mut Tape, v: &[Value]| {
            // A scaled copy: `x` is an op output (compressed at L3), as in a model.
            let x = t.scale(&v[0], 1.0)?;
            let m = MultiHeadAttention {
                wq: &v[1],
                bq: Some(&v[2]),
                wk: &v[3],
                bk: None,
                wv: &v[4],
                bv: Some(&v[5]),
                wo: &v[6],
                bo: Some(&v[7]),
                heads: 2,
                causal,
            };
            t.multi_head_attention_owned(x, &m)
        };
        // Kernels (fused, one sample per chunk at 512 bytes) against the composed ops.
        check(
            &format!("multi_head_attention (causal {causal})"),
            &inputs,
            f,
        );
        for level in [Level::L0, Level::L3] {
            assert_eq!(
                context_summary(level, &inputs, &f, true),
                context_summary(level, &inputs, &f, false),
                "causal {causal}, {level:?}: saved contexts, fused vs composed"
            );
        }
    }
}

#[test]
fn attention_backward_in_batch_chunks_matches_the_whole_batch() {
    for causal in [false, true] {
        let q = rand32(&[3, 2, 5, 4], 40, 1.0);
        let k = rand32(&[3, 2, 5, 4], 41, 1.0);
        let v = rand32(&[3, 2, 5, 4], 42, 1.0);
        check(&format!("sdpa (causal {causal})"), &[q, k, v], |t, v| {
            // Scaled copies: the contexts are op outputs (compressed at L3), not parameters.
            let q = t.scale(&v[0], 1.0)?;
            let k = t.scale(&v[1], 1.0)?;
            let vv = t.scale(&v[2], 1.0)?;
            t.scaled_dot_product_attention(&q, &k, &vv, causal)
        });
    }
}

/// A residual block's sum with its projection shortcut as one node
/// (`projection_shortcut_add`: the shortcut's batch norm and strided 1x1 conv run backward a
/// chunk of samples at a time into `x`'s gradient — a new one, or, with `gathered`, the one
/// `x` already has from a consumer recorded later — and the sum's gradient goes on to the
/// main branch as it came): the same output and gradients as conv, batch norm and add
/// composed, and at L3 the same context log, line by line.
#[test]
fn projection_shortcut_fused_with_the_sum_matches_the_composed_ops() {
    use actrain::ops::conv::Conv2dParams;
    use actrain::ops::residual::{ConvBn, ProjectionShortcut};
    let inputs = [
        rand32(&[5, 3, 8, 8], 90, 1.0),
        rand32(&[6, 3, 3, 3], 91, 0.5),
        rand32(&[6, 3, 1, 1], 92, 0.5),
        (rand32(&[6], 93, 0.3) + 1.0).unwrap(),
        rand32(&[6], 94, 0.3),
        rand32(&[6, 3, 1, 1], 95, 0.5),
    ];
    for gathered in [false, true] {
        let f = move |t: &mut Tape, v: &[Value]| -> Result<Value> {
            // A non-parameter input, so that its gradient is gathered on the tape.
            let x = t.scale(&v[0], 1.5)?;
            let s2 = |padding| Conv2dParams {
                stride: 2,
                padding,
                ..Default::default()
            };
            let h = t.conv2d(&x, &v[1], None, s2(1))?;
            let h = t.relu(&h)?;
            let sc = ProjectionShortcut {
                conv: ConvBn::new(&v[2], &v[3], &v[4]),
                stride: 2,
            };
            let mut stats = BatchNormStats::new(6, v[0].dtype(), &Device::Cpu)?;
            let y = t.projection_shortcut_add(h, &x, &sc, &mut stats)?;
            let y = t.relu(&y)?;
            if !gathered {
                return Ok(y);
            }
            // Recorded after the shortcut, so backward reaches it first.
            let z = t.conv2d(&x, &v[5], None, s2(0))?;
            t.add(&y, &z)
        };
        let what = format!("projection shortcut (gathered {gathered})");
        check(&what, &inputs, f);
        assert_eq!(
            context_summary(Level::L3, &inputs, &f, true),
            context_summary(Level::L3, &inputs, &f, false),
            "{what}: context log, fused vs composed"
        );
    }
}

/// A basic block with an identity shortcut as one node (`identity_block`: backward in batch
/// chunks, BN1's reductions gathered in a first pass, the chunks recomputed and taken on to
/// `x`'s gradient in a second, which is the sum's gradient itself): the same output and
/// gradients as the composed convs, batch norms, ReLU and sum — with the block's output
/// gradient owned or shared — and at L3 the same context log, line by line.
#[test]
fn identity_block_fused_matches_the_composed_ops() {
    use actrain::ops::conv::Conv2dParams;
    use actrain::ops::residual::ConvBn;
    let inputs = [
        rand32(&[6, 4, 6, 6], 100, 1.0),
        rand32(&[4, 4, 3, 3], 101, 0.4),
        (rand32(&[4], 102, 0.3) + 1.0).unwrap(),
        rand32(&[4], 103, 0.3),
        rand32(&[4, 4, 3, 3], 104, 0.4),
        (rand32(&[4], 105, 0.3) + 1.0).unwrap(),
        rand32(&[4], 106, 0.3),
        rand32(&[6, 6], 107, 0.5),
    ];
    for owned in [true, false] {
        let f = move |t: &mut Tape, v: &[Value]| -> Result<Value> {
            // A non-parameter input, so that its context is quantized at L3.
            let x = t.scale(&v[0], 1.5)?;
            let cb = |i: usize| ConvBn::new(&v[i], &v[i + 1], &v[i + 2]);
            let p = Conv2dParams {
                padding: 1,
                ..Default::default()
            };
            let mut s1 = BatchNormStats::new(4, v[0].dtype(), &Device::Cpu)?;
            let mut s2 = BatchNormStats::new(4, v[0].dtype(), &Device::Cpu)?;
            let y = t.identity_block(x, &cb(1), &cb(4), p, &mut s1, &mut s2)?;
            let y = t.relu(&y)?;
            downstream(t, &y, owned.then_some(&v[7]))
        };
        // One sample per im2col chunk, so that the fused path runs (in six chunks).
        actrain::ops::conv::set_workspace_bytes(1);
        let what = format!("identity block (owned gradient {owned})");
        check(&what, &inputs, f);
        let logs = (
            context_summary(Level::L3, &inputs, &f, true),
            context_summary(Level::L3, &inputs, &f, false),
        );
        actrain::ops::conv::set_workspace_bytes(actrain::ops::conv::DEFAULT_WORKSPACE_BYTES);
        assert_eq!(logs.0, logs.1, "{what}: context log, fused vs composed");
    }
}
