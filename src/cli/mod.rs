//! Command-line front end: one file per command. Shared flags live here.

pub mod fit;
pub mod max_batch;
pub mod profile_memory;

use anyhow::{bail, Result};
use std::io::IsTerminal;

/// `--device cpu|cuda:N`. Only the CPU exists in a build without the `cuda` feature.
pub fn check_device(device: &str) -> Result<()> {
    match device {
        "cpu" => Ok(()),
        d if d.starts_with("cuda") => {
            let idx = d.strip_prefix("cuda").unwrap_or("");
            let idx = idx.strip_prefix(':').unwrap_or(idx);
            if !idx.is_empty() && idx.parse::<usize>().is_err() {
                bail!("--device `{d}`: expected cpu or cuda:N");
            }
            if cfg!(feature = "cuda") {
                bail!(
                    "--device {d}: this build has the CUDA quantizer kernels, but training on a \
                     GPU is not wired into the trainer yet; use --device cpu"
                )
            }
            bail!(
                "--device {d}: this actrain binary was built without CUDA support; \
                 rebuild with `bash scripts/build-cuda.sh` (see README, GPU section)"
            )
        }
        other => bail!("--device `{other}`: expected cpu or cuda:N"),
    }
}

/// Progress bars go to stderr, and only when it is a terminal and not silenced.
pub fn show_progress(quiet: bool) -> bool {
    !quiet && std::io::stderr().is_terminal()
}
