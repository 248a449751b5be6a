//! `rmosix-keeper SOCKET`: holds the pipes of migd's jobs so that they outlive migd; see
//! `rmosix_migd::keeper`. migd starts it; it runs until killed.
//!
//! Exit codes: 1 if it cannot listen on SOCKET, 2 on bad arguments.

use std::os::unix::fs::PermissionsExt as _;
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let (Some(path), None) = (args.next(), args.next()) else {
        eprintln!("usage: rmosix-keeper SOCKET");
        return ExitCode::from(2);
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
