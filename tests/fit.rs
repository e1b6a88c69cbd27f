//! `actrain fit`: a resumed run equals the uninterrupted one, and every bad input is a clear
//! message naming the flag, file or field (checked through the real binary).

use actrain::compress::policy::Level;
use actrain::train::trainer::{fit, FitConfig, NoProgress};
use std::path::PathBuf;
use std::process::Command;

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("actrain-fit-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn small(level: Level) -> FitConfig {
    FitConfig {
        model: "cnn".into(),
        level,
        epochs: 2,
        batch_size: 32,
        limit: Some(256),
        warmup_steps: 3,
        ..FitConfig::default()
    }
}

fn check_resume(name: &str, base: FitConfig) {
    // Uninterrupted: 2 epochs of 8 batches.
    let full = fit(
        &FitConfig {
            out: Some(tmp(&format!("{name}-full"))),
            ..base.clone()
        },
        &mut NoProgress,
    )
    .unwrap();
    assert_eq!(full.steps, 16);

    // Interrupted mid-epoch after 5 steps (a checkpoint is written), then resumed.
    let dir = tmp(&format!("{name}-resumed"));
    let first = fit(
        &FitConfig {
            out: Some(dir.clone()),
            max_steps: Some(5),
            ..base.clone()
        },
        &mut NoProgress,
    )
    .unwrap();
    assert_eq!(first.steps, 5);
    let rest = fit(
        &FitConfig {
            out: Some(dir.clone()),
            resume: Some(dir.clone()),
            ..base.clone()
        },
        &mut NoProgress,
    )
    .unwrap();
    assert_eq!(rest.steps, 16);

    let mut resumed = first.step_losses.clone();
    resumed.extend(rest.step_losses.iter().cloned());
    assert_eq!(resumed.len(), full.step_losses.len());
    for ((s1, a), (s2, b)) in full.step_losses.iter().zip(&resumed) {
        assert_eq!(s1, s2);
        assert_eq!(
            a.to_bits(),
            b.to_bits(),
            "step {s1}: uninterrupted loss {a}, resumed {b}"
        );
    }
    assert_eq!(full.test_accuracy, rest.test_accuracy);
    assert_eq!(full.bits_per_tensor, rest.bits_per_tensor);
    assert_eq!(
        full.allocator_estimates, rest.allocator_estimates,
        "the resumed allocator continues the original's estimate schedule"
    );
    // Metrics were appended across both invocations: 16 step lines, 2 epoch lines.
    let metrics = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    assert_eq!(
        metrics
            .lines()
            .filter(|l| l.contains("\"kind\":\"step\""))
            .count(),
        16
    );
    assert_eq!(
        metrics
            .lines()
            .filter(|l| l.contains("\"kind\":\"epoch\""))
            .count(),
        2
    );
    assert!(dir.join("config.json").exists() && dir.join("weights.safetensors").exists());
}

#[test]
fn resumed_run_equals_the_uninterrupted_one() {
    // The variance allocator re-estimates every 3 steps, so estimates fall on both sides of
    // the interruption: its state (sensitivities, bits, rotation) must come back exactly.
    check_resume(
        "variance",
        FitConfig {
            variance_allocator: true,
            reallocate_every: 3,
            // 1.5 bits: tensors get different rungs (at 2 bits this small CNN stays uniform).
            ..small(Level::L4)
        },
    );
    check_resume(
        "uniform",
        FitConfig {
            variance_allocator: false,
            ..small(Level::L3)
        },
    );
}

#[test]
fn resuming_with_another_allocator_is_refused() {
    let dir = tmp("allocator-switch");
    fit(
        &FitConfig {
            out: Some(dir.clone()),
            max_steps: Some(2),
            ..small(Level::L3)
        },
        &mut NoProgress,
    )
    .unwrap();
    let err = fit(
        &FitConfig {
            out: Some(dir.clone()),
            resume: Some(dir.clone()),
            variance_allocator: false,
            ..small(Level::L3)
        },
        &mut NoProgress,
    )
    .unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("--allocator variance"), "{msg}");
}

#[test]
fn l3_trains_digits_like_l0() {
    let cfg = |level| FitConfig {
        epochs: 6,
        limit: Some(640),
        ..small(level)
    };
    let l0 = fit(&cfg(Level::L0), &mut NoProgress).unwrap();
    let l3 = fit(&cfg(Level::L3), &mut NoProgress).unwrap();
    println!("L0 {:.3} L3 {:.3}", l0.test_accuracy, l3.test_accuracy);
    assert!(l0.test_accuracy > 0.8, "L0 accuracy {}", l0.test_accuracy);
    assert!(
        (l0.test_accuracy - l3.test_accuracy).abs() < 0.05,
        "L0 {} vs L3 {}",
        l0.test_accuracy,
        l3.test_accuracy
    );
    assert!(
        l3.context_bytes * 10 < l0.context_bytes,
        "L3 context {} vs L0 {}",
        l3.context_bytes,
        l0.context_bytes
    );
}

/// Runs the binary; returns (exit code, stderr).
fn actrain(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_actrain"))
        .args(args)
        .output()
        .expect("run actrain");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_inputs_are_clear_errors() {
    let missing = tmp("no-such-dir");
    let missing = missing.to_str().unwrap();
    let bad_model = tmp("bad-model.toml");
    std::fs::write(
        &bad_model,
        "[[layer]]\nname = \"x\"\nop = \"conv2d\"\nkernel = 3\n",
    )
    .unwrap();
    let resume_from = tmp("resume-src");
    fit(
        &FitConfig {
            out: Some(resume_from.clone()),
            max_steps: Some(1),
            ..small(Level::L3)
        },
        &mut NoProgress,
    )
    .unwrap();
    let cases: Vec<(Vec<String>, Vec<&str>)> = vec![
        (
            vec!["--data".into(), format!("mnist:{missing}")],
            vec!["--data", missing],
        ),
        (
            vec!["--data".into(), "imagenet".into()],
            vec!["--data", "imagenet"],
        ),
        (
            vec!["--model".into(), "resnet1000".into()],
            vec!["--model", "resnet1000", "resnet18"],
        ),
        (
            vec!["--model".into(), bad_model.to_str().unwrap().into()],
            vec!["bad-model.toml", "`x`", "`out`"],
        ),
        (vec!["--level".into(), "L9".into()], vec!["--level", "L9"]),
        (
            vec!["--estimator".into(), "guess".into()],
            vec!["--estimator", "guess"],
        ),
        (vec!["--bits".into(), "0.5".into()], vec!["--bits"]),
        (
            vec!["--device".into(), "cuda:0".into()],
            vec!["cuda", "without CUDA"],
        ),
        (
            vec!["--device".into(), "tpu".into()],
            vec!["--device", "tpu"],
        ),
        (
            vec!["--schedule".into(), "linear".into()],
            vec!["--schedule", "linear"],
        ),
        (
            vec!["--batch-size".into(), "0".into()],
            vec!["--batch-size"],
        ),
        (vec!["--lr=-1".into()], vec!["--lr"]),
        (
            vec!["--allocator".into(), "greedy".into()],
            vec!["--allocator", "greedy"],
        ),
        (
            vec!["--group-size".into(), "7".into()],
            vec!["--group-size", "7"],
        ),
        (
            vec!["--exclude-ops".into(), "conv2d,softmaxx".into()],
            vec!["--exclude-ops", "softmaxx", "conv2d"],
        ),
        (
            vec!["--resume".into(), missing.into()],
            vec!["--resume", missing],
        ),
        (
            vec![
                "--resume".into(),
                resume_from.to_str().unwrap().into(),
                "--limit".into(),
                "256".into(),
                "--batch-size".into(),
                "32".into(),
                "--model".into(),
                "mlp".into(),
            ],
            vec!["--resume", "model"],
        ),
    ];
    for (args, needles) in cases {
        let mut full = vec!["fit", "--quiet", "--epochs", "1"];
        full.extend(args.iter().map(|s| s.as_str()));
        let (code, err) = actrain(&full);
        assert_eq!(code, 1, "{args:?} should fail cleanly, got {code}: {err}");
        assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
        for n in needles {
            assert!(err.contains(n), "{args:?}: message lacks `{n}`:\n{err}");
        }
    }
}

#[test]
fn json_summary_on_stdout() {
    let out = Command::new(env!("CARGO_BIN_EXE_actrain"))
        .args([
            "fit", "--quiet", "--json", "--epochs", "1", "--limit", "128", "--model", "mlp",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("one JSON object on stdout");
    assert_eq!(v["model"], "mlp");
    assert!(v["test_accuracy"].as_f64().unwrap() > 0.0);
    assert!(v["context_bytes"].as_u64().unwrap() > 0);
}

#[test]
fn a_diverging_run_stops_with_a_clear_message() {
    let dir = tmp("diverge");
    let err = fit(
        &FitConfig {
            lr: 1e6,
            clip_grad_norm: None,
            warmup_steps: 0,
            out: Some(dir.clone()),
            ..small(Level::L3)
        },
        &mut NoProgress,
    )
    .unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("NaN") || msg.contains("inf") || msg.contains("became"),
        "{msg}"
    );
    assert!(
        msg.contains("step"),
        "the message says where it stopped: {msg}"
    );
}

#[test]
fn variance_allocator_assigns_per_tensor_bits_within_budget() {
    let cfg = FitConfig {
        variance_allocator: true,
        epochs: 4,
        limit: Some(640),
        ..small(Level::L4)
    };
    let s = fit(&cfg, &mut NoProgress).unwrap();
    let bits = s
        .bits_per_tensor
        .expect("the variance allocator reports its bits");
    let used: Vec<u8> = bits.iter().copied().filter(|&b| b > 0).collect();
    assert!(used.len() >= 3, "several quantized tensors: {bits:?}");
    assert!(
        used.iter().all(|b| [1, 2, 4, 8, 32].contains(b)),
        "ladder rungs only: {bits:?}"
    );
    assert!(s.allocator_seconds > 0.0 && s.allocator_seconds < s.seconds);
    assert!(s.test_accuracy > 0.5, "trains: {}", s.test_accuracy);
}
