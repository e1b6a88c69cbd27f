//! The model-definition format: a TOML file with a `[[layer]]` array; each layer has a
//! `name`, an `op`, op fields, and optionally `inputs` (default: the previous layer; the
//! model input is called `input`). Every error names the file, the layer and the field.
//!
//! ```toml
//! name = "cnn"
//! [[layer]]
//! name = "conv1"
//! op = "conv2d"
//! out = 16
//! kernel = 3
//! padding = 1
//! ```

use crate::ops::activation::GeluApprox;
use anyhow::{anyhow, bail, Result};
use std::collections::HashSet;
use toml::{Table, Value as Toml};

/// One layer as written in the file.
#[derive(Clone, Debug)]
pub struct LayerDef {
    pub name: String,
    /// Names of the layers feeding this one (`input` is the model input).
    pub inputs: Vec<String>,
    pub op: LayerOp,
}

/// Every layer kind a definition can use, with its fields.
#[derive(Clone, Debug, PartialEq)]
pub enum LayerOp {
    Linear {
        out: Width,
        bias: bool,
    },
    Conv2d {
        out: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        dilation: usize,
        groups: usize,
        bias: bool,
    },
    BatchNorm {
        momentum: f64,
        eps: f64,
    },
    LayerNorm {
        eps: f64,
    },
    RmsNorm {
        eps: f64,
    },
    Relu,
    LeakyRelu {
        slope: f64,
    },
    Gelu {
        approx: GeluApprox,
    },
    Silu,
    Sigmoid,
    Tanh,
    Dropout {
        p: f64,
    },
    MaxPool {
        kernel: usize,
        stride: usize,
        padding: usize,
    },
    AvgPool {
        kernel: usize,
        stride: usize,
        padding: usize,
    },
    GlobalAvgPool,
    Flatten,
    Add,
    Concat {
        dim: usize,
    },
    /// Token ids `[T]` -> `[T, dim]`; the vocabulary size comes from the data unless given.
    Embedding {
        dim: usize,
        vocab: Option<usize>,
    },
    /// Adds a learned position embedding to `[T, D]` (up to `max_len` positions).
    PosEmbedding {
        max_len: usize,
    },
    /// `[C, H, W]` -> `[H*W, C]`: an image feature map as a token sequence (ViT patches).
    Tokens,
    /// `[T, D]` -> `[D]`: mean over tokens (classification head of a ViT).
    MeanTokens,
    /// Multi-head self-attention with its own projections.
    Attention {
        heads: usize,
        causal: bool,
    },
    /// Pre-norm transformer block: `x + attn(ln(x))`, then `x + mlp(ln(x))` with GELU.
    TransformerBlock {
        heads: usize,
        mlp_ratio: usize,
        causal: bool,
        dropout: f64,
    },
    /// ResNet block (basic: two 3x3 convs; bottleneck: 1x1-3x3-1x1 with 4x expansion), with
    /// batch norm and a projection shortcut when the shape changes.
    ResidualBlock {
        out: usize,
        stride: usize,
        bottleneck: bool,
    },
    /// Graph convolution `Â X W + b` over the dataset's normalised adjacency.
    Gcn {
        out: Width,
        bias: bool,
    },
}

/// An output width: a number, or `"classes"` — the data's class count (vocabulary size for a
/// language model), so one definition serves several datasets.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Width {
    Fixed(usize),
    Classes,
}

impl Width {
    pub fn resolve(self, classes: usize) -> usize {
        match self {
            Width::Fixed(n) => n,
            Width::Classes => classes,
        }
    }
}

/// A parsed definition.
#[derive(Clone, Debug)]
pub struct ModelDef {
    pub name: String,
    /// Where it came from (a path, or `preset:NAME`): every error message starts with it.
    pub source: String,
    pub layers: Vec<LayerDef>,
}

/// Reads typed fields of one layer table and remembers which were used, so a misspelt
/// field is reported instead of silently ignored.
struct Fields<'a> {
    source: &'a str,
    layer: &'a str,
    table: &'a Table,
    used: HashSet<&'static str>,
}

impl<'a> Fields<'a> {
    fn err(&self, field: &str, msg: impl std::fmt::Display) -> anyhow::Error {
        anyhow!(
            "{}: layer `{}`, field `{field}`: {msg}",
            self.source,
            self.layer
        )
    }
    fn get(&mut self, key: &'static str) -> Option<&'a Toml> {
        self.used.insert(key);
        self.table.get(key)
    }
    fn usize_opt(&mut self, key: &'static str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(Toml::Integer(i)) if *i >= 0 => Ok(Some(*i as usize)),
            Some(v) => Err(self.err(key, format!("expected a non-negative integer, got {v}"))),
        }
    }
    fn usize(&mut self, key: &'static str) -> Result<usize> {
        self.usize_opt(key)?
            .ok_or_else(|| self.err(key, "missing (required for this op)"))
    }
    fn positive(&mut self, key: &'static str) -> Result<usize> {
        let v = self.usize(key)?;
        if v == 0 {
            return Err(self.err(key, "must be at least 1"));
        }
        Ok(v)
    }
    fn positive_or(&mut self, key: &'static str, default: usize) -> Result<usize> {
        let v = self.usize_opt(key)?.unwrap_or(default);
        if v == 0 {
            return Err(self.err(key, "must be at least 1"));
        }
        Ok(v)
    }
    fn f64_or(&mut self, key: &'static str, default: f64) -> Result<f64> {
        match self.get(key) {
            None => Ok(default),
            Some(Toml::Float(f)) => Ok(*f),
            Some(Toml::Integer(i)) => Ok(*i as f64),
            Some(v) => Err(self.err(key, format!("expected a number, got {v}"))),
        }
    }
    fn bool_or(&mut self, key: &'static str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(Toml::Boolean(b)) => Ok(*b),
            Some(v) => Err(self.err(key, format!("expected true or false, got {v}"))),
        }
    }
    fn str_opt(&mut self, key: &'static str) -> Result<Option<&'a str>> {
        match self.get(key) {
            None => Ok(None),
            Some(Toml::String(s)) => Ok(Some(s.as_str())),
            Some(v) => Err(self.err(key, format!("expected a string, got {v}"))),
        }
    }
    fn width(&mut self, key: &'static str) -> Result<Width> {
        match self.get(key) {
            Some(Toml::String(s)) if s == "classes" => Ok(Width::Classes),
            Some(Toml::Integer(i)) if *i > 0 => Ok(Width::Fixed(*i as usize)),
            None => Err(self.err(key, "missing (required for this op)")),
            Some(v) => Err(self.err(
                key,
                format!("expected a positive integer or \"classes\", got {v}"),
            )),
        }
    }
    fn prob(&mut self, key: &'static str, default: f64) -> Result<f64> {
        let p = self.f64_or(key, default)?;
        if !(0.0..1.0).contains(&p) {
            return Err(self.err(key, format!("{p} is not a probability in [0, 1)")));
        }
        Ok(p)
    }
    fn positive_f64(&mut self, key: &'static str, default: f64) -> Result<f64> {
        let v = self.f64_or(key, default)?;
        if !(v > 0.0 && v.is_finite()) {
            return Err(self.err(key, format!("{v} must be a positive number")));
        }
        Ok(v)
    }
    fn finish(&self) -> Result<()> {
        for key in self.table.keys() {
            if !self.used.contains(key.as_str())
                && !["name", "op", "inputs"].contains(&key.as_str())
            {
                return Err(self.err(key, "unknown field for this op (misspelt?)"));
            }
        }
        Ok(())
    }
}

const OPS: &str =
    "linear, conv2d, batch_norm, layer_norm, rms_norm, relu, leaky_relu, gelu, silu, \
sigmoid, tanh, dropout, max_pool, avg_pool, global_avg_pool, flatten, add, concat, embedding, \
pos_embedding, tokens, mean_tokens, attention, transformer_block, residual_block, gcn";

fn parse_op(op: &str, f: &mut Fields) -> Result<LayerOp> {
    Ok(match op {
        "linear" => LayerOp::Linear {
            out: f.width("out")?,
            bias: f.bool_or("bias", true)?,
        },
        "conv2d" => {
            let out = f.positive("out")?;
            let kernel = f.positive("kernel")?;
            let op = LayerOp::Conv2d {
                out,
                kernel,
                stride: f.positive_or("stride", 1)?,
                padding: f.usize_opt("padding")?.unwrap_or(0),
                dilation: f.positive_or("dilation", 1)?,
                groups: f.positive_or("groups", 1)?,
                bias: f.bool_or("bias", true)?,
            };
            if let LayerOp::Conv2d { groups, .. } = op {
                if out % groups != 0 {
                    return Err(f.err(
                        "groups",
                        format!("out = {out} is not divisible by groups = {groups}"),
                    ));
                }
            }
            op
        }
        "batch_norm" => LayerOp::BatchNorm {
            momentum: f.prob("momentum", 0.1)?,
            eps: f.positive_f64("eps", 1e-5)?,
        },
        "layer_norm" => LayerOp::LayerNorm {
            eps: f.positive_f64("eps", 1e-5)?,
        },
        "rms_norm" => LayerOp::RmsNorm {
            eps: f.positive_f64("eps", 1e-6)?,
        },
        "relu" => LayerOp::Relu,
        "leaky_relu" => LayerOp::LeakyRelu {
            slope: f.f64_or("slope", 0.01)?,
        },
        "gelu" => LayerOp::Gelu {
            approx: match f.str_opt("approx")?.unwrap_or("tanh") {
                "tanh" => GeluApprox::Tanh,
                "erf" => GeluApprox::Erf,
                other => {
                    return Err(f.err("approx", format!("`{other}`: expected \"tanh\" or \"erf\"")))
                }
            },
        },
        "silu" => LayerOp::Silu,
        "sigmoid" => LayerOp::Sigmoid,
        "tanh" => LayerOp::Tanh,
        "dropout" => LayerOp::Dropout {
            p: f.prob("p", 0.1)?,
        },
        "max_pool" | "avg_pool" => {
            let kernel = f.positive("kernel")?;
            let stride = f.positive_or("stride", kernel)?;
            let padding = f.usize_opt("padding")?.unwrap_or(0);
            if padding * 2 > kernel {
                return Err(f.err(
                    "padding",
                    format!("{padding} is more than half the kernel ({kernel})"),
                ));
            }
            if op == "max_pool" {
                LayerOp::MaxPool {
                    kernel,
                    stride,
                    padding,
                }
            } else {
                LayerOp::AvgPool {
                    kernel,
                    stride,
                    padding,
                }
            }
        }
        "global_avg_pool" => LayerOp::GlobalAvgPool,
        "flatten" => LayerOp::Flatten,
        "add" => LayerOp::Add,
        "concat" => LayerOp::Concat {
            dim: f.usize_opt("dim")?.unwrap_or(0),
        },
        "embedding" => LayerOp::Embedding {
            dim: f.positive("dim")?,
            vocab: f.usize_opt("vocab")?,
        },
        "pos_embedding" => LayerOp::PosEmbedding {
            max_len: f.positive("max_len")?,
        },
        "tokens" => LayerOp::Tokens,
        "mean_tokens" => LayerOp::MeanTokens,
        "attention" => LayerOp::Attention {
            heads: f.positive("heads")?,
            causal: f.bool_or("causal", false)?,
        },
        "transformer_block" => LayerOp::TransformerBlock {
            heads: f.positive("heads")?,
            mlp_ratio: f.positive_or("mlp_ratio", 4)?,
            causal: f.bool_or("causal", false)?,
            dropout: f.prob("dropout", 0.0)?,
        },
        "residual_block" => {
            let bottleneck = match f.str_opt("kind")?.unwrap_or("basic") {
                "basic" => false,
                "bottleneck" => true,
                other => {
                    return Err(f.err(
                        "kind",
                        format!("`{other}`: expected \"basic\" or \"bottleneck\""),
                    ))
                }
            };
            LayerOp::ResidualBlock {
                out: f.positive("out")?,
                stride: f.positive_or("stride", 1)?,
                bottleneck,
            }
        }
        "gcn" => LayerOp::Gcn {
            out: f.width("out")?,
            bias: f.bool_or("bias", true)?,
        },
        other => return Err(f.err("op", format!("unknown op `{other}` (known: {OPS})"))),
    })
}

impl ModelDef {
    /// Parses a definition; `source` names it in errors (a path or `preset:NAME`).
    pub fn parse(text: &str, source: &str) -> Result<ModelDef> {
        let doc: Table = text
            .parse()
            .map_err(|e| anyhow!("{source}: not valid TOML: {e}"))?;
        for key in doc.keys() {
            if !["name", "description", "layer"].contains(&key.as_str()) {
                bail!("{source}: unknown top-level field `{key}` (expected name, description, [[layer]])");
            }
        }
        let name = match doc.get("name") {
            Some(Toml::String(s)) => s.clone(),
            None => source.to_string(),
            Some(v) => bail!("{source}: field `name`: expected a string, got {v}"),
        };
        let layers = match doc.get("layer") {
            Some(Toml::Array(a)) if !a.is_empty() => a,
            Some(Toml::Array(_)) | None => bail!("{source}: no layers (add [[layer]] tables)"),
            Some(v) => bail!("{source}: `layer` must be an array of tables ([[layer]]), got {v}"),
        };
        let mut seen: HashSet<String> = HashSet::new();
        seen.insert("input".into());
        let mut out = Vec::with_capacity(layers.len());
        let mut prev = "input".to_string();
        for (i, l) in layers.iter().enumerate() {
            let Toml::Table(t) = l else {
                bail!("{source}: layer #{} is not a table", i + 1);
            };
            let name = match t.get("name") {
                Some(Toml::String(s)) if !s.is_empty() => s.clone(),
                None => format!("layer{}", i + 1),
                Some(v) => bail!(
                    "{source}: layer #{}: field `name`: expected a non-empty string, got {v}",
                    i + 1
                ),
            };
            if seen.contains(&name) {
                bail!("{source}: layer `{name}`, field `name`: defined twice (or clashes with `input`)");
            }
            let op = match t.get("op") {
                Some(Toml::String(s)) => s.clone(),
                None => bail!("{source}: layer `{name}`, field `op`: missing (known: {OPS})"),
                Some(v) => {
                    bail!("{source}: layer `{name}`, field `op`: expected a string, got {v}")
                }
            };
            let inputs: Vec<String> = match t.get("inputs") {
                None => vec![prev.clone()],
                Some(Toml::String(s)) => vec![s.clone()],
                Some(Toml::Array(a)) => a
                    .iter()
                    .map(|v| match v {
                        Toml::String(s) => Ok(s.clone()),
                        _ => Err(anyhow!("{source}: layer `{name}`, field `inputs`: expected layer names, got {v}")),
                    })
                    .collect::<Result<_>>()?,
                Some(v) => bail!("{source}: layer `{name}`, field `inputs`: expected a name or a list of names, got {v}"),
            };
            for inp in &inputs {
                if !seen.contains(inp) {
                    let later = layers
                        .iter()
                        .any(|l| l.get("name").and_then(|n| n.as_str()) == Some(inp));
                    bail!(
                        "{source}: layer `{name}`, field `inputs`: `{inp}` {}",
                        if later || *inp == name {
                            "is defined later: layers may only use earlier layers (a cycle?)"
                        } else {
                            "is not a layer of this model"
                        }
                    );
                }
            }
            let mut fields = Fields {
                source,
                layer: &name,
                table: t,
                used: HashSet::new(),
            };
            let op = parse_op(&op, &mut fields)?;
            fields.finish()?;
            let arity_ok = match op {
                LayerOp::Add => inputs.len() >= 2,
                LayerOp::Concat { .. } => inputs.len() >= 2,
                _ => inputs.len() == 1,
            };
            if !arity_ok {
                bail!(
                    "{source}: layer `{name}`, field `inputs`: this op takes {} input(s), got {}",
                    if matches!(op, LayerOp::Add | LayerOp::Concat { .. }) {
                        "2 or more"
                    } else {
                        "exactly 1"
                    },
                    inputs.len()
                );
            }
            seen.insert(name.clone());
            prev = name.clone();
            out.push(LayerDef { name, inputs, op });
        }
        Ok(ModelDef {
            name,
            source: source.to_string(),
            layers: out,
        })
    }
}
