//! With the `torch` feature, makes the `trainer-client` binary find libtorch on its own.
//!
//! tch's link arguments do not reach a dependent binary (tch-rs issues 907 and 980): the binary
//! then lacks an rpath to `libtorch_cpu.so`, and the linker's `--as-needed` drops `libtorch.so`,
//! whose static initialisers register the CUDA backend, so CUDA silently disappears. torch-sys
//! exports its library directory (`links = "tch"` -> `DEP_TCH_LIBTORCH_LIB`); we add it as an
//! rpath and link `libtorch` with `--no-as-needed`, so the binary runs without
//! `LD_LIBRARY_PATH` and keeps CUDA when the libtorch build has it.

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if std::env::var_os("CARGO_FEATURE_TORCH").is_none() {
        return;
    }
    let Some(lib_dir) = std::env::var_os("DEP_TCH_LIBTORCH_LIB") else {
        println!("cargo:warning=torch-sys did not report its libtorch directory; set LD_LIBRARY_PATH to run");
        return;
    };
    let lib_dir = std::path::PathBuf::from(lib_dir);
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib_dir.display());
    println!("cargo:rustc-link-search=native={}", lib_dir.display());
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    for lib in ["torch_cpu", "torch", "torch_cuda", "c10_cuda"] {
        if lib_dir.join(format!("lib{lib}.so")).exists() {
            println!("cargo:rustc-link-arg=-l{lib}");
        }
    }
    println!("cargo:rustc-link-arg=-Wl,--as-needed");
}
