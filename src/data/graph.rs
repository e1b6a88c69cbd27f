//! Node classification data for a GCN: node features, labels, and the symmetric normalised
//! adjacency `Â = D^-1/2 (A + I) D^-1/2` (Kipf & Welling) in CSR form, the only graph
//! structure a GCN layer needs (`H' = Â H W`).
//!
//! # `graph:DIR` file format
//! Three UTF-8 text files; blank lines and lines starting with `#` are ignored everywhere,
//! and line numbers in errors count every line from 1.
//! - `features.csv`: one row per node (row `i` is node `i`), comma-separated floats; every
//!   row must have the same number of columns. No header row.
//! - `labels.txt`: one non-negative integer class per line, one line per node (same count
//!   as `features.csv`). `num_classes` = largest label + 1.
//! - `edges.txt`: one edge per line, `src dst` (whitespace- or comma-separated), 0-based node
//!   indices. Edges are undirected (each is added both ways); duplicates and self-loops are
//!   harmless (`A` is binary and `I` is always added).
//!
//! The train/test split is a seeded split of node indices (`LoadOptions::test_fraction`),
//! stored in [`Graph::train_nodes`] / [`Graph::test_nodes`] (sorted ascending). Both
//! `Split::x` hold all node features `[N, F]`, since a GCN propagates over the whole graph;
//! `Split::y` holds the labels of that split's nodes in node-list order, so the loss is
//! `cross_entropy(logits.index_select(train_nodes), train.y)`.

use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};

use super::prep::{gather, split_indices};
use super::rng::{mix, Rng};
use super::{Dataset, LoadOptions, Split, Task};

/// A sparse matrix in compressed sparse row form: row `i`'s entries are
/// `col[row_ptr[i]..row_ptr[i+1]]` with values `val[..]` (columns sorted ascending).
#[derive(Debug, Clone, PartialEq)]
pub struct Csr {
    pub row_ptr: Vec<usize>,
    pub col: Vec<u32>,
    pub val: Vec<f32>,
}

impl Csr {
    pub fn num_rows(&self) -> usize {
        self.row_ptr.len().saturating_sub(1)
    }

    /// Number of stored entries.
    pub fn nnz(&self) -> usize {
        self.col.len()
    }

    /// `(column, value)` pairs of row `i` (empty when out of range).
    pub fn row(&self, i: usize) -> impl Iterator<Item = (u32, f32)> + '_ {
        let range = match (self.row_ptr.get(i), self.row_ptr.get(i + 1)) {
            (Some(&a), Some(&b)) if a <= b => a..b,
            _ => 0..0,
        };
        let col = self.col.get(range.clone()).unwrap_or_default();
        let val = self.val.get(range).unwrap_or_default();
        col.iter().copied().zip(val.iter().copied())
    }

    /// Sum of each row's values.
    pub fn row_sums(&self) -> Vec<f32> {
        (0..self.num_rows())
            .map(|i| self.row(i).map(|(_, v)| v).sum())
            .collect()
    }

    /// Dense `[rows, cols]` f32 tensor: a fallback for small graphs and for tests.
    pub fn to_dense(&self, cols: usize, device: &Device) -> Result<Tensor> {
        let rows = self.num_rows();
        let mut d = vec![0f32; rows * cols];
        for i in 0..rows {
            for (j, v) in self.row(i) {
                if (j as usize) < cols {
                    d[i * cols + j as usize] += v;
                }
            }
        }
        Ok(Tensor::from_vec(d, (rows, cols), device)?)
    }
}

/// The structure of a node-classification dataset.
#[derive(Debug, Clone, PartialEq)]
pub struct Graph {
    pub num_nodes: usize,
    /// `D^-1/2 (A + I) D^-1/2`, `num_nodes x num_nodes`.
    pub adjacency: Csr,
    /// Nodes whose labels are in `Dataset::train.y`, in that order (sorted ascending).
    pub train_nodes: Vec<u32>,
    /// Nodes whose labels are in `Dataset::test.y`, in that order (sorted ascending).
    pub test_nodes: Vec<u32>,
}

/// Builds `Â = D^-1/2 (A + I) D^-1/2` for an undirected graph. Edge endpoints must be
/// `< num_nodes` (callers validate and report file positions; here it is an error too).
pub fn normalized_adjacency(num_nodes: usize, edges: &[(u32, u32)]) -> Result<Csr> {
    let mut nbrs: Vec<Vec<u32>> = (0..num_nodes as u32).map(|i| vec![i]).collect();
    for &(a, b) in edges {
        if a as usize >= num_nodes || b as usize >= num_nodes {
            bail!("edge ({a}, {b}) out of range for a graph of {num_nodes} nodes");
        }
        nbrs[a as usize].push(b);
        nbrs[b as usize].push(a);
    }
    for n in &mut nbrs {
        n.sort_unstable();
        n.dedup();
    }
    let inv_sqrt_deg: Vec<f32> = nbrs.iter().map(|n| 1.0 / (n.len() as f32).sqrt()).collect();
    let mut row_ptr = Vec::with_capacity(num_nodes + 1);
    row_ptr.push(0);
    let mut col = Vec::new();
    let mut val = Vec::new();
    for (i, n) in nbrs.iter().enumerate() {
        for &j in n {
            col.push(j);
            val.push(inv_sqrt_deg[i] * inv_sqrt_deg[j as usize]);
        }
        row_ptr.push(col.len());
    }
    Ok(Csr { row_ptr, col, val })
}

/// Meaningful lines of a text file as `(1-based line number, trimmed text)`.
fn content_lines(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.trim()))
        .filter(|(_, l)| !l.is_empty() && !l.starts_with('#'))
}

fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read '{}'", path.display()))
}

/// Parses `features.csv` into (row-major values, rows, columns).
pub fn parse_features(path: &Path, text: &str) -> Result<(Vec<f32>, usize, usize)> {
    let mut vals = Vec::new();
    let mut width: Option<usize> = None;
    let mut rows = 0;
    for (ln, line) in content_lines(text) {
        let mut count = 0;
        for (k, field) in line.split(',').enumerate() {
            let f = field.trim();
            match f.parse::<f32>() {
                Ok(v) if v.is_finite() => vals.push(v),
                _ => bail!(
                    "'{}' line {ln}, field {}: '{f}' is not a finite number",
                    path.display(),
                    k + 1
                ),
            }
            count += 1;
        }
        match width {
            None => width = Some(count),
            Some(w) if w != count => bail!(
                "'{}' line {ln}: {count} fields, expected {w} like the first row",
                path.display()
            ),
            _ => {}
        }
        rows += 1;
    }
    match width {
        Some(w) => Ok((vals, rows, w)),
        None => bail!("'{}' has no feature rows", path.display()),
    }
}

/// Parses `labels.txt`: one non-negative integer per line.
pub fn parse_labels(path: &Path, text: &str) -> Result<Vec<u32>> {
    content_lines(text)
        .map(|(ln, line)| {
            line.parse::<u32>().map_err(|_| {
                anyhow::anyhow!(
                    "'{}' line {ln}: '{line}' is not a non-negative integer label",
                    path.display()
                )
            })
        })
        .collect()
}

/// Parses `edges.txt`: `src dst` per line, each `< num_nodes`.
pub fn parse_edges(path: &Path, text: &str, num_nodes: usize) -> Result<Vec<(u32, u32)>> {
    content_lines(text)
        .map(|(ln, line)| {
            let fields: Vec<&str> = line
                .split(|c: char| c.is_whitespace() || c == ',')
                .filter(|f| !f.is_empty())
                .collect();
            if fields.len() != 2 {
                bail!(
                    "'{}' line {ln}: '{line}' should be two node indices 'src dst'",
                    path.display()
                );
            }
            let mut ends = [0u32; 2];
            for (k, f) in fields.iter().enumerate() {
                ends[k] = match f.parse::<u32>() {
                    Ok(v) if (v as usize) < num_nodes => v,
                    Ok(v) => bail!(
                        "'{}' line {ln}: node index {v} out of range (the graph has {num_nodes} \
                         nodes, indices are 0-based)",
                        path.display()
                    ),
                    Err(_) => bail!(
                        "'{}' line {ln}, field {}: '{f}' is not a non-negative integer node index",
                        path.display(),
                        k + 1
                    ),
                };
            }
            Ok((ends[0], ends[1]))
        })
        .collect()
}

/// Assembles a node-classification dataset from parsed parts.
/// `features` is `(row-major values, num_nodes, num_features)`.
fn build(
    name: String,
    features: (Vec<f32>, usize, usize),
    labels: Vec<u32>,
    num_classes: usize,
    edges: &[(u32, u32)],
    opts: &LoadOptions,
) -> Result<Dataset> {
    let (features, num_nodes, num_features) = features;
    let adjacency = normalized_adjacency(num_nodes, edges)?;
    let (train_nodes, test_nodes) = split_indices(num_nodes, opts.test_fraction, opts.seed);
    let x = Tensor::from_vec(features, (num_nodes, num_features), &Device::Cpu)?;
    let split = |nodes: &[u32]| -> Result<Split> {
        let y = gather(&labels, 1, nodes);
        let n = y.len();
        Ok(Split {
            x: x.clone(),
            y: Tensor::from_vec(y, n, &Device::Cpu)?,
        })
    };
    let (train, test) = (split(&train_nodes)?, split(&test_nodes)?);
    Ok(Dataset {
        name,
        task: Task::NodeClassification { num_classes },
        sample_shape: vec![num_features],
        train,
        test,
        vocab: None,
        graph: Some(Graph {
            num_nodes,
            adjacency,
            train_nodes,
            test_nodes,
        }),
    })
}

/// Loads `features.csv`, `labels.txt` and `edges.txt` from `dir` (format in the module docs).
pub fn load_dir(dir: &Path, name: String, opts: &LoadOptions) -> Result<Dataset> {
    if !dir.is_dir() {
        bail!(
            "graph directory '{}' does not exist or is not a directory (expected features.csv, \
             labels.txt, edges.txt)",
            dir.display()
        );
    }
    let fp = dir.join("features.csv");
    let lp = dir.join("labels.txt");
    let ep = dir.join("edges.txt");
    let (features, num_nodes, num_features) = parse_features(&fp, &read_text(&fp)?)?;
    let labels = parse_labels(&lp, &read_text(&lp)?)?;
    if labels.len() != num_nodes {
        bail!(
            "'{}' has {} labels but '{}' has {num_nodes} nodes; expected one label per node",
            lp.display(),
            labels.len(),
            fp.display()
        );
    }
    let num_classes = labels.iter().max().map_or(0, |&m| m as usize + 1);
    let edges = parse_edges(&ep, &read_text(&ep)?, num_nodes)?;
    build(
        name,
        (features, num_nodes, num_features),
        labels,
        num_classes,
        &edges,
        opts,
    )
}

/// Parameters of the built-in `graph:synthetic` stochastic block model.
pub const SBM_COMMUNITIES: usize = 4;
pub const SBM_NODES: usize = 400;
/// Edge probabilities within / across communities: about 5 same-community neighbours and
/// 1.5 others per node, so neighbourhood averaging clearly helps.
pub const SBM_P_IN: f32 = 0.05;
pub const SBM_P_OUT: f32 = 0.005;
/// Feature noise std: high enough that features alone classify poorly (Bayes accuracy ~55%), so a GCN
/// visibly beats an MLP on the same features.
pub const SBM_NOISE: f32 = 1.0;

/// `graph:synthetic`: a seeded stochastic block model (400 nodes, 4 communities; node `i` is
/// in community `i % 4`), features = one-hot community + Gaussian noise, label = community.
/// Needs no files, for tests and demos.
pub fn synthetic(name: String, opts: &LoadOptions) -> Result<Dataset> {
    let n = SBM_NODES;
    let k = SBM_COMMUNITIES;
    let mut rng = Rng::new(mix(opts.seed, 0x5B4D));
    let labels: Vec<u32> = (0..n).map(|i| (i % k) as u32).collect();
    let mut edges = Vec::new();
    for i in 0..n {
        for j in i + 1..n {
            let p = if i % k == j % k { SBM_P_IN } else { SBM_P_OUT };
            if rng.uniform() < p {
                edges.push((i as u32, j as u32));
            }
        }
    }
    let mut features = Vec::with_capacity(n * k);
    for &l in &labels {
        for c in 0..k {
            let hot = if c == l as usize { 1.0 } else { 0.0 };
            features.push(hot + SBM_NOISE * rng.normal());
        }
    }
    build(name, (features, n, k), labels, k, &edges, opts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_graph_adjacency() {
        // 0 - 1 - 2: degrees with self-loops 2, 3, 2.
        let a = normalized_adjacency(3, &[(0, 1), (1, 2), (1, 0)]).unwrap();
        assert_eq!(a.row_ptr, vec![0, 2, 5, 7]);
        assert_eq!(a.col, vec![0, 1, 0, 1, 2, 1, 2]);
        let s6 = 1.0 / 6f32.sqrt();
        let expect = [0.5, s6, s6, 1.0 / 3.0, s6, s6, 0.5];
        for (v, e) in a.val.iter().zip(expect) {
            assert!((v - e).abs() < 1e-6);
        }
        let d = a
            .to_dense(3, &Device::Cpu)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert!((d[0][1] - d[1][0]).abs() < 1e-7);
        assert!(normalized_adjacency(3, &[(0, 3)]).is_err());
    }
}
