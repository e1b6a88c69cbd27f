//! `max-batch`: the search finds the exact edge under a budget, never reports an untested size,
//! searches down, respects `--max`, frees memory between probes; flags and the plot.
//!
//! Real probes use the `mlp` preset on digits with budgets of a few MiB (fast); the search
//! rules are also checked against a fake prober whose limit is known exactly.

use actrain::allocate::Allocator;
use actrain::compress::policy::Level;
use actrain::memory::current_bytes;
use actrain::model::{load_def, InputSpec, ModelDef};
use actrain::search::*;
use anyhow::Result;
use std::sync::{Mutex, MutexGuard};

/// The allocator is process-wide: tests in this file must not overlap.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    let guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // The previous test's thread frees its thread-local gemm buffers (~1 MiB) as it exits,
    // after releasing the lock; let that land before measuring, or a probe's peak is
    // understated by the foreign free.
    std::thread::sleep(std::time::Duration::from_millis(100));
    guard
}

const MIB: usize = 1 << 20;

fn mlp() -> (ModelDef, InputSpec) {
    (
        load_def("mlp").unwrap(),
        load_input_spec("digits", 64, 0).unwrap(),
    )
}

fn prober(budget: usize) -> InProcessProber {
    let (def, input) = mlp();
    InProcessProber::new(def, input, budget, 2, 42)
}

fn quiet() -> impl FnMut(&str) {
    |_: &str| {}
}

/// Every reported size was probed, fitted, and the last probe of the level re-verified it.
fn assert_reported_was_probed(r: &LevelResult) {
    if r.max_batch == 0 {
        assert!(r.probes.iter().all(|p| !p.outcome.fits()), "{r:#?}");
        return;
    }
    let last = r.probes.last().expect("probes ran");
    assert_eq!(
        last.batch, r.max_batch,
        "the last probe re-verifies the winner"
    );
    assert_eq!(last.purpose, Purpose::Verify);
    assert!(last.outcome.fits());
    assert!(r
        .probes
        .iter()
        .any(|p| p.batch == r.max_batch && p.purpose == Purpose::Search && p.outcome.fits()));
    // Nothing larger than the answer ever fitted.
    assert!(r
        .probes
        .iter()
        .filter(|p| p.batch > r.max_batch)
        .all(|p| !p.outcome.fits()));
    match last.outcome {
        ProbeOutcome::Fits {
            peak_bytes,
            samples_per_second,
        } => {
            assert_eq!(r.peak_bytes, Some(peak_bytes));
            assert_eq!(r.samples_per_second, Some(samples_per_second));
        }
        _ => unreachable!(),
    }
}

#[test]
fn reported_edge_is_exact() -> Result<()> {
    let _g = serial();
    let (def, input) = mlp();
    let budget = 4 * MIB;
    for k in [1usize, 8] {
        let cfg = SearchConfig {
            start: 8,
            max: None,
            multiple_of: k,
        };
        let mut p = prober(budget);
        let r = search_level(Level::L0, &cfg, &mut p, &mut quiet())?;
        assert!(r.max_batch > 64, "{r:#?}");
        assert_eq!(r.max_batch % k, 0);
        assert_reported_was_probed(&r);
        assert!(r.probes.iter().all(|p| p.batch % k == 0));
        // Probed directly, under the same budget: B fits, B + k does not.
        let b = r.max_batch;
        assert!(probe(&def, &input, Level::L0, b, budget, 2, 42)?.fits());
        let over = probe(&def, &input, Level::L0, b + k, budget, 2, 42)?;
        assert!(!over.fits(), "batch {} fitted too: {over:?}", b + k);
        if let ProbeOutcome::Fits { peak_bytes, .. } =
            probe(&def, &input, Level::L0, b, budget, 2, 42)?
        {
            assert!(peak_bytes <= budget);
        }
    }
    Ok(())
}

#[test]
fn l3_fits_a_larger_batch_than_l0() -> Result<()> {
    let _g = serial();
    let mut p = prober(4 * MIB);
    let rs = search_levels(
        &[Level::L0, Level::L3],
        &SearchConfig::default(),
        &mut p,
        &mut quiet(),
    )?;
    let (l0, l3) = (&rs[0], &rs[1]);
    assert!(
        l3.max_batch > l0.max_batch,
        "L3 {} vs L0 {}",
        l3.max_batch,
        l0.max_batch
    );
    assert_eq!(l0.ratio_vs_l0, Some(1.0));
    let ratio = l3.ratio_vs_l0.unwrap();
    assert!((ratio - l3.max_batch as f64 / l0.max_batch as f64).abs() < 1e-12);
    for r in &rs {
        assert_reported_was_probed(r);
    }
    Ok(())
}

#[test]
fn first_probe_that_fails_searches_downward() -> Result<()> {
    let _g = serial();
    let mut p = prober(4 * MIB);
    let cfg = SearchConfig {
        start: 100_000,
        max: None,
        multiple_of: 1,
    };
    let mut lines = Vec::new();
    let r = search_level(Level::L0, &cfg, &mut p, &mut |l: &str| {
        lines.push(l.to_string())
    })?;
    assert_eq!(r.probes[0].batch, 100_000);
    assert!(!r.probes[0].outcome.fits());
    assert!(r.max_batch > 0 && r.max_batch < 100_000);
    assert!(
        r.notes.iter().any(|n| n.contains("downward")),
        "{:?}",
        r.notes
    );
    assert_reported_was_probed(&r);
    // Same answer as searching upward from the default start.
    let up = search_level(Level::L0, &SearchConfig::default(), &mut p, &mut quiet())?;
    assert_eq!(up.max_batch, r.max_batch);
    // One stderr line per probe (plus the note).
    let probe_lines = lines.iter().filter(|l| l.contains(" batch ")).count();
    assert!(probe_lines >= r.probes.len());
    assert!(
        lines[0].starts_with("L0 batch 100000: out of memory"),
        "{}",
        lines[0]
    );
    Ok(())
}

#[test]
fn nothing_fits_reports_zero() -> Result<()> {
    let _g = serial();
    // The model, its gradients and momentum alone (~600 KiB) exceed this.
    let mut p = prober(256 << 10);
    let r = search_level(Level::L3, &SearchConfig::default(), &mut p, &mut quiet())?;
    assert_eq!(r.max_batch, 0);
    assert_eq!(r.samples_per_second, None);
    assert_eq!(r.probes.last().unwrap().batch, 1);
    assert!(
        r.notes.iter().any(|n| n.contains("max batch 0")),
        "{:?}",
        r.notes
    );
    assert_reported_was_probed(&r);
    Ok(())
}

#[test]
fn max_caps_the_search() -> Result<()> {
    let _g = serial();
    let mut p = prober(4 * MIB);
    let cfg = SearchConfig {
        start: 8,
        max: Some(50),
        multiple_of: 1,
    };
    let r = search_level(Level::L3, &cfg, &mut p, &mut quiet())?;
    assert_eq!(r.max_batch, 50);
    assert!(r.capped);
    assert!(r.probes.iter().all(|p| p.batch <= 50));
    assert!(r.notes.iter().any(|n| n.contains("--max")));
    assert_reported_was_probed(&r);
    // A cap that is not a multiple rounds down to one.
    let cfg = SearchConfig {
        start: 8,
        max: Some(50),
        multiple_of: 16,
    };
    let r = search_level(Level::L3, &cfg, &mut p, &mut quiet())?;
    assert_eq!(r.max_batch, 48);
    assert!(r.probes.iter().all(|p| p.batch <= 48 && p.batch % 16 == 0));
    Ok(())
}

#[test]
fn memory_returns_to_baseline_after_probes() -> Result<()> {
    let _g = serial();
    let (def, input) = mlp();
    // Warm the process (thread pools, per-thread matmul scratch) the way the prober does.
    for b in [1, 64, 512, 2048] {
        probe(&def, &input, Level::L0, b, usize::MAX / 4, 2, 1)?;
    }
    for (level, batch) in [(Level::L0, 64), (Level::L3, 256), (Level::L0, 4096)] {
        let before = current_bytes();
        let out = probe(&def, &input, level, batch, 4 * MIB, 2, 42)?;
        let after = current_bytes();
        assert!(
            after <= before + REPEAT_THRESHOLD,
            "{level:?} batch {batch} ({out:?}) left {} bytes allocated",
            after as i64 - before as i64
        );
        if batch == 4096 {
            assert!(!out.fits(), "the out-of-memory path is covered too");
        }
    }
    // The budget is cleared after a probe: a large allocation is no longer an OOM.
    assert!(actrain::memory::counting::budget().is_none());
    // And the in-process prober reports it per probe.
    let mut p = prober(4 * MIB);
    let r = search_level(Level::L1, &SearchConfig::default(), &mut p, &mut quiet())?;
    for pr in &r.probes {
        let res = pr
            .residual_bytes
            .expect("in-process probes measure what they leave");
        assert!(
            res < REPEAT_THRESHOLD as i64,
            "batch {} left {res} bytes",
            pr.batch
        );
    }
    Ok(())
}

/// A prober whose memory limit is known: batch ≤ limit fits. With `drop_after: Some((n, m))`
/// the limit becomes `m` after `n` probes (memory use that is not the same from run to run).
struct Fake {
    limit: usize,
    drop_after: Option<(usize, usize)>,
    calls: Vec<usize>,
}

impl Prober for Fake {
    fn probe(&mut self, _level: Level, batch: usize) -> Result<ProbeReport> {
        let limit = match self.drop_after {
            Some((n, m)) if self.calls.len() >= n => m,
            _ => self.limit,
        };
        self.calls.push(batch);
        let fits = batch <= limit;
        Ok(ProbeReport {
            outcome: if fits {
                ProbeOutcome::Fits {
                    peak_bytes: batch * 1000,
                    samples_per_second: batch as f64,
                }
            } else {
                ProbeOutcome::OutOfMemory {
                    at_bytes: batch * 1000,
                }
            },
            residual_bytes: None,
        })
    }
}

fn fake(limit: usize) -> Fake {
    Fake {
        limit,
        drop_after: None,
        calls: vec![],
    }
}

#[test]
fn search_rules_on_a_known_limit() -> Result<()> {
    let cfg = SearchConfig::default();
    for limit in [0usize, 1, 2, 3, 7, 8, 9, 100, 1000, 1023, 1024, 1025] {
        for k in [1usize, 4] {
            for start in [1usize, 8, 5000] {
                let cfg = SearchConfig {
                    start,
                    multiple_of: k,
                    ..cfg
                };
                let mut f = fake(limit);
                let r = search_level(Level::L2, &cfg, &mut f, &mut quiet())?;
                let want = limit / k * k;
                assert_eq!(r.max_batch, want, "limit {limit} k {k} start {start}");
                assert!(f.calls.iter().all(|b| b % k == 0 && *b > 0));
                assert_reported_was_probed(&r);
                // Logarithmic number of probes.
                assert!(f.calls.len() <= 40, "{:?}", f.calls);
            }
        }
    }
    // Exact sequence: double, bisect, re-verify.
    let mut f = fake(100);
    search_level(Level::L3, &cfg, &mut f, &mut quiet())?;
    assert_eq!(
        f.calls,
        vec![8, 16, 32, 64, 128, 96, 112, 104, 100, 102, 101, 100]
    );
    // Downward: halve until one fits, then bisect up to the edge.
    let mut f = fake(100);
    let down = SearchConfig { start: 1000, ..cfg };
    search_level(Level::L3, &down, &mut f, &mut quiet())?;
    assert_eq!(f.calls[..4], [1000, 500, 250, 125]);
    assert_eq!(f.calls[4], 62);
    // --max caps, and is reported as a cap.
    let mut f = fake(10_000);
    let capped = SearchConfig {
        max: Some(300),
        ..cfg
    };
    let r = search_level(Level::L3, &capped, &mut f, &mut quiet())?;
    assert_eq!(f.calls, vec![8, 16, 32, 64, 128, 256, 300, 300]);
    assert!(r.capped && r.max_batch == 300);
    // A start above --max starts at --max.
    let mut f = fake(10_000);
    let r = search_level(
        Level::L3,
        &SearchConfig {
            start: 999,
            ..capped
        },
        &mut f,
        &mut quiet(),
    )?;
    assert_eq!(f.calls, vec![300, 300]);
    assert_eq!(r.max_batch, 300);
    Ok(())
}

#[test]
fn failed_reverification_steps_down() -> Result<()> {
    // 100 fits during the search (11 probes) but only 97 afterwards.
    let mut f = Fake {
        limit: 100,
        drop_after: Some((11, 97)),
        calls: vec![],
    };
    let mut lines = Vec::new();
    let r = search_level(
        Level::L3,
        &SearchConfig::default(),
        &mut f,
        &mut |l: &str| lines.push(l.to_string()),
    )?;
    assert_eq!(r.max_batch, 97, "{:?}", f.calls);
    assert!(f.calls.ends_with(&[100, 99, 97]), "{:?}", f.calls);
    assert!(r.notes.iter().any(|n| n.contains("re-verified")));
    assert!(lines.iter().any(|l| l.contains("stepping down")));
    let last = r.probes.last().unwrap();
    assert_eq!((last.batch, last.purpose), (97, Purpose::Verify));
    assert!(last.outcome.fits());
    Ok(())
}

#[test]
fn probe_lines_name_level_batch_and_result() {
    let rec = ProbeRecord {
        level: "L3".into(),
        batch: 256,
        purpose: Purpose::Search,
        outcome: ProbeOutcome::Fits {
            peak_bytes: 1_320_702_443,
            samples_per_second: 812.4,
        },
        residual_bytes: Some(0),
    };
    assert_eq!(
        rec.line(),
        "L3 batch 256: fits, peak 1.23 GiB, 812 samples/s"
    );
    let rec = ProbeRecord {
        batch: 512,
        outcome: ProbeOutcome::OutOfMemory { at_bytes: 2 << 30 },
        ..rec
    };
    assert!(rec.line().starts_with("L3 batch 512: out of memory"));
    // The --isolate child's line round-trips, whatever else is printed around it.
    let out = ProbeOutcome::Fits {
        peak_bytes: 123,
        samples_per_second: 4.5,
    };
    let text = format!("running 1 test\ntest x ... {}\nok\n", probe_line(&out));
    assert_eq!(parse_probe_line(&text).unwrap(), out);
    assert!(parse_probe_line("nothing here").is_err());
}

#[test]
fn flag_errors_name_the_flag() {
    let e = parse_memory_flag(None).unwrap_err().to_string();
    assert!(e.contains("--memory") && e.contains("required"), "{e}");
    let e = parse_memory_flag(Some("lots")).unwrap_err().to_string();
    assert!(e.contains("--memory") && e.contains("lots"), "{e}");
    let e = parse_memory_flag(Some("2XB")).unwrap_err().to_string();
    assert!(e.contains("--memory"), "{e}");
    assert_eq!(parse_memory_flag(Some("2GiB")).unwrap(), 2 << 30);

    let e = "greedy".parse::<Allocator>().unwrap_err().to_string();
    assert!(e.contains("--allocator") && e.contains("greedy"), "{e}");
    assert_eq!(
        "Variance".parse::<Allocator>().unwrap(),
        Allocator::Variance
    );

    let e = parse_levels_flag("L0,L9").unwrap_err().to_string();
    assert!(e.contains("--levels") && e.contains("L9"), "{e}");
    assert!(parse_levels_flag("").is_err());
    assert_eq!(
        parse_levels_flag("l3, L0,L3").unwrap(),
        vec![Level::L3, Level::L0]
    );

    let cfg = |f: &dyn Fn(&mut MaxBatchConfig)| {
        let mut c = base_config();
        f(&mut c);
        c.validate().map_err(|e| e.to_string())
    };
    assert!(cfg(&|_| {}).is_ok());
    assert!(cfg(&|c| c.margin = 1.0).unwrap_err().contains("--margin"));
    assert!(cfg(&|c| c.margin = -0.1).unwrap_err().contains("--margin"));
    assert!(cfg(&|c| c.steps = 1).unwrap_err().contains("--steps"));
    assert!(cfg(&|c| c.search.multiple_of = 0)
        .unwrap_err()
        .contains("--multiple-of"));
    assert!(cfg(&|c| {
        c.search.max = Some(4);
        c.search.multiple_of = 8
    })
    .unwrap_err()
    .contains("--max"));
    let mut c = base_config();
    c.margin = 0.25;
    c.memory_bytes = 4 * MIB;
    assert_eq!(c.probe_budget(), 3 * MIB);

    let e = load_input_spec("graph:synthetic", 64, 0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("full-batch"), "{e}");
}

fn base_config() -> MaxBatchConfig {
    MaxBatchConfig {
        model: "mlp".into(),
        data: "digits".into(),
        seq_len: 64,
        memory_bytes: 4 * MIB,
        margin: 0.05,
        levels: vec![Level::L0, Level::L3],
        search: SearchConfig::default(),
        steps: 2,
        seed: 42,
        allocator: Allocator::Variance,
        isolate: None,
        device: "cpu".into(),
    }
}

#[test]
fn run_table_json_and_svg() -> Result<()> {
    let _g = serial();
    let cfg = MaxBatchConfig {
        search: SearchConfig {
            start: 8,
            max: None,
            multiple_of: 8,
        },
        levels: vec![Level::L0, Level::L2, Level::L3, Level::L4],
        ..base_config()
    };
    let mut lines = Vec::new();
    let report = run_max_batch(&cfg, &mut |l: &str| lines.push(l.to_string()))?;
    assert_eq!(report.probe_budget, cfg.probe_budget());
    assert!(lines[0].starts_with("max-batch: model mlp"), "{}", lines[0]);
    assert_eq!(report.results.len(), 4);
    for r in &report.results {
        assert_reported_was_probed(r);
        assert!(r.peak_bytes.unwrap() <= report.probe_budget);
    }
    let table = report.table();
    for l in [
        "L0",
        "L2",
        "L3",
        "L4",
        "max batch",
        "samples/s",
        "x vs L0",
        "1.00x",
    ] {
        assert!(table.contains(l), "{l} missing from\n{table}");
    }
    let json = report.json_lines();
    assert_eq!(json.len(), 4);
    for (j, r) in json.iter().zip(&report.results) {
        let v: serde_json::Value = serde_json::from_str(j)?;
        for f in [
            "level",
            "max_batch",
            "samples_per_second",
            "peak_bytes",
            "ratio_vs_l0",
            "probes",
        ] {
            assert!(v.get(f).is_some(), "{f} missing in {j}");
        }
        assert_eq!(v["max_batch"].as_u64(), Some(r.max_batch as u64));
        assert_eq!(v["probes"].as_array().unwrap().len(), r.probes.len());
    }
    // The plot, written atomically.
    let dir = std::env::temp_dir().join(format!("actrain-max-batch-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("plot.svg");
    write_atomic(&path, &report.svg())?;
    let svg = std::fs::read_to_string(&path)?;
    assert!(svg.starts_with("<svg"));
    assert!(svg.trim_end().ends_with("</svg>"));
    for l in ["L0", "L2", "L3", "L4", "mlp", "max batch", "samples/s"] {
        assert!(svg.contains(l), "{l} missing from the SVG");
    }
    assert_eq!(svg.matches("<svg").count(), 1);
    assert_eq!(
        svg.matches("<rect").count(),
        svg.matches("</rect>").count() + 2
    );
    assert_eq!(svg.matches("<text").count(), svg.matches("</text>").count());
    let leftovers: Vec<_> = std::fs::read_dir(&dir)?
        .map(|e| e.unwrap().file_name())
        .filter(|n| n != "plot.svg")
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

#[test]
fn svg_escapes_and_handles_zero() {
    let r = |level: &str, b: usize, t: Option<f64>| LevelResult {
        level: level.into(),
        max_batch: b,
        samples_per_second: t,
        peak_bytes: None,
        ratio_vs_l0: None,
        capped: false,
        notes: vec![],
        probes: vec![],
    };
    let svg = render_svg(
        &[r("L0", 0, None), r("L3", 0, None), r("L4", 12, Some(3.0))],
        "a <model> & data",
    );
    assert!(svg.starts_with("<svg"));
    assert!(svg.contains("a &lt;model&gt; &amp; data"));
    assert!(!svg.contains("NaN") && !svg.contains("inf"));
}

/// The child side of `--isolate` when this test binary stands in for `actrain`: run as
/// `max_batch --exact isolate_child -- max-batch --probe-only ...`, it prints the probe line.
#[test]
fn isolate_child() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let Some(pos) = args.iter().position(|a| a == "max-batch") else {
        return Ok(()); // an ordinary test run
    };
    let mut kv = std::collections::HashMap::new();
    let rest = &args[pos + 1..];
    let mut i = 0;
    while i < rest.len() {
        if rest[i] == "--probe-only" {
            i += 1;
            continue;
        }
        kv.insert(rest[i].clone(), rest[i + 1].clone());
        i += 2;
    }
    let get = |k: &str| kv[k].clone();
    let budget =
        ((1.0 - get("--margin").parse::<f64>()?) * get("--memory").parse::<f64>()?) as usize;
    let line = probe_only(
        &get("--model"),
        &get("--data"),
        get("--seq-len").parse()?,
        get("--levels").parse()?,
        get("--batch").parse()?,
        budget,
        get("--steps").parse()?,
        get("--seed").parse()?,
        get("--allocator").parse()?,
    )?;
    println!("\n{line}");
    Ok(())
}

#[test]
fn isolated_probes_agree_with_in_process_ones() -> Result<()> {
    let _g = serial();
    let exe = std::env::current_exe()?;
    let mut sub = SubprocessProber {
        program: exe,
        prefix_args: [
            "--exact",
            "isolate_child",
            "--nocapture",
            "--test-threads=1",
            "--",
        ]
        .map(String::from)
        .to_vec(),
        model: "mlp".into(),
        data: "digits".into(),
        seq_len: 64,
        budget_bytes: 4 * MIB,
        steps: 2,
        seed: 42,
        allocator: Allocator::Variance,
        device: "cpu".into(),
    };
    let mut inproc = prober(4 * MIB);
    inproc.allocator = Allocator::Variance;
    let cfg = SearchConfig {
        start: 256,
        max: None,
        multiple_of: 64,
    };
    let a = search_level(Level::L0, &cfg, &mut sub, &mut quiet())?;
    let b = search_level(Level::L0, &cfg, &mut inproc, &mut quiet())?;
    assert_eq!(a.max_batch, b.max_batch, "{:#?}", a.probes);
    // At L3 the variance allocator's estimate runs inside each probe, in both modes.
    let a = search_level(Level::L3, &cfg, &mut sub, &mut quiet())?;
    let b = search_level(Level::L3, &cfg, &mut inproc, &mut quiet())?;
    assert_eq!(a.max_batch, b.max_batch, "{:#?}", a.probes);
    assert_reported_was_probed(&a);
    assert!(a.probes.iter().all(|p| p.residual_bytes.is_none()));
    Ok(())
}
