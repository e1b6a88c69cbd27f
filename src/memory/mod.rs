//! Memory accounting: a counting allocator (live and peak bytes) and a budget that turns
//! "would not fit" into a typed error instead of an abort.

pub mod counting;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod meter;
pub mod profile;

pub use counting::CountingAlloc;
pub use meter::{install, with_meter, HostMeter, MemoryMeter};

/// Bytes live now on the active meter's device (the host heap unless a device meter is
/// installed).
pub fn current_bytes() -> usize {
    with_meter(|m| m.current_bytes())
}

/// Highest [`current_bytes`] since the last [`reset_peak`].
pub fn peak_bytes() -> usize {
    with_meter(|m| m.peak_bytes())
}

/// Starts a new peak window at the current level.
pub fn reset_peak() {
    with_meter(|m| m.reset_peak())
}

/// Sets (Some) or clears (None) the budget in live bytes.
pub fn set_budget(bytes: Option<usize>) {
    with_meter(|m| m.set_budget(bytes))
}

/// What the figures measure ("host heap (counting allocator)").
pub fn describe() -> String {
    with_meter(|m| m.describe())
}

/// The process allocator: counting every byte is what makes memory figures measurements.
#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

/// The running step used more memory than the budget allows. Callers (max-batch) tell this
/// apart from every other failure with `err.downcast_ref::<OutOfMemory>()`.
#[derive(Debug, Clone, thiserror::Error)]
#[error("out of memory: {needed} bytes in use, budget is {budget} bytes")]
pub struct OutOfMemory {
    pub needed: usize,
    pub budget: usize,
}

/// Returns [`OutOfMemory`] when the budget has been passed; the tape calls it at every op.
pub fn check_budget() -> Result<(), OutOfMemory> {
    match with_meter(|m| m.over_budget()) {
        Some((needed, budget)) => Err(OutOfMemory { needed, budget }),
        None => Ok(()),
    }
}

/// Is this error (anywhere in its chain) an out-of-memory? Our budget's [`OutOfMemory`], or
/// (CUDA builds) the driver's typed `CUDA_ERROR_OUT_OF_MEMORY` as candle or our compression
/// kernels report it, so a real device running out is an outcome for max-batch like the
/// budget is.
pub fn is_oom(err: &anyhow::Error) -> bool {
    err.chain().any(|e| {
        if e.downcast_ref::<OutOfMemory>().is_some() {
            return true;
        }
        #[cfg(feature = "cuda")]
        {
            if let Some(c) = e.downcast_ref::<candle_core::Error>() {
                return cuda::is_cuda_oom(c);
            }
            if let Some(crate::compress::cuda::CudaCompressError::Candle(c)) = e.downcast_ref() {
                return cuda::is_cuda_oom(c);
            }
        }
        false
    })
}

/// The device's total memory (a GPU's; `None` on the host, where `--memory` defines it).
pub fn capacity_bytes() -> Option<usize> {
    with_meter(|m| m.capacity_bytes())
}

/// Bytes the process could still allocate on the device (a GPU's; `None` on the host).
pub fn available_bytes() -> Option<usize> {
    with_meter(|m| m.available_bytes())
}

/// Hands the device pool's cached, unused blocks back (no-op on the host).
pub fn trim_cache() {
    with_meter(|m| m.trim_cache())
}

/// "1.5 GiB"-style formatting for reports.
pub fn human_bytes(b: usize) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

/// Parses "2GiB", "512MiB", "1.5G", "1000000" (bytes) — the `--memory` flag.
pub fn parse_bytes(s: &str) -> anyhow::Result<usize> {
    let t = s.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.trim().parse().map_err(|_| {
        anyhow::anyhow!("`{s}` is not a memory size (expected e.g. 2GiB, 512MiB, 1.5G)")
    })?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" | "kib" => 1024.0,
        "m" | "mb" | "mib" => 1024.0 * 1024.0,
        "g" | "gb" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "t" | "tb" | "tib" => 1024.0f64.powi(4),
        other => anyhow::bail!("`{s}`: unknown memory unit `{other}` (use B, KiB, MiB, GiB)"),
    };
    if !(n.is_finite() && n > 0.0) {
        anyhow::bail!("`{s}`: a memory size must be positive");
    }
    Ok((n * mult) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn parses_sizes() {
        assert_eq!(parse_bytes("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_bytes("512 MiB").unwrap(), 512 << 20);
        assert_eq!(parse_bytes("1000").unwrap(), 1000);
        assert!(parse_bytes("abc").is_err());
        assert!(parse_bytes("2XB")
            .unwrap_err()
            .to_string()
            .contains("unknown memory unit"));
        assert!(parse_bytes("-1G").is_err());
    }

    #[test]
    fn out_of_memory_is_recognised_by_type_not_by_message() {
        // The driver's OOM is matched by its type (tests/cuda_train.rs checks it on a GPU); a
        // message that merely mentions it is not an OOM.
        let e = anyhow::anyhow!("DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")")
            .context("conv2d forward");
        assert!(!is_oom(&e));
        assert!(!is_oom(&anyhow::anyhow!("shape mismatch")));
        let ours = anyhow::Error::new(OutOfMemory {
            needed: 2,
            budget: 1,
        });
        assert!(is_oom(&ours.context("step 3")));
    }
}
