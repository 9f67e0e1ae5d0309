//! Gives this crate's test binaries the rpaths to LibTorch and NCCL (`build_rpath.rs`, shared
//! with worker/build.rs), tells the engine where NCCL is (`ONEHEAD_NCCL_DIR`, for its messages
//! and tests), and compiles `csrc/onednn.cpp` (LibTorch operators tch does not bind) against
//! LibTorch's headers, `csrc/amx.cpp` (the decode-sized products on AMX), `csrc/int8.cpp`
//! (int8 weights' products on AVX-512 or AVX2) and `csrc/attention.cpp` (decode attention on
//! AVX-512 BF16).
//! torch-sys reports LibTorch's library folder through its `links = "tch"` key.

#[path = "build_rpath.rs"]
mod build_rpath;

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    println!("cargo:rerun-if-changed=csrc/onednn.cpp");
    println!("cargo:rerun-if-changed=csrc/amx.cpp");
    println!("cargo:rerun-if-changed=csrc/int8.cpp");
    println!("cargo:rerun-if-changed=csrc/attention.cpp");
    println!("cargo:rerun-if-changed=csrc/avx512.h");
    println!("cargo:rerun-if-changed=csrc/omp_team.h");
    let (lib_dir, nccl_dir) = build_rpath::link_libtorch();
    if let Some(nccl_dir) = nccl_dir {
        println!("cargo:rustc-env=ONEHEAD_NCCL_DIR={}", nccl_dir.display());
    }
    // The same C++ ABI as torch-sys builds its own wrapper with (the PyPI wheels use the new one).
    let cxx11_abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .std("c++17")
        .include(lib_dir.with_file_name("include"))
        .define("_GLIBCXX_USE_CXX11_ABI", cxx11_abi.as_str())
        .flag_if_supported("-Wno-unused-parameter")
        .file("csrc/onednn.cpp")
        .file("csrc/amx.cpp")
        .file("csrc/int8.cpp")
        .file("csrc/attention.cpp")
        .compile("onehead_csrc");
}
