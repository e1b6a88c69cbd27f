//! What the model benchmarks share: `--flag value` arguments and the model, input shape and
//! random batch they name.

use actrain::model::{load_def, random_batch, InputSpec, ModelDef};
use anyhow::{anyhow, Result};
use candle_core::Tensor;

/// The value after `name` on the command line, or `default`.
pub fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| default.to_string())
}

/// A preset (`--model`, default resnet18-cifar), its input (`--shape`, default 3x32x32; with
/// `--vocab N`, token ids below N predicted per position, e.g. `--shape 64 --vocab 65` for
/// gpt-char) and a random batch of `--batch` samples.
pub struct Setup {
    pub model_name: String,
    pub def: ModelDef,
    pub spec: InputSpec,
    pub batch: usize,
    pub x: Tensor,
    pub y: Tensor,
}

pub fn setup(default_batch: &str) -> Result<Setup> {
    let model_name = arg("--model", "resnet18-cifar");
    let batch: usize = arg("--batch", default_batch)
        .parse()
        .map_err(|e| anyhow!("--batch: {e}"))?;
    let sample_shape: Vec<usize> = arg("--shape", "3x32x32")
        .split('x')
        .map(|s| s.parse())
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow!("--shape: expected e.g. 3x32x32 ({e})"))?;
    let vocab: Option<usize> = match arg("--vocab", "") {
        v if v.is_empty() => None,
        v => Some(
            v.parse()
                .map_err(|e| anyhow!("--vocab {v}: expected a number of tokens ({e})"))?,
        ),
    };
    let spec = InputSpec {
        sample_shape,
        tokens: vocab.is_some(),
        vocab,
        num_outputs: vocab.unwrap_or(10),
        graph: false,
    };
    let def = load_def(&model_name)?;
    let (x, y) = random_batch(&spec, batch, 1)?;
    Ok(Setup {
        model_name,
        def,
        spec,
        batch,
        x,
        y,
    })
}
