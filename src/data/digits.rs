//! The embedded default dataset: 1797 UCI 8x8 handwritten digits (CC BY 4.0, see
//! `data/README.md`), so `actrain fit` with no arguments trains on real data with nothing on
//! disk. Stored as raw bytes (65 per image: 64 pixels in 0..16, then the label) to keep the
//! binary small and parsing trivial; the bytes are still validated, since a bad rebuild of
//! `digits.bin` should produce an error rather than garbage.

use anyhow::{bail, Result};

use super::prep::{gather, image_split, split_indices, standardise, truncate_rows};
use super::{Dataset, LoadOptions, Task};

static DIGITS_BIN: &[u8] = include_bytes!("../../data/digits.bin");

pub const NUM_SAMPLES: usize = 1797;
pub const NUM_CLASSES: usize = 10;
const PIXELS: usize = 64;
const ROW: usize = PIXELS + 1;

/// Decodes and validates a digits blob: pixels scaled to `[0, 1]` (divided by 16) and labels.
pub fn decode(bytes: &[u8]) -> Result<(Vec<f32>, Vec<u32>)> {
    if bytes.len() != NUM_SAMPLES * ROW {
        bail!(
            "embedded data/digits.bin: {} bytes, expected {NUM_SAMPLES} rows x {ROW} = {}",
            bytes.len(),
            NUM_SAMPLES * ROW
        );
    }
    let mut pixels = Vec::with_capacity(NUM_SAMPLES * PIXELS);
    let mut labels = Vec::with_capacity(NUM_SAMPLES);
    for (r, row) in bytes.chunks_exact(ROW).enumerate() {
        let (px, label) = row.split_at(PIXELS);
        if let Some(&bad) = px.iter().find(|&&p| p > 16) {
            bail!("embedded data/digits.bin row {r}: pixel {bad} outside 0..=16");
        }
        let l = label.first().copied().unwrap_or(u8::MAX) as usize;
        if l >= NUM_CLASSES {
            bail!("embedded data/digits.bin row {r}: label {l} outside 0..{NUM_CLASSES}");
        }
        pixels.extend(px.iter().map(|&p| p as f32 / 16.0));
        labels.push(l as u32);
    }
    Ok((pixels, labels))
}

/// Loads the embedded digits: seeded split, then standardised with the train mean/std (one
/// scalar pair: several border pixels are always 0, so per-pixel stats would be degenerate).
pub fn load(name: String, opts: &LoadOptions) -> Result<Dataset> {
    let (pixels, labels) = decode(DIGITS_BIN)?;
    let (tr_idx, te_idx) = split_indices(NUM_SAMPLES, opts.test_fraction, opts.seed);
    let mut xtr = gather(&pixels, PIXELS, &tr_idx);
    let mut xte = gather(&pixels, PIXELS, &te_idx);
    let mut ytr = gather(&labels, 1, &tr_idx);
    let mut yte = gather(&labels, 1, &te_idx);
    for (x, y) in [(&mut xtr, &mut ytr), (&mut xte, &mut yte)] {
        truncate_rows(x, PIXELS, opts.limit);
        truncate_rows(y, 1, opts.limit);
    }
    standardise(&mut xtr, &mut xte, PIXELS, 1);
    let sample_shape = vec![1, 8, 8];
    Ok(Dataset {
        name,
        task: Task::Classification {
            num_classes: NUM_CLASSES,
        },
        train: image_split(xtr, &sample_shape, ytr)?,
        test: image_split(xte, &sample_shape, yte)?,
        sample_shape,
        vocab: None,
        graph: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_blob_is_valid() {
        let (px, y) = decode(DIGITS_BIN).unwrap();
        assert_eq!(px.len(), NUM_SAMPLES * PIXELS);
        assert_eq!(y.len(), NUM_SAMPLES);
        // Roughly balanced: every class has 170..190 images.
        for c in 0..10 {
            let k = y.iter().filter(|&&l| l == c).count();
            assert!((170..=190).contains(&k), "class {c}: {k}");
        }
    }

    #[test]
    fn corrupt_blob_is_an_error() {
        assert!(decode(&DIGITS_BIN[..100]).is_err());
        let mut b = DIGITS_BIN.to_vec();
        b[64] = 10;
        assert!(decode(&b).unwrap_err().to_string().contains("label 10"));
        b[64] = 0;
        b[3] = 17;
        assert!(decode(&b).unwrap_err().to_string().contains("pixel 17"));
    }
}
