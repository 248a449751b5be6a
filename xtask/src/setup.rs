//! `cargo xtask setup`: installs what building and testing need on a Debian 12 machine. Idempotent: it
//! asks apt only for what is missing, and does nothing when everything is there. A working CRIU (>= 4) is
//! provisioned by [`crate::criu`].

use std::process::Command;

use anyhow::{Context as _, ensure};
use rmosix_common::cgroup::{self, Hierarchy, Version};

/// Debian packages the project needs, and why.
const PACKAGES: &[(&str, &str)] = &[
    ("iproute2", "network namespaces, veth links and bridges of the local test cluster"),
    ("util-linux", "nsenter and unshare"),
    ("procps", "ps and pkill for inspecting the test cluster"),
    ("clang", "compiling the eBPF probes (C, CO-RE)"),
    ("llvm", "llvm-strip and llvm-objdump for the eBPF objects"),
    ("libbpf-dev", "bpf_helpers.h and friends for the eBPF probes"),
    ("bpftool", "vmlinux.h generation for the eBPF probes"),
    ("passwd", "useradd and groupadd: the tests and the demo run jobs as an ordinary user they create"),
    ("python3", "a real program the tests and the demo move between nodes"),
    ("gzip", "a real compressor in the pipelines the tests move"),
    ("nftables", "nft: the fault tests silence a node or a path between two nodes by dropping packets in its namespace"),
];

fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

/// Installs the missing packages.
pub fn run() -> anyhow::Result<()> {
    ensure!(
        nix::unistd::geteuid().is_root(),
        "setup installs packages and the tests create network namespaces and cgroups: run as root"
    );
    let missing: Vec<&str> = PACKAGES.iter().map(|(p, _)| *p).filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        eprintln!("setup: all {} packages present", PACKAGES.len());
    } else {
        for (p, why) in PACKAGES.iter().filter(|(p, _)| missing.contains(p)) {
            eprintln!("setup: installing {p}: {why}");
        }
        let status = Command::new("apt-get").arg("update").arg("-q").status().context("cannot run apt-get")?;
        ensure!(status.success(), "apt-get update failed ({status})");
        let status = Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .context("cannot run apt-get")?;
        ensure!(status.success(), "apt-get install {} failed ({status})", missing.join(" "));
        let still: Vec<&str> = missing.into_iter().filter(|p| !installed(p)).collect();
        ensure!(still.is_empty(), "still missing after apt-get install: {}", still.join(" "));
    }
    crate::criu::provision()?;
    check_cgroups()
}

/// The local test cluster gives each node a share of the CPUs and a memory limit: it needs the cpuset and
/// memory controllers, on cgroup v1 (hybrid hosts: mounted at `/sys/fs/cgroup/<controller>`) or v2 (offered
/// in the root's `cgroup.controllers`; the cluster enables them for its own cgroups).
fn check_cgroups() -> anyhow::Result<()> {
    let hierarchy = Hierarchy::detect().context("the local test cluster needs cgroups, and none are mounted")?;
    hierarchy.require(cgroup::REQUIRED).with_context(|| {
        let fix = match hierarchy.version() {
            Version::V1 => "mount the missing v1 controllers, or boot with the unified hierarchy \
                            (systemd.unified_cgroup_hierarchy=1)",
            Version::V2 => {
                "the kernel was built without them (CONFIG_CPUSETS, CONFIG_MEMCG) or booted with cgroup_disable="
            }
        };
        format!("the local test cluster needs the cpuset and memory controllers: {fix}")
    })?;
    eprintln!(
        "setup: {} at {}: cpuset and memory controllers available",
        hierarchy.version(),
        hierarchy.root_dir().display()
    );
    Ok(())
}
