//! From a [`ModelDef`] to a trainable [`Model`]: shapes are inferred layer by layer (so a
//! mismatch is reported before training, naming the layer), parameters are created with
//! seeded initialisation, and `forward` runs the graph on a tape, dropping each layer's output
//! as soon as its last consumer has run.

use super::def::{LayerOp, ModelDef};
use crate::compress::uniform;
use crate::ops::attention::MultiHeadAttention;
use crate::ops::conv::Conv2dParams;
use crate::ops::norm::{BatchNormStats, PreNorm};
use crate::ops::residual::{ConvBn, ProjectionShortcut};
use crate::ops::sparse::CsrMatrix;
use crate::tape::{ParamId, ParamStore, Tape, Value};
use anyhow::{anyhow, bail, Result};
use candle_core::{Device, Tensor};
use std::sync::Arc;

/// What the data feeds the model (per sample, without the batch dim).
#[derive(Clone, Debug)]
pub struct InputSpec {
    pub sample_shape: Vec<usize>,
    /// Inputs are integer token ids (the first layer must be an embedding).
    pub tokens: bool,
    /// Vocabulary size for token inputs.
    pub vocab: Option<usize>,
    /// Classes (or vocabulary size for a language model) the last layer must produce.
    pub num_outputs: usize,
    /// Full-graph node classification: GCN layers use the dataset's adjacency.
    pub graph: bool,
}

struct Layer {
    name: String,
    /// Slots feeding this layer: 0 is the model input, i + 1 the output of layer i.
    inputs: Vec<usize>,
    op: LayerOp,
    params: Vec<ParamId>,
    out_shape: Vec<usize>,
}

/// A built model: its layers, parameters and buffers.
pub struct Model {
    pub name: String,
    pub params: ParamStore,
    layers: Vec<Layer>,
    /// `last_use[s]`: index of the last layer reading slot `s`.
    last_use: Vec<usize>,
    input: InputSpec,
}

/// Deterministic initialisation: every parameter gets its own RNG stream.
struct Init {
    seed: u64,
    stream: u64,
}

impl Init {
    fn uniform(&mut self, dims: &[usize], bound: f64) -> Result<Tensor> {
        self.stream += 1;
        let n: usize = dims.iter().product();
        let v: Vec<f32> = (0..n as u64)
            .map(|i| ((uniform(self.seed, self.stream, i) as f64 * 2.0 - 1.0) * bound) as f32)
            .collect();
        Ok(Tensor::from_vec(v, dims, &Device::Cpu)?)
    }
    fn normal(&mut self, dims: &[usize], std: f64) -> Result<Tensor> {
        self.stream += 1;
        let n: usize = dims.iter().product();
        let v: Vec<f32> = (0..n as u64)
            .map(|i| {
                // Box-Muller from two independent counter-based uniforms.
                let u1 = (uniform(self.seed, self.stream, 2 * i) as f64).max(1e-12);
                let u2 = uniform(self.seed, self.stream, 2 * i + 1) as f64;
                ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos() * std) as f32
            })
            .collect();
        Ok(Tensor::from_vec(v, dims, &Device::Cpu)?)
    }
    fn constant(&self, dims: &[usize], c: f32) -> Result<Tensor> {
        Ok(Tensor::full(c, dims, &Device::Cpu)?)
    }
}

struct Builder {
    store: ParamStore,
    init: Init,
    prefix: String,
}

impl Builder {
    /// Weight with PyTorch's default bound 1/sqrt(fan_in).
    fn weight(&mut self, name: &str, dims: &[usize], fan_in: usize) -> Result<ParamId> {
        let t = self
            .init
            .uniform(dims, 1.0 / (fan_in.max(1) as f64).sqrt())?;
        self.store.add(format!("{}.{name}", self.prefix), t)
    }
    fn bias(&mut self, name: &str, n: usize, fan_in: usize) -> Result<ParamId> {
        let t = self
            .init
            .uniform(&[n], 1.0 / (fan_in.max(1) as f64).sqrt())?;
        self.store.add(format!("{}.{name}", self.prefix), t)
    }
    fn filled(&mut self, name: &str, n: usize, c: f32) -> Result<ParamId> {
        let t = self.init.constant(&[n], c)?;
        self.store.add(format!("{}.{name}", self.prefix), t)
    }
    fn buffer(&mut self, name: &str, n: usize, c: f32) -> Result<ParamId> {
        let t = self.init.constant(&[n], c)?;
        self.store.add_buffer(format!("{}.{name}", self.prefix), t)
    }
    /// gamma, beta, running mean, running var.
    fn batch_norm(&mut self, name: &str, c: usize) -> Result<Vec<ParamId>> {
        Ok(vec![
            self.filled(&format!("{name}.gamma"), c, 1.0)?,
            self.filled(&format!("{name}.beta"), c, 0.0)?,
            self.buffer(&format!("{name}.running_mean"), c, 0.0)?,
            self.buffer(&format!("{name}.running_var"), c, 1.0)?,
        ])
    }
    fn batch_norm_unnamed(&mut self, c: usize) -> Result<Vec<ParamId>> {
        Ok(vec![
            self.filled("gamma", c, 1.0)?,
            self.filled("beta", c, 0.0)?,
            self.buffer("running_mean", c, 0.0)?,
            self.buffer("running_var", c, 1.0)?,
        ])
    }
    fn linear(&mut self, name: &str, out: usize, inp: usize, bias: bool) -> Result<Vec<ParamId>> {
        let pre = if name.is_empty() {
            String::new()
        } else {
            format!("{name}.")
        };
        let mut p = vec![self.weight(&format!("{pre}weight"), &[out, inp], inp)?];
        if bias {
            p.push(self.bias(&format!("{pre}bias"), out, inp)?);
        }
        Ok(p)
    }
}

fn conv_out(
    size: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    dilation: usize,
) -> Option<usize> {
    let span = dilation * (kernel - 1) + 1;
    (size + 2 * padding)
        .checked_sub(span)
        .map(|v| v / stride + 1)
}

impl Model {
    /// Builds `def` for inputs described by `input`, initialising parameters from `seed`.
    pub fn build(def: &ModelDef, input: &InputSpec, seed: u64) -> Result<Model> {
        let src = &def.source;
        let mut slots: Vec<Vec<usize>> = vec![input.sample_shape.clone()];
        let mut names = vec!["input".to_string()];
        let mut layers = Vec::with_capacity(def.layers.len());
        let mut b = Builder {
            store: ParamStore::new(),
            init: Init { seed, stream: 0 },
            prefix: String::new(),
        };
        for l in &def.layers {
            let err =
                |msg: String| anyhow!("{src}: layer `{}` ({}): {msg}", l.name, op_name(&l.op));
            let inputs: Vec<usize> = l
                .inputs
                .iter()
                .map(|n| {
                    names
                        .iter()
                        .position(|m| m == n)
                        .expect("checked when parsing")
                })
                .collect();
            let ins: Vec<&Vec<usize>> = inputs.iter().map(|&s| &slots[s]).collect();
            let x = ins[0].clone();
            let prefix = l.name.clone();
            b.prefix = prefix.clone();
            let need_rank = |r: usize, what: &str| -> Result<()> {
                if x.len() != r {
                    return Err(err(format!("expects {what} per sample, got shape {x:?}")));
                }
                Ok(())
            };
            if input.tokens && inputs.contains(&0) && !matches!(l.op, LayerOp::Embedding { .. }) {
                return Err(err(
                    "the model input is token ids: only an `embedding` layer can read it".into(),
                ));
            }
            let (params, out_shape) = match &l.op {
                LayerOp::Linear { out, bias } => {
                    let out = out.resolve(input.num_outputs);
                    let inp = *x.last().ok_or_else(|| err("input has no dims".into()))?;
                    let mut s = x.clone();
                    *s.last_mut().expect("non-empty") = out;
                    (b.linear("", out, inp, *bias)?, s)
                }
                LayerOp::Conv2d {
                    out,
                    kernel,
                    stride,
                    padding,
                    dilation,
                    groups,
                    bias,
                } => {
                    need_rank(3, "[channels, height, width]")?;
                    let (c, h, w) = (x[0], x[1], x[2]);
                    if c % groups != 0 {
                        return Err(err(format!("field `groups`: {c} input channels are not divisible by groups = {groups}")));
                    }
                    let oh = conv_out(h, *kernel, *stride, *padding, *dilation);
                    let ow = conv_out(w, *kernel, *stride, *padding, *dilation);
                    let (Some(oh), Some(ow)) = (oh, ow) else {
                        return Err(err(format!("field `kernel`: a {kernel}x{kernel} kernel does not fit the {h}x{w} input")));
                    };
                    let fan_in = c / groups * kernel * kernel;
                    let mut p =
                        vec![b.weight("weight", &[*out, c / groups, *kernel, *kernel], fan_in)?];
                    if *bias {
                        p.push(b.bias("bias", *out, fan_in)?);
                    }
                    (p, vec![*out, oh, ow])
                }
                LayerOp::BatchNorm { .. } => {
                    if x.is_empty() {
                        return Err(err("needs a channel dim".into()));
                    }
                    (b.batch_norm_unnamed(x[0])?, x.clone())
                }
                LayerOp::LayerNorm { .. } => {
                    let d = *x.last().ok_or_else(|| err("input has no dims".into()))?;
                    (
                        vec![b.filled("gamma", d, 1.0)?, b.filled("beta", d, 0.0)?],
                        x.clone(),
                    )
                }
                LayerOp::RmsNorm { .. } => {
                    let d = *x.last().ok_or_else(|| err("input has no dims".into()))?;
                    (vec![b.filled("gamma", d, 1.0)?], x.clone())
                }
                LayerOp::Relu
                | LayerOp::LeakyRelu { .. }
                | LayerOp::Gelu { .. }
                | LayerOp::Silu
                | LayerOp::Sigmoid
                | LayerOp::Tanh
                | LayerOp::Dropout { .. } => (vec![], x.clone()),
                LayerOp::MaxPool {
                    kernel,
                    stride,
                    padding,
                }
                | LayerOp::AvgPool {
                    kernel,
                    stride,
                    padding,
                } => {
                    need_rank(3, "[channels, height, width]")?;
                    let oh = conv_out(x[1], *kernel, *stride, *padding, 1);
                    let ow = conv_out(x[2], *kernel, *stride, *padding, 1);
                    let (Some(oh), Some(ow)) = (oh, ow) else {
                        return Err(err(format!(
                            "field `kernel`: {kernel} does not fit the {}x{} input",
                            x[1], x[2]
                        )));
                    };
                    (vec![], vec![x[0], oh, ow])
                }
                LayerOp::GlobalAvgPool => {
                    need_rank(3, "[channels, height, width]")?;
                    (vec![], vec![x[0]])
                }
                LayerOp::Flatten => (vec![], vec![x.iter().product()]),
                LayerOp::Add => {
                    for s in &ins[1..] {
                        if **s != x {
                            return Err(err(format!(
                                "field `inputs`: shapes differ: {x:?} vs {s:?}"
                            )));
                        }
                    }
                    (vec![], x.clone())
                }
                LayerOp::Concat { dim } => {
                    if *dim >= x.len() {
                        return Err(err(format!(
                            "field `dim`: {dim} is out of range for shape {x:?}"
                        )));
                    }
                    let mut s = x.clone();
                    for o in &ins[1..] {
                        if o.len() != x.len()
                            || o.iter().enumerate().any(|(i, &d)| i != *dim && d != x[i])
                        {
                            return Err(err(format!(
                                "field `inputs`: cannot concat {x:?} and {o:?} along dim {dim}"
                            )));
                        }
                        s[*dim] += o[*dim];
                    }
                    (vec![], s)
                }
                LayerOp::Embedding { dim, vocab } => {
                    if !input.tokens || inputs != [0] {
                        return Err(err("an embedding reads the model input, which must be token ids (text data)".into()));
                    }
                    let v = vocab
                        .or(input.vocab)
                        .ok_or_else(|| err("field `vocab`: unknown vocabulary size".into()))?;
                    if let (Some(given), Some(data)) = (vocab, input.vocab) {
                        if *given < data {
                            return Err(err(format!("field `vocab`: {given} is smaller than the data's vocabulary ({data})")));
                        }
                    }
                    let t = b.init.normal(&[v, *dim], 0.02)?;
                    let id = b.store.add(format!("{prefix}.table"), t)?;
                    let mut s = x.clone();
                    s.push(*dim);
                    (vec![id], s)
                }
                LayerOp::PosEmbedding { max_len } => {
                    need_rank(2, "[tokens, dim]")?;
                    if x[0] > *max_len {
                        return Err(err(format!(
                            "field `max_len`: the sequence has {} tokens, more than {max_len}",
                            x[0]
                        )));
                    }
                    let t = b.init.normal(&[*max_len, x[1]], 0.02)?;
                    (vec![b.store.add(format!("{prefix}.table"), t)?], x.clone())
                }
                LayerOp::Tokens => {
                    need_rank(3, "[channels, height, width]")?;
                    (vec![], vec![x[1] * x[2], x[0]])
                }
                LayerOp::MeanTokens => {
                    need_rank(2, "[tokens, dim]")?;
                    (vec![], vec![x[1]])
                }
                LayerOp::Attention { heads, .. } => {
                    need_rank(2, "[tokens, dim]")?;
                    if !x[1].is_multiple_of(*heads) {
                        return Err(err(format!(
                            "field `heads`: dim {} is not divisible by {heads} heads",
                            x[1]
                        )));
                    }
                    (attention_params(&mut b, "attn", x[1])?, x.clone())
                }
                LayerOp::TransformerBlock {
                    heads, mlp_ratio, ..
                } => {
                    need_rank(2, "[tokens, dim]")?;
                    let d = x[1];
                    if !d.is_multiple_of(*heads) {
                        return Err(err(format!(
                            "field `heads`: dim {d} is not divisible by {heads} heads"
                        )));
                    }
                    let mut p = vec![
                        b.filled("ln1.gamma", d, 1.0)?,
                        b.filled("ln1.beta", d, 0.0)?,
                    ];
                    p.extend(attention_params(&mut b, "attn", d)?);
                    p.push(b.filled("ln2.gamma", d, 1.0)?);
                    p.push(b.filled("ln2.beta", d, 0.0)?);
                    p.extend(b.linear("fc1", d * mlp_ratio, d, true)?);
                    p.extend(b.linear("fc2", d, d * mlp_ratio, true)?);
                    (p, x.clone())
                }
                LayerOp::ResidualBlock {
                    out,
                    stride,
                    bottleneck,
                } => {
                    need_rank(3, "[channels, height, width]")?;
                    let (c, h, w) = (x[0], x[1], x[2]);
                    let (Some(oh), Some(ow)) =
                        (conv_out(h, 3, *stride, 1, 1), conv_out(w, 3, *stride, 1, 1))
                    else {
                        return Err(err(format!(
                            "field `stride`: does not fit the {h}x{w} input"
                        )));
                    };
                    let mut p = Vec::new();
                    if *bottleneck {
                        if out % 4 != 0 {
                            return Err(err(format!("field `out`: a bottleneck block needs out divisible by 4, got {out}")));
                        }
                        let mid = out / 4;
                        p.push(b.weight("conv1.weight", &[mid, c, 1, 1], c)?);
                        p.extend(b.batch_norm("bn1", mid)?);
                        p.push(b.weight("conv2.weight", &[mid, mid, 3, 3], mid * 9)?);
                        p.extend(b.batch_norm("bn2", mid)?);
                        p.push(b.weight("conv3.weight", &[*out, mid, 1, 1], mid)?);
                        p.extend(b.batch_norm("bn3", *out)?);
                    } else {
                        p.push(b.weight("conv1.weight", &[*out, c, 3, 3], c * 9)?);
                        p.extend(b.batch_norm("bn1", *out)?);
                        p.push(b.weight("conv2.weight", &[*out, *out, 3, 3], out * 9)?);
                        p.extend(b.batch_norm("bn2", *out)?);
                    }
                    if *stride != 1 || c != *out {
                        p.push(b.weight("shortcut.weight", &[*out, c, 1, 1], c)?);
                        p.extend(b.batch_norm("shortcut.bn", *out)?);
                    }
                    (p, vec![*out, oh, ow])
                }
                LayerOp::Gcn { out, bias } => {
                    if !input.graph {
                        return Err(err(
                            "a gcn layer needs graph data (--data graph:DIR or graph:synthetic)"
                                .into(),
                        ));
                    }
                    need_rank(1, "[features] (one row per node)")?;
                    let out = out.resolve(input.num_outputs);
                    (b.linear("", out, x[0], *bias)?, vec![out])
                }
            };
            layers.push(Layer {
                name: l.name.clone(),
                inputs,
                op: l.op.clone(),
                params,
                out_shape: out_shape.clone(),
            });
            slots.push(out_shape);
            names.push(l.name.clone());
        }
        let last = layers.last().ok_or_else(|| anyhow!("{src}: no layers"))?;
        let want = if input.tokens {
            let mut s = input.sample_shape.clone();
            s.push(input.num_outputs);
            s
        } else {
            vec![input.num_outputs]
        };
        if last.out_shape != want {
            bail!(
                "{src}: layer `{}` is the output and produces {:?} per sample, but the data needs {:?} ({} {})",
                last.name,
                last.out_shape,
                want,
                input.num_outputs,
                if input.tokens { "vocabulary logits per token" } else { "class logits" }
            );
        }
        let mut last_use = vec![0; layers.len() + 1];
        for (i, l) in layers.iter().enumerate() {
            for &s in &l.inputs {
                last_use[s] = i;
            }
        }
        // Initialised on the host (the same weights for a seed on every device), then moved to
        // the compute device.
        let mut params = b.store;
        params.to_device(&crate::device::current())?;
        Ok(Model {
            name: def.name.clone(),
            params,
            layers,
            last_use,
            input: input.clone(),
        })
    }

    pub fn input_spec(&self) -> &InputSpec {
        &self.input
    }

    /// Number of trainable scalars.
    pub fn num_parameters(&self) -> usize {
        self.params
            .iter()
            .filter(|(_, p)| p.trainable)
            .map(|(_, p)| p.value.elem_count())
            .sum()
    }

    /// Per-layer summary: name, op, output shape per sample, parameter count.
    pub fn summary(&self) -> Vec<(String, &'static str, Vec<usize>, usize)> {
        self.layers
            .iter()
            .map(|l| {
                let n = l
                    .params
                    .iter()
                    .filter(|&&p| self.params.get(p).trainable)
                    .map(|&p| self.params.value(p).elem_count())
                    .sum();
                (l.name.clone(), op_name(&l.op), l.out_shape.clone(), n)
            })
            .collect()
    }

    /// Runs the model on a batch `x` (`[B, ..sample_shape]`; token ids as `U32`; for graphs
    /// all node features) and returns the logits. `graph` is the normalised adjacency for GCN
    /// layers. In training mode batch norm updates its running statistics here.
    pub fn forward(
        &mut self,
        tape: &mut Tape,
        x: &Tensor,
        graph: Option<&Arc<CsrMatrix>>,
    ) -> Result<Value> {
        let mut slots: Vec<Option<Value>> = Vec::with_capacity(self.layers.len() + 1);
        slots.push(Some(tape.constant(x.clone())));
        slots.resize_with(self.layers.len() + 1, || None);
        let n = self.layers.len();
        for i in 0..n {
            let out = {
                let l = &self.layers[i];
                // An input whose last reader is this layer is moved in (its slot emptied), so
                // the layer can free it as soon as its own last op on it has run; the others
                // are shared with their slot.
                let mut ins: Vec<Value> = Vec::with_capacity(l.inputs.len());
                for (j, &s) in l.inputs.iter().enumerate() {
                    let last = self.last_use[s] == i && s != n && !l.inputs[j + 1..].contains(&s);
                    let v = if last {
                        slots[s].take()
                    } else {
                        slots[s].clone()
                    };
                    ins.push(v.ok_or_else(|| anyhow!("internal: slot {s} freed too early"))?);
                }
                tape.set_scope(&l.name);
                run_layer(tape, &mut self.params, l, ins, graph)
                    .map_err(|e| e.context(format!("layer `{}` ({})", l.name, op_name(&l.op))))?
            };
            slots[i + 1] = Some(out);
            // Free every output whose last reader just ran: the tape keeps only contexts.
            for (s, slot) in slots.iter_mut().enumerate().take(i + 1) {
                if self.last_use[s] == i && s != n {
                    *slot = None;
                }
            }
        }
        slots[n]
            .take()
            .ok_or_else(|| anyhow!("internal: the model produced no output"))
    }
}

/// conv → batch norm (→ ReLU) on `x`, which is dropped (freed if this was its last holder)
/// once the conv has read it, like each intermediate once the next op has read it.
///
/// `x_alone`: no other handle of `x` exists (not a block input the shortcut still needs), so
/// the conv may write its output over it; the conv's and the batch norm's outputs are this
/// function's alone, so batch norm and ReLU may too (each only where no context holds its
/// input as it is, i.e. at L1–L4: see [`Tape::may_overwrite`]).
#[allow(clippy::too_many_arguments)]
fn conv_bn(
    tape: &mut Tape,
    store: &mut ParamStore,
    x: Value,
    x_alone: bool,
    p: &[ParamId],
    stride: usize,
    padding: usize,
    relu: bool,
) -> Result<Value> {
    let w = tape.param(store, p[0]);
    let cp = Conv2dParams {
        stride,
        padding,
        ..Default::default()
    };
    let c = if x_alone {
        tape.conv2d_owned(x, &w, None, cp)?
    } else {
        tape.conv2d(&x, &w, None, cp)?
    };
    let b = batch_norm(tape, store, c, true, &p[1..5], 0.1, 1e-5)?;
    if relu {
        tape.relu_owned(b)
    } else {
        Ok(b)
    }
}

/// A basic (two 3x3 convs) or bottleneck (1x1, 3x3, 1x1) residual block with an identity or
/// projection (1x1 conv + batch norm) shortcut, `relu(main(x) + shortcut(x))`. Parameter
/// layout: each conv's weight followed by its 4 batch-norm entries, the shortcut's last.
/// Besides the block input, at most one op's input and output are alive at any time.
fn residual_block(
    tape: &mut Tape,
    store: &mut ParamStore,
    x: Value,
    p: &[ParamId],
    stride: usize,
    bottleneck: bool,
) -> Result<Value> {
    if !bottleneck && stride == 1 && p.len() == 10 {
        return identity_block(tape, store, x, p);
    }
    let (h, used) = if bottleneck {
        let h = conv_bn(tape, store, x.clone(), false, &p[0..5], 1, 0, true)?;
        let h = conv_bn(tape, store, h, true, &p[5..10], stride, 1, true)?;
        (conv_bn(tape, store, h, true, &p[10..15], 1, 0, false)?, 15)
    } else {
        let h = conv_bn(tape, store, x.clone(), false, &p[0..5], stride, 1, true)?;
        (conv_bn(tape, store, h, true, &p[5..10], 1, 1, false)?, 10)
    };
    // `h` is the main branch's own output: the sum and the ReLU may take its buffer.
    let y = if p.len() > used {
        let q = &p[used..used + 5];
        let (w, g, b) = (
            tape.param(store, q[0]),
            tape.param(store, q[1]),
            tape.param(store, q[2]),
        );
        let sc = ProjectionShortcut {
            conv: ConvBn::new(&w, &g, &b),
            stride,
        };
        let mut stats = running_stats(store, &q[3..5]);
        let y = tape.projection_shortcut_add(h, &x, &sc, &mut stats)?;
        set_running_stats(store, &q[3..5], stats);
        y
    } else {
        tape.add_owned(h, &x)?
    };
    drop(x);
    tape.relu_owned(y)
}

/// A basic block with an identity shortcut (see [`residual_block`]), as one node where the
/// tape runs it in batch chunks ([`Tape::identity_block`]).
fn identity_block(
    tape: &mut Tape,
    store: &mut ParamStore,
    x: Value,
    p: &[ParamId],
) -> Result<Value> {
    let v: Vec<Value> = [0, 1, 2, 5, 6, 7]
        .iter()
        .map(|&i| tape.param(store, p[i]))
        .collect();
    let conv_bn = |i: usize| ConvBn::new(&v[i], &v[i + 1], &v[i + 2]);
    let (mut s1, mut s2) = (
        running_stats(store, &p[3..5]),
        running_stats(store, &p[8..10]),
    );
    let cp = Conv2dParams {
        padding: 1,
        ..Default::default()
    };
    let y = tape.identity_block(x, &conv_bn(0), &conv_bn(3), cp, &mut s1, &mut s2)?;
    set_running_stats(store, &p[3..5], s1);
    set_running_stats(store, &p[8..10], s2);
    tape.relu_owned(y)
}

fn attention_params(b: &mut Builder, name: &str, d: usize) -> Result<Vec<ParamId>> {
    let mut p = Vec::new();
    for proj in ["q", "k", "v", "o"] {
        p.extend(b.linear(&format!("{name}.{proj}"), d, d, true)?);
    }
    Ok(p)
}

pub(crate) fn op_name(op: &LayerOp) -> &'static str {
    match op {
        LayerOp::Linear { .. } => "linear",
        LayerOp::Conv2d { .. } => "conv2d",
        LayerOp::BatchNorm { .. } => "batch_norm",
        LayerOp::LayerNorm { .. } => "layer_norm",
        LayerOp::RmsNorm { .. } => "rms_norm",
        LayerOp::Relu => "relu",
        LayerOp::LeakyRelu { .. } => "leaky_relu",
        LayerOp::Gelu { .. } => "gelu",
        LayerOp::Silu => "silu",
        LayerOp::Sigmoid => "sigmoid",
        LayerOp::Tanh => "tanh",
        LayerOp::Dropout { .. } => "dropout",
        LayerOp::MaxPool { .. } => "max_pool",
        LayerOp::AvgPool { .. } => "avg_pool",
        LayerOp::GlobalAvgPool => "global_avg_pool",
        LayerOp::Flatten => "flatten",
        LayerOp::Add => "add",
        LayerOp::Concat { .. } => "concat",
        LayerOp::Embedding { .. } => "embedding",
        LayerOp::PosEmbedding { .. } => "pos_embedding",
        LayerOp::Tokens => "tokens",
        LayerOp::MeanTokens => "mean_tokens",
        LayerOp::Attention { .. } => "attention",
        LayerOp::TransformerBlock { .. } => "transformer_block",
        LayerOp::ResidualBlock { .. } => "residual_block",
        LayerOp::Gcn { .. } => "gcn",
    }
}

/// Batch norm with its running statistics read from and written back to the store.
/// `x_alone`: the caller holds no other handle of `x`, so the output may take its buffer.
fn batch_norm(
    tape: &mut Tape,
    store: &mut ParamStore,
    x: Value,
    x_alone: bool,
    p: &[ParamId],
    momentum: f64,
    eps: f64,
) -> Result<Value> {
    let (g, b) = (tape.param(store, p[0]), tape.param(store, p[1]));
    let mut stats = running_stats(store, &p[2..4]);
    let y = if x_alone {
        tape.batch_norm_owned(x, &g, &b, &mut stats, momentum, eps)?
    } else {
        tape.batch_norm(&x, &g, &b, &mut stats, momentum, eps)?
    };
    set_running_stats(store, &p[2..4], stats);
    Ok(y)
}

/// A batch norm's running statistics, from the store's buffers `[mean, var]`.
fn running_stats(store: &ParamStore, ids: &[ParamId]) -> BatchNormStats {
    BatchNormStats {
        mean: store.value(ids[0]).clone(),
        var: store.value(ids[1]).clone(),
    }
}

/// Writes updated running statistics back into the buffers `[mean, var]`.
fn set_running_stats(store: &mut ParamStore, ids: &[ParamId], stats: BatchNormStats) {
    store.set_value(ids[0], stats.mean);
    store.set_value(ids[1], stats.var);
}

/// The attention layer's parameters `p` (wq, bq, wk, bk, wv, bv, wo, bo) as tape values.
fn attention_values(tape: &mut Tape, store: &ParamStore, p: &[ParamId]) -> Vec<Value> {
    p.iter().map(|&id| tape.param(store, id)).collect()
}

/// Multi-head attention over `v` from [`attention_values`].
fn mha_of(v: &[Value], heads: usize, causal: bool) -> MultiHeadAttention<'_> {
    MultiHeadAttention {
        wq: &v[0],
        bq: Some(&v[1]),
        wk: &v[2],
        bk: Some(&v[3]),
        wv: &v[4],
        bv: Some(&v[5]),
        wo: &v[6],
        bo: Some(&v[7]),
        heads,
        causal,
    }
}

/// Multi-head attention over `x` with the layer's parameters `p`.
fn mha(
    tape: &mut Tape,
    store: &ParamStore,
    x: Value,
    p: &[ParamId],
    heads: usize,
    causal: bool,
) -> Result<Value> {
    let v = attention_values(tape, store, p);
    tape.multi_head_attention_owned(x, &mha_of(&v, heads, causal))
}

/// Runs one layer. `ins` are owned: a layer frees each intermediate (and an input it was
/// handed as the last reader) as soon as its last op on it has run, so a block never holds
/// more than its live tensors — the tape keeps only contexts.
fn run_layer(
    tape: &mut Tape,
    store: &mut ParamStore,
    l: &Layer,
    ins: Vec<Value>,
    graph: Option<&Arc<CsrMatrix>>,
) -> Result<Value> {
    let x = &ins[0];
    let p = &l.params;
    let param =
        |tape: &mut Tape, store: &ParamStore, i: usize| p.get(i).map(|&id| tape.param(store, id));
    Ok(match &l.op {
        LayerOp::Linear { .. } => {
            let w = param(tape, store, 0).expect("weight");
            let b = param(tape, store, 1);
            tape.linear(x, &w, b.as_ref())?
        }
        LayerOp::Conv2d {
            stride,
            padding,
            dilation,
            groups,
            ..
        } => {
            let w = param(tape, store, 0).expect("weight");
            let b = param(tape, store, 1);
            let cp = Conv2dParams {
                stride: *stride,
                padding: *padding,
                dilation: *dilation,
                groups: *groups,
            };
            tape.conv2d(x, &w, b.as_ref(), cp)?
        }
        LayerOp::BatchNorm { momentum, eps } => {
            batch_norm(tape, store, x.clone(), false, p, *momentum, *eps)?
        }
        LayerOp::LayerNorm { eps } => {
            let (g, b) = (param(tape, store, 0), param(tape, store, 1));
            tape.layer_norm(x, g.as_ref(), b.as_ref(), *eps)?
        }
        LayerOp::RmsNorm { eps } => {
            let g = param(tape, store, 0);
            tape.rms_norm(x, g.as_ref(), *eps)?
        }
        LayerOp::Relu => tape.relu(x)?,
        LayerOp::LeakyRelu { slope } => tape.leaky_relu(x, *slope)?,
        LayerOp::Gelu { approx } => tape.gelu(x, *approx)?,
        LayerOp::Silu => tape.silu(x)?,
        LayerOp::Sigmoid => tape.sigmoid(x)?,
        LayerOp::Tanh => tape.tanh(x)?,
        LayerOp::Dropout { p } => tape.dropout(x, *p)?,
        LayerOp::MaxPool {
            kernel,
            stride,
            padding,
        } => tape.max_pool2d(x, *kernel, *stride, *padding)?,
        LayerOp::AvgPool {
            kernel,
            stride,
            padding,
        } => tape.avg_pool2d(x, *kernel, *stride, *padding)?,
        LayerOp::GlobalAvgPool => tape.global_avg_pool(x)?,
        LayerOp::Flatten => tape.flatten(x, 1)?,
        LayerOp::Add => {
            let mut rest = ins.iter().skip(1);
            let first = rest.next().ok_or_else(|| anyhow!("add needs two inputs"))?;
            let mut acc = tape.add(x, first)?;
            for other in rest {
                acc = tape.add(&acc, other)?;
            }
            acc
        }
        LayerOp::Concat { dim } => {
            let refs: Vec<&Value> = ins.iter().collect();
            tape.concat(&refs, dim + 1)?
        }
        LayerOp::Embedding { .. } => {
            let table = param(tape, store, 0).expect("table");
            tape.embedding(x.tensor(), &table)?
        }
        LayerOp::PosEmbedding { .. } => {
            let table = param(tape, store, 0).expect("table");
            let t = x.dims()[1];
            let pos = tape.narrow(&table, 0, 0, t)?;
            tape.add(x, &pos)?
        }
        LayerOp::Tokens => {
            let d = x.dims().to_vec();
            let h = tape.reshape(x, &[d[0], d[1], d[2] * d[3]])?;
            tape.transpose(&h, 1, 2)?
        }
        LayerOp::MeanTokens => tape.mean(x, &[1], false)?,
        LayerOp::Attention { heads, causal } => mha(tape, store, x.clone(), p, *heads, *causal)?,
        LayerOp::TransformerBlock {
            heads,
            causal,
            dropout,
            ..
        } => {
            let x = ins.into_iter().next().expect("one input");
            let (g1, b1) = (param(tape, store, 0), param(tape, store, 1));
            let (g2, b2) = (param(tape, store, 10), param(tape, store, 11));
            let (w1, c1) = (param(tape, store, 12).expect("fc1"), param(tape, store, 13));
            let (w2, c2) = (param(tape, store, 14).expect("fc2"), param(tape, store, 15));
            let mlp = crate::ops::mlp::Mlp {
                w1: &w1,
                b1: c1.as_ref(),
                w2: &w2,
                b2: c2.as_ref(),
                approx: crate::ops::activation::GeluApprox::Tanh,
            };
            if *dropout == 0.0 {
                // Each half fused with its layer norm and residual sum: at L1-L4 on the CPU
                // they run in batch chunks and add into the residual stream in place
                // (`Tape::prenorm_attention_residual`, `Tape::prenorm_mlp_residual`).
                let ln1 = PreNorm {
                    gamma: g1.as_ref(),
                    beta: b1.as_ref(),
                    eps: 1e-5,
                };
                let v = attention_values(tape, store, &p[2..10]);
                let x1 = tape.prenorm_attention_residual(x, &ln1, &mha_of(&v, *heads, *causal))?;
                drop(v);
                let ln2 = PreNorm {
                    gamma: g2.as_ref(),
                    beta: b2.as_ref(),
                    eps: 1e-5,
                };
                return tape.prenorm_mlp_residual(x1, &ln2, &mlp);
            }
            // With dropout: each intermediate is handed over or dropped once read (the
            // attention frees the normalised input before its scores exist) and the residual
            // sums take the branch output's buffer (at L1-L4, see `Tape::add_owned`).
            let n1 = tape.layer_norm(&x, g1.as_ref(), b1.as_ref(), 1e-5)?;
            let a = {
                let a = mha(tape, store, n1, &p[2..10], *heads, *causal)?;
                tape.dropout(&a, *dropout)?
            };
            let x1 = tape.add_owned(a, &x)?;
            drop(x);
            let n2 = tape.layer_norm(&x1, g2.as_ref(), b2.as_ref(), 1e-5)?;
            let h3 = {
                let h3 = tape.mlp_owned(n2, &mlp)?;
                tape.dropout(&h3, *dropout)?
            };
            tape.add_owned(h3, &x1)?
        }
        LayerOp::ResidualBlock {
            stride, bottleneck, ..
        } => {
            let x = ins.into_iter().next().expect("one input");
            residual_block(tape, store, x, p, *stride, *bottleneck)?
        }
        LayerOp::Gcn { .. } => {
            let a =
                graph.ok_or_else(|| anyhow!("no graph adjacency was given to the forward pass"))?;
            let w = param(tape, store, 0).expect("weight");
            let b = param(tape, store, 1);
            // Â (X W): multiply by the weight first, the narrower side of a GCN layer.
            let h = tape.linear(x, &w, None)?;
            let h = tape.spmm(a, &h)?;
            match b {
                Some(b) => tape.add(&h, &b)?,
                None => h,
            }
        }
    })
}
