//! The gradient-variance bit allocator: the solver is exactly optimal (against brute force),
//! respects the budget and is monotone in sensitivity; the estimators rank a tensor whose
//! noise matters more above one that matters less; `VariancePlan` serves its planned bits.

use actrain::allocate::sensitivity::{ProbePolicy, PROBE_LABEL};
use actrain::allocate::solver::{average_bits, objective};
use actrain::allocate::{
    allocate, allocate_greedy, estimate_per_slot, estimate_randomized, estimate_slots, flat_grad,
    solve, variance_factor, Estimator, NumericalConfig, ParamGrads, SlotProbe, TensorCost,
    VariancePlan,
};
use actrain::compress::policy::{CompressConfig, CompressPolicy, Level, LADDER};
use actrain::model::{load_def, InputSpec, Model};
use actrain::ops::loss::CrossEntropyOptions;
use actrain::tape::{ParamStore, Tape};
use candle_core::{DType, Device, Tensor};

/// A small deterministic generator (the tests must not depend on a crate's RNG).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let mut z = self.0;
        z = (z ^ (z >> 33)).wrapping_mul(0xff51afd7ed558ccd);
        z ^ (z >> 33)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn normal(&mut self) -> f32 {
        let u1 = self.unit().max(1e-12);
        let u2 = self.unit();
        ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
    }
}

fn random_instance(rng: &mut Lcg, n: usize) -> Vec<TensorCost> {
    let sizes = rng.below(3);
    (0..n)
        .map(|_| TensorCost {
            elements: match sizes {
                0 => 64,                            // equal sizes
                1 => 1 + rng.below(100) as usize,   // similar sizes
                _ => 1 << (rng.below(20) as usize), // wildly different sizes
            },
            sensitivity: if rng.below(8) == 0 {
                0.0
            } else {
                10f64.powf(rng.unit() * 8.0 - 4.0)
            },
        })
        .collect()
}

fn random_budget(rng: &mut Lcg) -> f64 {
    match rng.below(4) {
        0 => [1.0, 1.5, 2.0, 4.0, 8.0][rng.below(5) as usize],
        _ => 1.0 + rng.unit() * 31.5,
    }
}

/// Minimum of `Σ c S(b)` over all 5^n assignments within the budget (same capacity rule as
/// the solver: `⌊avg · ΣD⌋` with a 1e-12 relative slack).
fn brute_force(t: &[TensorCost], avg: f64) -> f64 {
    let total: u128 = t.iter().map(|x| x.elements as u128).sum();
    let cap = (avg * total as f64 * (1.0 + 1e-12)).floor() as u128;
    let n = t.len();
    let mut best = f64::INFINITY;
    let mut idx = vec![0usize; n];
    loop {
        let w: u128 = (0..n)
            .map(|i| t[i].elements as u128 * LADDER[idx[i]] as u128)
            .sum();
        if w <= cap {
            let bits: Vec<u8> = idx.iter().map(|&j| LADDER[j]).collect();
            best = best.min(objective(t, &bits));
        }
        let mut k = 0;
        while k < n {
            idx[k] += 1;
            if idx[k] < LADDER.len() {
                break;
            }
            idx[k] = 0;
            k += 1;
        }
        if k == n {
            return best;
        }
    }
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()) + 1e-300
}

#[test]
fn solver_matches_brute_force_and_greedy_does_not_always() {
    let mut rng = Lcg(7);
    let (mut cases, mut greedy_worse, mut worst_ratio) = (0, 0, 1.0f64);
    for _ in 0..1500 {
        let n = 1 + rng.below(6) as usize;
        let t = random_instance(&mut rng, n);
        let avg = random_budget(&mut rng);
        let best = brute_force(&t, avg);
        let sol = solve(&t, avg);
        assert!(sol.optimal, "search cap hit on a {n}-tensor instance");
        let got = objective(&t, &sol.bits);
        assert!(
            close(got, best),
            "not optimal: {t:?} at {avg} bits: {:?} gives {got}, brute force {best}",
            sol.bits
        );
        let g = objective(&t, &allocate_greedy(&t, avg));
        if !close(g, best) {
            greedy_worse += 1;
            if best > 0.0 {
                worst_ratio = worst_ratio.max(g / best);
            }
        }
        cases += 1;
    }
    println!(
        "exact solver optimal on {cases}/{cases}; greedy strictly worse on {greedy_worse} \
         (worst {worst_ratio:.2}x the optimum)"
    );
    assert!(
        greedy_worse > 0,
        "greedy was always optimal: the exact solver would be unnecessary"
    );
}

#[test]
fn budget_always_holds_and_bits_are_on_the_ladder() {
    let mut rng = Lcg(11);
    for _ in 0..300 {
        let n = 1 + rng.below(60) as usize;
        let t = random_instance(&mut rng, n);
        let avg = random_budget(&mut rng);
        for bits in [allocate(&t, avg), allocate_greedy(&t, avg)] {
            assert_eq!(bits.len(), n);
            assert!(bits.iter().all(|b| LADDER.contains(b)), "{bits:?}");
            let used = average_bits(&t, &bits);
            assert!(used <= avg + 1e-9, "{used} bits > budget {avg}");
        }
    }
}

#[test]
fn more_sensitive_never_gets_fewer_bits_at_equal_size() {
    let mut rng = Lcg(13);
    for _ in 0..300 {
        let n = 2 + rng.below(30) as usize;
        let size = [16usize, 100, 4096][rng.below(3) as usize];
        let t: Vec<TensorCost> = (0..n)
            .map(|i| TensorCost {
                // A few size classes, so equal-size pairs are common.
                elements: size * (1 + i % 3),
                sensitivity: 10f64.powf(rng.unit() * 6.0 - 3.0),
            })
            .collect();
        let avg = random_budget(&mut rng);
        let bits = allocate(&t, avg);
        for a in 0..n {
            for b in 0..n {
                if t[a].elements == t[b].elements && t[a].sensitivity > t[b].sensitivity {
                    assert!(
                        bits[a] >= bits[b],
                        "c {} > {} but bits {} < {} at {avg}",
                        t[a].sensitivity,
                        t[b].sensitivity,
                        bits[a],
                        bits[b]
                    );
                }
            }
        }
    }
}

#[test]
fn solver_edge_cases() {
    let t = |d: usize, c: f64| TensorCost {
        elements: d,
        sensitivity: c,
    };
    assert!(allocate(&[], 2.0).is_empty());
    assert_eq!(allocate(&[t(10, 1.0), t(5, 2.0)], 32.0), vec![32, 32]);
    assert_eq!(allocate(&[t(10, 1.0), t(5, 2.0)], 40.0), vec![32, 32]);
    assert_eq!(allocate(&[t(10, 1.0), t(5, 2.0)], 0.5), vec![1, 1]);
    assert_eq!(allocate(&[t(10, 1.0), t(5, 2.0)], f64::NAN), vec![1, 1]);
    assert_eq!(allocate(&[t(10, 1.0)], 1.0), vec![1]);
    // A zero-sensitivity tensor gives its bits to the sensitive one of the same size.
    assert_eq!(allocate(&[t(100, 0.0), t(100, 1.0)], 4.5), vec![1, 8]);
    // All zero: nothing to minimise, the budget is still used (not everyone at 1).
    assert_eq!(allocate(&[t(100, 0.0), t(100, 0.0)], 8.0), vec![8, 8]);
    // Broken estimates do not poison the solve.
    let bits = allocate(
        &[t(100, f64::NAN), t(100, f64::INFINITY), t(100, -1.0)],
        4.0,
    );
    assert!(bits.iter().all(|b| LADDER.contains(b)));
    assert!(bits[1] >= bits[0] && bits[1] >= bits[2], "{bits:?}");
    // Empty tensors cost nothing and stay kept.
    assert_eq!(allocate(&[t(0, 1.0), t(100, 1.0)], 2.0), vec![32, 2]);
    assert_eq!(variance_factor(32), 0.0);
}

#[test]
fn large_instances_are_solved_exactly_and_fast() {
    let mut rng = Lcg(17);
    for n in [50, 150, 400] {
        let t: Vec<TensorCost> = (0..n)
            .map(|_| TensorCost {
                elements: 1000 + rng.below(1_000_000) as usize,
                sensitivity: 10f64.powf(rng.unit() * 6.0 - 3.0),
            })
            .collect();
        for avg in [1.5, 2.0, 3.0] {
            let t0 = std::time::Instant::now();
            let sol = solve(&t, avg);
            let dt = t0.elapsed();
            let g = objective(&t, &allocate_greedy(&t, avg));
            println!(
                "{n} tensors at {avg} bits: {} nodes, {dt:?}, optimal {}, greedy/exact {:.4}",
                sol.nodes,
                sol.optimal,
                g / sol.variance
            );
            assert!(sol.variance <= g * (1.0 + 1e-12));
            assert!(average_bits(&t, &sol.bits) <= avg + 1e-9);
            assert!(dt.as_secs_f64() < 5.0, "solve took {dt:?}");
        }
    }
}

/// Two inputs feed two linear maps; the second map's output is scaled ×10 before the loss,
/// so the rounding noise of its saved input reaches the gradient 10× amplified (100× in
/// variance). Slot 0 is `x1`, slot 1 is `x2`, slot 2 the cross-entropy probabilities.
fn two_path_problem() -> (
    ParamStore,
    [actrain::tape::ParamId; 2],
    Tensor,
    Tensor,
    Tensor,
) {
    let mut rng = Lcg(23);
    let (n, d, k) = (32, 64, 10);
    let mut rand = |dims: &[usize], s: f32| {
        let len: usize = dims.iter().product();
        let v: Vec<f32> = (0..len).map(|_| rng.normal() * s).collect();
        Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
    };
    let x1 = rand(&[n, d], 1.0);
    let x2 = rand(&[n, d], 1.0);
    let mut store = ParamStore::new();
    let w1 = store.add("w1", rand(&[k, d], 0.02)).unwrap();
    let w2 = store.add("w2", rand(&[k, d], 0.002)).unwrap();
    let y: Vec<u32> = (0..n as u32).map(|i| i % k as u32).collect();
    let y = Tensor::from_vec(y, n, &Device::Cpu).unwrap();
    (store, [w1, w2], x1, x2, y)
}

fn two_path_grad(
    store: &mut ParamStore,
    w: [actrain::tape::ParamId; 2],
    x1: &Tensor,
    x2: &Tensor,
    y: &Tensor,
    tape: &mut Tape,
) -> anyhow::Result<ParamGrads> {
    store.zero_grad();
    let a = tape.constant(x1.clone());
    let b = tape.constant(x2.clone());
    let w1 = tape.param(store, w[0]);
    let w2 = tape.param(store, w[1]);
    let h1 = tape.linear(&a, &w1, None)?;
    let h2 = tape.linear(&b, &w2, None)?;
    let h2 = tape.scale(&h2, 10.0)?;
    let logits = tape.add(&h1, &h2)?;
    let loss = tape.cross_entropy(&logits, y, CrossEntropyOptions::default())?;
    tape.backward(&loss, store)?;
    Ok(ParamGrads::of(store))
}

/// An estimation pass stores each perturbed activation as its codes at the probe bits, not as
/// the perturbed fp32 tensor (which made the first estimate of a training run its peak), and
/// reading it back gives the same gradient as the tensor itself would.
#[test]
fn probe_passes_hold_activations_as_codes() {
    let (mut store, w, x1, x2, y) = two_path_problem();
    let mut tape = Tape::new(Box::new(ProbePolicy::quantize(2, 256, 1)));
    tape.begin_step();
    let g = two_path_grad(&mut store, w, &x1, &x2, &y, &mut tape)
        .unwrap()
        .flatten()
        .unwrap();
    let probes: Vec<_> = tape
        .context_log()
        .iter()
        .filter(|r| r.repr == PROBE_LABEL)
        .cloned()
        .collect();
    assert!(
        probes.len() >= 2,
        "both linear inputs are probed: {probes:?}"
    );
    for r in &probes {
        // 2-bit codes plus bf16 min/scale per group (here a sample of 64 or 10 elements):
        // well under a quarter of fp32; the perturbed fp32 tensor would be all of it.
        assert!(
            r.uncompressed_bytes > 0 && r.stored_bytes * 4 < r.uncompressed_bytes,
            "{r:?}"
        );
    }
    // The same pass again gives the same gradient (the codes dequantize deterministically).
    let mut again = Tape::new(Box::new(ProbePolicy::quantize(2, 256, 1)));
    again.begin_step();
    let g2 = two_path_grad(&mut store, w, &x1, &x2, &y, &mut again).unwrap();
    assert_eq!(g2.sq_dist(&g).unwrap(), 0.0);
    assert_eq!(g, g2.flatten().unwrap());
}

#[test]
fn estimators_rank_the_amplified_tensor_first() {
    let (mut store, w, x1, x2, y) = two_path_problem();
    let mut grad = |tape: &mut Tape| two_path_grad(&mut store, w, &x1, &x2, &y, tape);
    let cfg = NumericalConfig::default();
    let fast = estimate_randomized(&cfg, None, 0, &mut grad).unwrap();
    let reference = estimate_per_slot(2, 256, 1, None, &mut grad).unwrap();
    let c = |s: &actrain::allocate::Sensitivities, slot: usize| {
        s.slots
            .iter()
            .find(|(p, _)| p.slot == slot)
            .map(|(_, c)| *c)
            .unwrap()
    };
    for (name, s) in [("randomized", &fast), ("per-slot", &reference)] {
        let (c1, c2) = (c(s, 0), c(s, 1));
        println!(
            "{name}: {} passes, c(x1) = {c1:.3e}, c(x2) = {c2:.3e}, ratio {:.1}",
            s.passes,
            c2 / c1
        );
        assert!(
            c2 > 10.0 * c1,
            "{name}: ×10 path not ranked first ({c1} vs {c2})"
        );
    }
    assert_eq!(fast.passes, 1 + cfg.sign_passes);
    // One target at an operating point (x1 kept exact): 2 passes, the same c(x2) up to the
    // noise of a single reseed.
    let mut probe = SlotProbe::new(2, 256, 5);
    probe.targets = Some(vec![1]);
    probe.operating_point = [(0usize, 32u8)].into_iter().collect();
    let one = estimate_slots(&probe, &mut grad).unwrap();
    assert_eq!((one.passes, one.slots.len()), (2, 1));
    let ratio = one.slots[0].1 / c(&reference, 1);
    assert!((0.5..2.0).contains(&ratio), "c(x2) {ratio}× the reference");
    assert_eq!(reference.passes, 1 + reference.slots.len());
    // And the allocation follows: equal sizes, 2.5 bits → (1, 4) rather than (2, 2).
    let costs = [
        TensorCost {
            elements: x1.elem_count(),
            sensitivity: c(&fast, 0),
        },
        TensorCost {
            elements: x2.elem_count(),
            sensitivity: c(&fast, 1),
        },
    ];
    assert_eq!(allocate(&costs, 2.5), vec![1, 4]);
}

fn image(shape: &[usize], classes: usize) -> InputSpec {
    InputSpec {
        sample_shape: shape.to_vec(),
        tokens: false,
        vocab: None,
        num_outputs: classes,
        graph: false,
    }
}

fn digits_like(n: usize, seed: u64) -> (Tensor, Tensor) {
    let mut rng = Lcg(seed);
    let x: Vec<f32> = (0..n * 64).map(|_| rng.normal()).collect();
    let y: Vec<u32> = (0..n).map(|_| rng.below(10) as u32).collect();
    (
        Tensor::from_vec(x, (n, 1, 8, 8), &Device::Cpu).unwrap(),
        Tensor::from_vec(y, n, &Device::Cpu).unwrap(),
    )
}

/// Runs training steps (no optimizer: the plan is what is under test) and checks that each
/// saved activation is stored at exactly the bits the plan reports for its slot.
fn run_plan(avg: f32, estimator: Estimator) {
    let def = load_def("cnn").unwrap();
    let mut model = Model::build(&def, &image(&[1, 8, 8], 10), 3).unwrap();
    let (x, y) = digits_like(32, 5);
    let plan = VariancePlan::new(avg, 2, estimator).unwrap();
    let cfg = CompressConfig {
        level: Level::Bits(avg),
        ..Default::default()
    };
    let mut tape = Tape::new(Box::new(CompressPolicy::with_plan(cfg, plan.boxed())));
    let buffers = |m: &Model| -> Vec<Vec<f32>> {
        m.params
            .iter()
            .filter(|(_, p)| !p.trainable)
            .map(|(_, p)| p.value.flatten_all().unwrap().to_vec1().unwrap())
            .collect()
    };
    let mut estimated = 0;
    for step in 0..5 {
        let before = buffers(&model);
        if plan.maybe_estimate(&mut model, &x, &y).unwrap() {
            estimated += 1;
            assert_eq!(
                before,
                buffers(&model),
                "estimation changed the BN statistics"
            );
        }
        tape.begin_step();
        let logits = model.forward(&mut tape, &x, None).unwrap();
        let bits = plan.bits();
        let mut quantized = 0;
        for r in tape.context_log() {
            if let Some(b) = r.repr.strip_prefix('q') {
                let b: u8 = b.parse().unwrap();
                assert_eq!(bits[r.slot], b, "step {step}: slot {} ({})", r.slot, r.op);
                quantized += 1;
            } else if bits.get(r.slot).copied().unwrap_or(0) == 32 {
                assert_eq!(r.repr, "f32", "a slot planned at 32 bits is kept");
            }
        }
        assert!(quantized > 0 || bits.contains(&32));
        let loss = tape
            .cross_entropy(&logits, &y, CrossEntropyOptions::default())
            .unwrap();
        drop(logits);
        tape.backward(&loss, &mut model.params).unwrap();
        if step > 0 {
            let used = plan.average_bits();
            assert!(used <= avg as f64 + 1e-9, "step {step}: {used} > {avg}");
        }
    }
    let slots = plan.slots();
    println!(
        "{} passes at {avg} bits: {:?}",
        plan.stats().passes_per_estimate,
        slots
            .iter()
            .map(|s| (s.slot, s.op, s.elements, s.bits))
            .collect::<Vec<_>>()
    );
    assert!(slots.iter().all(|s| s.sensitivity.is_some()));
    if matches!(plan.stats().passes_per_estimate, 0) {
        assert_eq!(estimated, 0);
    } else {
        assert_eq!(
            estimated, 3,
            "steps 0, 2 and 4 re-estimate with an interval of 2"
        );
    }
}

#[test]
fn variance_plan_serves_planned_bits_numerical() {
    run_plan(2.0, Estimator::numerical());
}

#[test]
fn variance_plan_works_at_one_and_a_half_bits() {
    run_plan(1.5, Estimator::numerical());
}

#[test]
fn variance_plan_serves_planned_bits_analytic() {
    run_plan(2.0, Estimator::analytic());
}

#[test]
fn variance_plan_rejects_bad_settings_and_defaults_to_uniform() {
    assert!(VariancePlan::new(0.5, 10, Estimator::numerical()).is_err());
    assert!(VariancePlan::new(f32::NAN, 10, Estimator::numerical()).is_err());
    assert!(VariancePlan::new(2.0, 0, Estimator::numerical()).is_err());
    for bad in [
        NumericalConfig {
            slots_per_round: Some(0),
            ..Default::default()
        },
        NumericalConfig {
            probe_bits: 3,
            ..Default::default()
        },
        NumericalConfig {
            sub_batch: 0,
            ..Default::default()
        },
        NumericalConfig {
            sampling: actrain::allocate::Sampling::Randomized,
            sign_passes: 1,
            ..Default::default()
        },
    ] {
        assert!(VariancePlan::new(2.0, 10, Estimator::Numerical(bad)).is_err());
    }
    assert!("analytic".parse::<Estimator>().is_ok());
    assert!("nope".parse::<Estimator>().is_err());
    // Analytic plans need no estimation passes.
    let plan = VariancePlan::new(2.0, 10, Estimator::analytic()).unwrap();
    assert!(!plan.due());
    // A slot never seen gets the uniform rung of the budget.
    let plan = VariancePlan::new(3.0, 10, Estimator::numerical()).unwrap();
    let mut p = plan.boxed();
    let t = Tensor::zeros((4, 300), candle_core::DType::F32, &Device::Cpu).unwrap();
    let req = actrain::tape::SaveRequest {
        op: "linear",
        kind: actrain::tape::SaveAs::Activation,
        tensor: &t,
        slot: 7,
        step: 1,
        is_param: false,
    };
    assert_eq!(p.bits_for(&req), 2);
    // External sensitivities re-plan at once.
    plan.set_sensitivities(&[(7, 1.0)]).unwrap();
    assert_eq!(plan.bits()[7], 2);
}

/// A plan restored from its exported state (through JSON, as in a checkpoint) continues
/// exactly like the original: same estimates, sensitivities and bits at every later step.
#[test]
fn plan_state_round_trips_and_continues_identically() {
    let def = load_def("cnn").unwrap();
    let (x, y) = digits_like(16, 9);
    let step = |plan: &VariancePlan, model: &mut Model, tape: &mut Tape| {
        plan.maybe_estimate(model, &x, &y).unwrap();
        tape.begin_step();
        let logits = model.forward(tape, &x, None).unwrap();
        let loss = tape
            .cross_entropy(&logits, &y, CrossEntropyOptions::default())
            .unwrap();
        drop(logits);
        tape.backward(&loss, &mut model.params).unwrap();
    };
    let new_run = || {
        let model = Model::build(&def, &image(&[1, 8, 8], 10), 3).unwrap();
        let plan = VariancePlan::new(1.5, 2, Estimator::numerical()).unwrap();
        let cfg = CompressConfig {
            level: Level::Bits(1.5),
            ..Default::default()
        };
        let tape = Tape::new(Box::new(CompressPolicy::with_plan(cfg, plan.boxed())));
        (model, plan, tape)
    };
    let (mut model_a, plan_a, mut tape_a) = new_run();
    for _ in 0..3 {
        step(&plan_a, &mut model_a, &mut tape_a);
    }
    let json = serde_json::to_string(&plan_a.export_state().unwrap()).unwrap();
    let state: actrain::allocate::PlanState = serde_json::from_str(&json).unwrap();
    assert_eq!(state, plan_a.export_state().unwrap(), "JSON is lossless");

    let (mut model_b, plan_b, mut tape_b) = new_run();
    plan_b.import_state(&state).unwrap();
    assert_eq!(plan_b.export_state().unwrap(), state);
    for _ in 3..7 {
        tape_b.set_step(tape_a.step());
        step(&plan_a, &mut model_a, &mut tape_a);
        step(&plan_b, &mut model_b, &mut tape_b);
        assert_eq!(plan_a.bits(), plan_b.bits());
        assert_eq!(plan_a.slots(), plan_b.slots());
    }
    assert!(plan_a.stats().estimates >= 3);

    // A plan built for another budget or interval refuses the state, naming the flag.
    let other = VariancePlan::new(2.0, 2, Estimator::numerical()).unwrap();
    let msg = other.import_state(&state).unwrap_err().to_string();
    assert!(msg.contains("--level/--bits"), "{msg}");
    let other = VariancePlan::new(1.5, 5, Estimator::numerical()).unwrap();
    let msg = other.import_state(&state).unwrap_err().to_string();
    assert!(msg.contains("--reallocate-every"), "{msg}");
}

/// `profile-memory` with the variance allocator shows the plan's per-tensor bits: more than
/// one rung at 1.5 bits, within the budget, and the rows still add up to the saved context.
#[test]
fn profile_shows_the_allocated_bits() {
    use actrain::allocate::Allocator;
    use actrain::memory::profile::profile_step_with;
    let def = load_def("cnn").unwrap();
    let (x, y) = digits_like(64, 3);
    let mut model = Model::build(&def, &image(&[1, 8, 8], 10), 3).unwrap();
    let p = profile_step_with(&mut model, Level::L4, Allocator::Variance, &x, &y, 7).unwrap();
    assert_eq!(p.allocator, Allocator::Variance);
    let quantized: Vec<_> = p.rows.iter().filter(|r| r.repr.starts_with('q')).collect();
    let rungs: std::collections::BTreeSet<&str> =
        quantized.iter().map(|r| r.repr.as_str()).collect();
    assert!(rungs.len() >= 2, "per-tensor bits differ: {rungs:?}");
    let (bits, elems) = quantized.iter().fold((0.0, 0.0), |(b, e), r| {
        let n = r.shape.iter().product::<usize>() as f64;
        let rung: f64 = r.repr[1..].parse().unwrap();
        (b + rung * n, e + n)
    });
    assert!(bits / elems <= 1.5 + 1e-9, "average {} bits", bits / elems);
    let stored: usize = p.rows.iter().map(|r| r.stored_bytes).sum();
    assert_eq!(stored, p.activations);

    let mut model = Model::build(&def, &image(&[1, 8, 8], 10), 3).unwrap();
    let u = profile_step_with(&mut model, Level::L4, Allocator::Uniform, &x, &y, 7).unwrap();
    assert!(u
        .rows
        .iter()
        .filter(|r| r.repr.starts_with('q'))
        .all(|r| r.repr == "q1"));
}

/// The analytic (ActNN) estimator weighs each linear input's rounding noise by its node's
/// output-gradient norm, observed in backward: the path scaled ×10 after its linear layer
/// gets ~100× the sensitivity (inputs of equal statistics), with no extra passes.
#[test]
fn analytic_estimator_reads_output_gradient_norms() {
    let (mut store, w, x1, x2, y) = two_path_problem();
    let plan = VariancePlan::new(2.0, 1, Estimator::analytic()).unwrap();
    let cfg = CompressConfig {
        level: Level::Bits(2.0),
        ..Default::default()
    };
    let mut tape = Tape::new(Box::new(CompressPolicy::with_plan(cfg, plan.boxed())));
    for _ in 0..2 {
        tape.begin_step(); // step 1 gathers; step 2 turns it into sensitivities
        two_path_grad(&mut store, w, &x1, &x2, &y, &mut tape).unwrap();
    }
    let slots: Vec<_> = plan
        .slots()
        .into_iter()
        .filter(|s| s.op == "linear")
        .collect();
    assert_eq!(slots.len(), 2, "{slots:?}");
    let (c1, c2) = (
        slots[0].sensitivity.expect("estimated"),
        slots[1].sensitivity.expect("estimated"),
    );
    let ratio = c2 / c1;
    assert!((50.0..200.0).contains(&ratio), "c(x2)/c(x1) = {ratio}");
    assert_eq!(plan.stats().passes_per_estimate, 0, "no extra passes");
}

/// The estimator's gradient view: parameters in id order, a missing gradient read as zeros,
/// distances and differences against a flattened pass, a changed layout refused.
#[test]
fn param_grads_compare_tensor_by_tensor() {
    let dev = Device::Cpu;
    let mut store = ParamStore::new();
    let a = store
        .add("a", Tensor::zeros(3, DType::F32, &dev).unwrap())
        .unwrap();
    store
        .add("b", Tensor::zeros((2, 2), DType::F32, &dev).unwrap())
        .unwrap(); // gets no gradient
    store
        .accumulate_grad(a, Tensor::new(&[1f32, 2., 3.], &dev).unwrap())
        .unwrap();
    let g = ParamGrads::of(&store);
    assert_eq!(g.len(), 7);
    assert_eq!(g.flatten().unwrap(), vec![1., 2., 3., 0., 0., 0., 0.]);
    assert_eq!(flat_grad(&store).unwrap(), g.flatten().unwrap());
    let other = [1f32, 0., 3., 0., 0., 0., 1.];
    assert_eq!(g.sq_dist(&other).unwrap(), 5.0);
    assert_eq!(g.minus(&other).unwrap(), vec![0., 2., 0., 0., 0., 0., -1.]);
    let err = g.sq_dist(&other[..6]).unwrap_err().to_string();
    assert!(err.contains("6 vs 7 elements"), "{err}");
}
