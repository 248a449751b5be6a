//! Compiles the C eBPF probes with clang into `OUT_DIR`, twice from one source: `probes.tp_btf.o`
//! (BTF-typed tracepoints, the default) and `probes.raw_tp.o` (`-DRAW_TP`, the fallback). `src/probes.rs`
//! embeds both. A missing clang or missing libbpf headers stop the build with the Debian package to
//! install; `cargo xtask setup` installs both.

use std::env;
use std::path::{Path, PathBuf};
use std::process::{Command, exit};

/// The C sources; a change to any of them rebuilds the objects.
const SOURCES: &[&str] = &["src/bpf/probes.bpf.c", "src/bpf/probes.h", "src/bpf/kernel.h"];

/// Where libbpf-dev puts `bpf/bpf_helpers.h` and friends, unless `LIBBPF_INCLUDE` says otherwise.
const LIBBPF_INCLUDE_DIRS: &[&str] = &["/usr/include", "/usr/local/include"];

/// The objects to build: file name and extra clang arguments.
const OBJECTS: &[(&str, &[&str])] = &[("probes.tp_btf.o", &[]), ("probes.raw_tp.o", &["-DRAW_TP"])];

fn main() {
    for source in SOURCES {
        println!("cargo::rerun-if-changed={source}");
    }
    println!("cargo::rerun-if-env-changed=CLANG");
    println!("cargo::rerun-if-env-changed=LIBBPF_INCLUDE");

    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    if arch != "x86_64" {
        fail(&format!("the eBPF probes are built and tested for x86-64 only, and the target is {arch}"));
    }
    let clang = env::var("CLANG").unwrap_or_else(|_| "clang".to_owned());
    match Command::new(&clang).arg("--version").output() {
        Ok(output) if output.status.success() => {}
        Ok(output) => fail(&format!("`{clang} --version` failed ({})", output.status)),
        Err(error) => fail(&format!(
            "cannot run `{clang}` ({error}): the eBPF probes are C compiled with clang; install the Debian \
             package `clang` (`cargo xtask setup` does), or name a clang with CLANG="
        )),
    }
    let libbpf = libbpf_include();
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    for (object, extra) in OBJECTS {
        compile(&clang, &libbpf, extra, &out_dir.join(object));
    }
}

/// The directory holding `bpf/bpf_helpers.h`.
fn libbpf_include() -> PathBuf {
    let candidates: Vec<PathBuf> = match env::var_os("LIBBPF_INCLUDE") {
        Some(dir) => vec![dir.into()],
        None => LIBBPF_INCLUDE_DIRS.iter().map(PathBuf::from).collect(),
    };
    candidates.iter().find(|dir| dir.join("bpf/bpf_helpers.h").is_file()).cloned().unwrap_or_else(|| {
        fail(&format!(
            "libbpf's headers (bpf/bpf_helpers.h) are not in {}: install the Debian package `libbpf-dev` \
             (`cargo xtask setup` does), or name their directory with LIBBPF_INCLUDE=",
            candidates.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(" or ")
        ))
    })
}

/// Builds one object; clang's warnings become cargo warnings, its errors stop the build.
fn compile(clang: &str, libbpf: &Path, extra: &[&str], out: &Path) {
    let output = Command::new(clang)
        .args(["-g", "-O2", "-Wall", "-target", "bpf", "-D__TARGET_ARCH_x86"])
        .args(extra)
        .arg("-I")
        .arg(libbpf)
        // <linux/types.h> includes <asm/types.h>, which Debian keeps in the multiarch directory; the bpf
        // target does not search it by itself.
        .args(["-I", "/usr/include/x86_64-linux-gnu"])
        .args(["-c", "src/bpf/probes.bpf.c", "-o"])
        .arg(out)
        .output()
        .unwrap_or_else(|error| fail(&format!("cannot run `{clang}`: {error}")));
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        fail(&format!("clang failed to build {} ({}):\n{stderr}", out.display(), output.status));
    }
    for line in stderr.lines().filter(|line| !line.trim().is_empty()) {
        println!("cargo::warning={line}");
    }
}

/// Stops the build with `message`; cargo shows a failed build script's stderr.
fn fail(message: &str) -> ! {
    eprintln!("error: building the eBPF probes: {message}");
    exit(1);
}
