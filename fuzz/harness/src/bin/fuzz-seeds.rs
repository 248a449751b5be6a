//! `fuzz-seeds --list`: the fuzz targets, one per line (name, a tab, what it feeds).
//! `fuzz-seeds TARGET DIR`: writes the target's seeds into DIR, one file each, named after their contents.
//!
//! `cargo xtask fuzz` starts each libFuzzer run from these: seeds are built by the current encoders, so
//! they stay valid inputs when a format changes, which files kept in the repository would not.

use std::path::PathBuf;

use anyhow::{Context as _, bail};
use rmosix_fuzz_harness::{TARGETS, input_name, target};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [list] if list == "--list" => {
            for t in TARGETS {
                println!("{}\t{}", t.name, t.feeds);
            }
            Ok(())
        }
        [name, dir] => {
            let target = target(name).with_context(|| format!("no fuzz target {name}"))?;
            let dir = PathBuf::from(dir);
            std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
            let seeds = (target.seeds)();
            for seed in &seeds {
                let path = dir.join(format!("seed-{}", input_name(seed)));
                std::fs::write(&path, seed).with_context(|| format!("cannot write {}", path.display()))?;
            }
            eprintln!("fuzz-seeds: {} seeds of {name} in {}", seeds.len(), dir.display());
            Ok(())
        }
        _ => bail!("usage: fuzz-seeds --list | fuzz-seeds TARGET DIR"),
    }
}
