//! The GPU's [`MemoryMeter`] (feature `cuda`): candle allocates every tensor with
//! `cuMemAllocAsync` from the device's default stream-ordered memory pool, so the pool's
//! `USED_MEM_CURRENT` / `USED_MEM_HIGH` attributes are exactly the bytes our tensors hold
//! (PyTorch's `memory_allocated` / `max_memory_allocated`), and `RESERVED_MEM_*` what the pool
//! took from the driver. Out-of-memory arrives from the driver as a typed
//! `CUDA_ERROR_OUT_OF_MEMORY` ([`is_cuda_oom`]); [`trim`] hands cached blocks back between
//! max-batch probes so one probe's cache cannot starve the next.

use super::meter::MemoryMeter;
use anyhow::{Context as _, Result};
use candle_core::cuda_backend::cudarc::driver::{result, sys, CudaContext, DriverError};
use candle_core::CudaDevice;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// The default memory pool of one CUDA device.
pub struct CudaMeter {
    ctx: Arc<CudaContext>,
    pool: sys::CUmemoryPool,
    ordinal: usize,
    budget: AtomicUsize,
}

// SAFETY: a CUmemoryPool handle is a process-wide driver object; the driver API is
// thread-safe and every call here binds the context first.
unsafe impl Send for CudaMeter {}
unsafe impl Sync for CudaMeter {}

const NO_BUDGET: usize = usize::MAX;

impl CudaMeter {
    pub fn new(dev: &CudaDevice) -> Result<Self> {
        let stream = dev.cuda_stream();
        let ctx = stream.context().clone();
        ctx.bind_to_thread().context("binding the CUDA context")?;
        // SAFETY: the device handle comes from a live context.
        let pool = unsafe { result::device::get_default_mem_pool(ctx.cu_device()) }
            .context("reading the device's default memory pool")?;
        let meter = Self {
            ordinal: ctx.ordinal(),
            ctx,
            pool,
            budget: AtomicUsize::new(NO_BUDGET),
        };
        // Keep freed blocks cached in the pool (like PyTorch's caching allocator) instead of
        // returning them to the driver at every synchronisation: allocation stays cheap, and
        // `USED_*` still counts only live tensors.
        meter.set_attr(
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            u64::MAX,
        )?;
        Ok(meter)
    }

    fn attr(&self, a: sys::CUmemPool_attribute) -> std::result::Result<u64, DriverError> {
        self.ctx.bind_to_thread()?;
        let mut v = 0u64;
        // SAFETY: the four attributes used here are cuuint64_t.
        unsafe { result::mem_pool::get_attribute(self.pool, a, (&mut v as *mut u64).cast()) }?;
        Ok(v)
    }

    fn set_attr(&self, a: sys::CUmemPool_attribute, mut v: u64) -> Result<()> {
        self.ctx.bind_to_thread()?;
        // SAFETY: as in `attr`.
        unsafe { result::mem_pool::set_attribute(self.pool, a, (&mut v as *mut u64).cast()) }
            .with_context(|| format!("setting {a:?} on the CUDA memory pool"))?;
        Ok(())
    }

    /// Bytes the pool holds from the driver (live tensors plus its cache).
    pub fn reserved_bytes(&self) -> usize {
        self.attr(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT)
            .unwrap_or(0) as usize
    }

    /// Returns the pool's cached, unused blocks to the driver.
    pub fn trim(&self) -> Result<()> {
        self.ctx.bind_to_thread()?;
        self.ctx.synchronize()?;
        // SAFETY: valid pool; keeps the live allocations.
        unsafe { result::mem_pool::trim_to(self.pool, 0) }.context("trimming the CUDA pool")?;
        Ok(())
    }

    /// `(free, total)` device memory as the driver reports it.
    pub fn device_free_total(&self) -> Result<(usize, usize)> {
        self.ctx.bind_to_thread()?;
        Ok(self.ctx.mem_get_info()?)
    }
}

impl MemoryMeter for CudaMeter {
    fn describe(&self) -> String {
        format!("cuda:{} memory pool (live tensor bytes)", self.ordinal)
    }
    fn current_bytes(&self) -> usize {
        self.attr(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT)
            .unwrap_or(0) as usize
    }
    fn peak_bytes(&self) -> usize {
        self.attr(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH)
            .unwrap_or(0) as usize
    }
    fn reset_peak(&self) {
        // Setting the high-water mark to 0 resets it to the current level.
        let _ = self.set_attr(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH, 0);
    }
    fn set_budget(&self, bytes: Option<usize>) {
        self.budget
            .store(bytes.unwrap_or(NO_BUDGET), Ordering::SeqCst);
    }
    fn budget(&self) -> Option<usize> {
        let b = self.budget.load(Ordering::SeqCst);
        (b != NO_BUDGET).then_some(b)
    }
    fn capacity_bytes(&self) -> Option<usize> {
        self.device_free_total().ok().map(|(_, total)| total)
    }
    fn available_bytes(&self) -> Option<usize> {
        // What this process could still take: free driver memory, plus what the pool caches.
        let (free, _) = self.device_free_total().ok()?;
        Some(free + self.reserved_bytes().saturating_sub(self.current_bytes()))
    }
    fn trim_cache(&self) {
        let _ = self.trim();
    }
}

/// Whether a candle error is the driver's `CUDA_ERROR_OUT_OF_MEMORY` (through candle's
/// context and backtrace wrappers).
pub fn is_cuda_oom(e: &candle_core::Error) -> bool {
    use candle_core::cuda_backend::CudaError;
    match e {
        candle_core::Error::Cuda(inner) => {
            let driver = match inner.downcast_ref::<CudaError>() {
                Some(CudaError::Cuda(d)) | Some(CudaError::Load { cuda: d, .. }) => Some(d),
                _ => inner.downcast_ref::<DriverError>(),
            };
            driver.is_some_and(|d| d.0 == sys::cudaError_enum::CUDA_ERROR_OUT_OF_MEMORY)
        }
        candle_core::Error::WithBacktrace { inner, .. }
        | candle_core::Error::Context { inner, .. }
        | candle_core::Error::WithPath { inner, .. } => is_cuda_oom(inner),
        _ => false,
    }
}
