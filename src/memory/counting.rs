//! A counting global allocator: the CPU analogue of `torch.cuda.max_memory_allocated`.
//!
//! Every heap allocation of the process goes through it, so live and peak bytes are measured,
//! never estimated. A budget (`--memory`) does not make allocations fail — Rust would abort —
//! it raises a flag that the tape checks at the next op, which then returns a typed
//! out-of-memory error and unwinds normally, freeing what the step allocated.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

pub struct CountingAlloc;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
/// 0 = no budget.
static BUDGET: AtomicUsize = AtomicUsize::new(0);

#[inline]
fn on_alloc(size: usize) {
    let now = CURRENT.fetch_add(size, Relaxed) + size;
    PEAK.fetch_max(now, Relaxed);
}

unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            on_alloc(layout.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            on_alloc(layout.size());
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        CURRENT.fetch_sub(layout.size(), Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size >= layout.size() {
                on_alloc(new_size - layout.size());
            } else {
                CURRENT.fetch_sub(layout.size() - new_size, Relaxed);
            }
        }
        p
    }
}

/// Bytes currently allocated by the whole process.
pub fn current_bytes() -> usize {
    CURRENT.load(Relaxed)
}

/// Highest `current_bytes` since the last [`reset_peak`].
pub fn peak_bytes() -> usize {
    PEAK.load(Relaxed)
}

/// Starts a new peak window at the current level.
pub fn reset_peak() {
    PEAK.store(CURRENT.load(Relaxed), Relaxed);
}

/// Sets (Some) or clears (None) the budget in bytes of live heap memory.
pub fn set_budget(bytes: Option<usize>) {
    BUDGET.store(bytes.unwrap_or(0), Relaxed);
}

pub fn budget() -> Option<usize> {
    match BUDGET.load(Relaxed) {
        0 => None,
        b => Some(b),
    }
}

/// True when the peak since the last reset passed the budget. Peak, not current: a temporary
/// that came and went inside one candle op still did not fit.
pub fn over_budget() -> Option<(usize, usize)> {
    let b = BUDGET.load(Relaxed);
    let peak = PEAK.load(Relaxed);
    (b != 0 && peak > b).then_some((peak, b))
}
