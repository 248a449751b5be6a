//! The keeper: holds, for migd, what a job needs to outlive migd.
//!
//! A job's stdio and status pipes have their far ends in migd. If migd died with them, the job's next write
//! to its stdout would kill it (SIGPIPE) and its status would be lost. So migd hands a duplicate of every
//! job's pipe ends, with a description of the job ([`Kept`]), to the keeper, `rmosix-keeper`: a small process
//! of its own that does nothing but hold them. It outlives migd (migd starts it once, and it is not in
//! migd's process group), so a job's pipes stay open while migd is down: its output waits in them, and the
//! job blocks if they fill. A restarted migd asks the keeper for everything it holds ([`Request::List`])
//! and takes the jobs up again (`Job::adopt`).
//!
//! It holds nothing for nobody: with no job held and no request for [`IDLE`], or once its socket is gone
//! (the node's run directory removed), it exits; migd starts a new one when it needs one.
//!
//! The keeper speaks the control socket's framing (`rmosix_common::control`: a `u32` length, JSON, and
//! descriptors with `SCM_RIGHTS`) on a Unix socket only root may use, one request per connection.

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rmosix_common::control::{self, ControlError};
use serde::{Deserialize, Serialize};

/// How long a keeper holding no job waits for a request before it exits.
pub const IDLE: Duration = Duration::from_secs(30);

/// What migd says of a job it hands over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Kept {
    pub home_node: u32,
    pub home_pid: i32,
    pub epoch: u32,
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub command: Vec<String>,
    /// Host PID of the job's init.
    pub pid: i32,
    /// Inodes of the job's pipes (`Job::pipes`).
    pub pipes: [u64; 4],
    /// The job's stdin has not ended: its write end is held (the first descriptor).
    pub stdin_open: bool,
    /// The job was being moved away (frozen) to this node: a migd taking it up must find out from its home
    /// whether the move happened before it resumes or kills it.
    pub moving_to: Option<u32>,
    /// The job arrived by a move and had not been let run yet: resumed only if home's record names it.
    pub arriving: bool,
    /// Its hint, start time and moves so far.
    #[serde(default)]
    pub facts: rmosix_common::control::JobFacts,
}

impl Kept {
    /// The key: one job generation on this node.
    pub fn id(&self) -> String {
        format!("{}-{}-{}", self.home_node, self.home_pid, self.epoch)
    }
}

/// A request to the keeper.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case")]
pub enum Request {
    /// Hold this job's descriptors (stdin write end if `stdin_open`, stdout and stderr read ends, status
    /// read end), or,
    /// sent without descriptors, only update what is said of a job already held.
    Keep(Kept),
    /// Let go of a job (it ended here, or left).
    Forget { id: String },
    /// The job's input ended: let go of its stdin's write end, so that the job reads the end of it.
    CloseStdin { id: String },
    /// Everything held: one `Held` per job with its descriptors, then `End`.
    List,
}

/// The keeper's answers.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "answer", rename_all = "snake_case")]
pub enum Answer {
    Done,
    Held(Kept),
    End,
    Refused { why: String },
}

/// A keeper could not be reached or refused.
#[derive(Debug, thiserror::Error)]
pub enum KeeperError {
    #[error("keeper at {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("keeper at {path}: {source}")]
    Protocol {
        path: PathBuf,
        #[source]
        source: ControlError,
    },
    #[error("keeper at {path} refused: {why}")]
    Refused { path: PathBuf, why: String },
}

/// migd's side: the keeper at a socket path.
#[derive(Debug, Clone)]
pub struct Keeper {
    path: PathBuf,
    /// `rmosix-keeper`, to start one again after an idle one exited.
    program: PathBuf,
}

impl Keeper {
    /// The keeper listening at `path`, started (from `program`) if none answers there.
    pub fn connect_or_start(path: &Path, program: &Path) -> Result<Self, KeeperError> {
        let keeper = Self { path: path.to_owned(), program: program.to_owned() };
        keeper.start_if_gone()?;
        Ok(keeper)
    }

    /// The keeper listening at `path`, to ask what it holds (one is not started if none answers).
    pub fn at(path: &Path) -> Self {
        Self { path: path.to_owned(), program: PathBuf::new() }
    }

    /// Starts a keeper if none answers (an idle one exits).
    fn start_if_gone(&self) -> Result<(), KeeperError> {
        let (path, program) = (&self.path, &self.program);
        if UnixStream::connect(path).is_ok() {
            return Ok(());
        }
        let io = |source| KeeperError::Io { path: path.to_owned(), source };
        let mut command = std::process::Command::new(program);
        command.arg(path).stdin(std::process::Stdio::null());
        // Its own process group: whatever stops migd's group leaves the keeper, and the jobs' pipes, be.
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let mut child = command.spawn().map_err(io)?;
        std::thread::spawn(move || child.wait());
        for _ in 0..200 {
            if UnixStream::connect(path).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Err(io(std::io::Error::new(std::io::ErrorKind::TimedOut, "the keeper did not come up")))
    }

    fn ask(&self, request: &Request, fds: &[BorrowedFd<'_>]) -> Result<UnixStream, KeeperError> {
        if matches!(request, Request::Keep(_)) {
            self.start_if_gone()?;
        }
        let stream = UnixStream::connect(&self.path).map_err(|source| KeeperError::Io { path: self.path.clone(), source })?;
        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
        control::send_with_fds(&stream, request, fds).map_err(|source| KeeperError::Protocol { path: self.path.clone(), source })?;
        Ok(stream)
    }

    fn done(&self, mut stream: UnixStream) -> Result<(), KeeperError> {
        match control::recv::<Answer>(&mut stream) {
            Ok(Answer::Done) => Ok(()),
            Ok(Answer::Refused { why }) => Err(KeeperError::Refused { path: self.path.clone(), why }),
            Ok(other) => Err(KeeperError::Refused { path: self.path.clone(), why: format!("unexpected answer {other:?}") }),
            Err(source) => Err(KeeperError::Protocol { path: self.path.clone(), source }),
        }
    }

    /// Hands over a job's descriptors (`[stdin, stdout, stderr, status]`), or updates what is said of it.
    /// Tried twice: a keeper that had been idle may have been exiting as it was asked (a new one is
    /// started for the second try).
    pub fn keep(&self, kept: &Kept, fds: &[BorrowedFd<'_>]) -> Result<(), KeeperError> {
        let once = || self.ask(&Request::Keep(kept.clone()), fds).and_then(|stream| self.done(stream));
        match once() {
            Err(KeeperError::Io { .. } | KeeperError::Protocol { .. }) => {
                std::thread::sleep(Duration::from_millis(50));
                once()
            }
            done => done,
        }
    }

    /// Lets go of a job's stdin.
    pub fn close_stdin(&self, id: &str) -> Result<(), KeeperError> {
        let stream = self.ask(&Request::CloseStdin { id: id.to_owned() }, &[])?;
        self.done(stream)
    }

    /// Lets go of a job.
    pub fn forget(&self, id: &str) -> Result<(), KeeperError> {
        let stream = self.ask(&Request::Forget { id: id.to_owned() }, &[])?;
        self.done(stream)
    }

    /// Everything the keeper holds.
    pub fn list(&self) -> Result<Vec<(Kept, Vec<OwnedFd>)>, KeeperError> {
        let mut stream = self.ask(&Request::List, &[])?;
        let mut held = Vec::new();
        loop {
            match control::recv_with_fds::<Answer>(&mut stream) {
                Ok((Answer::Held(kept), fds)) => held.push((kept, fds)),
                Ok((Answer::End, _)) => return Ok(held),
                Ok((other, _)) => {
                    return Err(KeeperError::Refused { path: self.path.clone(), why: format!("unexpected answer {other:?}") });
                }
                Err(source) => return Err(KeeperError::Protocol { path: self.path.clone(), source }),
            }
        }
    }
}

/// The keeper's own loop: serves `listener` for ever, one request at a time (each is a few syscalls).
/// Only root (migd) may talk to it.
pub fn serve(listener: &UnixListener, path: &Path) {
    let mut held: HashMap<String, (Kept, Vec<OwnedFd>)> = HashMap::new();
    let _ = listener.set_nonblocking(true);
    let mut last = std::time::Instant::now();
    loop {
        let mut stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if !path.exists() {
                    return;
                }
                if held.is_empty() && last.elapsed() > IDLE {
                    // The socket goes first, so that migd starts a new keeper rather than asking this one.
                    let _ = std::fs::remove_file(path);
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
            Err(_) => continue,
        };
        last = std::time::Instant::now();
        let _ = stream.set_nonblocking(false);
        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
        let root = nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::PeerCredentials).is_ok_and(|c| c.uid() == 0);
        if !root {
            let _ = control::send(&mut stream, &Answer::Refused { why: "only root may use the keeper".into() });
            continue;
        }
        let Ok((request, fds)) = control::recv_with_fds::<Request>(&mut stream) else { continue };
        let answer = match request {
            Request::Keep(kept) => {
                let id = kept.id();
                let expected = 3 + usize::from(kept.stdin_open);
                if fds.is_empty() {
                    match held.get_mut(&id) {
                        Some((held_kept, held_fds)) => {
                            if held_kept.stdin_open && !kept.stdin_open && held_fds.len() == 4 {
                                held_fds.remove(0);
                            }
                            *held_kept = Kept { stdin_open: held_kept.stdin_open && kept.stdin_open, ..kept };
                            Answer::Done
                        }
                        None => Answer::Refused { why: format!("no job {id} held") },
                    }
                } else if fds.len() == expected {
                    held.insert(id, (kept, fds));
                    Answer::Done
                } else {
                    Answer::Refused { why: format!("job {id} comes with {} descriptors, not {expected}", fds.len()) }
                }
            }
            Request::Forget { id } => {
                held.remove(&id);
                Answer::Done
            }
            Request::CloseStdin { id } => {
                if let Some((kept, fds)) = held.get_mut(&id)
                    && kept.stdin_open
                    && fds.len() == 4
                {
                    fds.remove(0);
                    kept.stdin_open = false;
                }
                Answer::Done
            }
            Request::List => {
                for (kept, fds) in held.values() {
                    let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(AsFd::as_fd).collect();
                    if control::send_with_fds(&stream, &Answer::Held(kept.clone()), &borrowed).is_err() {
                        break;
                    }
                }
                Answer::End
            }
        };
        let _ = control::send(&mut stream, &answer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;
    use std::io::{Read as _, Write as _};

    fn kept(stdin_open: bool) -> Kept {
        Kept {
            home_node: 1,
            home_pid: 42,
            epoch: 0,
            uid: 1000,
            gid: 1000,
            groups: vec![],
            command: vec!["sleep".into()],
            pid: 4242,
            pipes: [1, 2, 3, 4],
            stdin_open,
            facts: rmosix_common::control::JobFacts::default(),
            moving_to: None,
            arriving: false,
        }
    }

    /// A keeper serving a socket in a fresh directory, in a thread; it ends when the directory goes.
    fn keeper() -> (tempfile::TempDir, Keeper) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keeper.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let served = path.clone();
        std::thread::spawn(move || serve(&listener, &served));
        (dir, Keeper { path, program: PathBuf::from("/nonexistent") })
    }

    #[test]
    fn what_is_kept_comes_back_with_its_pipes_and_the_end_of_stdin_reaches_the_reader() {
        let (_dir, keeper) = keeper();
        let (stdin_r, stdin_w) = std::io::pipe().unwrap();
        let (out_r, mut out_w) = std::io::pipe().unwrap();
        let (err_r, _err_w) = std::io::pipe().unwrap();
        let (status_r, _status_w) = std::io::pipe().unwrap();
        let fds = [stdin_w.as_fd(), out_r.as_fd(), err_r.as_fd(), status_r.as_fd()];
        keeper.keep(&kept(true), &fds).unwrap();
        // migd's own ends go (as when it dies): the pipes stay open, output waits in them.
        drop((stdin_w, out_r, err_r, status_r));
        out_w.write_all(b"still here\n").unwrap();
        keeper.keep(&Kept { moving_to: Some(3), ..kept(true) }, &[]).unwrap();

        let held = keeper.list().unwrap();
        assert_eq!(held.len(), 1);
        let (said, fds) = &held[0];
        assert_eq!(said, &Kept { moving_to: Some(3), ..kept(true) });
        assert_eq!(fds.len(), 4);
        let mut out = File::from(fds[1].try_clone().unwrap());
        let mut line = [0u8; 11];
        out.read_exact(&mut line).unwrap();
        assert_eq!(&line, b"still here\n");

        // The keeper's copy of the stdin write end was the last but the list's: once both go, the reader
        // sees the end.
        keeper.close_stdin(&kept(true).id()).unwrap();
        drop(held);
        let mut rest = Vec::new();
        File::from(OwnedFd::from(stdin_r)).read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
        let held = keeper.list().unwrap();
        assert!(!held[0].0.stdin_open);
        assert_eq!(held[0].1.len(), 3);

        keeper.forget(&kept(true).id()).unwrap();
        assert!(keeper.list().unwrap().is_empty());
    }

    #[test]
    fn a_job_with_the_wrong_number_of_pipes_or_an_update_of_an_unknown_job_is_refused() {
        let (_dir, keeper) = keeper();
        let (r, _w) = std::io::pipe().unwrap();
        let error = keeper.keep(&kept(true), &[r.as_fd(), r.as_fd(), r.as_fd()]).unwrap_err();
        assert!(error.to_string().contains("3 descriptors, not 4"), "{error}");
        let error = keeper.keep(&kept(false), &[]).unwrap_err();
        assert!(error.to_string().contains("no job 1-42-0 held"), "{error}");
        assert!(keeper.list().unwrap().is_empty());
    }
}
