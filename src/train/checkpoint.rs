//! Checkpoints: everything needed to resume a run exactly, in one directory.
//!
//! * `weights.safetensors` — every parameter and buffer, by name;
//! * `optimizer.safetensors` — the optimizer state (`Optimizer::state_tensors`);
//! * `state.json` — [`CheckpointMeta`] (where in the data the run stopped), plus the size and
//!   a digest of the two tensor files it was written with.
//!
//! Each file is written to `<name>.tmp` in the same directory, flushed to disk and renamed
//! over the old one, and `state.json` goes last: a crash leaves at worst stale `.tmp` files
//! (ignored and overwritten) and never a `state.json` that points at half-written tensors.
//! When a checkpoint is overwritten in place, a crash between the renames can leave new
//! tensor files beside the old `state.json`; the recorded sizes and digests catch that
//! mix-up on load instead of resuming from inconsistent state.

use super::optim::Optimizer;
use crate::tape::{ParamId, ParamStore};
use anyhow::{bail, Context as _, Result};
use candle_core::{Device, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Read as _;
use std::path::{Path, PathBuf};

pub const WEIGHTS_FILE: &str = "weights.safetensors";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub const STATE_FILE: &str = "state.json";

/// Where a run stands, so a resumed run continues with the same batch, learning rate and
/// bias correction.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CheckpointMeta {
    /// Global training step (the schedule's input).
    pub step: u64,
    pub epoch: u64,
    /// Batches of `epoch` already consumed.
    pub batch_in_epoch: u64,
    /// `Optimizer::steps` at save time (AdamW's bias correction); `save` records the
    /// optimizer's own count.
    pub optimizer_steps: u64,
    pub best_metric: Option<f64>,
    /// Free-form data for the caller (run configuration, metrics, ...).
    #[serde(default)]
    pub extra: serde_json::Value,
}

/// The contents of `state.json`: the metadata's fields at top level (so the file reads as a
/// plain `CheckpointMeta`) plus the fingerprints of the tensor files.
#[derive(serde::Serialize, serde::Deserialize)]
struct StateFile {
    #[serde(flatten)]
    meta: CheckpointMeta,
    /// File name → fingerprint; absent in hand-written state files, which skips the check.
    #[serde(default)]
    files: BTreeMap<String, FileFingerprint>,
}

#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct FileFingerprint {
    bytes: u64,
    /// 64-bit non-cryptographic digest, hex: detects a file from another save, not tampering.
    digest: String,
}

const EXPECTED: &str = "a checkpoint directory holds weights.safetensors, optimizer.safetensors and state.json, as written by `checkpoint::save`";

/// Writes the checkpoint into `dir` (created if needed), atomically file by file with
/// `state.json` last. `meta.optimizer_steps` is replaced by `opt.steps()` so the two cannot
/// disagree.
pub fn save(dir: &Path, params: &ParamStore, opt: &Optimizer, meta: &CheckpointMeta) -> Result<()> {
    fs::create_dir_all(dir)
        .with_context(|| format!("cannot create checkpoint directory `{}`", dir.display()))?;

    let weights: HashMap<String, Tensor> = params
        .iter()
        .map(|(_, p)| (p.name.clone(), p.value.clone()))
        .collect();
    let mut files = BTreeMap::new();
    let fp = write_atomic(dir, WEIGHTS_FILE, |tmp| {
        Ok(candle_core::safetensors::save(&weights, tmp)?)
    })?;
    drop(weights);
    files.insert(WEIGHTS_FILE.to_string(), fp);

    let state: HashMap<String, Tensor> = opt.state_tensors(params).into_iter().collect();
    let fp = write_atomic(dir, OPTIMIZER_FILE, |tmp| {
        Ok(candle_core::safetensors::save(&state, tmp)?)
    })?;
    drop(state);
    files.insert(OPTIMIZER_FILE.to_string(), fp);
    // The tensor files' renames must be durable before state.json can name them.
    sync_dir(dir);

    let mut meta = meta.clone();
    meta.optimizer_steps = opt.steps();
    let json = serde_json::to_vec_pretty(&StateFile { meta, files })?;
    write_atomic(dir, STATE_FILE, |tmp| Ok(fs::write(tmp, &json)?))?;
    sync_dir(dir);
    Ok(())
}

/// Loads the checkpoint in `dir` into the existing `params` and `opt` and returns its
/// metadata. Every parameter and buffer of the store must be in `weights.safetensors` with
/// the same shape and dtype, and the file may hold nothing else. Nothing is modified unless
/// everything loads (tensors are moved to each parameter's device). Gradients are left as
/// they are. Leftover `.tmp` files are ignored.
pub fn load(dir: &Path, params: &mut ParamStore, opt: &mut Optimizer) -> Result<CheckpointMeta> {
    if !dir.exists() {
        bail!(
            "checkpoint directory `{}` does not exist ({EXPECTED})",
            dir.display()
        );
    }
    if !dir.is_dir() {
        bail!(
            "checkpoint path `{}` is not a directory ({EXPECTED})",
            dir.display()
        );
    }
    let state_path = dir.join(STATE_FILE);
    let text = read_required(&state_path)?;
    let state: StateFile = serde_json::from_slice(&text).with_context(|| {
        format!(
            "`{}` is not a valid checkpoint state file",
            state_path.display()
        )
    })?;

    let (weights_path, weights) = read_tensors(dir, WEIGHTS_FILE, &state.files)?;
    let new_values = match_weights(&weights_path, params, weights)?;

    let (opt_path, opt_tensors) = read_tensors(dir, OPTIMIZER_FILE, &state.files)?;
    opt.load_state(params, &opt_tensors, state.meta.optimizer_steps)
        .with_context(|| format!("cannot load optimizer state from `{}`", opt_path.display()))?;

    for (id, value) in new_values {
        params.set_value(id, value);
    }
    Ok(state.meta)
}

/// Pairs each store entry with its checkpointed tensor (on the entry's device), checking
/// names, shapes and dtypes; errors name the file and the parameter.
fn match_weights(
    path: &Path,
    params: &ParamStore,
    mut weights: HashMap<String, Tensor>,
) -> Result<Vec<(ParamId, Tensor)>> {
    let mut out = Vec::with_capacity(params.len());
    for (id, p) in params.iter() {
        let what = if p.trainable { "parameter" } else { "buffer" };
        let Some(t) = weights.remove(&p.name) else {
            bail!(
                "`{}` has no tensor for {what} `{}` (shape {:?}); was it written for a different model?",
                path.display(),
                p.name,
                p.value.dims()
            );
        };
        if t.dims() != p.value.dims() {
            bail!(
                "`{}`: {what} `{}` has shape {:?} in the checkpoint but {:?} in the model",
                path.display(),
                p.name,
                t.dims(),
                p.value.dims()
            );
        }
        if t.dtype() != p.value.dtype() {
            bail!(
                "`{}`: {what} `{}` is {:?} in the checkpoint but {:?} in the model",
                path.display(),
                p.name,
                t.dtype(),
                p.value.dtype()
            );
        }
        out.push((id, t.to_device(p.value.device())?));
    }
    if !weights.is_empty() {
        let mut extra: Vec<&String> = weights.keys().collect();
        extra.sort();
        let names: Vec<String> = extra.iter().map(|n| format!("`{n}`")).collect();
        bail!(
            "`{}` holds {} tensor(s) the model does not have: {}; was it written for a different model?",
            path.display(),
            names.len(),
            names.join(", ")
        );
    }
    Ok(out)
}

/// Reads a required checkpoint file, with an error that says what a checkpoint holds.
fn read_required(path: &Path) -> Result<Vec<u8>> {
    fs::read(path).with_context(|| format!("cannot read `{}` ({EXPECTED})", path.display()))
}

/// Reads one tensor file (onto the CPU) after checking it against the fingerprint that
/// `state.json` recorded for it.
fn read_tensors(
    dir: &Path,
    name: &str,
    files: &BTreeMap<String, FileFingerprint>,
) -> Result<(PathBuf, HashMap<String, Tensor>)> {
    let path = dir.join(name);
    let bytes = read_required(&path)?;
    if let Some(want) = files.get(name) {
        let got = fingerprint(&bytes);
        if &got != want {
            bail!(
                "`{}` does not match `{STATE_FILE}` ({} bytes, digest {}; expected {} bytes, digest {}): \
                 it belongs to a different save, probably one interrupted while overwriting this checkpoint",
                path.display(),
                got.bytes,
                got.digest,
                want.bytes,
                want.digest
            );
        }
    }
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
        .with_context(|| format!("`{}` is not a valid safetensors file", path.display()))?;
    Ok((path, tensors))
}

/// Writes `dir/name` through `dir/name.tmp`: `write` fills the temp file, which is then
/// flushed to disk, fingerprinted and renamed over the final name.
fn write_atomic(
    dir: &Path,
    name: &str,
    write: impl FnOnce(&Path) -> Result<()>,
) -> Result<FileFingerprint> {
    let tmp = dir.join(format!("{name}.tmp"));
    let dst = dir.join(name);
    write(&tmp).with_context(|| format!("cannot write `{}`", tmp.display()))?;
    let fp = fingerprint_and_sync(&tmp)
        .with_context(|| format!("cannot flush `{}` to disk", tmp.display()))?;
    fs::rename(&tmp, &dst)
        .with_context(|| format!("cannot rename `{}` to `{}`", tmp.display(), dst.display()))?;
    Ok(fp)
}

/// Streams the file through the digest (so a large checkpoint is never held in memory twice)
/// and fsyncs it.
fn fingerprint_and_sync(path: &Path) -> Result<FileFingerprint> {
    let mut f = fs::OpenOptions::new().read(true).write(true).open(path)?;
    let mut digest = Digest::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        digest.update(&buf[..n]);
    }
    f.sync_all()?;
    Ok(digest.finish())
}

fn fingerprint(bytes: &[u8]) -> FileFingerprint {
    let mut d = Digest::new();
    d.update(bytes);
    d.finish()
}

/// Makes renames in `dir` durable. Best effort: some platforms and file systems cannot fsync
/// a directory, and the data files themselves were already synced.
fn sync_dir(dir: &Path) {
    #[cfg(unix)]
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    #[cfg(not(unix))]
    let _ = dir;
}

/// A 64-bit multiply-rotate digest over little-endian words, fed incrementally (chunk
/// boundaries do not change the result). Word-at-a-time keeps it well ahead of the disk; it
/// only has to tell two saves apart, not resist tampering.
struct Digest {
    h: u64,
    n: u64,
    tail: [u8; 8],
    tail_len: usize,
}

impl Digest {
    const K: u64 = 0x9e37_79b9_7f4a_7c15;

    fn new() -> Self {
        Self {
            h: 0xcbf2_9ce4_8422_2325,
            n: 0,
            tail: [0; 8],
            tail_len: 0,
        }
    }

    fn mix(h: u64, w: u64) -> u64 {
        (h ^ w).wrapping_mul(Self::K).rotate_left(29)
    }

    fn update(&mut self, mut bytes: &[u8]) {
        self.n += bytes.len() as u64;
        if self.tail_len > 0 {
            let take = (8 - self.tail_len).min(bytes.len());
            self.tail[self.tail_len..self.tail_len + take].copy_from_slice(&bytes[..take]);
            self.tail_len += take;
            bytes = &bytes[take..];
            if self.tail_len < 8 {
                return;
            }
            self.h = Self::mix(self.h, u64::from_le_bytes(self.tail));
            self.tail_len = 0;
        }
        let mut words = bytes.chunks_exact(8);
        let mut h = self.h;
        for w in &mut words {
            let mut a = [0u8; 8];
            a.copy_from_slice(w);
            h = Self::mix(h, u64::from_le_bytes(a));
        }
        self.h = h;
        let rest = words.remainder();
        self.tail[..rest.len()].copy_from_slice(rest);
        self.tail_len = rest.len();
    }

    fn finish(&self) -> FileFingerprint {
        let mut last = [0u8; 8];
        last[..self.tail_len].copy_from_slice(&self.tail[..self.tail_len]);
        let h = Self::mix(Self::mix(self.h, u64::from_le_bytes(last)), self.n);
        FileFingerprint {
            bytes: self.n,
            digest: format!("{h:016x}"),
        }
    }
}
