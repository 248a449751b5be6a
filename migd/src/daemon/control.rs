//! The control socket: `mosrun`, `migrate` and `mosctl` talk to migd over a UNIX socket, one request per
//! connection (a `Run` keeps its connection as the deputy's session). Who asks is read from the socket
//! (`SO_PEERCRED`), never from the request: a user acts on their own jobs only, root on all.

use std::ffi::OsString;
use std::os::fd::{AsFd as _, OwnedFd};
use std::os::unix::ffi::OsStringExt as _;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use nix::sys::signal::Signal;
use rmosix_checkpoint::job::{Credentials, Job, JobSpec};
use rmosix_common::control::{ControlError, JobFacts, Refusal, Request, Response, Run, Target, Where};
use rmosix_common::{NodeId, control, query};
use tracing::{info, warn};

use crate::records::{JobRecord, JobState};
use crate::{protocol, relay};
use super::home::{HomeJob, Location};
use super::runner::{Runner, Whose};
use super::{Adopted, Daemon, MoveError, StartError};

/// Who is on the other end of a control connection.
#[derive(Debug, Clone, Copy)]
pub(super) struct Peer {
    pub(super) pid: i32,
    pub(super) uid: u32,
    pub(super) gid: u32,
}

pub(super) fn peer(stream: &UnixStream) -> std::io::Result<Peer> {
    let cred = nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerCredentials)
        .map_err(std::io::Error::from)?;
    Ok(Peer { pid: cred.pid(), uid: cred.uid(), gid: cred.gid() })
}

pub(super) fn refuse(stream: &mut UnixStream, why: Refusal, message: impl Into<String>) {
    let _ = control::send(stream, &Response::Refused { why, message: message.into() });
}

/// A user's name for messages, or the uid when the user database has none.
pub(super) fn user_name(uid: u32) -> String {
    match nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) {
        Ok(Some(user)) => user.name,
        _ => format!("uid {uid}"),
    }
}

/// The deputy's identity: its uid and gid, and its supplementary groups as the kernel knows them
/// (`SO_PEERGROUPS`): the groups the deputy really has (after `newgrp` or `sg`, say), not the user database's.
pub(super) fn credentials(stream: &UnixStream, peer: Peer) -> std::io::Result<Credentials> {
    let mut groups = vec![0 as libc::gid_t; 64];
    loop {
        let mut len = libc::socklen_t::try_from(groups.len() * std::mem::size_of::<libc::gid_t>()).unwrap_or(libc::socklen_t::MAX);
        // SAFETY: getsockopt writes at most `len` bytes into the buffer and says how many it needs.
        let ret = unsafe {
            libc::getsockopt(
                std::os::fd::AsRawFd::as_raw_fd(stream),
                libc::SOL_SOCKET,
                libc::SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &raw mut len,
            )
        };
        let needed = len as usize / std::mem::size_of::<libc::gid_t>();
        if ret == 0 {
            groups.truncate(needed);
            return Ok(Credentials { uid: peer.uid, gid: peer.gid, groups });
        }
        let error = std::io::Error::last_os_error();
        if error.raw_os_error() != Some(libc::ERANGE) || needed <= groups.len() {
            return Err(error);
        }
        groups.resize(needed, 0);
    }
}

impl Daemon {
    /// Serves the control socket. Every local user may connect, so what one user can hold is bounded by
    /// `crate::limits` (per uid, from `SO_PEERCRED`): a thread is given only to connections within the
    /// user's limit; the rest wait without one or are refused in words.
    pub(super) fn serve_control(self: &Arc<Self>) -> Result<(), StartError> {
        let path = self.settings.config.migd.socket.clone();
        let listen = |source| StartError::Listen { what: path.display().to_string(), source };
        // Everyone may connect; what they may do is decided per request from their credentials.
        let listener = rmosix_common::node::bind_local_socket(&path).map_err(listen)?;
        let limits = crate::limits::Limits::new(self.settings.config.migd.requests_per_user);
        let daemon = Arc::clone(self);
        let gate = crate::limits::Gate::new(limits, move |stream, ticket: crate::limits::Ticket<UnixStream>| {
            let daemon = Arc::clone(&daemon);
            let uid = ticket.uid();
            let serve = std::thread::Builder::new().name("control".into()).spawn(move || daemon.serve_client(stream, ticket));
            if let Err(e) = serve {
                warn!(uid, error = %e, "cannot start a thread for a control connection; closing it");
            }
        });
        gate.watch().map_err(listen)?;
        info!(node = %self.me(), socket = %path.display(), per_user = limits.per_user, "migd control socket ready");
        for stream in listener.incoming() {
            match stream.and_then(|stream| peer(&stream).map(|peer| (stream, peer))) {
                Ok((stream, peer)) => gate.arrive(peer.uid, stream),
                Err(e) => warn!(error = %e, "accept on the control socket failed"),
            }
        }
        Ok(())
    }

    /// One control connection: its first request, then a job's session or one answer. `ticket` counts the
    /// connection against its user until the request turns out to be a job's session, or is answered.
    pub(super) fn serve_client(self: Arc<Self>, mut stream: UnixStream, ticket: crate::limits::Ticket<UnixStream>) {
        use crate::limits::Connection as _;
        let Ok(peer) = peer(&stream) else { return };
        let (request, fds) = match control::recv_with_fds::<Request>(&mut stream) {
            Ok(r) => r,
            Err(e) => {
                match (ticket.expired(), e) {
                    (Some(why), _) => {
                        info!(uid = peer.uid, pid = peer.pid, "control connection sent no request in time; closed");
                        stream.refuse(&why);
                    }
                    (None, ControlError::Closed) => {}
                    (None, e) => refuse(&mut stream, Refusal::BadRequest, e.to_string()),
                }
                return;
            }
        };
        ticket.request_read();
        match request {
            Request::Run(run) => {
                // A job's session lasts as long as the job: it does not count against its user.
                drop(ticket);
                self.run(stream, peer, run, fds);
            }
            Request::Migrate { home_pid, target } => {
                let response = match self.migrate(peer, home_pid, target) {
                    Ok(r) => r,
                    Err(e) => Response::Refused { why: e.why, message: e.message },
                };
                let _ = control::send(&mut stream, &response);
            }
            Request::Reattach => {
                drop(ticket);
                self.reattach(stream, peer, fds);
            }
            Request::Guests => {
                let me = self.me().0;
                let count = self.runners.lock().expect("runners").keys().filter(|(home, _)| *home != me).count();
                let count = u32::try_from(count).unwrap_or(u32::MAX);
                let _ = control::send(&mut stream, &Response::Guests { count });
            }
            Request::Jobs => {
                let _ = control::send(&mut stream, &self.cluster_jobs());
            }
            Request::Policy { change } => {
                let response = self.change_policy(peer.uid, change).unwrap_or_else(|e| Response::Refused { why: e.why, message: e.message });
                let _ = control::send(&mut stream, &response);
            }
            Request::Expel => {
                let response = self.expel(peer.uid).unwrap_or_else(|e| Response::Refused { why: e.why, message: e.message });
                let _ = control::send(&mut stream, &response);
            }
            Request::Pin { home_pid, pinned } => {
                let response =
                    self.pin(peer.uid, home_pid, pinned).unwrap_or_else(|e| Response::Refused { why: e.why, message: e.message });
                let _ = control::send(&mut stream, &response);
            }
            Request::Signal { .. } => refuse(&mut stream, Refusal::BadRequest, "signal outside a run session"),
        }
    }

    /// What to start for a `Run` request, as `credentials`.
    pub(super) fn job_spec(&self, req: &Run, credentials: Credentials) -> JobSpec {
        JobSpec {
            init: self.init.clone(),
            program: OsString::from_vec(req.program.clone()),
            args: req.args.iter().cloned().map(OsString::from_vec).collect(),
            env: req
                .env
                .iter()
                .filter_map(|kv| {
                    let eq = kv.iter().position(|&b| b == b'=')?;
                    Some((OsString::from_vec(kv[..eq].to_vec()), OsString::from_vec(kv[eq + 1..].to_vec())))
                })
                .collect(),
            cwd: req.cwd.clone(),
            credentials: Some(credentials),
            umask: req.umask,
            rlimits: req.rlimits.iter().map(|l| (l.resource, l.soft, l.hard)).collect(),
        }
    }

    #[expect(clippy::needless_pass_by_value, reason = "the session owns its connection and request")]
    pub(super) fn run(self: &Arc<Self>, mut stream: UnixStream, peer: Peer, req: Run, fds: Vec<OwnedFd>) {
        let Ok([stdin, stdout, stderr]) = <[OwnedFd; 3]>::try_from(fds) else {
            refuse(&mut stream, Refusal::BadRequest, "a run request must carry stdin, stdout and stderr");
            return;
        };
        let start_on = match req.place {
            Where::Home => self.me().0,
            Where::Node(n) if self.settings.map.get(NodeId(n)).is_none() => {
                refuse(&mut stream, Refusal::NoSuchNode, format!("node {n} is not in the cluster map; `mosctl status` lists the nodes"));
                return;
            }
            Where::Node(n) => n,
            Where::Best if req.options.stay_home => self.me().0,
            Where::Best => self.best_node(None, req.options.mem_mb.unwrap_or(0).saturating_mul(1 << 20)),
        };
        if req.options.stay_home && start_on != self.me().0 {
            let why = format!("-h keeps the job on its home node, node {}, and -N {start_on} asks for another", self.me().0);
            refuse(&mut stream, Refusal::BadRequest, why);
            return;
        }
        let credentials = match credentials(&stream, peer) {
            Ok(c) => c,
            Err(e) => {
                refuse(&mut stream, Refusal::Failed, format!("cannot read the groups of the deputy (uid {}): {e}", peer.uid));
                return;
            }
        };
        let spec = self.job_spec(&req, credentials.clone());
        let home_pid = peer.pid;
        let (cgroup, placement) = self.job_cgroup(self.me().0, home_pid, 0);
        let (job, pipes) = match Job::spawn(&spec, &placement) {
            Ok(j) => j,
            Err(e) => {
                if let Some(cgroup) = &cgroup {
                    let _ = cgroup.remove();
                }
                refuse(&mut stream, Refusal::Failed, e.to_string());
                return;
            }
        };
        let mut command = vec![String::from_utf8_lossy(&req.program).into_owned()];
        command.extend(req.args.iter().map(|a| String::from_utf8_lossy(a).into_owned()));
        let now = SystemTime::now();
        let record = JobRecord {
            home_pid,
            uid: peer.uid,
            gid: peer.gid,
            command: command.clone(),
            cwd: JobRecord::lossy_path(&req.cwd),
            node: self.me(),
            node_pid: job.pid(),
            state: JobState::Running,
            migrations: 0,
            started_at: now,
            updated_at: now,
            stay_home: req.options.stay_home,
        };
        if let Err(e) = self.records.insert(record) {
            let _ = job.signal(Signal::SIGKILL);
            let _ = job.wait();
            refuse(&mut stream, Refusal::Busy, e.to_string());
            return;
        }
        let Some(home) = self.new_home(home_pid, req.options.stay_home, 0, stdout, stderr, &stream) else {
            let _ = job.signal(Signal::SIGKILL);
            let _ = job.wait();
            refuse(&mut stream, Refusal::Failed, "cannot duplicate the deputy's descriptors");
            return;
        };
        info!(home_pid, uid = peer.uid, pid = job.pid(), command = ?command, stay_home = req.options.stay_home, "job started");
        let (job_stdout, job_stderr) = (pipes.stdout, pipes.stderr);
        let whose = Whose {
            home_node: self.me().0,
            home_pid,
            uid: peer.uid,
            gid: peer.gid,
            groups: credentials.groups,
            command,
            facts: JobFacts {
                hint: req.options.hint,
                started: SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
                migrations: 0,
                stay_home: req.options.stay_home,
                manual: req.options.no_auto_migrate,
            },
        };
        let runner = Arc::new(Runner::new(whose, job, Some(pipes.stdin), 0, cgroup).kept_by(self.keeper.as_ref()));
        self.keep(&runner, job_stdout.as_fd(), job_stderr.as_fd(), false);
        self.attach_here(&home, &runner, job_stdout, job_stderr);
        relay::spawn_stoppable("deputy-stdin", stdin, home.stdin.clone(), Arc::clone(&home.stop_stdin));

        if control::send(&mut stream, &Response::Started { home_pid, node: start_on }).is_err() {
            let _ = runner.job.signal(Signal::SIGKILL);
        }
        if start_on != self.me().0 {
            // Started here, moved at once: the simplest way to start elsewhere with everything a move checks.
            let daemon = Arc::clone(self);
            std::thread::spawn(move || daemon.start_away(&runner, start_on));
        }
        Self::deputy_session(stream, &home);
    }

    /// A deputy takes its job up again after this migd restarted: the job runs on another node, which links
    /// back here once it notices.
    pub(super) fn reattach(self: &Arc<Self>, mut stream: UnixStream, peer: Peer, fds: Vec<OwnedFd>) {
        let Ok([stdin, stdout, stderr]) = <[OwnedFd; 3]>::try_from(fds) else {
            refuse(&mut stream, Refusal::BadRequest, "a reattach request must carry stdin, stdout and stderr");
            return;
        };
        let home_pid = peer.pid;
        let Some(record) = self.records.get(home_pid).filter(|r| !r.state.has_ended() && r.uid == peer.uid) else {
            refuse(&mut stream, Refusal::NoSuchJob, format!("no running job with home PID {home_pid} here"));
            return;
        };
        let adopted = self.adopted.lock().expect("adopted").remove(&home_pid);
        if let Some(adopted) = adopted {
            self.reattach_adopted(stream, [stdin, stdout, stderr], &record, adopted);
            return;
        }
        if record.node == self.me() || self.homes.lock().expect("homes lock").contains_key(&home_pid) {
            // It ran here, in the migd that ended: it ended with it.
            let _ = self.records.update(home_pid, |r| r.state = JobState::Lost { reason: "migd restarted".into() });
            refuse(&mut stream, Refusal::NoSuchJob, format!("job {home_pid} ran on this node and ended with migd"));
            return;
        }
        let Some(home) = self.new_home(home_pid, record.stay_home, record.migrations, stdout, stderr, &stream) else {
            refuse(&mut stream, Refusal::Failed, "cannot duplicate the deputy's descriptors");
            return;
        };
        relay::spawn_stoppable("deputy-stdin", stdin, home.stdin.clone(), Arc::clone(&home.stop_stdin));
        info!(home_pid, node = %record.node, "deputy back; waiting for the job's node to link again");
        if control::send(&mut stream, &Response::Started { home_pid, node: record.node.0 }).is_err() {
            return;
        }
        self.lose_unless_linked(&home, record.node.0, record.migrations);
        Self::deputy_session(stream, &home);
    }

    /// A deputy comes back to its job, which ran on here while migd was down.
    pub(super) fn reattach_adopted(self: &Arc<Self>, mut stream: UnixStream, [stdin, stdout, stderr]: [OwnedFd; 3], record: &JobRecord, adopted: Adopted) {
        let (runner, job_stdout, job_stderr, arriving) = adopted;
        let home_pid = record.home_pid;
        let Some(home) = self.new_home(home_pid, record.stay_home, record.migrations, stdout, stderr, &stream) else {
            refuse(&mut stream, Refusal::Failed, "cannot duplicate the deputy's descriptors");
            return;
        };
        if arriving && let Err(why) = self.bind(home_pid, self.me().0, runner.epoch, runner.job.pid()) {
            warn!(home_pid, %why, "the job taken up was not this node's to run; killed");
            runner.kill_and_clean();
            self.finish_home(&home, Response::Lost { reason: why });
            return;
        }
        self.attach_here(&home, &runner, job_stdout, job_stderr);
        if arriving {
            runner.job.resume();
            self.kept_update(&runner, None, false);
        }
        relay::spawn_stoppable("deputy-stdin", stdin, home.stdin.clone(), Arc::clone(&home.stop_stdin));
        info!(home_pid, pid = runner.job.pid(), "deputy back; its job ran on here");
        if control::send(&mut stream, &Response::Started { home_pid, node: self.me().0 }).is_err() {
            return;
        }
        Self::deputy_session(stream, &home);
    }

    pub(super) fn best_node(&self, exclude: Option<u32>, mem_bytes: u64) -> u32 {
        let socket = std::env::var_os(query::SOCKET_ENV)
            .map_or_else(|| self.settings.config.infod.socket.clone(), PathBuf::from);
        match query::ask(&socket, &query::Request::Best { mem_bytes }) {
            Ok(query::Response::Best { node }) if Some(node) != exclude => node,
            _ => self.me().0,
        }
    }

    /// The live job homed here with home PID `home_pid`, its record and its `HomeJob`, if `uid` (root, or
    /// the job's owner) may `verb` it.
    pub(super) fn owned_job(&self, uid: u32, home_pid: i32, verb: &str) -> Result<(JobRecord, Arc<HomeJob>), MoveError> {
        let record = self
            .records
            .get(home_pid)
            .filter(|r| !r.state.has_ended())
            .ok_or_else(|| MoveError::new(Refusal::NoSuchJob, format!(
                "no job of this node has home PID {home_pid} (give the PID of the job's mosrun, on the node where mosrun runs)"
            )))?;
        if uid != 0 && uid != record.uid {
            return Err(MoveError::new(
                Refusal::NotYours,
                format!("it is not your job (it belongs to {}); only its owner or root may {verb} it", user_name(record.uid)),
            ));
        }
        let home = self
            .homes
            .lock()
            .expect("homes lock")
            .get(&home_pid)
            .cloned()
            .ok_or_else(|| MoveError::new(Refusal::NoSuchJob, format!("job {home_pid} has ended or is ending")))?;
        Ok((record, home))
    }

    pub(super) fn migrate(self: &Arc<Self>, peer: Peer, home_pid: i32, target: Target) -> Result<Response, MoveError> {
        let (record, home) = self.owned_job(peer.uid, home_pid, "move")?;
        if home.stay_home {
            return Err(MoveError::new(Refusal::StaysHome, "it was started to stay on its home node (mosrun -h)"));
        }
        let from = record.node.0;
        // Where to; for `balance`, the node the job runs on decides (it knows what the job does there).
        let to = match target {
            Target::Home => self.me().0,
            Target::Node(n) => n,
            Target::Balance => protocol::BALANCE,
        };
        if to != protocol::BALANCE && self.settings.map.get(NodeId(to)).is_none() {
            return Err(MoveError::new(
                Refusal::NoSuchNode,
                format!("node {to} is not in the cluster map; `mosctl status` lists the nodes"),
            ));
        }
        if to == from {
            return Err(MoveError::new(Refusal::Failed, format!("it already runs on node {to}")));
        }
        let stayed = |e: MoveError| -> Result<Response, MoveError> {
            if e.why == Refusal::Balanced { Ok(Response::Stayed { home_pid, node: from, why: e.message }) } else { Err(e) }
        };
        let started = Instant::now();
        *home.move_result.lock().expect("move result") = None;
        let location = match &*home.location.lock().expect("location") {
            Location::Here(runner) => Ok(Arc::clone(runner)),
            Location::Away { link, .. } => Err(Arc::clone(link)),
            Location::Moving => return Err(MoveError::new(Refusal::Busy, "it is moving already; try again once that move is done")),
        };
        match location {
            Ok(runner) => {
                let moved = if to == protocol::BALANCE { self.rebalance(&runner) } else { self.move_runner(&runner, to) };
                if let Err(e) = moved {
                    return stayed(e);
                }
            }
            Err(link) => {
                link.lock()
                    .expect("link")
                    .send_json(protocol::MIGRATE, &to)
                    .map_err(|e| MoveError::new(Refusal::TargetDown, format!("node {from}, where it runs, is unreachable ({e}); `mosctl status` shows whether it is up")))?;
            }
        }
        // Wait until the job runs at its destination (or the move failed and it runs on where it was).
        let mut slot = home.move_result.lock().expect("move result");
        let deadline = Instant::now() + Duration::from_mins(10);
        while slot.is_none() && Instant::now() < deadline {
            slot = home.move_changed.wait_timeout(slot, Duration::from_millis(200)).expect("move result").0;
        }
        let result = slot.take().unwrap_or_else(|| Err(MoveError::new(Refusal::Failed, "the move did not finish within 10 minutes")));
        drop(slot);
        let to = match result {
            Ok(to) => to,
            Err(e) => return stayed(e),
        };
        let frozen = *home.frozen.lock().expect("frozen");
        Ok(Response::Moved { home_pid, from, to, seconds: started.elapsed().as_secs_f64(), frozen })
    }
}
