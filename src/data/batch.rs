//! Mini-batches over a [`Split`]: a fresh seeded shuffle per epoch, where the epoch number is
//! mixed into the seed. Epoch `k`'s order is thus a pure function of `(seed, k)`: a resumed
//! run replays exactly the batches it would have seen (see [`Batcher::epoch_from`]) without
//! storing any RNG state.

use anyhow::{bail, Result};
use candle_core::Tensor;

use super::rng::{mix, permutation};
use super::Split;

/// Yields `(x, y)` batches of a split, gathered with `Tensor::index_select` along dim 0.
#[derive(Debug, Clone)]
pub struct Batcher {
    x: Tensor,
    y: Tensor,
    len: usize,
    batch_size: usize,
    seed: u64,
    drop_last: bool,
    shuffle: bool,
}

impl Batcher {
    /// A shuffling batcher that keeps the final short batch. Errors when `batch_size` is 0 or
    /// `split.x` and `split.y` disagree on the sample count. (Cloning the split's tensors is
    /// cheap: candle tensors share their storage.)
    pub fn new(split: &Split, batch_size: usize, shuffle_seed: u64) -> Result<Self> {
        if batch_size == 0 {
            bail!("batch size must be at least 1");
        }
        let len = split.len();
        let xn = split.x.dims().first().copied().unwrap_or(0);
        if xn != len {
            bail!(
                "split has {xn} inputs but {len} targets; cannot batch (graph splits are \
                 full-batch: index node outputs with Graph::train_nodes instead)"
            );
        }
        Ok(Self {
            x: split.x.clone(),
            y: split.y.clone(),
            len,
            batch_size,
            seed: shuffle_seed,
            drop_last: false,
            shuffle: true,
        })
    }

    /// Drop the final batch when it is smaller than `batch_size` (keeps batch shapes fixed,
    /// which memory measurements want).
    pub fn drop_last(mut self, drop_last: bool) -> Self {
        self.drop_last = drop_last;
        self
    }

    /// Disable shuffling (evaluation): batches come in sample order.
    pub fn shuffle(mut self, shuffle: bool) -> Self {
        self.shuffle = shuffle;
        self
    }

    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    /// Number of samples in the split.
    pub fn num_samples(&self) -> usize {
        self.len
    }

    /// Batches per epoch.
    pub fn num_batches(&self) -> usize {
        if self.drop_last {
            self.len / self.batch_size
        } else {
            self.len.div_ceil(self.batch_size)
        }
    }

    /// The sample order of epoch `epoch`.
    pub fn order(&self, epoch: u64) -> Vec<u32> {
        if self.shuffle {
            permutation(self.len, mix(self.seed, epoch))
        } else {
            (0..self.len as u32).collect()
        }
    }

    /// The batches of epoch `epoch`.
    pub fn epoch(&self, epoch: u64) -> Epoch {
        self.epoch_from(epoch, 0)
    }

    /// The batches of epoch `epoch` starting at batch `first_batch`, to resume mid-epoch
    /// (yields nothing when `first_batch >= num_batches()`).
    pub fn epoch_from(&self, epoch: u64, first_batch: usize) -> Epoch {
        let num_batches = self.num_batches();
        Epoch {
            x: self.x.clone(),
            y: self.y.clone(),
            order: self.order(epoch),
            batch_size: self.batch_size,
            next: first_batch.min(num_batches),
            num_batches,
        }
    }
}

/// Iterator over one epoch's batches; each item is `(x, y)` or a tensor error.
#[derive(Debug)]
pub struct Epoch {
    x: Tensor,
    y: Tensor,
    order: Vec<u32>,
    batch_size: usize,
    next: usize,
    num_batches: usize,
}

impl Epoch {
    /// Index of the batch the next call to `next()` returns.
    pub fn position(&self) -> usize {
        self.next
    }
}

impl Iterator for Epoch {
    type Item = Result<(Tensor, Tensor)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.next >= self.num_batches {
            return None;
        }
        let start = self.next * self.batch_size;
        let end = (start + self.batch_size).min(self.order.len());
        self.next += 1;
        let idx = self.order.get(start..end)?;
        let gather = || -> Result<(Tensor, Tensor)> {
            let idx = Tensor::from_slice(idx, idx.len(), self.x.device())?;
            Ok((self.x.index_select(&idx, 0)?, self.y.index_select(&idx, 0)?))
        };
        Some(gather())
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self.num_batches - self.next;
        (left, Some(left))
    }
}

impl ExactSizeIterator for Epoch {}
