//! The device-neutral face of memory accounting. Commands and the tape ask "how many bytes
//! are live, what was the peak, are we over budget" through [`MemoryMeter`]; the host answer
//! is the counting allocator ([`HostMeter`]). A device backend (CUDA: the driver's free/total,
//! the stream-ordered pool's used-memory high-water mark, `CUDA_ERROR_OUT_OF_MEMORY` mapped to
//! [`super::OutOfMemory`] by [`super::is_oom`]) implements the same trait and is installed with
//! [`install`]; `profile-memory`, `max-batch` and `fit` do not change.

use super::counting;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::RwLock;

/// Live/peak bytes and a budget on one device.
pub trait MemoryMeter: Send + Sync {
    /// What is measured, for reports ("host heap (counting allocator)", "cuda:0 (driver)").
    fn describe(&self) -> String;
    /// Bytes live now.
    fn current_bytes(&self) -> usize;
    /// Highest `current_bytes` since the last [`MemoryMeter::reset_peak`].
    fn peak_bytes(&self) -> usize;
    /// Starts a new peak window at the current level.
    fn reset_peak(&self);
    /// Sets (Some) or clears (None) the budget in live bytes.
    fn set_budget(&self, bytes: Option<usize>);
    fn budget(&self) -> Option<usize>;
    /// `(peak, budget)` when the peak since the last reset passed the budget.
    fn over_budget(&self) -> Option<(usize, usize)> {
        let b = self.budget()?;
        let peak = self.peak_bytes();
        (peak > b).then_some((peak, b))
    }
    /// The device's total memory, when it has a fixed size (a GPU); `None` on the host, where
    /// `--memory` defines the device.
    fn capacity_bytes(&self) -> Option<usize> {
        None
    }
    /// Bytes this process could still allocate on the device (a GPU: the driver's free memory
    /// plus the pool's cache); `None` on the host.
    fn available_bytes(&self) -> Option<usize> {
        None
    }
    /// Hands cached, unused device memory back (between max-batch probes); no-op on the host.
    fn trim_cache(&self) {}
}

/// The host heap, measured by the counting global allocator.
pub struct HostMeter;

impl MemoryMeter for HostMeter {
    fn describe(&self) -> String {
        "host heap (counting allocator)".into()
    }
    fn current_bytes(&self) -> usize {
        counting::current_bytes()
    }
    fn peak_bytes(&self) -> usize {
        counting::peak_bytes()
    }
    fn reset_peak(&self) {
        counting::reset_peak()
    }
    fn set_budget(&self, bytes: Option<usize>) {
        counting::set_budget(bytes)
    }
    fn budget(&self) -> Option<usize> {
        counting::budget()
    }
    fn over_budget(&self) -> Option<(usize, usize)> {
        counting::over_budget()
    }
}

/// Set while a non-host meter is installed: the tape checks the budget at every op, so the
/// host path stays a couple of atomic loads with no lock.
static INSTALLED: AtomicBool = AtomicBool::new(false);
static ACTIVE: RwLock<Option<Box<dyn MemoryMeter>>> = RwLock::new(None);

/// Makes `meter` the process's meter (None: back to the host heap); returns the previous one.
pub fn install(meter: Option<Box<dyn MemoryMeter>>) -> Option<Box<dyn MemoryMeter>> {
    let mut slot = ACTIVE.write().unwrap_or_else(|e| e.into_inner());
    INSTALLED.store(meter.is_some(), Ordering::SeqCst);
    std::mem::replace(&mut *slot, meter)
}

/// Runs `f` with the active meter.
pub fn with_meter<R>(f: impl FnOnce(&dyn MemoryMeter) -> R) -> R {
    if !INSTALLED.load(Ordering::Relaxed) {
        return f(&HostMeter);
    }
    let slot = ACTIVE.read().unwrap_or_else(|e| e.into_inner());
    match slot.as_deref() {
        Some(m) => f(m),
        None => f(&HostMeter),
    }
}
