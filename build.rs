//! Compiles `kernels/*.cu` to PTX for the `cuda` feature; does nothing otherwise.
//!
//! CPU builds (the default) never look for a CUDA toolkit. With `--features cuda`, each
//! `kernels/NAME.cu` becomes `$OUT_DIR/NAME.ptx` (`include_str!`ed by `src/compress/cuda.rs`),
//! built with `$NVCC` (else `nvcc` on PATH, else `$CUDA_HOME/bin/nvcc`) as
//! `nvcc --ptx -arch=sm_${CUDA_COMPUTE_CAP:-90} -O3`. Use nvcc 13.0 (scripts/cuda-toolkit.sh):
//! the GPU machines' driver cannot JIT the PTX of a newer toolkit.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    for var in [
        "NVCC",
        "CUDA_COMPUTE_CAP",
        "CUDA_HOME",
        "CUDA_ROOT",
        "CUDA_PATH",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    let nvcc = find_nvcc();
    let cap = env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".to_string());
    let cap = cap.trim().replace('.', "");
    let mut kernels: Vec<PathBuf> = std::fs::read_dir("kernels")
        .expect("kernels/ folder")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cu"))
        .collect();
    kernels.sort();
    for src in &kernels {
        println!("cargo:rerun-if-changed={}", src.display());
        let stem = src.file_stem().expect("file name").to_string_lossy();
        let ptx = out_dir.join(format!("{stem}.ptx"));
        let status = Command::new(&nvcc)
            .arg("--ptx")
            .arg(format!("-arch=sm_{cap}"))
            .arg("-O3")
            .arg("-o")
            .arg(&ptx)
            .arg(src)
            .status()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run nvcc `{}` ({e}): the `cuda` feature needs the CUDA compiler; \
                     run scripts/build-cuda.sh, or set NVCC",
                    nvcc.display()
                )
            });
        if !status.success() {
            panic!("nvcc failed on {} ({status})", src.display());
        }
    }
}

fn find_nvcc() -> PathBuf {
    if let Some(p) = env::var_os("NVCC") {
        return PathBuf::from(p);
    }
    if let Some(path) = env::var_os("PATH") {
        for dir in env::split_paths(&path) {
            let cand = dir.join("nvcc");
            if cand.is_file() {
                return cand;
            }
        }
    }
    for var in ["CUDA_HOME", "CUDA_ROOT", "CUDA_PATH"] {
        if let Some(root) = env::var_os(var) {
            let cand = Path::new(&root).join("bin").join("nvcc");
            if cand.is_file() {
                return cand;
            }
        }
    }
    PathBuf::from("nvcc")
}
