//! With the `torch` feature, makes the `trainer-client` binary find libtorch on its own.
//!
//! tch's link arguments do not reach a dependent binary (tch-rs issues 907 and 980): the binary
//! then lacks an rpath to `libtorch_cpu.so`, and the linker's `--as-needed` drops `libtorch.so`,
//! whose static initialisers register the CUDA backend, so CUDA silently disappears. torch-sys
//! exports its library directory (`links = "tch"` -> `DEP_TCH_LIBTORCH_LIB`); we add it as an
//! rpath and link `libtorch` with `--no-as-needed`, so the binary runs without
//! `LD_LIBRARY_PATH` and keeps CUDA when the libtorch build has it.
//!
//! It also compiles `csrc/owned_blob.cpp` against libtorch's headers: CPU tensors over received
//! batches without a copy (see `tensor.rs`).

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
    #[cfg(feature = "torch")]
    compile_owned_blob(&lib_dir);
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

/// Compiles the `at::from_blob`-with-deleter shim with the include directory and C++ ABI of the
/// libtorch torch-sys links (a PyTorch wheel's `torch/include` beside `torch/lib`, or a libtorch
/// archive's `include` beside `lib`).
#[cfg(feature = "torch")]
fn compile_owned_blob(lib_dir: &std::path::Path) {
    println!("cargo:rerun-if-changed=csrc/owned_blob.cpp");
    let include = lib_dir.parent().map(|root| root.join("include")).filter(|dir| dir.join("ATen").is_dir());
    let Some(include) = include else {
        panic!("libtorch headers not found beside {} (expected ../include/ATen)", lib_dir.display());
    };
    // PyTorch wheels since 2.7 and current libtorch archives use the C++11 ABI; a build with the
    // old one says so in LIBTORCH_CXX11_ABI=0, the variable torch-sys reads for the same purpose.
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".to_owned());
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(&include)
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .file("csrc/owned_blob.cpp")
        .compile("conveyor_owned_blob");
}
