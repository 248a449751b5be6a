//! `rmosix-keeper SOCKET`: holds the pipes of migd's jobs so that they outlive migd; see
//! `rmosix_migd::keeper`. migd starts it; it runs until it has held nothing for a while.
//!
//! `rmosix-keeper --list SOCKET`: asks the keeper listening on SOCKET what it holds and prints one line
//! per job generation: `HOME_NODE-HOME_PID-EPOCH pid PID uid UID` and `moving to N` or `arriving` when the
//! job was in the middle of a move.
//!
//! Exit codes: 1 if it cannot listen on SOCKET (or, with `--list`, no keeper answers), 2 on bad arguments.

use std::os::unix::fs::PermissionsExt as _;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let path = match &args[..] {
        [path] => path,
        [flag, path] if flag == "--list" => return list(std::path::Path::new(path)),
        _ => {
            eprintln!("usage: rmosix-keeper SOCKET | rmosix-keeper --list SOCKET");
            return ExitCode::from(2);
        }
    };
    let path = std::path::PathBuf::from(path);
    // A socket left by a keeper that died: nobody answers on it (migd starts a keeper only then).
    let _ = std::fs::remove_file(&path);
    let listener = match std::os::unix::net::UnixListener::bind(&path) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("rmosix-keeper: cannot listen on {}: {e}", path.display());
            return ExitCode::from(1);
        }
    };
    if let Err(e) = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)) {
        eprintln!("rmosix-keeper: cannot make {} root's only: {e}", path.display());
        return ExitCode::from(1);
    }
    rmosix_migd::keeper::serve(&listener, &path);
    ExitCode::SUCCESS
}

/// Prints what the keeper at `path` holds.
fn list(path: &std::path::Path) -> ExitCode {
    match rmosix_migd::keeper::Keeper::at(path).list() {
        Ok(held) => {
            for (kept, _) in held {
                let moving = match (kept.moving_to, kept.arriving) {
                    (Some(to), _) => format!(" moving to {to}"),
                    (None, true) => " arriving".to_owned(),
                    (None, false) => String::new(),
                };
                println!("{} pid {} uid {}{moving}", kept.id(), kept.pid, kept.uid);
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("rmosix-keeper: {e}");
            ExitCode::from(1)
        }
    }
}
