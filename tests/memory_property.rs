//! The engine's memory property, measured with the counting global allocator:
//! after forward only the saved context is alive; during backward it shrinks node by node;
//! after backward only parameters and their gradients remain.
//!
//! The contexts are stored through a test policy that *copies* them to f16, so a tape that
//! also kept the forward outputs (f32) would show up as extra live bytes — the second half of
//! each test builds exactly that leak on purpose and checks the measurement catches it.

use actrain::memory::current_bytes;
use actrain::ops::conv::Conv2dParams;
use actrain::tape::{
    ContextPolicy, Packed, PackedContext, ParamStore, SaveAs, SaveRequest, Tape, Value,
};
use anyhow::Result;
use candle_core::{DType, Device, Shape, Tensor};
use std::sync::Mutex;

/// The allocator is process-wide: tests in this file must not overlap.
static SERIAL: Mutex<()> = Mutex::new(());

/// Stores every context as an f16 copy (half the bytes, and a distinct allocation).
struct HalfCopy;
struct HalfCtx {
    t: Tensor,
    mask: bool,
}
impl PackedContext for HalfCtx {
    fn unpack(&self, _shape: &Shape, dtype: DType, _device: &Device) -> Result<Tensor> {
        let t = self.t.to_dtype(dtype)?;
        Ok(if self.mask {
            t.gt(0.0)?.to_dtype(dtype)?
        } else {
            t
        })
    }
    fn stored_bytes(&self) -> usize {
        self.t.elem_count() * 2
    }
    fn bits(&self) -> f32 {
        16.0
    }
    fn label(&self) -> String {
        "f16".into()
    }
}
impl ContextPolicy for HalfCopy {
    fn pack(&mut self, req: &SaveRequest) -> Result<Packed> {
        match req.kind {
            SaveAs::Activation | SaveAs::SignMask => Ok(Packed::Compressed(Box::new(HalfCtx {
                t: req.tensor.to_dtype(DType::F16)?,
                mask: req.kind == SaveAs::SignMask,
            }))),
            _ => Ok(Packed::Full(req.tensor.clone())),
        }
    }
}

/// Slack for the tape's own bookkeeping (nodes, closures, hash maps) and allocator noise.
const SLACK: usize = 256 * 1024;

/// Runs matmuls of the given (m, k, n) shapes on every thread of rayon's pool. The CPU matmul
/// keeps a per-thread packing buffer that each thread allocates on its first product and never
/// frees: a pool thread doing its first one during a measured backward showed up as ~1 MiB
/// "alive after backward" (seen under CPU load, when the work lands on other threads than in
/// the warm-up pass).
fn warm_matmul_threads(shapes: &[(usize, usize, usize)]) {
    rayon::broadcast(|_| {
        for &(m, k, n) in shapes {
            let a = Tensor::ones((m, k), DType::F32, &Device::Cpu).expect("warm-up tensor");
            let b = Tensor::ones((k, n), DType::F32, &Device::Cpu).expect("warm-up tensor");
            a.matmul(&b).expect("warm-up matmul");
        }
    });
}

fn mlp_params(
    depth: usize,
    width: usize,
) -> Result<(
    ParamStore,
    Vec<(actrain::tape::ParamId, actrain::tape::ParamId)>,
)> {
    let mut store = ParamStore::new();
    let mut ids = Vec::new();
    for l in 0..depth {
        let w = (Tensor::randn(0f32, 1.0, (width, width), &Device::Cpu)? / (width as f64).sqrt())?;
        let b = Tensor::zeros(width, DType::F32, &Device::Cpu)?;
        ids.push((
            store.add(format!("l{l}.w"), w)?,
            store.add(format!("l{l}.b"), b)?,
        ));
    }
    Ok((store, ids))
}

fn mlp_forward(
    tape: &mut Tape,
    store: &ParamStore,
    ids: &[(actrain::tape::ParamId, actrain::tape::ParamId)],
    x: &Tensor,
    leak: &mut Option<Vec<Value>>,
) -> Result<Value> {
    let mut h = tape.constant(x.clone());
    for &(w, b) in ids {
        let (w, b) = (tape.param(store, w), tape.param(store, b));
        let z = tape.linear(&h, &w, Some(&b))?;
        let a = tape.relu(&z)?;
        if let Some(l) = leak.as_mut() {
            l.push(z.clone());
            l.push(a.clone());
        }
        h = a;
    }
    tape.mean_all(&h)
}

type Forward<'a> = &'a dyn Fn(&mut Tape, &ParamStore, &mut Option<Vec<Value>>) -> Result<Value>;

struct Trace {
    after_forward: usize,
    context: usize,
    during: Vec<(usize, usize)>,
    after_backward: usize,
    grads: usize,
}

/// One forward+backward, measured. `leak` keeps every forward output alive (what a tape that
/// stored outputs would do).
fn measure(store: &mut ParamStore, forward: Forward, leak: bool) -> Result<Trace> {
    let mut tape = Tape::new(Box::new(HalfCopy));
    store.zero_grad();
    let base = current_bytes();
    let mut kept = if leak { Some(Vec::new()) } else { None };
    let loss = forward(&mut tape, store, &mut kept)?;
    let after_forward = current_bytes().saturating_sub(base);
    let context = tape.live_context_bytes();
    let logged: usize = tape.context_log().iter().map(|r| r.stored_bytes).sum();
    assert_eq!(
        context, logged,
        "live context must equal the logged stored bytes"
    );
    let mut during = Vec::new();
    tape.backward_with(&loss, store, |p| {
        during.push((p.live_context_bytes, current_bytes().saturating_sub(base)));
    })?;
    drop(loss);
    drop(kept);
    let after_backward = current_bytes().saturating_sub(base);
    Ok(Trace {
        after_forward,
        context,
        during,
        after_backward,
        grads: store.bytes().2,
    })
}

fn check_property(name: &str, t: &Trace) {
    assert!(t.context > 0, "{name}: nothing was saved");
    assert!(
        t.after_forward >= t.context,
        "{name}: live {} < context {} — the measurement is broken",
        t.after_forward,
        t.context
    );
    assert!(
        t.after_forward <= t.context + SLACK,
        "{name}: after forward {} bytes are alive but the saved context is only {} bytes",
        t.after_forward,
        t.context
    );
    // Context shrinks monotonically during backward and is gone at the end.
    let ctx: Vec<usize> = t.during.iter().map(|d| d.0).collect();
    assert!(
        ctx.windows(2).all(|w| w[1] <= w[0]),
        "{name}: context grew during backward: {ctx:?}"
    );
    let strict_drops = ctx.windows(2).filter(|w| w[1] < w[0]).count();
    assert!(
        strict_drops >= ctx.len() / 3,
        "{name}: context did not shrink node by node: {ctx:?}"
    );
    assert_eq!(
        *ctx.last().unwrap(),
        0,
        "{name}: context left after backward"
    );
    // Live bytes during backward never exceed what remains of the context plus the
    // gradients built so far plus a frontier; at most the starting level plus grads.
    for &(c, live) in &t.during {
        assert!(
            live <= c + t.grads + t.after_forward + SLACK,
            "{name}: {live} live with {c} context left"
        );
    }
    // After backward: parameters' gradients and nothing else.
    assert!(
        t.after_backward.abs_diff(t.grads) <= SLACK,
        "{name}: after backward {} bytes alive, gradients are {} bytes",
        t.after_backward,
        t.grads
    );
}

#[test]
fn deep_mlp_keeps_only_its_context() -> Result<()> {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // Let the previous test thread's exit-time frees land before measuring.
    std::thread::sleep(std::time::Duration::from_millis(100));
    let (mut store, ids) = mlp_params(8, 256)?;
    let x = Tensor::randn(0f32, 1.0, (128, 256), &Device::Cpu)?;
    let fwd = |t: &mut Tape, s: &ParamStore, leak: &mut Option<Vec<Value>>| {
        mlp_forward(t, s, &ids, &x, leak)
    };
    // Warm-up: thread pools and every pool thread's matmul buffer (forward x·wᵀ, backward
    // g·w and xᵀ·g).
    warm_matmul_threads(&[(128, 256, 256), (256, 128, 256)]);
    measure(&mut store, &fwd, false)?;
    let t = measure(&mut store, &fwd, false)?;
    check_property("mlp", &t);
    // 8 layers × (linear input + relu input) × 128×256 f16 = 1 MiB of context.
    assert_eq!(t.context, 8 * 2 * 128 * 256 * 2);

    let leaky = measure(&mut store, &fwd, true)?;
    assert!(
        leaky.after_forward > leaky.context + SLACK,
        "keeping forward outputs must be visible: {} vs context {}",
        leaky.after_forward,
        leaky.context
    );
    Ok(())
}

fn cnn_forward(
    tape: &mut Tape,
    store: &ParamStore,
    x: &Tensor,
    leak: &mut Option<Vec<Value>>,
) -> Result<Value> {
    let p = |t: &mut Tape, n: &str| t.param(store, store.id(n).expect("param"));
    let mut keep = |v: &Value| {
        if let Some(l) = leak.as_mut() {
            l.push(v.clone());
        }
    };
    let x = tape.constant(x.clone());
    let (w1, b1) = (p(tape, "c1.w"), p(tape, "c1.b"));
    let pad1 = Conv2dParams {
        padding: 1,
        ..Default::default()
    };
    let h = tape.conv2d(&x, &w1, Some(&b1), pad1)?;
    keep(&h);
    let h = tape.relu(&h)?;
    keep(&h);
    let h = tape.max_pool2d(&h, 2, 2, 0)?;
    keep(&h);
    let (w2, b2) = (p(tape, "c2.w"), p(tape, "c2.b"));
    let h = tape.conv2d(&h, &w2, Some(&b2), pad1)?;
    keep(&h);
    let h = tape.relu(&h)?;
    keep(&h);
    let h = tape.global_avg_pool(&h)?;
    keep(&h);
    let (w3, b3) = (p(tape, "fc.w"), p(tape, "fc.b"));
    let out = tape.linear(&h, &w3, Some(&b3))?;
    tape.mean_all(&out)
}

#[test]
fn small_cnn_keeps_only_its_context() -> Result<()> {
    let _g = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // Let the previous test thread's exit-time frees land before measuring.
    std::thread::sleep(std::time::Duration::from_millis(100));
    let dev = Device::Cpu;
    let mut store = ParamStore::new();
    store.add(
        "c1.w",
        (Tensor::randn(0f32, 1.0, (16, 3, 3, 3), &dev)? * 0.2)?,
    )?;
    store.add("c1.b", Tensor::zeros(16, DType::F32, &dev)?)?;
    store.add(
        "c2.w",
        (Tensor::randn(0f32, 1.0, (32, 16, 3, 3), &dev)? * 0.1)?,
    )?;
    store.add("c2.b", Tensor::zeros(32, DType::F32, &dev)?)?;
    store.add("fc.w", (Tensor::randn(0f32, 1.0, (10, 32), &dev)? * 0.1)?)?;
    store.add("fc.b", Tensor::zeros(10, DType::F32, &dev)?)?;
    let x = Tensor::randn(0f32, 1.0, (16, 3, 32, 32), &dev)?;
    let fwd =
        |t: &mut Tape, s: &ParamStore, leak: &mut Option<Vec<Value>>| cnn_forward(t, s, &x, leak);
    measure(&mut store, &fwd, false)?;
    let t = measure(&mut store, &fwd, false)?;
    check_property("cnn", &t);
    let leaky = measure(&mut store, &fwd, true)?;
    assert!(
        leaky.after_forward > leaky.context + SLACK,
        "keeping forward outputs must be visible: {} vs context {}",
        leaky.after_forward,
        leaky.context
    );
    Ok(())
}
