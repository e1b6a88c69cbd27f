//! The commands measure memory through the installed `MemoryMeter`, not the host allocator
//! directly: a device meter plugs in without touching them. Its own binary, because the
//! meter is process-wide.

use actrain::compress::policy::Level;
use actrain::memory::{self, counting, install, MemoryMeter};
use actrain::model::{load_def, InputSpec};
use actrain::search::{probe, ProbeOutcome};
use std::sync::atomic::{AtomicUsize, Ordering};

/// A pretend device on which every byte costs two: live bytes are twice the host's.
struct DoubleCostDevice {
    budget: AtomicUsize,
}

impl MemoryMeter for DoubleCostDevice {
    fn describe(&self) -> String {
        "double-cost test device".into()
    }
    fn current_bytes(&self) -> usize {
        2 * counting::current_bytes()
    }
    fn peak_bytes(&self) -> usize {
        2 * counting::peak_bytes()
    }
    fn reset_peak(&self) {
        counting::reset_peak()
    }
    fn set_budget(&self, bytes: Option<usize>) {
        self.budget.store(bytes.unwrap_or(0), Ordering::SeqCst)
    }
    fn budget(&self) -> Option<usize> {
        match self.budget.load(Ordering::SeqCst) {
            0 => None,
            b => Some(b),
        }
    }
}

#[test]
fn probes_measure_through_the_installed_meter() {
    let def = load_def("mlp").unwrap();
    let input = InputSpec {
        sample_shape: vec![1, 8, 8],
        tokens: false,
        vocab: None,
        num_outputs: 10,
        graph: false,
    };
    let batch = 256;
    // Warm-up, then the host peak of this probe.
    probe(&def, &input, Level::L0, batch, usize::MAX / 4, 2, 1).unwrap();
    let host_peak = match probe(&def, &input, Level::L0, batch, usize::MAX / 4, 2, 1).unwrap() {
        ProbeOutcome::Fits { peak_bytes, .. } => peak_bytes,
        other => panic!("no budget, must fit: {other:?}"),
    };
    let budget = host_peak * 3 / 2;
    assert_eq!(memory::describe(), "host heap (counting allocator)");
    assert!(probe(&def, &input, Level::L0, batch, budget, 2, 1)
        .unwrap()
        .fits());

    let previous = install(Some(Box::new(DoubleCostDevice {
        budget: AtomicUsize::new(0),
    })));
    assert!(previous.is_none());
    assert_eq!(memory::describe(), "double-cost test device");
    let on_device = probe(&def, &input, Level::L0, batch, budget, 2, 1).unwrap();
    // The tape's per-op budget check and the probe's peak both went through the device meter.
    assert!(
        matches!(on_device, ProbeOutcome::OutOfMemory { .. }),
        "twice the bytes do not fit in 1.5x: {on_device:?}"
    );
    assert!(probe(&def, &input, Level::L0, batch, 3 * host_peak, 2, 1)
        .unwrap()
        .fits());

    install(None);
    assert_eq!(memory::describe(), "host heap (counting allocator)");
    assert!(probe(&def, &input, Level::L0, batch, budget, 2, 1)
        .unwrap()
        .fits());
}
