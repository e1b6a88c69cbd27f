//! Character-level language-model data from a plain UTF-8 text file: the smallest real
//! workload for the transformer path, with no tokenizer dependency.
//!
//! The vocabulary is the sorted set of distinct characters (so ids are stable for a given
//! file). The text is cut into non-overlapping windows of `seq_len + 1` characters stepping
//! by `seq_len`; `x` is a window's first `seq_len` ids and `y` the same shifted by one. The
//! last 10% of windows (at least one when there are two or more) form the test split: held
//! out at the end rather than sampled, so test text never overlaps training text.

use std::path::Path;

use anyhow::{bail, Context, Result};

use super::prep::token_split;
use super::{Dataset, LoadOptions, Task};

/// Fraction of sequences held out for testing.
pub const TEST_FRACTION: f32 = 0.1;

/// Tokenised text: the vocabulary and the id of every character.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    pub vocab: Vec<char>,
    pub ids: Vec<u32>,
}

/// Builds the sorted character vocabulary of `text` and encodes it.
pub fn encode(text: &str) -> Encoded {
    let mut vocab: Vec<char> = text.chars().collect();
    vocab.sort_unstable();
    vocab.dedup();
    let ids = text
        .chars()
        .map(|c| vocab.binary_search(&c).unwrap_or(0) as u32)
        .collect();
    Encoded { vocab, ids }
}

/// Cuts `ids` into (inputs, targets) windows of `seq_len`, flattened row-major.
pub fn windows(ids: &[u32], seq_len: usize) -> (Vec<u32>, Vec<u32>) {
    let n = ids.len().saturating_sub(1) / seq_len.max(1);
    let mut x = Vec::with_capacity(n * seq_len);
    let mut y = Vec::with_capacity(n * seq_len);
    for i in 0..n {
        let s = i * seq_len;
        x.extend_from_slice(&ids[s..s + seq_len]);
        y.extend_from_slice(&ids[s + 1..s + seq_len + 1]);
    }
    (x, y)
}

/// Loads `file` as a character-level LM dataset with `opts.seq_len`-long sequences.
pub fn load(file: &Path, name: String, opts: &LoadOptions) -> Result<Dataset> {
    let bytes = std::fs::read(file)
        .with_context(|| format!("cannot read text file '{}'", file.display()))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        anyhow::anyhow!(
            "text file '{}' is not valid UTF-8 (at byte {})",
            file.display(),
            e.utf8_error().valid_up_to()
        )
    })?;
    let seq_len = opts.seq_len;
    let enc = encode(&text);
    if enc.ids.len() < seq_len + 1 {
        bail!(
            "text file '{}' has {} characters, expected at least seq_len + 1 = {}",
            file.display(),
            enc.ids.len(),
            seq_len + 1
        );
    }
    let (x, y) = windows(&enc.ids, seq_len);
    let n = x.len() / seq_len;
    let n_test = super::prep::test_count(n, TEST_FRACTION);
    // With a single window there is nothing to hold out: evaluate on the training text
    // rather than hand the trainer an empty test split.
    let (n_train, test_start) = if n_test == 0 {
        (n, 0)
    } else {
        (n - n_test, n - n_test)
    };
    let cap = |rows: usize| opts.limit.map_or(rows, |l| rows.min(l));
    let (tr_rows, te_rows) = (cap(n_train), cap(n - test_start));
    let train = token_split(
        x[..tr_rows * seq_len].to_vec(),
        y[..tr_rows * seq_len].to_vec(),
        seq_len,
    )?;
    let te = test_start * seq_len..(test_start + te_rows) * seq_len;
    let test = token_split(x[te.clone()].to_vec(), y[te].to_vec(), seq_len)?;
    Ok(Dataset {
        name,
        task: Task::LanguageModel {
            vocab_size: enc.vocab.len(),
            seq_len,
        },
        sample_shape: vec![seq_len],
        train,
        test,
        vocab: Some(enc.vocab),
        graph: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_sorts_vocab() {
        let e = encode("banana");
        assert_eq!(e.vocab, vec!['a', 'b', 'n']);
        assert_eq!(e.ids, vec![1, 0, 2, 0, 2, 0]);
    }

    #[test]
    fn windows_shift_by_one() {
        let ids: Vec<u32> = (0..10).collect();
        let (x, y) = windows(&ids, 3);
        assert_eq!(x, vec![0, 1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(y, vec![1, 2, 3, 4, 5, 6, 7, 8, 9]);
        let (x, _) = windows(&ids, 9);
        assert_eq!(x.len(), 9);
        let (x, _) = windows(&ids, 10);
        assert!(x.is_empty());
    }
}
