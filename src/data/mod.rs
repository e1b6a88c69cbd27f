//! Datasets and batching: everything `actrain fit --data SPEC` can train on, loaded from the
//! embedded digits, local files (MNIST/Fashion-MNIST idx, CIFAR-10 binary batches, plain
//! text, a graph as three text files) or seeded generators. Nothing here touches the network.
//!
//! All tensors are created on the CPU; the training loop moves batches to its device. Every
//! random choice (split, synthetic data, per-epoch order) derives from a `u64` seed, so a run
//! is reproducible and can be resumed mid-epoch.
//!
//! Spec strings (see [`spec::parse`]):
//! - `digits` (default): embedded 8x8 UCI digits, 1797 images, `[1, 8, 8]`, 10 classes.
//! - `mnist:DIR`, `fashion-mnist:DIR`: idx files, `[1, 28, 28]`.
//! - `cifar10:DIR`: `data_batch_1..5.bin` + `test_batch.bin`, `[3, 32, 32]`.
//! - `text:FILE`: character-level language model, `[seq_len]` token ids.
//! - `graph:DIR` / `graph:synthetic`: node classification for a GCN (see [`graph`]).
//! - `synthetic:CxHxW:CLASSES[:N]`, `synthetic:D:CLASSES[:N]`, `synthetic-text:VOCAB:SEQ[:N]`.

pub mod batch;
pub mod digits;
pub mod graph;
mod prep;
pub mod rng;
pub mod spec;
pub mod synthetic;
pub mod text;
pub mod vision;

use anyhow::{bail, Result};
use candle_core::Tensor;

pub use batch::{Batcher, Epoch};
pub use graph::{Csr, Graph};
pub use spec::Spec;

/// What the labels mean, and so which head and loss a model needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    /// One label in `0..num_classes` per sample.
    Classification { num_classes: usize },
    /// Next-token prediction: `x` and `y` are `[N, seq_len]` token ids, `y` shifted by one.
    LanguageModel { vocab_size: usize, seq_len: usize },
    /// One label per graph node; see [`Graph`] for which nodes each split scores.
    NodeClassification { num_classes: usize },
}

impl Task {
    /// Width of the model's output layer (classes, or vocabulary size for a language model).
    pub fn num_outputs(&self) -> usize {
        match *self {
            Task::Classification { num_classes } | Task::NodeClassification { num_classes } => {
                num_classes
            }
            Task::LanguageModel { vocab_size, .. } => vocab_size,
        }
    }
}

/// One side (train or test) of a dataset.
#[derive(Debug, Clone)]
pub struct Split {
    /// Inputs: f32 `[N, ...sample_shape]`, or u32 token ids `[N, seq_len]` for language
    /// models. For node classification: all node features `[num_nodes, F]` (in both splits).
    pub x: Tensor,
    /// Targets: u32 labels `[N]`, or u32 next tokens `[N, seq_len]` for language models. For
    /// node classification: the labels of this split's nodes, in the order of
    /// `Graph::train_nodes` / `Graph::test_nodes`.
    pub y: Tensor,
}

impl Split {
    /// Number of labelled samples (rows of `y`).
    pub fn len(&self) -> usize {
        self.y.dims().first().copied().unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A loaded dataset.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// The spec it was loaded from (e.g. `digits`, `mnist:/data/mnist`).
    pub name: String,
    pub task: Task,
    /// Per-sample input shape: `[1, 8, 8]` digits, `[3, 32, 32]` CIFAR, `[seq_len]` text,
    /// `[F]` graph node features.
    pub sample_shape: Vec<usize>,
    pub train: Split,
    pub test: Split,
    /// Character vocabulary of a `text:` dataset: token id `i` is `vocab[i]`.
    pub vocab: Option<Vec<char>>,
    /// Graph structure of a node-classification dataset.
    pub graph: Option<Graph>,
}

impl Dataset {
    /// One line for logs: name, split sizes, sample shape and classes/vocabulary.
    pub fn describe(&self) -> String {
        let (tr, te) = (self.train.len(), self.test.len());
        match (&self.task, &self.graph) {
            (Task::NodeClassification { num_classes }, Some(g)) => format!(
                "{}: graph of {} nodes ({} nonzeros in the normalised adjacency), train {tr} / test {te} nodes, \
                 features {:?}, {num_classes} classes",
                self.name,
                g.num_nodes,
                g.adjacency.nnz(),
                self.sample_shape
            ),
            (
                Task::LanguageModel {
                    vocab_size,
                    seq_len,
                },
                _,
            ) => format!(
                "{}: train {tr} / test {te} sequences of {seq_len} tokens, vocab {vocab_size}",
                self.name
            ),
            (task, _) => format!(
                "{}: train {tr} / test {te} samples, shape {:?}, {} classes",
                self.name,
                self.sample_shape,
                task.num_outputs()
            ),
        }
    }
}

/// Loading options (the `fit` flags that shape the data).
#[derive(Debug, Clone, PartialEq)]
pub struct LoadOptions {
    /// Seeds the train/test split and the synthetic generators.
    pub seed: u64,
    /// Held-out fraction for datasets without a fixed split (digits, synthetic, graph).
    /// MNIST and CIFAR keep their official split; text always holds out its last 10%.
    pub test_fraction: f32,
    /// Sequence length for `text:` (the `synthetic-text:` spec carries its own).
    pub seq_len: usize,
    /// At most this many samples (sequences for text) in each split, for quick runs.
    /// Ignored for graphs, whose nodes cannot be dropped without changing the graph.
    pub limit: Option<usize>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            seed: 0,
            test_fraction: 0.2,
            seq_len: 64,
            limit: None,
        }
    }
}

impl LoadOptions {
    fn validate(&self) -> Result<()> {
        if !(self.test_fraction.is_finite() && (0.0..1.0).contains(&self.test_fraction)) {
            bail!(
                "test fraction {} is out of range: expected a number in [0, 1)",
                self.test_fraction
            );
        }
        if self.seq_len == 0 {
            bail!("sequence length must be at least 1");
        }
        if self.limit == Some(0) {
            bail!("sample limit must be at least 1 (or unset)");
        }
        Ok(())
    }
}

/// Loads the dataset named by `spec` (the `--data` flag); see the module docs for the forms.
pub fn load(spec: &str, opts: &LoadOptions) -> Result<Dataset> {
    opts.validate()?;
    let parsed = spec::parse(spec)?;
    let name = spec.trim().to_string();
    match parsed {
        Spec::Digits => digits::load(name, opts),
        Spec::Mnist(dir) => vision::load_mnist(&dir, name, opts),
        Spec::FashionMnist(dir) => vision::load_mnist(&dir, name, opts),
        Spec::Cifar10(dir) => vision::load_cifar10(&dir, name, opts),
        Spec::Text(file) => text::load(&file, name, opts),
        Spec::Graph(dir) => graph::load_dir(&dir, name, opts),
        Spec::GraphSynthetic => graph::synthetic(name, opts),
        Spec::Synthetic { shape, classes, n } => synthetic::images(name, &shape, classes, n, opts),
        Spec::SyntheticText { vocab, seq_len, n } => synthetic::text(name, vocab, seq_len, n, opts),
    }
}
