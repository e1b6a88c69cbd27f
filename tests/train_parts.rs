//! Optimizers, gradient utilities, learning-rate schedules and checkpoints. Expected optimizer
//! trajectories are computed independently here with plain f64 arithmetic (PyTorch's
//! formulas) and compared with the tensor implementation.

use actrain::tape::{ParamId, ParamStore};
use actrain::train::checkpoint::{self, CheckpointMeta};
use actrain::train::optim::{clip_grad_norm, grads_finite, Optimizer, OptimizerConfig};
use actrain::train::schedule::{Schedule, ScheduleKind};
use anyhow::Result;
use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::PathBuf;

fn t(v: &[f32]) -> Tensor {
    Tensor::new(v, &Device::Cpu).expect("tensor")
}

fn vals(x: &Tensor) -> Vec<f32> {
    x.flatten_all()
        .and_then(|x| x.to_vec1::<f32>())
        .expect("values")
}

fn assert_close(got: &[f32], want: &[f64], tol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let err = (*g as f64 - w).abs() / w.abs().max(1.0);
        assert!(
            err <= tol,
            "{what}[{i}]: got {g}, want {w} (rel err {err:.2e})"
        );
    }
}

fn sgd(momentum: f64, nesterov: bool, weight_decay: f64) -> OptimizerConfig {
    OptimizerConfig::Sgd {
        momentum,
        nesterov,
        weight_decay,
    }
}

fn adamw(weight_decay: f64) -> OptimizerConfig {
    OptimizerConfig::AdamW {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay,
    }
}

fn set_grad(ps: &mut ParamStore, id: ParamId, g: Tensor) {
    ps.take_grad(id);
    ps.accumulate_grad(id, g).expect("grad");
}

// ---------------------------------------------------------------- reference optimizers

/// PyTorch SGD (dampening 0) on f64 vectors.
struct RefSgd {
    mu: f64,
    nesterov: bool,
    wd: f64,
    buf: Option<Vec<f64>>,
}

impl RefSgd {
    fn step(&mut self, p: &mut [f64], g: &[f64], lr: f64) {
        let d: Vec<f64> = p.iter().zip(g).map(|(p, g)| g + self.wd * p).collect();
        let dir = if self.mu != 0.0 {
            let buf = match self.buf.take() {
                None => d.clone(),
                Some(b) => b.iter().zip(&d).map(|(b, d)| self.mu * b + d).collect(),
            };
            let dir = if self.nesterov {
                d.iter().zip(&buf).map(|(d, b)| d + self.mu * b).collect()
            } else {
                buf.clone()
            };
            self.buf = Some(buf);
            dir
        } else {
            d
        };
        for (p, d) in p.iter_mut().zip(dir) {
            *p -= lr * d;
        }
    }
}

/// PyTorch AdamW on f64 vectors.
struct RefAdamW {
    b1: f64,
    b2: f64,
    eps: f64,
    wd: f64,
    m: Vec<f64>,
    v: Vec<f64>,
    t: i32,
}

impl RefAdamW {
    fn step(&mut self, p: &mut [f64], g: &[f64], lr: f64) {
        self.t += 1;
        let bc1 = 1.0 - self.b1.powi(self.t);
        let bc2 = 1.0 - self.b2.powi(self.t);
        for i in 0..p.len() {
            p[i] *= 1.0 - lr * self.wd;
            self.m[i] = self.b1 * self.m[i] + (1.0 - self.b1) * g[i];
            self.v[i] = self.b2 * self.v[i] + (1.0 - self.b2) * g[i] * g[i];
            let denom = (self.v[i] / bc2).sqrt() + self.eps;
            p[i] -= lr * (self.m[i] / bc1) / denom;
        }
    }
}

/// Gradient used by the trajectory tests: `g = p ⊙ a + c_t`, a function of the current value
/// so errors in the update compound visibly.
fn grad_of(p: &[f64], step: usize) -> Vec<f64> {
    let a = [0.5, -1.5, 2.0, 0.25];
    p.iter()
        .enumerate()
        .map(|(i, p)| p * a[i] + 0.1 * (step as f64 + 1.0) - 0.3 * i as f64)
        .collect()
}

fn run_tensor(cfg: OptimizerConfig, p0: &[f64], lrs: &[f64]) -> Result<Vec<Vec<f32>>> {
    let mut ps = ParamStore::new();
    let p0f: Vec<f32> = p0.iter().map(|&x| x as f32).collect();
    let id = ps.add("w", t(&p0f))?;
    let mut opt = Optimizer::new(cfg);
    let mut traj = Vec::new();
    for (s, &lr) in lrs.iter().enumerate() {
        let cur: Vec<f64> = vals(ps.value(id)).iter().map(|&x| x as f64).collect();
        let g: Vec<f32> = grad_of(&cur, s).iter().map(|&x| x as f32).collect();
        set_grad(&mut ps, id, t(&g));
        opt.step(&mut ps, lr)?;
        traj.push(vals(ps.value(id)));
    }
    assert_eq!(opt.steps(), lrs.len() as u64);
    Ok(traj)
}

// ---------------------------------------------------------------- SGD

#[test]
fn sgd_matches_hand_computed_values() -> Result<()> {
    // p = 1, g = 1 always, lr = 0.1, momentum 0.9: b = 1, 1.9, 2.71 → p = 0.9, 0.71, 0.439.
    let mut ps = ParamStore::new();
    let id = ps.add("w", t(&[1.0]))?;
    let mut opt = Optimizer::new(sgd(0.9, false, 0.0));
    for want in [0.9, 0.71, 0.439] {
        set_grad(&mut ps, id, t(&[1.0]));
        opt.step(&mut ps, 0.1)?;
        assert_close(&vals(ps.value(id)), &[want], 1e-6, "momentum");
    }
    // Nesterov: d = g + μb → 1.9, 2.71 → p = 0.81, 0.539.
    let mut ps = ParamStore::new();
    let id = ps.add("w", t(&[1.0]))?;
    let mut opt = Optimizer::new(sgd(0.9, true, 0.0));
    for want in [0.81, 0.539] {
        set_grad(&mut ps, id, t(&[1.0]));
        opt.step(&mut ps, 0.1)?;
        assert_close(&vals(ps.value(id)), &[want], 1e-6, "nesterov");
    }
    // Weight decay without momentum: p = 2, g = 0.5, wd = 0.1, lr = 0.5 → 2 - 0.5·0.7 = 1.65.
    let mut ps = ParamStore::new();
    let id = ps.add("w", t(&[2.0]))?;
    let mut opt = Optimizer::new(sgd(0.0, false, 0.1));
    set_grad(&mut ps, id, t(&[0.5]));
    opt.step(&mut ps, 0.5)?;
    assert_close(&vals(ps.value(id)), &[1.65], 1e-6, "weight decay");
    assert_eq!(opt.state_bytes(), 0, "plain SGD keeps no state");
    Ok(())
}

#[test]
fn sgd_trajectories_match_reference() -> Result<()> {
    let p0 = [0.3, -0.7, 1.2, 0.05];
    let lrs = [0.1, 0.05, 0.08, 0.02, 0.1];
    for (mu, nesterov, wd) in [
        (0.0, false, 0.0),
        (0.9, false, 0.0),
        (0.9, true, 0.0),
        (0.0, false, 0.01),
        (0.8, false, 0.05),
        (0.9, true, 0.05),
    ] {
        let got = run_tensor(sgd(mu, nesterov, wd), &p0, &lrs)?;
        let mut r = RefSgd {
            mu,
            nesterov,
            wd,
            buf: None,
        };
        let mut p = p0.to_vec();
        for (s, &lr) in lrs.iter().enumerate() {
            let g = grad_of(&p, s);
            r.step(&mut p, &g, lr);
            let what = format!("SGD mu={mu} nesterov={nesterov} wd={wd} step {s}");
            assert_close(&got[s], &p, 1e-5, &what);
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- AdamW

#[test]
fn adamw_matches_hand_computed_first_step() -> Result<()> {
    // First step: m̂ = g, v̂ = g², so p = p·(1 - lr·wd) - lr·g/(|g| + eps).
    // p = 1, g = 0.5, lr = 0.1, wd = 0.01 → 0.999 - 0.1·0.5/(0.5 + 1e-8) = 0.899 (+2e-9).
    let mut ps = ParamStore::new();
    let id = ps.add("w", t(&[1.0, -1.0]))?;
    let mut opt = Optimizer::new(adamw(0.01));
    set_grad(&mut ps, id, t(&[0.5, -2.0]));
    opt.step(&mut ps, 0.1)?;
    assert_close(
        &vals(ps.value(id)),
        &[
            0.999 - 0.1 * 0.5 / (0.5 + 1e-8),
            -0.999 + 0.1 * 2.0 / (2.0 + 1e-8),
        ],
        1e-6,
        "AdamW step 1",
    );
    Ok(())
}

#[test]
fn adamw_trajectories_match_reference() -> Result<()> {
    let p0 = [0.3, -0.7, 1.2, 0.05];
    let lrs = [0.01, 0.02, 0.02, 0.015, 0.01, 0.005];
    for wd in [0.0, 0.1] {
        let got = run_tensor(adamw(wd), &p0, &lrs)?;
        let mut r = RefAdamW {
            b1: 0.9,
            b2: 0.999,
            eps: 1e-8,
            wd,
            m: vec![0.0; 4],
            v: vec![0.0; 4],
            t: 0,
        };
        let mut p = p0.to_vec();
        for (s, &lr) in lrs.iter().enumerate() {
            let g = grad_of(&p, s);
            r.step(&mut p, &g, lr);
            assert_close(&got[s], &p, 1e-5, &format!("AdamW wd={wd} step {s}"));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------- shared behaviour

/// f(p) = ½ Σ a_i (p_i - c_i)², gradient a ⊙ (p - c), computed with tensor ops.
fn bowl(cfg: OptimizerConfig, lr: f64, steps: usize) -> Result<f64> {
    let a = t(&[1.0, 4.0, 0.5, 2.0]);
    let c = t(&[1.0, -2.0, 3.0, 0.5]);
    let mut ps = ParamStore::new();
    let id = ps.add("p", t(&[0.0; 4]))?;
    let mut opt = Optimizer::new(cfg);
    for _ in 0..steps {
        let g = ((ps.value(id) - &c)? * &a)?;
        set_grad(&mut ps, id, g);
        opt.step(&mut ps, lr)?;
    }
    let dist = (ps.value(id) - &c)?.sqr()?.sum_all()?.sqrt()?;
    Ok(dist.to_scalar::<f32>()? as f64)
}

#[test]
fn quadratic_bowl_converges() -> Result<()> {
    for (name, cfg, lr, steps) in [
        ("sgd", sgd(0.0, false, 0.0), 0.2, 300),
        ("sgd momentum", sgd(0.9, false, 0.0), 0.05, 300),
        ("sgd nesterov", sgd(0.9, true, 0.0), 0.05, 300),
        ("adamw", adamw(0.0), 0.05, 1500),
    ] {
        let d = bowl(cfg, lr, steps)?;
        assert!(d < 1e-3, "{name}: distance to the minimum {d}");
    }
    Ok(())
}

#[test]
fn buffers_and_params_without_grad_are_untouched() -> Result<()> {
    for cfg in [sgd(0.9, true, 0.1), adamw(0.1)] {
        let mut ps = ParamStore::new();
        let w = ps.add("w", t(&[1.0, 2.0]))?;
        let frozen = ps.add("no_grad", t(&[3.0, 4.0]))?;
        let buf = ps.add_buffer("running_mean", t(&[5.0, 6.0]))?;
        set_grad(&mut ps, w, t(&[0.1, 0.2]));
        // A stray gradient on a buffer must still not move it.
        set_grad(&mut ps, buf, t(&[1.0, 1.0]));
        let mut opt = Optimizer::new(cfg.clone());
        opt.step(&mut ps, 0.1)?;
        assert_ne!(vals(ps.value(w)), vec![1.0, 2.0], "{cfg:?}: w moves");
        assert_eq!(vals(ps.value(frozen)), vec![3.0, 4.0], "{cfg:?}");
        assert_eq!(vals(ps.value(buf)), vec![5.0, 6.0], "{cfg:?}");
        assert!(ps.grad(w).is_some(), "step does not clear grads");
        let names: Vec<String> = opt.state_tensors(&ps).into_iter().map(|(n, _)| n).collect();
        assert!(names.iter().all(|n| n.ends_with(".w")), "{names:?}");
    }
    Ok(())
}

#[test]
fn state_bytes_and_names() -> Result<()> {
    let mut ps = ParamStore::new();
    let a = ps.add(
        "layer.weight",
        Tensor::zeros((2, 3), candle_core::DType::F32, &Device::Cpu)?,
    )?;
    let b = ps.add("layer.bias", t(&[0.0; 4]))?;
    for (cfg, per_param, names) in [
        (sgd(0.0, false, 0.0), 0, vec![]),
        (
            sgd(0.9, false, 0.0),
            1,
            vec!["sgd.momentum.layer.weight", "sgd.momentum.layer.bias"],
        ),
        (
            adamw(0.0),
            2,
            vec![
                "adamw.m.layer.weight",
                "adamw.v.layer.weight",
                "adamw.m.layer.bias",
                "adamw.v.layer.bias",
            ],
        ),
    ] {
        let mut opt = Optimizer::new(cfg.clone());
        assert_eq!(opt.state_bytes(), 0);
        set_grad(
            &mut ps,
            a,
            Tensor::ones((2, 3), candle_core::DType::F32, &Device::Cpu)?,
        );
        set_grad(&mut ps, b, t(&[1.0; 4]));
        opt.step(&mut ps, 0.01)?;
        assert_eq!(opt.state_bytes(), per_param * (6 + 4) * 4, "{cfg:?}");
        let got: Vec<String> = opt.state_tensors(&ps).into_iter().map(|(n, _)| n).collect();
        assert_eq!(got, names, "{cfg:?}");
    }
    Ok(())
}

#[test]
fn load_state_resumes_exactly_and_rejects_bad_entries() -> Result<()> {
    let mut ps = ParamStore::new();
    let w = ps.add("w", t(&[0.5, -0.5, 1.0]))?;
    let mut opt = Optimizer::new(adamw(0.01));
    for s in 0..3 {
        set_grad(&mut ps, w, t(&[0.1 * s as f32, -0.2, 0.3]));
        opt.step(&mut ps, 0.01)?;
    }
    let saved: HashMap<String, Tensor> = opt.state_tensors(&ps).into_iter().collect();
    let mut resumed = Optimizer::new(adamw(0.01));
    resumed.load_state(&ps, &saved, opt.steps())?;
    assert_eq!(resumed.steps(), 3);
    assert_eq!(resumed.state_bytes(), opt.state_bytes());

    let mut ps2 = ParamStore::new();
    let w2 = ps2.add("w", ps.value(w).clone())?;
    set_grad(&mut ps, w, t(&[0.3, 0.3, -0.1]));
    set_grad(&mut ps2, w2, t(&[0.3, 0.3, -0.1]));
    opt.step(&mut ps, 0.01)?;
    resumed.step(&mut ps2, 0.01)?;
    assert_eq!(vals(ps.value(w)), vals(ps2.value(w2)), "bit-exact resume");

    let err = |m: HashMap<String, Tensor>, steps: u64| -> String {
        let mut o = Optimizer::new(adamw(0.01));
        match o.load_state(&ps, &m, steps) {
            Ok(()) => panic!("load_state accepted bad state"),
            Err(e) => {
                assert_eq!(o.steps(), 0, "failed load leaves the optimizer unchanged");
                format!("{e:#}")
            }
        }
    };
    let mut missing = saved.clone();
    missing.remove("adamw.v.w");
    let e = err(missing, 3);
    assert!(e.contains("adamw.v.w") && e.contains("missing"), "{e}");

    let mut bad_shape = saved.clone();
    bad_shape.insert("adamw.m.w".into(), t(&[0.0, 0.0]));
    let e = err(bad_shape, 3);
    assert!(e.contains("adamw.m.w") && e.contains("shape"), "{e}");

    let mut unknown = saved.clone();
    unknown.insert("adamw.m.ghost".into(), t(&[0.0]));
    let e = err(unknown, 3);
    assert!(e.contains("ghost"), "{e}");

    let sgd_state: HashMap<String, Tensor> = [("sgd.momentum.w".to_string(), t(&[0.0; 3]))]
        .into_iter()
        .collect();
    let e = err(sgd_state, 3);
    assert!(e.contains("sgd.momentum.w") && e.contains("AdamW"), "{e}");

    let e = err(HashMap::new(), 3);
    assert!(e.contains("adamw.m.w"), "{e}");
    Ok(())
}

#[test]
fn step_rejects_mismatched_grad_without_touching_anything() -> Result<()> {
    let mut ps = ParamStore::new();
    let a = ps.add("a", t(&[1.0, 2.0]))?;
    let b = ps.add("b", t(&[3.0, 4.0]))?;
    set_grad(&mut ps, a, t(&[1.0, 1.0]));
    set_grad(&mut ps, b, t(&[1.0, 1.0, 1.0]));
    let mut opt = Optimizer::new(sgd(0.9, false, 0.0));
    let e = format!("{:#}", opt.step(&mut ps, 0.1).expect_err("shape error"));
    assert!(e.contains("`b`"), "{e}");
    assert_eq!(vals(ps.value(a)), vec![1.0, 2.0]);
    assert_eq!(opt.steps(), 0);
    assert_eq!(opt.state_bytes(), 0);

    let mut bad = Optimizer::new(sgd(0.0, true, 0.0));
    assert!(bad.step(&mut ps, 0.1).is_err(), "nesterov without momentum");
    assert!(opt.step(&mut ps, f64::NAN).is_err(), "NaN learning rate");
    Ok(())
}

#[test]
fn clip_grad_norm_scales_to_max_and_returns_pre_clip_norm() -> Result<()> {
    let mut ps = ParamStore::new();
    let a = ps.add("a", t(&[0.0, 0.0]))?;
    let b = ps.add("b", t(&[0.0]))?;
    ps.add("no_grad", t(&[0.0]))?;
    set_grad(&mut ps, a, t(&[3.0, 4.0]));
    set_grad(&mut ps, b, t(&[12.0]));
    // Norm sqrt(9 + 16 + 144) = 13.
    let n = clip_grad_norm(&mut ps, 6.5)?;
    assert!((n - 13.0).abs() < 1e-9, "{n}");
    let k = 6.5 / (13.0 + 1e-6);
    let ga = vals(ps.grad(a).expect("grad a"));
    let gb = vals(ps.grad(b).expect("grad b"));
    assert_close(&ga, &[3.0 * k, 4.0 * k], 1e-6, "a");
    assert_close(&gb, &[12.0 * k], 1e-6, "b");
    let after = ((ga[0] * ga[0] + ga[1] * ga[1] + gb[0] * gb[0]) as f64).sqrt();
    assert!((after - 6.5).abs() < 1e-5, "clipped norm {after}");

    // Below the maximum: reported, left alone.
    let n2 = clip_grad_norm(&mut ps, 100.0)?;
    assert!((n2 - 6.5).abs() < 1e-5, "{n2}");
    assert_eq!(vals(ps.grad(b).expect("grad b")), gb);

    assert!(clip_grad_norm(&mut ps, 0.0).is_err());
    assert_eq!(clip_grad_norm(&mut ParamStore::new(), 1.0)?, 0.0);
    Ok(())
}

#[test]
fn grads_finite_names_the_bad_parameter() -> Result<()> {
    let mut ps = ParamStore::new();
    let a = ps.add("enc.weight", t(&[1.0, 2.0]))?;
    let b = ps.add("dec.weight", t(&[1.0, 2.0]))?;
    let c = ps.add("head.bias", t(&[1.0]))?;
    assert_eq!(grads_finite(&ps)?, None, "no grads at all");
    set_grad(&mut ps, a, t(&[1e30, -1e30]));
    set_grad(&mut ps, b, t(&[0.5, 0.25]));
    set_grad(&mut ps, c, t(&[1.0]));
    assert_eq!(grads_finite(&ps)?, None, "large but finite");
    set_grad(&mut ps, b, t(&[0.5, f32::NAN]));
    set_grad(&mut ps, c, t(&[f32::INFINITY]));
    assert_eq!(grads_finite(&ps)?.as_deref(), Some("dec.weight"));
    set_grad(&mut ps, b, t(&[0.5, 0.5]));
    assert_eq!(grads_finite(&ps)?.as_deref(), Some("head.bias"));
    set_grad(&mut ps, c, t(&[f32::NEG_INFINITY]));
    assert_eq!(grads_finite(&ps)?.as_deref(), Some("head.bias"));
    Ok(())
}

// ---------------------------------------------------------------- schedules

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-12 * b.abs().max(1.0)
}

#[test]
fn schedule_warmup_then_constant() {
    let s = Schedule {
        kind: ScheduleKind::Constant,
        base_lr: 0.1,
        warmup_steps: 4,
        total_steps: 100,
    };
    let got: Vec<f64> = (0..6).map(|i| s.lr(i)).collect();
    for (g, w) in got.iter().zip([0.025, 0.05, 0.075, 0.1, 0.1, 0.1]) {
        assert!(close(*g, w), "{got:?}");
    }
    assert!(close(s.lr(1_000), 0.1));
    let no_warmup = Schedule {
        warmup_steps: 0,
        ..s
    };
    assert!(close(no_warmup.lr(0), 0.1));
}

#[test]
fn schedule_step_decay_counts_from_end_of_warmup() {
    let s = Schedule {
        kind: ScheduleKind::Step {
            every: 10,
            gamma: 0.1,
        },
        base_lr: 1.0,
        warmup_steps: 5,
        total_steps: 100,
    };
    for (step, want) in [
        (0, 0.2),
        (4, 1.0),
        (5, 1.0),
        (14, 1.0),
        (15, 0.1),
        (24, 0.1),
        (25, 0.01),
    ] {
        assert!(
            close(s.lr(step), want),
            "step {step}: {} vs {want}",
            s.lr(step)
        );
    }
}

#[test]
fn schedule_cosine_reaches_min_at_the_end() {
    let s = Schedule {
        kind: ScheduleKind::Cosine { min_lr: 0.01 },
        base_lr: 0.1,
        warmup_steps: 10,
        total_steps: 110,
    };
    assert!(close(s.lr(9), 0.1));
    assert!(close(s.lr(10), 0.1));
    assert!(close(s.lr(60), 0.055), "midpoint {}", s.lr(60));
    assert!(close(s.lr(110), 0.01));
    assert!(close(s.lr(500), 0.01), "past the end stays at min");
    let after: Vec<f64> = (10..=110).map(|i| s.lr(i)).collect();
    assert!(after.windows(2).all(|w| w[1] <= w[0]), "non-increasing");
    // Degenerate: everything is warmup.
    let all_warmup = Schedule {
        total_steps: 10,
        ..s.clone()
    };
    assert!(all_warmup.lr(10).is_finite());
}

#[test]
fn schedule_kind_parses_cli_forms() {
    let ok = [
        ("constant", ScheduleKind::Constant),
        ("  Constant ", ScheduleKind::Constant),
        (
            "step:1000:0.1",
            ScheduleKind::Step {
                every: 1000,
                gamma: 0.1,
            },
        ),
        ("cosine", ScheduleKind::Cosine { min_lr: 0.0 }),
        ("cosine:1e-5", ScheduleKind::Cosine { min_lr: 1e-5 }),
    ];
    for (s, want) in ok {
        let got: ScheduleKind = s.parse().unwrap_or_else(|e| panic!("{s}: {e}"));
        assert_eq!(got, want, "{s}");
        let again: ScheduleKind = got.to_string().parse().expect("display round-trips");
        assert_eq!(again, want);
    }
    for bad in [
        "",
        "linear",
        "step",
        "step:10",
        "step:0:0.1",
        "step:ten:0.1",
        "step:10:x",
        "step:10:-1",
        "cosine:abc",
        "cosine:-1",
        "cosine:1:2",
        "constant:1",
    ] {
        let e = bad.parse::<ScheduleKind>().expect_err(bad).to_string();
        assert!(e.contains(&format!("`{bad}`")), "names the input: {e}");
        assert!(
            e.contains("step:EVERY:GAMMA") && e.contains("cosine:MIN_LR"),
            "{e}"
        );
    }
}

// ---------------------------------------------------------------- checkpoints

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let p =
            std::env::temp_dir().join(format!("actrain-test-{tag}-{}-{nanos}", std::process::id()));
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Two parameters and a buffer, values offset by `shift`.
fn model(shift: f32) -> Result<ParamStore> {
    let mut ps = ParamStore::new();
    ps.add(
        "conv.weight",
        (Tensor::arange(0f32, 6f32, &Device::Cpu)?.reshape((2, 3))? + shift as f64)?,
    )?;
    ps.add("conv.bias", t(&[0.5 + shift, -0.5]))?;
    ps.add_buffer("bn.running_mean", t(&[0.1, 0.2, 0.3 + shift]))?;
    Ok(ps)
}

fn train_steps(ps: &mut ParamStore, opt: &mut Optimizer, n: usize) -> Result<()> {
    for s in 0..n {
        let ids: Vec<ParamId> = ps.ids().collect();
        for id in ids {
            if ps.get(id).trainable {
                let g = (ps.value(id).affine(0.3, 0.1 * s as f64))?;
                set_grad(ps, id, g);
            }
        }
        opt.step(ps, 0.01)?;
    }
    Ok(())
}

fn meta(step: u64) -> CheckpointMeta {
    CheckpointMeta {
        step,
        epoch: 2,
        batch_in_epoch: 7,
        optimizer_steps: 0,
        best_metric: Some(0.875),
        extra: serde_json::json!({ "model": "cnn", "lr": 0.01 }),
    }
}

#[test]
fn checkpoint_round_trip_resumes_exactly() -> Result<()> {
    let dir = TempDir::new("roundtrip");
    let mut ps = model(0.0)?;
    let mut opt = Optimizer::new(adamw(0.01));
    train_steps(&mut ps, &mut opt, 3)?;
    checkpoint::save(&dir.0, &ps, &opt, &meta(42))?;
    for f in ["weights.safetensors", "optimizer.safetensors", "state.json"] {
        assert!(dir.0.join(f).is_file(), "{f} written");
        assert!(
            !dir.0.join(format!("{f}.tmp")).exists(),
            "{f}.tmp renamed away"
        );
    }

    let mut ps2 = model(10.0)?;
    let mut opt2 = Optimizer::new(adamw(0.01));
    let m = checkpoint::load(&dir.0, &mut ps2, &mut opt2)?;
    let want = CheckpointMeta {
        optimizer_steps: 3,
        ..meta(42)
    };
    assert_eq!(m, want);
    for ((_, a), (_, b)) in ps.iter().zip(ps2.iter()) {
        assert_eq!(a.name, b.name);
        assert_eq!(vals(&a.value), vals(&b.value), "{}", a.name);
    }
    assert_eq!(opt2.steps(), 3);
    let s1 = opt.state_tensors(&ps);
    let s2 = opt2.state_tensors(&ps2);
    assert_eq!(s1.len(), 4);
    for ((n1, t1), (n2, t2)) in s1.iter().zip(&s2) {
        assert_eq!(n1, n2);
        assert_eq!(vals(t1), vals(t2), "{n1}");
    }

    // Continuing both gives identical parameters.
    train_steps(&mut ps, &mut opt, 2)?;
    train_steps(&mut ps2, &mut opt2, 2)?;
    for ((_, a), (_, b)) in ps.iter().zip(ps2.iter()) {
        assert_eq!(vals(&a.value), vals(&b.value), "{} after resume", a.name);
    }

    // Overwriting in place works; a stateless optimizer writes an empty optimizer file.
    let plain = Optimizer::new(sgd(0.0, false, 0.0));
    checkpoint::save(&dir.0, &ps, &plain, &meta(43))?;
    let mut plain2 = Optimizer::new(sgd(0.0, false, 0.0));
    let m = checkpoint::load(&dir.0, &mut ps2, &mut plain2)?;
    assert_eq!(m.step, 43);
    assert_eq!(m.optimizer_steps, 0);
    Ok(())
}

#[test]
fn checkpoint_errors_name_the_parameter_and_file() -> Result<()> {
    let dir = TempDir::new("mismatch");
    // Saved model lacks `conv.bias`.
    let mut small = ParamStore::new();
    small.add(
        "conv.weight",
        Tensor::zeros((2, 3), candle_core::DType::F32, &Device::Cpu)?,
    )?;
    small.add_buffer("bn.running_mean", t(&[0.0; 3]))?;
    checkpoint::save(
        &dir.0,
        &small,
        &Optimizer::new(sgd(0.9, false, 0.0)),
        &meta(1),
    )?;
    let mut ps = model(0.0)?;
    let before: Vec<Vec<f32>> = ps.iter().map(|(_, p)| vals(&p.value)).collect();
    let mut opt = Optimizer::new(sgd(0.9, false, 0.0));
    let e = format!(
        "{:#}",
        checkpoint::load(&dir.0, &mut ps, &mut opt).expect_err("missing")
    );
    assert!(
        e.contains("conv.bias") && e.contains("weights.safetensors"),
        "{e}"
    );
    let after: Vec<Vec<f32>> = ps.iter().map(|(_, p)| vals(&p.value)).collect();
    assert_eq!(before, after, "a failed load changes nothing");

    // Wrong shape.
    let mut wrong = ParamStore::new();
    wrong.add(
        "conv.weight",
        Tensor::zeros((3, 2), candle_core::DType::F32, &Device::Cpu)?,
    )?;
    wrong.add("conv.bias", t(&[0.0; 2]))?;
    wrong.add_buffer("bn.running_mean", t(&[0.0; 3]))?;
    checkpoint::save(
        &dir.0,
        &wrong,
        &Optimizer::new(sgd(0.9, false, 0.0)),
        &meta(1),
    )?;
    let e = format!(
        "{:#}",
        checkpoint::load(&dir.0, &mut ps, &mut opt).expect_err("shape")
    );
    assert!(
        e.contains("conv.weight") && e.contains("[3, 2]") && e.contains("[2, 3]"),
        "{e}"
    );

    // Extra entry.
    let mut extra = model(0.0)?;
    extra.add("head.weight", t(&[1.0]))?;
    checkpoint::save(
        &dir.0,
        &extra,
        &Optimizer::new(sgd(0.9, false, 0.0)),
        &meta(1),
    )?;
    let e = format!(
        "{:#}",
        checkpoint::load(&dir.0, &mut ps, &mut opt).expect_err("extra")
    );
    assert!(e.contains("head.weight"), "{e}");

    // Missing directory / file.
    let gone = dir.0.join("nope");
    let e = format!(
        "{:#}",
        checkpoint::load(&gone, &mut ps, &mut opt).expect_err("no dir")
    );
    assert!(e.contains("nope") && e.contains("state.json"), "{e}");
    checkpoint::save(&dir.0, &ps, &opt, &meta(1))?;
    std::fs::remove_file(dir.0.join("optimizer.safetensors"))?;
    let e = format!(
        "{:#}",
        checkpoint::load(&dir.0, &mut ps, &mut opt).expect_err("no file")
    );
    assert!(e.contains("optimizer.safetensors"), "{e}");
    Ok(())
}

#[test]
fn checkpoint_survives_leftover_tmp_and_detects_mixed_saves() -> Result<()> {
    let dir = TempDir::new("crash");
    let other = TempDir::new("crash-other");
    let mut ps = model(0.0)?;
    let mut opt = Optimizer::new(sgd(0.9, true, 1e-4));
    train_steps(&mut ps, &mut opt, 2)?;
    checkpoint::save(&dir.0, &ps, &opt, &meta(5))?;
    // A crash during the next save left half-written temp files behind.
    std::fs::write(
        dir.0.join("weights.safetensors.tmp"),
        b"half-written garbage",
    )?;
    std::fs::write(dir.0.join("state.json.tmp"), b"{\"step\": 99")?;
    let mut ps2 = model(1.0)?;
    let mut opt2 = Optimizer::new(sgd(0.9, true, 1e-4));
    let m = checkpoint::load(&dir.0, &mut ps2, &mut opt2)?;
    assert_eq!(m.step, 5);
    assert_eq!(opt2.steps(), 2);
    for ((_, a), (_, b)) in ps.iter().zip(ps2.iter()) {
        assert_eq!(vals(&a.value), vals(&b.value), "{}", a.name);
    }
    // The next save overwrites the leftovers.
    checkpoint::save(&dir.0, &ps, &opt, &meta(6))?;
    assert!(!dir.0.join("weights.safetensors.tmp").exists());

    // A crash between renames while overwriting: new weights beside the old state.json.
    train_steps(&mut ps, &mut opt, 1)?;
    checkpoint::save(&other.0, &ps, &opt, &meta(7))?;
    std::fs::copy(
        other.0.join("weights.safetensors"),
        dir.0.join("weights.safetensors"),
    )?;
    let e = format!(
        "{:#}",
        checkpoint::load(&dir.0, &mut ps2, &mut opt2).expect_err("mixed save")
    );
    assert!(
        e.contains("weights.safetensors") && e.contains("state.json"),
        "{e}"
    );
    Ok(())
}
