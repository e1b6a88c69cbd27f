//! profile-memory: the per-saved-tensor rows add up to the activations bucket, buckets are the
//! exact tensor sizes, and L3's activations are a fraction of L0's.

use actrain::compress::policy::Level;
use actrain::memory::profile::profile_step;
use actrain::model::{load_def, random_batch, InputSpec, Model};

#[test]
fn rows_add_up_to_the_totals() {
    let spec = InputSpec {
        sample_shape: vec![1, 8, 8],
        tokens: false,
        vocab: None,
        num_outputs: 10,
        graph: false,
    };
    let def = load_def("cnn").unwrap();
    let (x, y) = random_batch(&spec, 32, 3).unwrap();
    let mut acts = Vec::new();
    for level in [Level::L0, Level::L3] {
        let mut model = Model::build(&def, &spec, 1).unwrap();
        let p = profile_step(&mut model, level, &x, &y, 1).unwrap();
        let stored: usize = p.rows.iter().map(|r| r.stored_bytes).sum();
        let uncompressed: usize = p.rows.iter().map(|r| r.uncompressed_bytes).sum();
        assert_eq!(
            stored, p.activations,
            "{level:?}: rows vs activations bucket"
        );
        assert_eq!(
            uncompressed, p.activations_uncompressed,
            "{level:?}: rows vs uncompressed total"
        );
        let (params, buffers, _) = model.params.bytes();
        assert_eq!(p.parameters, params);
        assert_eq!(p.buffers, buffers);
        assert_eq!(p.gradients, p.parameters, "every parameter got a gradient");
        assert_eq!(
            p.optimizer_state, p.parameters,
            "SGD momentum: one buffer per parameter"
        );
        assert!(
            p.rows.iter().all(|r| !r.layer.is_empty()),
            "every row names its layer"
        );
        assert_eq!(p.phases.len(), 3);
        assert!(p.peak_bytes >= p.parameters + p.optimizer_state + p.activations);
        acts.push(p.activations);
    }
    assert!(
        acts[1] * 10 < acts[0],
        "L3 activations {} vs L0 {}",
        acts[1],
        acts[0]
    );
}
