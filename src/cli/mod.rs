//! Command-line front end: one file per command. Shared flags live here.

pub mod fit;
pub mod max_batch;
pub mod profile_memory;

use anyhow::Result;
use std::io::IsTerminal;

/// Checks `--device cpu|cuda:N` without opening it (flag errors before any work).
pub fn check_device(device: &str) -> Result<crate::device::DeviceSpec> {
    crate::device::DeviceSpec::parse(device)
}

/// Progress bars go to stderr, and only when it is a terminal and not silenced.
pub fn show_progress(quiet: bool) -> bool {
    !quiet && std::io::stderr().is_terminal()
}
