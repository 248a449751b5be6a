//! Target `config`: `Config::parse`, which reads the `rmosix.toml` an administrator wrote (TOML, then
//! validation).
//!
//! Checked: parsing returns, whatever the text; every error names the file; an accepted configuration
//! holds every rule `validate` enforces, and its paths are absolute (relative ones follow the file, which
//! is at an absolute path here). There is no encoder, so no round trip; the parse is checked to be a
//! function of the text (the same text parses to the same configuration).

use std::path::Path;

use rmosix_common::config::{Config, ResourceSource};

/// Pieces of configuration worth splicing in.
pub const TOKENS: &[&[u8]] = &[
    b"[infod]\n",
    b"[load]\n",
    b"[resources]\n",
    b"[policy]\n",
    b"[checkpoint]\n",
    b"[migd]\n",
    b" = ",
    b"\"",
    b"'''",
    b"[[",
    b"]]",
    b"{",
    b"}",
    b"true",
    b"1e999",
    b"nan",
    b"-inf",
    b"0x7f",
    b"1979-05-27T07:32:00Z",
    b"source = \"cgroup\"\n",
    b"cgroup = \"/rmosix-local/node1\"\n",
    b"../",
    b"node = ",
];

const PATH: &str = "/etc/rmosix/rmosix.toml";

/// Runs one input.
pub fn run(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    match Config::parse(&text, Path::new(PATH)) {
        Ok(config) => {
            check_valid(&config);
            let again = Config::parse(&text, Path::new(PATH)).expect("the same text parses twice");
            assert_eq!(again, config);
        }
        Err(e) => assert!(e.to_string().starts_with(PATH), "error does not name the file: {e}"),
    }
}

fn check_valid(c: &Config) {
    let i = &c.infod;
    assert!(i.interval_ms >= 1 && i.window >= 1 && i.port != 0, "{i:?}");
    assert!(i.down_after_ms > i.interval_ms && i.max_age_ms >= i.down_after_ms, "{i:?}");
    assert!((0.0..1.0).contains(&c.load.rise) && (0.0..1.0).contains(&c.load.fall), "{:?}", c.load);
    assert!(c.load.samples_per_interval >= 1);
    if let Some(speed) = c.resources.speed {
        assert!(speed.is_finite() && speed > 0.0, "speed {speed}");
    }
    if c.resources.source == ResourceSource::Cgroup {
        assert!(c.resources.cgroup.is_some());
    }
    for path in [
        &c.map,
        &c.cluster_key,
        &c.infod.socket,
        &c.checkpoint.criu,
        &c.checkpoint.image_store,
        &c.checkpoint.log_dir,
        &c.migd.socket,
        &c.migd.records,
    ] {
        assert!(path.is_absolute(), "relative path {} accepted", path.display());
    }
}

/// The documented defaults, and files that reach each rule.
pub fn seeds() -> Vec<Vec<u8>> {
    let texts: &[&str] = &[
        include_str!("../../../etc/rmosix.toml"),
        "",
        "map = \"mosix.map\"\ncluster_key = \"../keys/./cluster.key\"\nnode = 3\n",
        "[infod]\nport = 5401\ninterval_ms = 500\nwindow = 8\ndown_after_ms = 2000\nmax_age_ms = 4000\n",
        "[infod]\nintervall_ms = 5\n",
        "[infod]\ndown_after_ms = 500\n",
        "[load]\nrise = 1.0\nfall = 0.5\nsamples_per_interval = 0\n",
        "[resources]\nsource = \"cgroup\"\ncgroup = \"/rmosix-local/node1\"\nspeed = 2.0\n",
        "[resources]\nsource = \"cgroup\"\ncgroup = \"rmosix-local/../node1\"\n",
        "[resources]\nsource = \"host\"\nspeed = -1.0\n",
        "[policy]\nblock_guests = true\nallow_root_guests = false\n",
        "[checkpoint]\ncriu = \"bin/criu\"\nimage_store = \"/run/rmosix/images\"\n",
        "[migd]\nport = 5402\nsocket = \"migd.sock\"\nrecords = \"/var/lib/rmosix/records\"\n",
        "infod = { port = 1, window = [1, 2] }\n[[migd]]\n",
    ];
    texts.iter().map(|t| t.as_bytes().to_vec()).collect()
}
