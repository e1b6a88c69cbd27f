//! Models as data: definitions in TOML (`models/*.toml`, embedded as presets; any path works
//! too), built into parameters plus a forward pass over the tape.

pub mod build;
pub mod def;

pub use build::{InputSpec, Model};
pub use def::{LayerDef, LayerOp, ModelDef, Width};

use anyhow::{bail, Context as _, Result};
use candle_core::{Device, Tensor};
use std::path::Path;

/// The presets shipped in `models/`, embedded so `--model NAME` needs no file on disk.
pub const PRESETS: &[(&str, &str)] = &[
    ("mlp", include_str!("../../models/mlp.toml")),
    ("cnn", include_str!("../../models/cnn.toml")),
    (
        "resnet18-cifar",
        include_str!("../../models/resnet18-cifar.toml"),
    ),
    ("resnet18", include_str!("../../models/resnet18.toml")),
    (
        "resnet50-cifar",
        include_str!("../../models/resnet50-cifar.toml"),
    ),
    ("resnet50", include_str!("../../models/resnet50.toml")),
    ("vit-tiny", include_str!("../../models/vit-tiny.toml")),
    ("gpt-char", include_str!("../../models/gpt-char.toml")),
    ("gcn", include_str!("../../models/gcn.toml")),
];

pub fn preset_names() -> Vec<&'static str> {
    PRESETS.iter().map(|(n, _)| *n).collect()
}

/// `--model`: a preset name, or a path to a definition file.
pub fn load_def(spec: &str) -> Result<ModelDef> {
    if let Some((name, text)) = PRESETS.iter().find(|(n, _)| *n == spec) {
        return ModelDef::parse(text, &format!("preset `{name}`"));
    }
    let path = Path::new(spec);
    if path.exists() {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading model definition {}", path.display()))?;
        return ModelDef::parse(&text, &path.display().to_string());
    }
    bail!(
        "--model `{spec}`: neither a preset ({}) nor an existing file",
        preset_names().join(", ")
    )
}

/// A worst-case batch for a model's input (max-batch probes, profile-memory, benchmarks):
/// random values of the full sample shape (or random token ids), random labels, on the
/// compute device ([`crate::device::current`]). Deterministic from `seed`.
pub fn random_batch(input: &InputSpec, batch: usize, seed: u64) -> Result<(Tensor, Tensor)> {
    let mut rng = crate::data::rng::Rng::new(crate::data::rng::mix(seed, 0x6D61_7862));
    let mut shape = vec![batch];
    shape.extend_from_slice(&input.sample_shape);
    let n: usize = shape.iter().product();
    let x = if input.tokens {
        let vocab = input.vocab.unwrap_or(input.num_outputs).max(1);
        let v: Vec<u32> = (0..n).map(|_| rng.below(vocab) as u32).collect();
        Tensor::from_vec(v, shape.as_slice(), &Device::Cpu)?
    } else {
        let v: Vec<f32> = (0..n).map(|_| rng.normal()).collect();
        Tensor::from_vec(v, shape.as_slice(), &Device::Cpu)?
    };
    let classes = input.num_outputs.max(1);
    let y = if input.tokens {
        let v: Vec<u32> = (0..n).map(|_| rng.below(classes) as u32).collect();
        Tensor::from_vec(v, shape.as_slice(), &Device::Cpu)?
    } else {
        let v: Vec<u32> = (0..batch).map(|_| rng.below(classes) as u32).collect();
        Tensor::from_vec(v, batch, &Device::Cpu)?
    };
    Ok((
        crate::device::to_current(&x)?,
        crate::device::to_current(&y)?,
    ))
}
