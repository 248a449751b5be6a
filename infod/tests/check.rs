//! `infod --check`: validates configuration, map and key like `nginx -t`, without starting the daemon.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::{Command, Output};

use rmosix_common::key::ClusterKey;

fn setup(dir: &Path, map: &str, config_extra: &str) -> std::path::PathBuf {
    std::fs::write(dir.join("mosix.map"), map).unwrap();
    let key = dir.join("cluster.key");
    if !key.exists() {
        ClusterKey::generate().write_new(&key).unwrap();
    }
    let config = dir.join("rmosix.toml");
    std::fs::write(
        &config,
        format!("map = \"mosix.map\"\ncluster_key = \"cluster.key\"\nnode = 2\n{config_extra}"),
    )
    .unwrap();
    config
}

fn check(config: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_infod"))
        .arg("--check")
        .arg("--config")
        .arg(config)
        .env_remove("RMOSIX_CONFIG")
        .output()
        .unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_good_configuration_passes_with_a_summary() {
    let dir = tempfile::tempdir().unwrap();
    let config = setup(dir.path(), "1 192.0.2.1 3 speed=2\n", "");
    let out = check(&config);
    assert!(out.status.success(), "{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("3 nodes"), "{stdout}");
    assert!(stdout.contains("this is node 2 (192.0.2.2)"), "{stdout}");
}

#[test]
fn a_bad_map_line_is_named_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let config = setup(dir.path(), "1 192.0.2.1 3\n# spare\n5 192.0.2.9 0\n", "");
    let out = check(&config);
    assert_eq!(out.status.code(), Some(1));
    let map = dir.path().join("mosix.map");
    assert_eq!(
        stderr(&out).trim(),
        format!("infod: {}:3: count is 0: a line must describe at least one node", map.display())
    );
}

#[test]
fn a_misspelt_option_fails() {
    let dir = tempfile::tempdir().unwrap();
    let config = setup(dir.path(), "1 192.0.2.1 3\n", "[infod]\nwindow_size = 5\n");
    let out = check(&config);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("unknown field `window_size`"), "{}", stderr(&out));
}

#[test]
fn a_key_others_can_read_fails() {
    let dir = tempfile::tempdir().unwrap();
    let config = setup(dir.path(), "1 192.0.2.1 3\n", "");
    let key = dir.path().join("cluster.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = check(&config);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("is accessible by group or others (mode 0644)"), "{}", stderr(&out));
}

#[test]
fn a_node_outside_the_map_fails() {
    let dir = tempfile::tempdir().unwrap();
    let config = setup(dir.path(), "5 192.0.2.1 3\n", "");
    let out = check(&config);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("node 2 is not in the cluster map"), "{}", stderr(&out));
}
