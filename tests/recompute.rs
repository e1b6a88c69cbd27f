//! Contexts rebuilt from other contexts instead of stored (`Tape::offer_recompute`): a layer
//! norm's output (the input of the linear layer after it) from the norm's saved input and
//! statistics, and the attention output (the output projection's input) from the saved `P`
//! and `v`. At L1–L4 they cost no storage; L0 still stores them (the fp32 baseline).
//!
//! Checked here: with nothing rounded, the rebuilt contexts give the stored ones' gradients
//! (composed ops and the fused pre-norm halves); at L3 the log shows them as rebuilt, with
//! zero bytes and L0's bytes as their uncompressed size; and the gradients that read them
//! only linearly stay unbiased.

mod common;

use actrain::compress::policy::{CompressConfig, CompressPolicy, Level};
use actrain::ops::attention::MultiHeadAttention;
use actrain::ops::set_context_chunk_bytes;
use actrain::tape::{
    ContextPolicy, ContextRecord, KeepPolicy, Packed, ParamStore, SaveRequest, Tape, Value,
};
use anyhow::Result;
use candle_core::Tensor;
use common::{prenorm_block, prenorm_block_inputs, rand32};

/// Keeps every context as it is (nothing rounded) but rebuilds what can be rebuilt, and
/// says it compresses so that the fused paths run too.
struct KeepButRebuild;

impl ContextPolicy for KeepButRebuild {
    fn pack(&mut self, req: &SaveRequest) -> Result<Packed> {
        Ok(Packed::Full(req.tensor.clone()))
    }
    fn recomputes_contexts(&self) -> bool {
        true
    }
    fn compresses_activations(&self) -> bool {
        true
    }
}

fn l3(seed: u64) -> Box<dyn ContextPolicy> {
    Box::new(CompressPolicy::new(CompressConfig {
        level: Level::L3,
        seed,
        min_elements: 0,
        ..Default::default()
    }))
}

fn l0() -> Box<dyn ContextPolicy> {
    Box::new(CompressPolicy::new(CompressConfig {
        level: Level::L0,
        min_elements: 0,
        ..Default::default()
    }))
}

/// Output, every input's gradient and the context log of one step of `f` under `policy`.
fn run(
    policy: Box<dyn ContextPolicy>,
    inputs: &[Tensor],
    f: &dyn Fn(&mut Tape, &[Value]) -> Result<Value>,
) -> (Tensor, Vec<Option<Tensor>>, Vec<ContextRecord>) {
    let mut store = ParamStore::new();
    let ids: Vec<_> = inputs
        .iter()
        .enumerate()
        .map(|(i, t)| store.add(format!("in{i}"), t.clone()).unwrap())
        .collect();
    let mut tape = Tape::new(policy).with_seed(11);
    tape.begin_step();
    let vals: Vec<Value> = ids.iter().map(|&id| tape.param(&store, id)).collect();
    let out = f(&mut tape, &vals).unwrap();
    let r = tape.constant(rand32(out.dims(), 7, 1.0));
    let prod = tape.mul(&out, &r).unwrap();
    let loss = tape.sum_all(&prod).unwrap();
    let log = tape.context_log().to_vec();
    tape.backward(&loss, &mut store).unwrap();
    let grads = ids.iter().map(|&id| store.grad(id).cloned()).collect();
    (out.into_tensor(), grads, log)
}

fn max_scaled_diff(a: &Tensor, b: &Tensor) -> f32 {
    let scale = b
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
    d.to_scalar::<f32>().unwrap() / scale.max(1e-30)
}

/// Runs `f` storing every context and rebuilding what can be rebuilt, nothing rounded in
/// either, and checks that the outputs and every input's gradient agree; returns both logs
/// (stored, rebuilt).
fn stored_vs_rebuilt(
    inputs: &[Tensor],
    f: &dyn Fn(&mut Tape, &[Value]) -> Result<Value>,
    what: &str,
) -> (Vec<ContextRecord>, Vec<ContextRecord>) {
    let (out_k, grads_k, log_k) = run(Box::new(KeepPolicy), inputs, f);
    let (out_r, grads_r, log_r) = run(Box::new(KeepButRebuild), inputs, f);
    assert!(max_scaled_diff(&out_r, &out_k) < 1e-6, "{what}: outputs");
    for (i, (a, b)) in grads_r.iter().zip(&grads_k).enumerate() {
        let d = max_scaled_diff(a.as_ref().unwrap(), b.as_ref().unwrap());
        assert!(d < 1e-5, "{what}: gradient of input {i} differs by {d:.2e}");
    }
    (log_k, log_r)
}

fn rebuilt(log: &[ContextRecord]) -> Vec<(&str, String, Vec<usize>)> {
    log.iter()
        .filter(|r| r.repr.starts_with("from "))
        .map(|r| (r.op, r.repr.clone(), r.shape.clone()))
        .collect()
}

/// Nothing rounded, so rebuilding must not change a thing: the same output and gradients as
/// storing every context, on the composed ops and on the fused pre-norm halves (in several
/// chunks), with the three rebuilt contexts in the log at zero bytes.
#[test]
fn rebuilt_contexts_give_the_stored_contexts_gradients() {
    let inputs = prenorm_block_inputs();
    for prenorm in [false, true] {
        for chunk in [None, Some(512)] {
            set_context_chunk_bytes(chunk);
            let f = |t: &mut Tape, v: &[Value]| prenorm_block(t, v, prenorm);
            let what = format!("prenorm {prenorm}, chunk {chunk:?}");
            let (log_k, log_r) = stored_vs_rebuilt(&inputs, &f, &what);
            set_context_chunk_bytes(None);
            assert!(rebuilt(&log_k).is_empty(), "{what}: KeepPolicy rebuilds");
            let expect = vec![
                ("linear", "from layer_norm".to_string(), vec![4, 6, 8]),
                ("linear", "from sdpa".to_string(), vec![4, 6, 8]),
                ("linear", "from layer_norm".to_string(), vec![4, 6, 8]),
            ];
            assert_eq!(rebuilt(&log_r), expect, "{what}");
            for r in log_r.iter().filter(|r| r.repr.starts_with("from ")) {
                assert_eq!(r.stored_bytes, 0, "{what}: {r:?}");
                assert_eq!(r.uncompressed_bytes, 4 * 6 * 8 * 4, "{what}: {r:?}");
            }
            // One context fewer per rebuilt one than when storing them.
            let stored = |log: &[ContextRecord]| log.iter().filter(|r| r.stored_bytes > 0).count();
            assert_eq!(stored(&log_r) + 3, stored(&log_k), "{what}");
        }
    }
}

/// At L3 the block stores neither the norms' outputs nor the attention output, while L0
/// stores all three in fp32: the L3 log's uncompressed total is exactly what L0 stores, so
/// its ratio is against the real baseline.
#[test]
fn l3_rebuilds_what_l0_stores_and_counts_it_at_l0_size() {
    let inputs = prenorm_block_inputs();
    for prenorm in [false, true] {
        set_context_chunk_bytes(Some(512));
        let f = |t: &mut Tape, v: &[Value]| prenorm_block(t, v, prenorm);
        let (_, _, log0) = run(l0(), &inputs, &f);
        let (_, _, log3) = run(l3(5), &inputs, &f);
        set_context_chunk_bytes(None);
        assert!(rebuilt(&log0).is_empty());
        assert_eq!(rebuilt(&log3).len(), 3, "prenorm {prenorm}");
        let stored0: usize = log0.iter().map(|r| r.stored_bytes).sum();
        let unc3: usize = log3.iter().map(|r| r.uncompressed_bytes).sum();
        assert_eq!(unc3, stored0, "prenorm {prenorm}");
        // The three rebuilt tensors are 3 of the block's 16 [4, 6, 8]-sized fp32 units
        // (the GELU's input and the second linear's are twice that, P is 6/8 of one).
        let stored3: usize = log3.iter().map(|r| r.stored_bytes).sum();
        assert!(stored3 * 10 < stored0, "L3 {stored3} vs L0 {stored0}");
    }
}

/// The output projection's weight gradient reads the rebuilt `P v` only linearly, and the
/// value projection's reads the rebuilt norm output times a gradient made from `P` (another,
/// independently rounded context): both stay unbiased. The mean of many L3 draws converges
/// to the exact gradient like 1/sqrt(draws).
#[test]
fn gradients_through_rebuilt_contexts_stay_unbiased() {
    let inputs = prenorm_block_inputs();
    // Only the attention half: the MLP's GELU is not linear in its context.
    let f = |t: &mut Tape, v: &[Value]| -> Result<Value> {
        let x = t.scale(&v[0], 1.0)?;
        let n = t.layer_norm(&x, Some(&v[1]), Some(&v[2]), 1e-5)?;
        let attn = MultiHeadAttention {
            causal: true,
            ..MultiHeadAttention::new(&v[3], &v[4], &v[5], &v[6], 2)
        };
        t.multi_head_attention(&n, &attn)
    };
    // wv (input 5) and wo (input 6).
    for which in [5usize, 6] {
        mean_of_draws_converges(&inputs, &f, which, 1000, 2, &format!("input {which}"));
    }
}

/// The gradient of input `which` of `f` over 200 L3 draws (seeds from `seed`, `rebuilt`
/// rebuilt contexts in each log): one draw is perturbed, and the mean of the draws is at
/// least 7x closer to the exact gradient than one draw is — an unbiased estimator's mean is
/// √200 ≈ 14x closer, a biased one's stalls at its bias.
fn mean_of_draws_converges(
    inputs: &[Tensor],
    f: &dyn Fn(&mut Tape, &[Value]) -> Result<Value>,
    which: usize,
    seed: u64,
    rebuilt_contexts: usize,
    what: &str,
) {
    let (_, exact, _) = run(Box::new(KeepPolicy), inputs, f);
    let exact = exact[which].as_ref().unwrap();
    let dist = |a: &Tensor| -> f64 {
        let d = (a - exact).unwrap().sqr().unwrap().sum_all().unwrap();
        let n = exact.sqr().unwrap().sum_all().unwrap();
        (d.to_scalar::<f32>().unwrap() as f64 / n.to_scalar::<f32>().unwrap() as f64).sqrt()
    };
    let draws = 200;
    let (mut mean, mut single): (Option<Tensor>, f64) = (None, 0.0);
    for s in 0..draws {
        let (_, g, log) = run(l3(seed + s), inputs, f);
        assert_eq!(rebuilt(&log).len(), rebuilt_contexts, "{what}");
        let g = g[which].clone().unwrap();
        single += dist(&g) / draws as f64;
        let part = (g / draws as f64).unwrap();
        mean = Some(match mean {
            None => part,
            Some(m) => (m + part).unwrap(),
        });
    }
    let averaged = dist(&mean.unwrap());
    println!("{what}: single draw {single:.4}, mean of {draws} {averaged:.4}");
    assert!(
        single > 1e-3,
        "{what}: 2-bit contexts should perturb it ({single})"
    );
    assert!(
        averaged < single / 7.0,
        "{what}: mean of {draws} draws {averaged} vs single {single}: biased?"
    );
}

/// RMS norm (no mean) and a layer norm without affine parameters rebuild exactly too, and the
/// log names the norm.
#[test]
fn norms_without_mean_or_affine_rebuild_exactly() {
    let inputs = vec![
        rand32(&[5, 3, 8], 40, 2.0),
        rand32(&[8], 41, 1.0),
        rand32(&[6, 8], 42, 0.5),
    ];
    let f = |t: &mut Tape, v: &[Value]| -> Result<Value> {
        let x = t.scale(&v[0], 1.0)?;
        let r = t.rms_norm(&x, Some(&v[1]), 1e-5)?;
        let a = t.linear(&r, &v[2], None)?;
        let n = t.layer_norm(&x, None, None, 1e-5)?;
        let b = t.linear(&n, &v[2], None)?;
        t.add(&a, &b)
    };
    for chunk in [None, Some(256)] {
        set_context_chunk_bytes(chunk);
        let (_, log_r) = stored_vs_rebuilt(&inputs, &f, &format!("chunk {chunk:?}"));
        set_context_chunk_bytes(None);
        let labels: Vec<String> = rebuilt(&log_r).into_iter().map(|r| r.1).collect();
        assert_eq!(
            labels,
            ["from rms_norm", "from layer_norm"],
            "chunk {chunk:?}"
        );
    }
}

/// `conv → batch norm → ReLU → conv` (and LeakyReLU): the second conv's input is rebuilt
/// from the batch norm's saved input and statistics times the ReLU's exact mask.
fn conv_bn_act_conv(t: &mut Tape, v: &[Value], leaky: bool) -> Result<Value> {
    let p = actrain::ops::conv::Conv2dParams {
        padding: 1,
        ..Default::default()
    };
    let c = t.conv2d(&v[0], &v[1], None, p)?;
    let mut stats = actrain::ops::norm::BatchNormStats::new(
        4,
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )?;
    let b = t.batch_norm(&c, &v[2], &v[3], &mut stats, 0.1, 1e-5)?;
    let a = if leaky {
        t.leaky_relu(&b, 0.1)?
    } else {
        t.relu(&b)?
    };
    t.conv2d(&a, &v[4], None, p)
}

fn conv_block_inputs() -> Vec<Tensor> {
    vec![
        rand32(&[6, 3, 8, 8], 50, 1.0),
        rand32(&[4, 3, 3, 3], 51, 0.5),
        (rand32(&[4], 52, 0.3) + 1.0).unwrap(),
        rand32(&[4], 53, 0.3),
        rand32(&[5, 4, 3, 3], 54, 0.5),
    ]
}

/// With nothing rounded the rebuilt conv input gives the stored input's gradients, in row
/// chunks or whole, and the log names it `from batch_norm, relu`.
#[test]
fn conv_inputs_after_batch_norm_and_relu_rebuild_exactly() {
    let inputs = conv_block_inputs();
    for leaky in [false, true] {
        for chunk in [None, Some(1024)] {
            set_context_chunk_bytes(chunk);
            let f = |t: &mut Tape, v: &[Value]| conv_bn_act_conv(t, v, leaky);
            let what = format!("leaky {leaky}, chunk {chunk:?}");
            let (log_k, log_r) = stored_vs_rebuilt(&inputs, &f, &what);
            set_context_chunk_bytes(None);
            assert!(rebuilt(&log_k).is_empty(), "{what}");
            let act = if leaky { "leaky_relu" } else { "relu" };
            assert_eq!(
                rebuilt(&log_r),
                vec![(
                    "conv2d",
                    format!("from batch_norm, {act}"),
                    vec![6, 4, 8, 8]
                )],
                "{what}"
            );
        }
    }
}

/// The second conv's weight gradient reads its rebuilt input linearly (an affine function of
/// the 2-bit batch-norm input, times an exact mask): unbiased, so the mean of many L3 draws
/// converges to the exact gradient like 1/sqrt(draws).
#[test]
fn conv_weight_gradient_through_a_rebuilt_input_stays_unbiased() {
    let inputs = conv_block_inputs();
    let f = |t: &mut Tape, v: &[Value]| conv_bn_act_conv(t, v, false);
    mean_of_draws_converges(&inputs, &f, 4, 2000, 1, "conv weight");
}
