//! The jobs running here as the kernel sees them, and every job of the cluster for `mosctl jobs`: the
//! sampler ([`crate::observe`]) runs every second over this node's runners (sooner when one starts); a
//! `Jobs` request asks every node that infod says is up, in parallel, and names those that do not answer
//! in time.

use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use rmosix_common::NodeId;
use rmosix_common::control::{Class, JobView, NodeJobs, Response};
use rmosix_common::query;

use super::Daemon;
use crate::channel::blocking::Channel;
use crate::observe::Watched;
use crate::protocol;

/// How long `mosctl jobs` waits for the other nodes.
const ASK_LIMIT: Duration = Duration::from_secs(2);

impl Daemon {
    /// Samples the jobs running here every second (sooner for new ones), for ever.
    pub(super) fn start_sampling(self: &Arc<Self>) {
        let daemon = Arc::clone(self);
        let spawned = std::thread::Builder::new().name("sample".into()).spawn(move || {
            loop {
                let jobs: Vec<Watched> = daemon
                    .runners
                    .lock()
                    .expect("runners")
                    .values()
                    .map(|r| Watched { root: r.job.pid(), hint: r.facts.hint })
                    .collect();
                daemon.observer.sample(&jobs);
                daemon.observer.wait_for_next();
            }
        });
        if let Err(error) = spawned {
            tracing::warn!(%error, "cannot start the sampler; jobs are not classified");
        }
    }

    /// The jobs running on this node.
    pub(super) fn node_jobs(&self) -> NodeJobs {
        let runners: Vec<_> = self.runners.lock().expect("runners").values().cloned().collect();
        let mut jobs: Vec<JobView> = runners
            .iter()
            .map(|r| {
                let seen = self.observer.seen(r.job.pid());
                let moving = r.in_move.load(std::sync::atomic::Ordering::Relaxed)
                    || r.moving.load(std::sync::atomic::Ordering::Relaxed);
                let state = match &seen {
                    _ if moving => "moving",
                    Some(s) if s.stopped => "stopped",
                    _ => "running",
                };
                #[expect(clippy::cast_possible_truncation, clippy::cast_sign_loss, reason = "non-negative rates")]
                let bps = |v: f64| v.max(0.0).round() as u64;
                JobView {
                    home_node: r.home_node,
                    home_pid: r.home_pid,
                    node: self.me().0,
                    pid: r.job.pid(),
                    uid: r.uid,
                    command: r.command.clone(),
                    state: state.to_owned(),
                    class: seen.as_ref().map_or(Class::Sleeping, |s| s.class),
                    reason: seen.as_ref().and_then(|s| s.reason.clone()),
                    cpu: seen.as_ref().map_or(0.0, |s| (s.fast.rates.cpu * 1000.0).round() / 10.0),
                    rss: seen.as_ref().map_or(0, |s| s.rss),
                    read_bps: seen.as_ref().map_or(0, |s| bps(s.fast.rates.read_bps)),
                    write_bps: seen.as_ref().map_or(0, |s| bps(s.fast.rates.write_bps)),
                    migrations: r.facts.migrations,
                    started: r.facts.started,
                }
            })
            .collect();
        jobs.sort_by_key(|j| (j.home_node, j.home_pid));
        NodeJobs { node: self.me().0, source: self.observer.source(), jobs }
    }

    /// Every job of the cluster: this node's, and those of every other node infod says is up, asked in
    /// parallel for at most [`ASK_LIMIT`].
    pub(super) fn cluster_jobs(self: &Arc<Self>) -> Response {
        let me = self.me().0;
        let others: Vec<u32> = self.live_nodes().into_iter().filter(|&n| n != me).collect();
        let asks: Vec<_> = others
            .into_iter()
            .map(|node| {
                let (tx, rx) = std::sync::mpsc::channel();
                let daemon = Arc::clone(self);
                std::thread::spawn(move || {
                    let _ = tx.send(daemon.ask_jobs(node));
                });
                (node, rx)
            })
            .collect();
        let mut nodes = vec![self.node_jobs()];
        let mut unreachable = Vec::new();
        let deadline = std::time::Instant::now() + ASK_LIMIT;
        for (node, rx) in asks {
            match rx.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now())) {
                Ok(Ok(jobs)) => nodes.push(jobs),
                Ok(Err(why)) => unreachable.push((node, why)),
                Err(_) => unreachable.push((node, format!("no answer within {} s", ASK_LIMIT.as_secs()))),
            }
        }
        nodes.sort_by_key(|n| n.node);
        Response::Jobs { nodes, unreachable }
    }

    /// The nodes infod counts as up (every node of the map when infod does not answer).
    fn live_nodes(&self) -> Vec<u32> {
        let socket = std::env::var_os(query::SOCKET_ENV)
            .map_or_else(|| self.settings.config.infod.socket.clone(), std::path::PathBuf::from);
        match query::ask(&socket, &query::Request::View) {
            Ok(query::Response::View(view)) => view.nodes.iter().filter(|n| n.alive).map(|n| n.id).collect(),
            _ => self.settings.map.nodes().map(|n| n.id.0).collect(),
        }
    }

    /// Asks node `node`'s migd what runs there.
    fn ask_jobs(&self, node: u32) -> Result<NodeJobs, String> {
        let entry = self.settings.map.get(NodeId(node)).ok_or("not in the cluster map")?;
        let addr = SocketAddr::from((entry.addr, self.settings.config.migd.port));
        let stream = TcpStream::connect_timeout(&addr, ASK_LIMIT).map_err(|e| e.to_string())?;
        let _ = stream.set_read_timeout(Some(ASK_LIMIT));
        let _ = stream.set_write_timeout(Some(ASK_LIMIT));
        let mut link = Channel::client_tcp(stream, &self.settings.key, self.me().0).map_err(|e| e.to_string())?;
        link.send(protocol::JOBS_ASK, &[]).map_err(|e| e.to_string())?;
        match link.recv_json::<NodeJobs>() {
            Ok((protocol::JOBS, jobs)) if jobs.node == node => Ok(jobs),
            Ok((protocol::JOBS, jobs)) => Err(format!("answered as node {}", jobs.node)),
            Ok((kind, _)) => Err(format!("answered with message {kind}")),
            Err(e) => Err(e.to_string()),
        }
    }
}
