//! Model definitions: every preset builds and trains a step; every kind of wrong definition
//! fails before training with a message naming the file, the layer and the field.

use actrain::model::{load_def, InputSpec, Model, ModelDef};
use actrain::ops::loss::CrossEntropyOptions;
use actrain::ops::sparse::CsrMatrix;
use actrain::tape::Tape;
use candle_core::{DType, Device, Tensor};
use std::sync::Arc;

fn image(shape: &[usize], classes: usize) -> InputSpec {
    InputSpec {
        sample_shape: shape.to_vec(),
        tokens: false,
        vocab: None,
        num_outputs: classes,
        graph: false,
    }
}

/// One forward + backward on a batch of 2; returns the loss.
fn step(model: &mut Model, x: &Tensor, y: &Tensor, graph: Option<&Arc<CsrMatrix>>) -> f32 {
    let mut tape = Tape::default();
    let logits = model.forward(&mut tape, x, graph).expect("forward");
    let loss = tape
        .cross_entropy(&logits, y, CrossEntropyOptions::default())
        .expect("loss");
    tape.backward(&loss, &mut model.params).expect("backward");
    let n_grads = model
        .params
        .iter()
        .filter(|(_, p)| p.trainable && p.grad.is_some())
        .count();
    let n_train = model.params.iter().filter(|(_, p)| p.trainable).count();
    assert_eq!(
        n_grads, n_train,
        "{}: every trainable parameter gets a gradient",
        model.name
    );
    loss.tensor().to_scalar::<f32>().expect("scalar")
}

#[test]
fn image_presets_build_and_step() {
    for (preset, shape) in [
        ("mlp", vec![1, 8, 8]),
        ("cnn", vec![1, 8, 8]),
        ("resnet18-cifar", vec![3, 16, 16]),
        ("resnet18", vec![3, 32, 32]),
        ("resnet50-cifar", vec![3, 8, 8]),
        ("resnet50", vec![3, 32, 32]),
        ("vit-tiny", vec![3, 16, 16]),
    ] {
        let def = load_def(preset).unwrap();
        let mut m = Model::build(&def, &image(&shape, 10), 1).unwrap();
        let mut dims = vec![2];
        dims.extend(&shape);
        let x = Tensor::randn(0f32, 1.0, dims, &Device::Cpu).unwrap();
        let y = Tensor::new(&[3u32, 7], &Device::Cpu).unwrap();
        let loss = step(&mut m, &x, &y, None);
        assert!(loss.is_finite() && loss > 0.5, "{preset}: loss {loss}");
    }
}

#[test]
fn resnet_parameter_counts_match_the_reference_architectures() {
    // torchvision: resnet18 11,689,512 (1000 classes), resnet50 25,557,032.
    let m = Model::build(
        &load_def("resnet18").unwrap(),
        &image(&[3, 32, 32], 1000),
        0,
    )
    .unwrap();
    assert_eq!(m.num_parameters(), 11_689_512);
    let m = Model::build(
        &load_def("resnet50").unwrap(),
        &image(&[3, 32, 32], 1000),
        0,
    )
    .unwrap();
    assert_eq!(m.num_parameters(), 25_557_032);
}

#[test]
fn gpt_char_and_gcn_presets_step() {
    let spec = InputSpec {
        sample_shape: vec![12],
        tokens: true,
        vocab: Some(30),
        num_outputs: 30,
        graph: false,
    };
    let mut m = Model::build(&load_def("gpt-char").unwrap(), &spec, 2).unwrap();
    let ids: Vec<u32> = (0..24).map(|i| (i * 7 % 30) as u32).collect();
    let x = Tensor::from_vec(ids.clone(), (2, 12), &Device::Cpu).unwrap();
    let y = Tensor::from_vec(
        ids.iter().map(|i| (i + 1) % 30).collect::<Vec<_>>(),
        (2, 12),
        &Device::Cpu,
    )
    .unwrap();
    let loss = step(&mut m, &x, &y, None);
    assert!(
        (loss - (30f32).ln()).abs() < 1.0,
        "initial loss near ln(vocab): {loss}"
    );

    let spec = InputSpec {
        sample_shape: vec![5],
        tokens: false,
        vocab: None,
        num_outputs: 3,
        graph: true,
    };
    let mut m = Model::build(&load_def("gcn").unwrap(), &spec, 3).unwrap();
    let a = Arc::new(CsrMatrix::from_edges(4, &[(0, 1), (1, 2), (2, 3)], true).unwrap());
    let x = Tensor::randn(0f32, 1.0, (4, 5), &Device::Cpu).unwrap();
    let y = Tensor::new(&[0u32, 1, 2, 1], &Device::Cpu).unwrap();
    let loss = step(&mut m, &x, &y, Some(&a));
    assert!(loss.is_finite());
}

#[test]
fn batch_norm_running_statistics_are_updated_in_training() {
    let mut m = Model::build(&load_def("cnn").unwrap(), &image(&[1, 8, 8], 10), 1).unwrap();
    let id = m.params.id("bn1.running_mean").unwrap();
    let before = m.params.value(id).to_vec1::<f32>().unwrap();
    let x = (Tensor::randn(0f32, 1.0, (4, 1, 8, 8), &Device::Cpu).unwrap() + 3.0).unwrap();
    let mut tape = Tape::default();
    m.forward(&mut tape, &x, None).unwrap();
    let after = m.params.value(id).to_vec1::<f32>().unwrap();
    assert_ne!(before, after);
    // Eval mode leaves them alone.
    let mut tape = Tape::default();
    tape.eval_mode();
    m.forward(&mut tape, &x, None).unwrap();
    assert_eq!(after, m.params.value(id).to_vec1::<f32>().unwrap());
}

fn build_err(toml: &str, spec: &InputSpec) -> String {
    match ModelDef::parse(toml, "models/bad.toml").and_then(|d| Model::build(&d, spec, 0)) {
        Ok(_) => panic!("definition should have been rejected:\n{toml}"),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn wrong_definitions_name_file_layer_and_field() {
    let img = image(&[1, 8, 8], 10);
    let cases: &[(&str, &[&str])] = &[
        ("name = 3", &["models/bad.toml", "name"]),
        ("[[layer]]\nname = \"a\"\nop = \"frobnicate\"", &["models/bad.toml", "`a`", "`op`", "frobnicate", "conv2d"]),
        ("[[layer]]\nname = \"c\"\nop = \"conv2d\"\nkernel = 3", &["`c`", "`out`", "missing"]),
        ("[[layer]]\nname = \"c\"\nop = \"conv2d\"\nout = 4\nkernal = 3", &["`c`", "kern"]),
        ("[[layer]]\nname = \"c\"\nop = \"conv2d\"\nout = -4\nkernel = 3", &["`c`", "`out`"]),
        ("[[layer]]\nname = \"f\"\nop = \"flatten\"\ninputs = \"g\"\n[[layer]]\nname = \"g\"\nop = \"relu\"", &["`f`", "`inputs`", "later"]),
        ("[[layer]]\nname = \"f\"\nop = \"flatten\"\ninputs = \"nope\"", &["`f`", "`inputs`", "nope"]),
        ("[[layer]]\nname = \"f\"\nop = \"flatten\"\ninputs = \"f\"", &["`f`", "`inputs`"]),
        ("[[layer]]\nname = \"a\"\nop = \"relu\"\n[[layer]]\nname = \"a\"\nop = \"relu\"", &["`a`", "twice"]),
        ("[[layer]]\nname = \"c\"\nop = \"conv2d\"\nout = 4\nkernel = 9", &["`c`", "kernel", "8x8"]),
        ("[[layer]]\nname = \"f\"\nop = \"flatten\"\n[[layer]]\nname = \"h\"\nop = \"linear\"\nout = 7", &["`h`", "[7]", "10"]),
        ("[[layer]]\nname = \"f\"\nop = \"flatten\"\n[[layer]]\nname = \"s\"\nop = \"add\"\ninputs = [\"f\", \"input\"]", &["`s`", "shapes differ"]),
        ("[[layer]]\nname = \"d\"\nop = \"dropout\"\np = 1.5", &["`d`", "`p`", "probability"]),
        ("[[layer]]\nname = \"g\"\nop = \"gcn\"\nout = 3", &["`g`", "graph"]),
        ("[[layer]]\nname = \"e\"\nop = \"embedding\"\ndim = 8", &["`e`", "token ids"]),
        ("layer = []", &["no layers"]),
        ("[[layer]\n", &["not valid TOML"]),
    ];
    for (toml, needles) in cases {
        let msg = build_err(toml, &img);
        for n in *needles {
            assert!(msg.contains(n), "message for\n{toml}\nlacks `{n}`: {msg}");
        }
    }
    // Attention heads must divide the width.
    let tok = InputSpec {
        sample_shape: vec![6],
        tokens: true,
        vocab: Some(10),
        num_outputs: 10,
        graph: false,
    };
    let msg = build_err("[[layer]]\nname = \"e\"\nop = \"embedding\"\ndim = 10\n[[layer]]\nname = \"t\"\nop = \"transformer_block\"\nheads = 3", &tok);
    assert!(msg.contains("`t`") && msg.contains("heads"), "{msg}");
}

#[test]
fn unknown_model_spec_lists_presets() {
    let e = load_def("no-such-model").unwrap_err().to_string();
    assert!(e.contains("resnet18") && e.contains("no-such-model"), "{e}");
}

#[test]
fn definitions_load_from_a_path() {
    let dir = std::env::temp_dir().join(format!("actrain-model-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("tiny.toml");
    std::fs::write(&p, "[[layer]]\nname = \"f\"\nop = \"flatten\"\n[[layer]]\nname = \"h\"\nop = \"linear\"\nout = \"classes\"\n").unwrap();
    let def = load_def(p.to_str().unwrap()).unwrap();
    let m = Model::build(&def, &image(&[1, 8, 8], 10), 0).unwrap();
    assert_eq!(m.num_parameters(), 64 * 10 + 10);
    let _ = DType::F32;
}
