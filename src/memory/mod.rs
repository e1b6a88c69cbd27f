//! Memory accounting: a counting allocator (live and peak bytes) and a budget that turns
//! "would not fit" into a typed error instead of an abort.

pub mod counting;
pub mod profile;

pub use counting::{current_bytes, peak_bytes, reset_peak, set_budget, CountingAlloc};

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
    match counting::over_budget() {
        Some((needed, budget)) => Err(OutOfMemory { needed, budget }),
        None => Ok(()),
    }
}

/// Is this error (anywhere in its chain) an out-of-memory?
pub fn is_oom(err: &anyhow::Error) -> bool {
    err.chain()
        .any(|e| e.downcast_ref::<OutOfMemory>().is_some())
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
}
