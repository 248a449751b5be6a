//! `/proc/PID/mountinfo`, read once for everything that needs a process's mounts: the cgroup hierarchies
//! ([`crate::cgroup`]), the mounts a job leaves out of its namespace, and whether migd's image store is
//! mounted already.

/// One line of a mount table, the fields rmosix uses, unescaped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// The part of the file system's tree the mount shows (`/` unless a subtree was bind-mounted).
    pub root: String,
    /// Where it is mounted.
    pub point: String,
    /// File system type (`tmpfs`, `cgroup2`, `nsfs`, ...).
    pub fstype: String,
    /// The mount's source (a device, or a name such as `rmosix-images`).
    pub source: String,
    /// The super block's options (a v1 cgroup mount names its controllers there).
    pub super_options: String,
}

/// Parses one line, `None` when it is not a mount line:
/// `31 23 0:28 / /sys/fs/cgroup rw,relatime shared:9 - tmpfs tmpfs rw,mode=755` (the optional fields end at
/// the lone `-`).
pub fn parse_line(line: &str) -> Option<Mount> {
    let fields: Vec<&str> = line.split(' ').collect();
    let sep = fields.iter().skip(6).position(|f| *f == "-")? + 6;
    if fields.len() <= 4 {
        return None;
    }
    let after = &fields[sep + 1..];
    let field = |i: usize| after.get(i).copied().unwrap_or_default().to_owned();
    Some(Mount {
        root: unescape(fields[3]),
        point: unescape(fields[4]),
        fstype: field(0),
        source: unescape(after.get(1).copied().unwrap_or_default()),
        super_options: field(2),
    })
}

/// Every mount line of a mount table; lines that are not are skipped.
pub fn parse(text: &str) -> Vec<Mount> {
    text.lines().filter_map(parse_line).collect()
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).filter(|d| d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match (bytes[i], octal) {
            (b'\\', Some(d)) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_with_optional_fields_and_escapes() {
        let m = parse_line("40 27 0:4 net:[4026532290] /run/netns/a\\040b rw shared:5 - nsfs nsfs rw").unwrap();
        assert_eq!((m.point.as_str(), m.fstype.as_str(), m.root.as_str()), ("/run/netns/a b", "nsfs", "net:[4026532290]"));
        let m = parse_line("41 27 0:50 / /run/rmosix/images rw - tmpfs rmosix-images rw,mode=700").unwrap();
        assert_eq!((m.source.as_str(), m.super_options.as_str()), ("rmosix-images", "rw,mode=700"));
        assert!(parse_line("garbage").is_none());
        assert!(parse_line("1 2 3 4 5 6 no separator").is_none());
        assert_eq!(parse("\n41 27 0:50 / /x rw - tmpfs t rw\nbad\n").len(), 1);
    }
}
