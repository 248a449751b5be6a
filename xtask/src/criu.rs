//! Provisioning a CRIU that works on this kernel.
//!
//! Debian 12's criu 3.17 fails `criu check` on Linux 6.18 (vDSO bounds); 4.x works. When the system has no
//! working criu >= 4.0, Debian trixie's criu and the libraries it links are downloaded with apt (from the
//! system's own Debian mirror, through a private apt configuration that leaves the system's untouched),
//! unpacked into a private prefix, and run through that prefix's own dynamic loader by a wrapper script,
//! so the system's libc is never replaced.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail, ensure};

/// Where the private CRIU goes.
pub const PREFIX: &str = "/opt/rmosix/criu";
/// The wrapper that runs it; the path every rmosix component uses unless configured otherwise.
pub const WRAPPER: &str = "/opt/rmosix/criu/bin/criu";

/// Debian trixie packages making up a working criu: criu itself, its compel library, a libc new enough
/// for it, and every library it links (checked with ldd against the prefix).
const PACKAGES: &[&str] = &[
    "criu",
    "libcompel1",
    "libc6",
    "libbsd0",
    "libgnutls30t64",
    "libnftables1",
    "libnl-3-200",
    "libprotobuf-c1",
    "libuuid1",
    "libnet1",
    "libmd0",
    "libnftnl11",
    "libmnl0",
    "libjansson4",
    "libxtables12",
    "libgmp10",
    "libnettle8t64",
    "libhogweed6t64",
    "libidn2-0",
    "libp11-kit0",
    "libtasn1-6",
    "libunistring5",
    "libffi8",
    "libzstd1",
    "libedit2",
    "libtinfo6",
    "libbrotli1",
];

/// `criu --version` of `criu` as (major, minor, sublevel), if it runs.
pub fn version(criu: &Path) -> Option<(u32, u32, u32)> {
    let out = Command::new(criu).arg("--version").output().ok()?;
    parse_version(&String::from_utf8_lossy(&out.stdout))
}

/// Parses `criu --version` output: `Version: 4.1.1` (and sometimes a `GitID:` line).
fn parse_version(text: &str) -> Option<(u32, u32, u32)> {
    let v = text.lines().find_map(|l| l.strip_prefix("Version:"))?.trim();
    let mut parts = v.split('.').map(|p| p.parse::<u32>().ok());
    Some((parts.next()??, parts.next().flatten().unwrap_or(0), parts.next().flatten().unwrap_or(0)))
}

/// True when `criu check` passes.
pub fn check(criu: &Path) -> bool {
    Command::new(criu)
        .arg("check")
        .output()
        .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains("Looks good"))
}

fn usable(criu: &Path) -> bool {
    version(criu).is_some_and(|v| v.0 >= 4) && check(criu)
}

/// Makes sure a working criu >= 4 exists and returns its path: the system's if it qualifies, else the
/// private one (installed now if needed).
pub fn provision() -> anyhow::Result<PathBuf> {
    if let Some(system) = which("criu")
        && usable(&system)
    {
        // The configuration's default path leads to it, so every node finds criu in the same place.
        let bin = Path::new(WRAPPER).parent().expect("wrapper has a directory");
        std::fs::create_dir_all(bin)?;
        let script = format!("#!/bin/sh\n# The system's criu, chosen by `cargo xtask setup`.\nexec {} \"$@\"\n", system.display());
        std::fs::write(WRAPPER, script)?;
        std::fs::set_permissions(WRAPPER, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        eprintln!("setup: using the system's {} ({:?}) through {WRAPPER}", system.display(), version(&system));
        return Ok(system);
    }
    let wrapper = PathBuf::from(WRAPPER);
    if usable(&wrapper) {
        eprintln!("setup: CRIU {:?} present at {WRAPPER}", version(&wrapper).unwrap_or_default());
        return Ok(wrapper);
    }
    eprintln!("setup: no working criu >= 4.0; installing Debian trixie's into {PREFIX}");
    install_private().context("cannot install a private CRIU")?;
    ensure!(
        usable(&wrapper),
        "the private CRIU at {WRAPPER} does not pass `criu check`; run `{WRAPPER} check` to see why"
    );
    eprintln!("setup: CRIU {:?} installed at {WRAPPER}", version(&wrapper).unwrap_or_default());
    Ok(wrapper)
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

/// The URI of the system's Debian archive, read from its apt sources (deb822 or one-line format).
fn debian_mirror() -> anyhow::Result<String> {
    let mut texts = Vec::new();
    for path in ["/etc/apt/sources.list.d/debian.sources", "/etc/apt/sources.list"] {
        if let Ok(t) = std::fs::read_to_string(path) {
            texts.push(t);
        }
    }
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        for e in dir.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "sources" || x == "list")
                && let Ok(t) = std::fs::read_to_string(&p)
            {
                texts.push(t);
            }
        }
    }
    for text in &texts {
        // deb822: a stanza with URIs: and Suites: naming bookworm (not -security).
        for stanza in text.split("\n\n") {
            let field = |name: &str| {
                stanza.lines().find_map(|l| l.strip_prefix(name)).map(|v| v.trim().to_owned())
            };
            if let (Some(uris), Some(suites)) = (field("URIs:"), field("Suites:"))
                && suites.split_whitespace().any(|s| s == "bookworm")
                && let Some(uri) = uris.split_whitespace().next()
            {
                return Ok(uri.trim_end_matches('/').to_owned());
            }
        }
        // one-line: deb [options] URI bookworm main
        for line in text.lines().map(str::trim).filter(|l| l.starts_with("deb ")) {
            let words: Vec<&str> = line.split_whitespace().filter(|w| !w.starts_with('[') && !w.ends_with(']')).collect();
            if words.len() >= 3 && words[2] == "bookworm" {
                return Ok(words[1].trim_end_matches('/').to_owned());
            }
        }
    }
    bail!("no Debian bookworm archive found in the apt sources to fetch trixie's criu from")
}

fn install_private() -> anyhow::Result<()> {
    let mirror = debian_mirror()?;
    let work = Path::new(PREFIX).with_file_name("criu-download");
    let _ = std::fs::remove_dir_all(&work);
    for d in ["lists/partial", "archives/partial", "debs"] {
        std::fs::create_dir_all(work.join(d))?;
    }
    let keyring = ["/usr/share/keyrings/debian-archive-trixie-stable.gpg", "/usr/share/keyrings/debian-archive-keyring.gpg"]
        .into_iter()
        .find(|k| Path::new(k).exists())
        .context("no Debian archive keyring with the trixie key (package debian-archive-keyring)")?;
    std::fs::write(
        work.join("sources.list"),
        format!("deb [signed-by={keyring}] {mirror} trixie main\n"),
    )?;
    let apt = |args: &[&str], cwd: &Path| -> anyhow::Result<()> {
        let status = Command::new("apt-get")
            .current_dir(cwd)
            .arg("-q")
            .arg("-o")
            .arg(format!("Dir::Etc::SourceList={}", work.join("sources.list").display()))
            .args(["-o", "Dir::Etc::SourceParts=/nonexistent"])
            .arg("-o")
            .arg(format!("Dir::State::Lists={}", work.join("lists").display()))
            .arg("-o")
            .arg(format!("Dir::Cache::Archives={}", work.join("archives").display()))
            .arg("-o")
            .arg(format!("Dir::Cache::pkgcache={}", work.join("pkgcache.bin").display()))
            .arg("-o")
            .arg(format!("Dir::Cache::srcpkgcache={}", work.join("srcpkgcache.bin").display()))
            .args(["-o", "APT::Architecture=amd64", "-o", "APT::Architectures=amd64"])
            .args(args)
            .status()
            .context("cannot run apt-get")?;
        ensure!(status.success(), "apt-get {} failed ({status})", args.join(" "));
        Ok(())
    };
    apt(&["update"], &work)?;
    apt(&[&["download"][..], PACKAGES].concat(), &work.join("debs"))?;
    let root = Path::new(PREFIX).join("root");
    let _ = std::fs::remove_dir_all(PREFIX);
    std::fs::create_dir_all(&root)?;
    for deb in std::fs::read_dir(work.join("debs"))? {
        let deb = deb?.path();
        let status = Command::new("dpkg").arg("-x").arg(&deb).arg(&root).status()?;
        ensure!(status.success(), "dpkg -x {} failed", deb.display());
    }
    let lib = root.join("usr/lib/x86_64-linux-gnu");
    let loader = lib.join("ld-linux-x86-64.so.2");
    ensure!(loader.exists(), "the trixie libc6 package has no loader at {}", loader.display());
    let bin = Path::new(PREFIX).join("bin");
    std::fs::create_dir_all(&bin)?;
    let script = format!(
        "#!/bin/sh\n# Debian trixie's criu with its own libc, installed by `cargo xtask setup`.\n\
         exec {} --library-path {}:{} {} \"$@\"\n",
        loader.display(),
        lib.display(),
        root.join("lib/x86_64-linux-gnu").display(),
        root.join("usr/sbin/criu").display(),
    );
    std::fs::write(bin.join("criu"), script)?;
    std::fs::set_permissions(bin.join("criu"), std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse() {
        assert_eq!(parse_version("Version: 4.1.1\n"), Some((4, 1, 1)));
        assert_eq!(parse_version("Version: 3.17\nGitID: v3.17\n"), Some((3, 17, 0)));
        assert_eq!(parse_version("criu: command not found"), None);
    }
}
