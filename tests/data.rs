//! Integration tests of `actrain::data`: every spec form loads with the documented shapes,
//! every malformed input is an error naming the file (and line where relevant), and the
//! batcher is a seeded, resumable permutation per epoch.

use std::path::{Path, PathBuf};

use actrain::data::{load, Batcher, LoadOptions, Split, Task};

/// A fresh, empty scratch directory unique to this test and process (no tempfile crate).
fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("actrain-data-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn opts() -> LoadOptions {
    LoadOptions::default()
}

fn err_of(spec: &str, o: &LoadOptions) -> String {
    match load(spec, o) {
        Ok(_) => panic!("{spec} loaded but should have failed"),
        Err(e) => format!("{e:#}"),
    }
}

fn labels(s: &Split) -> Vec<u32> {
    s.y.to_vec1::<u32>().unwrap()
}

fn flat(s: &Split) -> Vec<f32> {
    s.x.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

// ---------------------------------------------------------------- digits

#[test]
fn digits_loads_standardised_and_split() {
    let d = load("digits", &opts()).unwrap();
    assert_eq!(d.task, Task::Classification { num_classes: 10 });
    assert_eq!(d.sample_shape, vec![1, 8, 8]);
    assert_eq!(d.train.len() + d.test.len(), 1797);
    assert_eq!(d.test.len(), 359); // round(1797 * 0.2)
    assert_eq!(d.train.x.dims(), &[1438, 1, 8, 8]);
    let ytr = labels(&d.train);
    assert!(ytr.iter().chain(&labels(&d.test)).all(|&l| l < 10));
    for c in 0..10 {
        assert!(ytr.contains(&c), "class {c} missing from train");
    }
    let x = flat(&d.train);
    let mean = x.iter().map(|&v| v as f64).sum::<f64>() / x.len() as f64;
    let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / x.len() as f64;
    assert!(mean.abs() < 1e-4, "mean {mean}");
    assert!((var - 1.0).abs() < 1e-3, "var {var}");
    assert!(d.describe().contains("1438"), "{}", d.describe());
}

#[test]
fn digits_split_is_seeded() {
    let a = load("digits", &opts()).unwrap();
    let b = load("digits", &opts()).unwrap();
    let c = load("digits", &LoadOptions { seed: 1, ..opts() }).unwrap();
    assert_eq!(labels(&a.test), labels(&b.test));
    assert_eq!(flat(&a.test), flat(&b.test));
    assert_ne!(flat(&a.test), flat(&c.test));
}

#[test]
fn limit_caps_each_split() {
    let o = LoadOptions {
        limit: Some(50),
        ..opts()
    };
    let d = load("digits", &o).unwrap();
    assert_eq!((d.train.len(), d.test.len()), (50, 50));
    assert_eq!(d.train.x.dims(), &[50, 1, 8, 8]);
}

#[test]
fn bad_options_are_errors() {
    for o in [
        LoadOptions {
            test_fraction: 1.0,
            ..opts()
        },
        LoadOptions {
            test_fraction: f32::NAN,
            ..opts()
        },
        LoadOptions {
            seq_len: 0,
            ..opts()
        },
        LoadOptions {
            limit: Some(0),
            ..opts()
        },
    ] {
        assert!(load("digits", &o).is_err());
    }
}

// ---------------------------------------------------------------- mnist

fn idx3(n: u32, rows: u32, cols: u32, px: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    for v in [0x0803u32, n, rows, cols] {
        b.extend_from_slice(&v.to_be_bytes());
    }
    b.extend_from_slice(px);
    b
}

fn idx1(labels: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    for v in [0x0801u32, labels.len() as u32] {
        b.extend_from_slice(&v.to_be_bytes());
    }
    b.extend_from_slice(labels);
    b
}

/// Writes a tiny 28x28 MNIST directory: 3 train images (pixel value = image index * 100) and
/// 2 test images.
fn write_mnist(dir: &Path) {
    let img = |n: usize| -> Vec<u8> {
        (0..n)
            .flat_map(|i| std::iter::repeat_n((i * 100) as u8, 784))
            .collect()
    };
    std::fs::write(
        dir.join("train-images-idx3-ubyte"),
        idx3(3, 28, 28, &img(3)),
    )
    .unwrap();
    std::fs::write(dir.join("train-labels-idx1-ubyte"), idx1(&[3, 1, 4])).unwrap();
    std::fs::write(dir.join("t10k-images-idx3-ubyte"), idx3(2, 28, 28, &img(2))).unwrap();
    std::fs::write(dir.join("t10k-labels-idx1-ubyte"), idx1(&[9, 0])).unwrap();
}

#[test]
fn mnist_loads_tiny_idx_files() {
    let dir = scratch("mnist-ok");
    write_mnist(&dir);
    for kind in ["mnist", "fashion-mnist"] {
        let d = load(&format!("{kind}:{}", dir.display()), &opts()).unwrap();
        assert_eq!(d.sample_shape, vec![1, 28, 28]);
        assert_eq!(d.train.x.dims(), &[3, 1, 28, 28]);
        assert_eq!(d.test.x.dims(), &[2, 1, 28, 28]);
        assert_eq!(labels(&d.train), vec![3, 1, 4]);
        assert_eq!(labels(&d.test), vec![9, 0]);
        // Train pixels are 0, 100/255, 200/255 per image: standardised to mean 0, equal steps.
        let x = flat(&d.train);
        let (a, b, c) = (x[0], x[784], x[2 * 784]);
        assert!((a + b + c).abs() < 1e-4);
        assert!(((b - a) - (c - b)).abs() < 1e-4 && b > a);
        // Test uses the train statistics: its images equal the first two train images.
        let t = flat(&d.test);
        assert!((t[0] - a).abs() < 1e-6 && (t[784] - b).abs() < 1e-6);
    }
    // The `name.idx3-ubyte` spelling is accepted too.
    let dir2 = scratch("mnist-dots");
    write_mnist(&dir2);
    for f in ["train-images", "train-labels", "t10k-images", "t10k-labels"] {
        let kind = if f.ends_with("images") {
            "idx3"
        } else {
            "idx1"
        };
        std::fs::rename(
            dir2.join(format!("{f}-{kind}-ubyte")),
            dir2.join(format!("{f}.{kind}-ubyte")),
        )
        .unwrap();
    }
    assert!(load(&format!("mnist:{}", dir2.display()), &opts()).is_ok());
}

#[test]
fn mnist_errors_name_the_file() {
    let o = opts();
    let missing = std::env::temp_dir().join("actrain-data-definitely-missing");
    assert!(err_of(&format!("mnist:{}", missing.display()), &o).contains("definitely-missing"));

    let dir = scratch("mnist-bad");
    let spec = format!("mnist:{}", dir.display());
    // Missing file.
    write_mnist(&dir);
    std::fs::remove_file(dir.join("t10k-labels-idx1-ubyte")).unwrap();
    let e = err_of(&spec, &o);
    assert!(
        e.contains("t10k-labels-idx1-ubyte") && e.contains("missing"),
        "{e}"
    );
    // Wrong magic.
    write_mnist(&dir);
    let mut b = std::fs::read(dir.join("train-images-idx3-ubyte")).unwrap();
    b[3] = 0x01;
    std::fs::write(dir.join("train-images-idx3-ubyte"), &b).unwrap();
    let e = err_of(&spec, &o);
    assert!(
        e.contains("train-images-idx3-ubyte") && e.contains("magic"),
        "{e}"
    );
    // Truncated images.
    b[3] = 0x03;
    b.truncate(16 + 784 + 10);
    std::fs::write(dir.join("train-images-idx3-ubyte"), &b).unwrap();
    let e = err_of(&spec, &o);
    assert!(
        e.contains("train-images-idx3-ubyte") && e.contains("truncated"),
        "{e}"
    );
    // Truncated header.
    std::fs::write(dir.join("train-images-idx3-ubyte"), &b[..10]).unwrap();
    let e = err_of(&spec, &o);
    assert!(
        e.contains("train-images-idx3-ubyte") && e.contains("header"),
        "{e}"
    );
    // Label out of range.
    write_mnist(&dir);
    std::fs::write(dir.join("train-labels-idx1-ubyte"), idx1(&[3, 10, 4])).unwrap();
    let e = err_of(&spec, &o);
    assert!(
        e.contains("train-labels-idx1-ubyte") && e.contains("label 10"),
        "{e}"
    );
    // Count mismatch.
    std::fs::write(dir.join("train-labels-idx1-ubyte"), idx1(&[3, 1])).unwrap();
    let e = err_of(&spec, &o);
    assert!(
        e.contains("train-labels-idx1-ubyte") && e.contains("3 images"),
        "{e}"
    );
    // Header sizes that would overflow.
    let huge = idx3(u32::MAX, u32::MAX, u32::MAX, &[]);
    std::fs::write(dir.join("train-images-idx3-ubyte"), huge).unwrap();
    assert!(err_of(&spec, &o).contains("train-images-idx3-ubyte"));
    // Gzipped only.
    write_mnist(&dir);
    std::fs::rename(
        dir.join("t10k-images-idx3-ubyte"),
        dir.join("t10k-images-idx3-ubyte.gz"),
    )
    .unwrap();
    let e = err_of(&spec, &o);
    assert!(
        e.contains("t10k-images-idx3-ubyte.gz") && e.contains("gunzip"),
        "{e}"
    );
}

// ---------------------------------------------------------------- cifar10

const REC: usize = 3073;

/// `n` CIFAR records; record `i` has label `(i + base) % 10` and channel `c` filled with
/// `10 * c + i`.
fn cifar_batch(n: usize, base: usize) -> Vec<u8> {
    let mut b = Vec::with_capacity(n * REC);
    for i in 0..n {
        b.push(((i + base) % 10) as u8);
        for c in 0..3 {
            b.extend(std::iter::repeat_n((10 * c + i) as u8, 1024));
        }
    }
    b
}

fn write_cifar(dir: &Path) {
    for k in 1..=5 {
        std::fs::write(dir.join(format!("data_batch_{k}.bin")), cifar_batch(2, k)).unwrap();
    }
    std::fs::write(dir.join("test_batch.bin"), cifar_batch(3, 0)).unwrap();
}

#[test]
fn cifar10_loads_tiny_batches() {
    let dir = scratch("cifar-ok");
    write_cifar(&dir);
    let d = load(&format!("cifar10:{}", dir.display()), &opts()).unwrap();
    assert_eq!(d.sample_shape, vec![3, 32, 32]);
    assert_eq!(d.train.x.dims(), &[10, 3, 32, 32]);
    assert_eq!(d.test.x.dims(), &[3, 3, 32, 32]);
    assert_eq!(labels(&d.train), vec![1, 2, 2, 3, 3, 4, 4, 5, 5, 6]);
    assert_eq!(labels(&d.test), vec![0, 1, 2]);
    // Per channel, train values alternate i = 0, 1: standardised to exactly -1 / +1.
    let x = flat(&d.train);
    for c in 0..3 {
        assert!((x[c * 1024] + 1.0).abs() < 1e-4, "{}", x[c * 1024]);
        assert!((x[REC - 1 + c * 1024] - 1.0).abs() < 1e-4);
    }
    // Test record 2 is 2 std above the train mean in every channel.
    let t = flat(&d.test);
    assert!((t[2 * 3072 + 5] - 3.0).abs() < 1e-4, "{}", t[2 * 3072 + 5]);
    // The official tarball's nested folder is found too.
    let outer = scratch("cifar-nested");
    let inner = outer.join("cifar-10-batches-bin");
    std::fs::create_dir_all(&inner).unwrap();
    write_cifar(&inner);
    assert!(load(&format!("cifar10:{}", outer.display()), &opts()).is_ok());
}

#[test]
fn cifar10_errors_name_the_file() {
    let dir = scratch("cifar-bad");
    let spec = format!("cifar10:{}", dir.display());
    write_cifar(&dir);
    let mut b = cifar_batch(2, 0);
    b.truncate(REC + 100);
    std::fs::write(dir.join("data_batch_3.bin"), &b).unwrap();
    let e = err_of(&spec, &opts());
    assert!(e.contains("data_batch_3.bin") && e.contains("3073"), "{e}");
    write_cifar(&dir);
    let mut b = cifar_batch(2, 0);
    b[REC] = 11;
    std::fs::write(dir.join("test_batch.bin"), &b).unwrap();
    let e = err_of(&spec, &opts());
    assert!(
        e.contains("test_batch.bin") && e.contains("label 11"),
        "{e}"
    );
    std::fs::remove_file(dir.join("data_batch_5.bin")).unwrap();
    let e = err_of(&spec, &opts());
    assert!(
        e.contains("data_batch_5.bin") && e.contains("missing"),
        "{e}"
    );
}

// ---------------------------------------------------------------- text

#[test]
fn text_builds_vocab_and_shifted_targets() {
    let dir = scratch("text");
    let f = dir.join("tiny.txt");
    let body = "hello world, hello rust! ".repeat(20); // 500 chars
    std::fs::write(&f, &body).unwrap();
    let o = LoadOptions {
        seq_len: 16,
        ..opts()
    };
    let d = load(&format!("text:{}", f.display()), &o).unwrap();
    let vocab = d.vocab.clone().unwrap();
    let mut expect: Vec<char> = body.chars().collect();
    expect.sort_unstable();
    expect.dedup();
    assert_eq!(vocab, expect);
    assert_eq!(
        d.task,
        Task::LanguageModel {
            vocab_size: vocab.len(),
            seq_len: 16
        }
    );
    assert_eq!(d.sample_shape, vec![16]);
    // 499 / 16 = 31 windows: 3 test (last), 28 train.
    assert_eq!(d.train.x.dims(), &[28, 16]);
    assert_eq!(d.train.y.dims(), &[28, 16]);
    assert_eq!(d.test.x.dims(), &[3, 16]);
    let x = d.train.x.to_vec2::<u32>().unwrap();
    let y = d.train.y.to_vec2::<u32>().unwrap();
    let decoded: String = x[0].iter().map(|&i| vocab[i as usize]).collect();
    assert_eq!(decoded, &body[..16]);
    assert_eq!(&x[0][1..], &y[0][..15]);
    assert_eq!(y[0][15], x[1][0]);
    let tx = d.test.x.to_vec2::<u32>().unwrap();
    let decoded: String = tx[0].iter().map(|&i| vocab[i as usize]).collect();
    assert_eq!(decoded, &body[28 * 16..29 * 16]);
}

#[test]
fn text_errors_name_the_file() {
    let dir = scratch("text-bad");
    let f = dir.join("short.txt");
    std::fs::write(&f, "abc").unwrap();
    let o = LoadOptions {
        seq_len: 3,
        ..opts()
    };
    let e = err_of(&format!("text:{}", f.display()), &o);
    assert!(e.contains("short.txt") && e.contains("at least"), "{e}");
    // Exactly seq_len + 1 characters is enough (train and test then share the one window).
    std::fs::write(&f, "abcd").unwrap();
    let d = load(&format!("text:{}", f.display()), &o).unwrap();
    assert_eq!((d.train.len(), d.test.len()), (1, 1));
    let missing = dir.join("nope.txt");
    assert!(err_of(&format!("text:{}", missing.display()), &o).contains("nope.txt"));
    std::fs::write(&f, [b'a', 0xff, 0xfe, b'b', b'c']).unwrap();
    let e = err_of(&format!("text:{}", f.display()), &o);
    assert!(e.contains("short.txt") && e.contains("UTF-8"), "{e}");
}

// ---------------------------------------------------------------- graph

fn write_graph(dir: &Path, edges: &str) {
    std::fs::write(
        dir.join("features.csv"),
        "# 4 nodes, 2 features\n1,0\n0,1\n1, 1\n0.5,-2e-1\n",
    )
    .unwrap();
    std::fs::write(dir.join("labels.txt"), "0\n1\n\n1\n2\n").unwrap();
    std::fs::write(dir.join("edges.txt"), edges).unwrap();
}

#[test]
fn graph_files_build_normalised_csr() {
    let dir = scratch("graph-ok");
    // Star: 0 connected to 1, 2, 3 (one duplicate, one reversed, one self-loop).
    write_graph(&dir, "0 1\n0\t2\n2 0\n3,0\n1 1\n");
    let o = LoadOptions {
        test_fraction: 0.25,
        ..opts()
    };
    let d = load(&format!("graph:{}", dir.display()), &o).unwrap();
    assert_eq!(d.task, Task::NodeClassification { num_classes: 3 });
    assert_eq!(d.sample_shape, vec![2]);
    assert_eq!(d.train.x.dims(), &[4, 2]);
    assert_eq!(d.test.x.dims(), &[4, 2]);
    let g = d.graph.as_ref().unwrap();
    assert_eq!(g.num_nodes, 4);
    assert_eq!((g.train_nodes.len(), g.test_nodes.len()), (3, 1));
    let mut all: Vec<u32> = g.train_nodes.iter().chain(&g.test_nodes).copied().collect();
    all.sort_unstable();
    assert_eq!(all, vec![0, 1, 2, 3]);
    let all_labels = [0u32, 1, 1, 2];
    let want: Vec<u32> = g
        .train_nodes
        .iter()
        .map(|&n| all_labels[n as usize])
        .collect();
    assert_eq!(labels(&d.train), want);
    // Â for a star with self-loops: deg(0) = 4, deg(leaf) = 2.
    let a = &g.adjacency;
    assert_eq!(a.row_ptr, vec![0, 4, 6, 8, 10]);
    assert_eq!(a.col, vec![0, 1, 2, 3, 0, 1, 0, 2, 0, 3]);
    let hub = 0.25 + 3.0 / 8f32.sqrt();
    let leaf = 1.0 / 8f32.sqrt() + 0.5;
    for (s, e) in a.row_sums().iter().zip([hub, leaf, leaf, leaf]) {
        assert!((s - e).abs() < 1e-6, "{s} vs {e}");
    }
    let x = d.train.x.to_vec2::<f32>().unwrap();
    assert_eq!(x[3], vec![0.5, -0.2]);
    assert!(d.describe().contains("4 nodes"), "{}", d.describe());
}

#[test]
fn graph_errors_name_file_and_line() {
    let dir = scratch("graph-bad");
    let spec = format!("graph:{}", dir.display());
    write_graph(&dir, "0 1\n1 2\n\n2 7\n");
    let e = err_of(&spec, &opts());
    assert!(
        e.contains("edges.txt") && e.contains("line 4") && e.contains("7"),
        "{e}"
    );
    write_graph(&dir, "0 1\n1 x\n");
    let e = err_of(&spec, &opts());
    assert!(e.contains("edges.txt") && e.contains("line 2"), "{e}");
    write_graph(&dir, "0 1 2\n");
    let e = err_of(&spec, &opts());
    assert!(e.contains("edges.txt") && e.contains("line 1"), "{e}");
    write_graph(&dir, "0 1\n");
    std::fs::write(dir.join("features.csv"), "1,0\n0,1,3\n1,1\n0,0\n").unwrap();
    let e = err_of(&spec, &opts());
    assert!(e.contains("features.csv") && e.contains("line 2"), "{e}");
    std::fs::write(dir.join("features.csv"), "1,0\n0,abc\n1,1\n0,0\n").unwrap();
    let e = err_of(&spec, &opts());
    assert!(
        e.contains("features.csv") && e.contains("line 2") && e.contains("field 2"),
        "{e}"
    );
    write_graph(&dir, "0 1\n");
    std::fs::write(dir.join("labels.txt"), "0\n1\n-1\n2\n").unwrap();
    let e = err_of(&spec, &opts());
    assert!(e.contains("labels.txt") && e.contains("line 3"), "{e}");
    std::fs::write(dir.join("labels.txt"), "0\n1\n").unwrap();
    let e = err_of(&spec, &opts());
    assert!(e.contains("labels.txt") && e.contains("2 labels"), "{e}");
    std::fs::remove_file(dir.join("edges.txt")).unwrap();
    write_graph(&dir, "0 1\n");
    std::fs::remove_file(dir.join("edges.txt")).unwrap();
    assert!(err_of(&spec, &opts()).contains("edges.txt"));
    let missing = dir.join("nope");
    assert!(err_of(&format!("graph:{}", missing.display()), &opts()).contains("nope"));
}

#[test]
fn graph_synthetic_is_a_seeded_sbm() {
    let d = load("graph:synthetic", &opts()).unwrap();
    let g = d.graph.as_ref().unwrap();
    assert_eq!(g.num_nodes, 400);
    assert_eq!(d.task, Task::NodeClassification { num_classes: 4 });
    assert_eq!(d.train.x.dims(), &[400, 4]);
    assert_eq!(d.train.len() + d.test.len(), 400);
    assert_eq!(g.adjacency.num_rows(), 400);
    // Mostly intra-community edges (node i is in community i % 4).
    let (mut same, mut total) = (0, 0);
    for i in 0..400 {
        for (j, v) in g.adjacency.row(i) {
            assert!(v > 0.0 && v <= 1.0);
            if j as usize != i {
                total += 1;
                same += usize::from(j as usize % 4 == i % 4);
            }
        }
    }
    assert!(total > 1000 && same * 10 > total * 6, "{same}/{total}");
    let again = load("graph:synthetic", &opts()).unwrap();
    assert_eq!(again.graph, d.graph);
}

// ---------------------------------------------------------------- synthetic

#[test]
fn synthetic_shapes_and_determinism() {
    let o = opts();
    let d = load("synthetic:3x16x16:7:100", &o).unwrap();
    assert_eq!(d.task, Task::Classification { num_classes: 7 });
    assert_eq!(d.sample_shape, vec![3, 16, 16]);
    assert_eq!(d.train.x.dims(), &[80, 3, 16, 16]);
    assert_eq!(d.test.x.dims(), &[20, 3, 16, 16]);
    assert!(labels(&d.train).iter().all(|&l| l < 7));
    let again = load("synthetic:3x16x16:7:100", &o).unwrap();
    assert_eq!(flat(&d.train), flat(&again.train));
    let other = load(
        "synthetic:3x16x16:7:100",
        &LoadOptions { seed: 5, ..opts() },
    )
    .unwrap();
    assert_ne!(flat(&d.train), flat(&other.train));
    // A limit takes a prefix of the same samples.
    let small = load(
        "synthetic:3x16x16:7:100",
        &LoadOptions {
            limit: Some(10),
            ..opts()
        },
    )
    .unwrap();
    assert_eq!(small.train.x.dims(), &[10, 3, 16, 16]);
    assert_eq!(flat(&small.train)[..], flat(&d.train)[..10 * 768]);

    let v = load("synthetic:784:10", &o).unwrap();
    assert_eq!(v.train.x.dims(), &[1638, 784]);

    let t = load("synthetic-text:50:12:40", &o).unwrap();
    assert_eq!(
        t.task,
        Task::LanguageModel {
            vocab_size: 50,
            seq_len: 12
        }
    );
    assert_eq!(t.train.x.dims(), &[32, 12]);
    assert_eq!(t.test.y.dims(), &[8, 12]);
    let x = t.train.x.to_vec2::<u32>().unwrap();
    let y = t.train.y.to_vec2::<u32>().unwrap();
    assert_eq!(&x[0][1..], &y[0][..11]);
    assert!(x.iter().flatten().all(|&v| v < 50));
}

#[test]
fn bad_specs_name_the_spec() {
    for bad in [
        "synthetic:3x3x:10",
        "synthetic:3x32x32",
        "synthetic:0:10",
        "synthetic:8:ten",
        "synthetic-text:1:8",
        "imagenet:/data",
        "mnist:",
    ] {
        let e = err_of(bad, &opts());
        assert!(e.contains(bad), "{bad}: {e}");
    }
}

// ---------------------------------------------------------------- batcher

fn toy_split(n: usize) -> Split {
    let dev = candle_core::Device::Cpu;
    let x: Vec<f32> = (0..n * 2).map(|v| v as f32).collect();
    Split {
        x: candle_core::Tensor::from_vec(x, (n, 2), &dev).unwrap(),
        y: candle_core::Tensor::from_vec((0..n as u32).collect::<Vec<_>>(), n, &dev).unwrap(),
    }
}

fn epoch_ids(b: &Batcher, k: u64) -> Vec<Vec<u32>> {
    b.epoch(k)
        .map(|r| {
            let (x, y) = r.unwrap();
            let ids = y.to_vec1::<u32>().unwrap();
            // x rows travel with their labels.
            let xs = x.to_vec2::<f32>().unwrap();
            for (row, &id) in xs.iter().zip(&ids) {
                assert_eq!(row[0], 2.0 * id as f32);
            }
            ids
        })
        .collect()
}

#[test]
fn batcher_covers_every_sample_once_per_epoch() {
    let s = toy_split(10);
    let b = Batcher::new(&s, 4, 7).unwrap();
    assert_eq!(b.num_batches(), 3);
    let e0 = epoch_ids(&b, 0);
    assert_eq!(e0.iter().map(Vec::len).collect::<Vec<_>>(), vec![4, 4, 2]);
    let mut all: Vec<u32> = e0.concat();
    all.sort_unstable();
    assert_eq!(all, (0..10).collect::<Vec<u32>>());
    // Deterministic per (seed, epoch), different across epochs and seeds.
    assert_eq!(e0, epoch_ids(&Batcher::new(&s, 4, 7).unwrap(), 0));
    assert_ne!(e0, epoch_ids(&b, 1));
    assert_ne!(e0, epoch_ids(&Batcher::new(&s, 4, 8).unwrap(), 0));
    assert_eq!(b.epoch(0).len(), 3);
}

#[test]
fn batcher_drop_last_resume_and_errors() {
    let s = toy_split(10);
    let b = Batcher::new(&s, 4, 7).unwrap().drop_last(true);
    assert_eq!(b.num_batches(), 2);
    let e = epoch_ids(&b, 3);
    assert_eq!(e.len(), 2);
    assert!(e.iter().all(|v| v.len() == 4));
    // Resuming at batch 1 of epoch 3 replays the same batch.
    let resumed: Vec<Vec<u32>> = b
        .epoch_from(3, 1)
        .map(|r| r.unwrap().1.to_vec1::<u32>().unwrap())
        .collect();
    assert_eq!(resumed, e[1..].to_vec());
    assert_eq!(b.epoch_from(3, 99).count(), 0);
    // Unshuffled: sample order.
    let u = Batcher::new(&s, 3, 0).unwrap().shuffle(false);
    assert_eq!(epoch_ids(&u, 5).concat(), (0..10).collect::<Vec<u32>>());
    // Errors instead of panics.
    assert!(Batcher::new(&s, 0, 0).is_err());
    let g = load("graph:synthetic", &opts()).unwrap();
    assert!(Batcher::new(&g.train, 8, 0).is_err());
    // Works on real data: digits batches have the sample shape.
    let d = load("digits", &opts()).unwrap();
    let (x, y) = Batcher::new(&d.train, 32, 1)
        .unwrap()
        .epoch(0)
        .next()
        .unwrap()
        .unwrap();
    assert_eq!(x.dims(), &[32, 1, 8, 8]);
    assert_eq!(y.dims(), &[32]);
}
