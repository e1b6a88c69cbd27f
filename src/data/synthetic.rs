//! Seeded synthetic data of any shape, for memory and speed work where only tensor sizes
//! matter, yet with real structure so the loss can fall and compressed vs. exact training
//! can be compared on accuracy.
//!
//! Images/vectors (`synthetic:CxHxW:CLASSES[:N]`): each sample draws a class `c`, then
//! `x = noise + amp * P_c` with standard-normal noise and a fixed ±1 class prototype `P_c`
//! that is constant on 4x4 spatial blocks (so convolutions and pooling can pick it up; flat
//! vectors use one sign per element). `amp = min(1, sqrt(16 / D))` keeps the class
//! separation near 5.7 noise std whatever the input size `D`: learnable, not instant. The
//! generative form (class first) costs O(N·D), where "argmax of a random projection" would
//! cost O(N·D·C), too slow for ImageNet-sized requests.
//!
//! Token sequences (`synthetic-text:VOCAB:SEQ[:N]`): a fixed random Markov chain where each
//! token is followed by one of 3 preferred successors with probability 0.9, else any token,
//! so a model can push the loss from ln(VOCAB) towards ~1.4 nats.
//!
//! Sample `i` depends only on `(seed, i)`, not on `N` or `limit`, and samples are generated
//! in parallel. The first `N - n_test` samples are the training split, the rest the test split.

use anyhow::Result;
use rayon::prelude::*;

use super::prep::{image_split, test_count, token_split};
use super::rng::{mix, Rng};
use super::{Dataset, LoadOptions, Task};

/// Side of the square blocks on which image prototypes are constant.
const BLOCK: usize = 4;
/// Preferred successors per token in the synthetic Markov chain, and their total probability.
const SUCCESSORS: usize = 3;
const P_PREFERRED: f32 = 0.9;

/// Index ranges `(train, test)` of the generated samples after the test fraction and `limit`.
fn ranges(n: usize, opts: &LoadOptions) -> (std::ops::Range<usize>, std::ops::Range<usize>) {
    let n_test = test_count(n, opts.test_fraction);
    let n_train = n - n_test;
    let cap = |rows: usize| opts.limit.map_or(rows, |l| rows.min(l));
    (0..cap(n_train), n_train..n_train + cap(n_test))
}

/// For each element of a sample, the key of the prototype cell it belongs to: elements in the
/// same 4x4 block of the same channel share a key (rank >= 2); flat vectors key per element.
fn cell_keys(shape: &[usize]) -> Vec<u64> {
    let d: usize = shape.iter().product();
    if shape.len() < 2 {
        return (0..d as u64).collect();
    }
    let (h, w) = (shape[shape.len() - 2], shape[shape.len() - 1]);
    let (bh, bw) = (h.div_ceil(BLOCK), w.div_ceil(BLOCK));
    (0..d)
        .map(|e| {
            let outer = e / (h * w);
            let (r, c) = ((e / w) % h, e % w);
            ((outer * bh + r / BLOCK) * bw + c / BLOCK) as u64
        })
        .collect()
}

/// Generates `range` samples of the image generator into (inputs, labels).
fn gen_images(
    range: std::ops::Range<usize>,
    keys: &[u64],
    classes: usize,
    amp: f32,
    seed: u64,
) -> (Vec<f32>, Vec<u32>) {
    let d = keys.len();
    let proto_seed = mix(seed, 1);
    let sample_seed = mix(seed, 2);
    let labels: Vec<u32> = range
        .clone()
        .map(|i| Rng::new(mix(sample_seed, i as u64)).below(classes) as u32)
        .collect();
    let mut x = vec![0f32; range.len() * d];
    x.par_chunks_mut(d.max(1))
        .zip(range.into_par_iter())
        .zip(labels.par_iter())
        .for_each(|((row, i), &c)| {
            let mut rng = Rng::new(mix(sample_seed, i as u64));
            rng.next_u64(); // the draw used for the label
            let class_seed = mix(proto_seed, c as u64);
            for (v, &k) in row.iter_mut().zip(keys) {
                let sign = if mix(class_seed, k) & 1 == 0 {
                    1.0
                } else {
                    -1.0
                };
                *v = rng.normal() + amp * sign;
            }
        });
    (x, labels)
}

/// `synthetic:SHAPE:CLASSES[:N]`: see the module docs.
pub fn images(
    name: String,
    shape: &[usize],
    classes: usize,
    n: usize,
    opts: &LoadOptions,
) -> Result<Dataset> {
    let keys = cell_keys(shape);
    let amp = (16.0 / keys.len().max(1) as f32).sqrt().min(1.0);
    let (tr, te) = ranges(n, opts);
    let (xtr, ytr) = gen_images(tr, &keys, classes, amp, opts.seed);
    let (xte, yte) = gen_images(te, &keys, classes, amp, opts.seed);
    Ok(Dataset {
        name,
        task: Task::Classification {
            num_classes: classes,
        },
        train: image_split(xtr, shape, ytr)?,
        test: image_split(xte, shape, yte)?,
        sample_shape: shape.to_vec(),
        vocab: None,
        graph: None,
    })
}

/// Generates `range` sequences of the Markov-chain generator into (inputs, targets).
fn gen_tokens(
    range: std::ops::Range<usize>,
    vocab: usize,
    seq_len: usize,
    seed: u64,
) -> (Vec<u32>, Vec<u32>) {
    let chain_seed = mix(seed, 3);
    let sample_seed = mix(seed, 4);
    let successor =
        |t: usize, j: usize| (mix(chain_seed, (t * SUCCESSORS + j) as u64) % vocab as u64) as usize;
    let seqs: Vec<Vec<u32>> = range
        .into_par_iter()
        .map(|i| {
            let mut rng = Rng::new(mix(sample_seed, i as u64));
            let mut tok = rng.below(vocab);
            let mut s = Vec::with_capacity(seq_len + 1);
            for _ in 0..=seq_len {
                s.push(tok as u32);
                tok = if rng.uniform() < P_PREFERRED {
                    successor(tok, rng.below(SUCCESSORS))
                } else {
                    rng.below(vocab)
                };
            }
            s
        })
        .collect();
    let mut x = Vec::with_capacity(seqs.len() * seq_len);
    let mut y = Vec::with_capacity(seqs.len() * seq_len);
    for s in &seqs {
        x.extend_from_slice(&s[..seq_len]);
        y.extend_from_slice(&s[1..]);
    }
    (x, y)
}

/// `synthetic-text:VOCAB:SEQ[:N]`: see the module docs.
pub fn text(
    name: String,
    vocab: usize,
    seq_len: usize,
    n: usize,
    opts: &LoadOptions,
) -> Result<Dataset> {
    let (tr, te) = ranges(n, opts);
    let (xtr, ytr) = gen_tokens(tr, vocab, seq_len, opts.seed);
    let (xte, yte) = gen_tokens(te, vocab, seq_len, opts.seed);
    Ok(Dataset {
        name,
        task: Task::LanguageModel {
            vocab_size: vocab,
            seq_len,
        },
        sample_shape: vec![seq_len],
        train: token_split(xtr, ytr, seq_len)?,
        test: token_split(xte, yte, seq_len)?,
        vocab: None,
        graph: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cell_keys_are_blocky() {
        let k = cell_keys(&[2, 8, 8]);
        assert_eq!(k.len(), 128);
        assert_eq!(k[0], k[3 * 8 + 3]); // same 4x4 block
        assert_ne!(k[0], k[4]); // next block to the right
        assert_ne!(k[0], k[64]); // other channel
        assert_eq!(cell_keys(&[5]), vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn class_means_differ() {
        // The per-class mean of the inputs should recover the prototype's sign pattern.
        let keys = cell_keys(&[16]);
        let (x, y) = gen_images(0..2000, &keys, 2, 1.0, 9);
        let mean = |c: u32| -> Vec<f32> {
            let rows: Vec<&[f32]> = x
                .chunks(16)
                .zip(&y)
                .filter(|(_, &l)| l == c)
                .map(|(r, _)| r)
                .collect();
            (0..16)
                .map(|e| rows.iter().map(|r| r[e]).sum::<f32>() / rows.len() as f32)
                .collect()
        };
        let (m0, m1) = (mean(0), mean(1));
        assert!(m0.iter().chain(&m1).all(|v| (v.abs() - 1.0).abs() < 0.2));
        assert!(m0.iter().zip(&m1).any(|(a, b)| (a - b).abs() > 1.5));
    }

    #[test]
    fn markov_text_is_predictable() {
        let (x, y) = gen_tokens(0..200, 50, 20, 1);
        // Successor pairs concentrate: few distinct (x, y) pairs compared with 50 * 50.
        let mut pairs: Vec<(u32, u32)> = x.iter().copied().zip(y.iter().copied()).collect();
        pairs.sort_unstable();
        pairs.dedup();
        assert!(pairs.len() < 50 * 50 / 3, "{} distinct pairs", pairs.len());
        assert!(x.iter().all(|&t| t < 50));
    }
}
