//! How much of migd one local user can hold through the control socket.
//!
//! The control socket is open to every local user (mode 0666) and migd serves each connection on a thread
//! of its own, blocked in reads. Unbounded, a user who opens connections and sends nothing takes a thread
//! and a descriptor each, until migd can serve nobody, and with it nobody's jobs. The [`Gate`] bounds what
//! one user (uid, from `SO_PEERCRED`) can hold:
//!
//! - A served connection must deliver its first request within [`FIRST_REQUEST`]; one that does not has its
//!   reading ended ([`Connection::stop_reading`]) and is told why ([`LimitError::NoRequest`]).
//! - At most `per_user` connections of one user are *served* at once outside job sessions: waiting for
//!   their first request, or having a short request (`migrate`, `guests`) answered. A `Run` or `Reattach`
//!   leaves the count as soon as it is read ([`Ticket`] dropped): the connection is then a job's deputy
//!   session, which lasts as long as the job, and a user may run as many jobs as their own process limits
//!   allow (each session belongs to one of the user's live processes, its deputy).
//! - Connections beyond that wait, holding a descriptor but no thread, until a place frees, so that a
//!   burst of `mosrun`s from one script is served in turn; one still waiting after [`FIRST_REQUEST`] is
//!   refused ([`LimitError::Waited`]), and while `waiting_per_user` wait, new ones are refused at once
//!   ([`LimitError::TooMany`]).
//! - Root is not counted: the daemons (infod asks for the guest count) and an administrator's tools must
//!   get through whatever the users do.
//!
//! So outside their jobs one user holds at most `per_user` of migd's threads and `per_user +
//! waiting_per_user` of its descriptors, and only for seconds when idle. The gate only counts and times:
//! what a connection is, how it is refused and how it is served belong to [`Connection`] and to the caller,
//! so the logic is tested with fake connections and a fake clock.

use std::collections::{HashMap, VecDeque};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rmosix_common::control::{self, Refusal, Response};
use tracing::warn;

/// Time a served connection has to deliver its first request: a client sends it right after connecting,
/// so this is only ever reached by a client that is stuck or means harm.
pub const FIRST_REQUEST: Duration = Duration::from_secs(5);
/// Connections of one user that may wait for a place, per place.
const WAITING_PER_PLACE: usize = 8;
/// Root's uid, never counted.
const ROOT: u32 = 0;

/// How much one user may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections of one user served at once outside job sessions.
    pub per_user: usize,
    /// Connections of one user waiting for a place; more are refused at once.
    pub waiting_per_user: usize,
    /// Time to deliver the first request once served, and the longest wait for a place.
    pub first_request: Duration,
}

impl Limits {
    /// The limits for `migd.requests_per_user` = `per_user`.
    pub fn new(per_user: u32) -> Self {
        let per_user = usize::try_from(per_user).unwrap_or(usize::MAX).max(1);
        Self { per_user, waiting_per_user: per_user.saturating_mul(WAITING_PER_PLACE), first_request: FIRST_REQUEST }
    }
}

/// Why the gate turned a connection away: the words its client reads.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    #[error(
        "uid {uid} already has {served} control connections to migd outside running jobs and {waiting} more \
         waiting (at most {per_user} at once, migd.requests_per_user); migd is busy with them: try again \
         when they are done"
    )]
    TooMany { uid: u32, served: usize, waiting: usize, per_user: usize },
    #[error(
        "uid {uid} had {per_user} control connections to migd outside running jobs for all of the {secs} s this \
         one waited (at most {per_user} at once, migd.requests_per_user); migd is busy with them: try again \
         when they are done"
    )]
    Waited { uid: u32, per_user: usize, secs: u64 },
    #[error("no request from uid {uid} within {secs} s of being served; migd closed the connection")]
    NoRequest { uid: u32, secs: u64 },
}

impl LimitError {
    /// The kind of refusal the client sees.
    pub fn refusal(&self) -> Refusal {
        match self {
            LimitError::TooMany { .. } | LimitError::Waited { .. } => Refusal::Busy,
            LimitError::NoRequest { .. } => Refusal::BadRequest,
        }
    }
}

/// A control connection, as far as the gate is concerned.
pub trait Connection: Sized + Send + 'static {
    /// A second handle on the same connection, which the gate keeps to end a wait for the first request.
    fn try_clone(&self) -> std::io::Result<Self>;
    /// Ends every read on the connection, now and later, as if the client had stopped sending.
    fn stop_reading(&self);
    /// Tells the client it is refused and why, without waiting for it to read; then the connection closes.
    fn refuse(self, why: &LimitError);
}

impl Connection for UnixStream {
    fn try_clone(&self) -> std::io::Result<Self> {
        UnixStream::try_clone(self)
    }

    fn stop_reading(&self) {
        let _ = self.shutdown(std::net::Shutdown::Read);
    }

    fn refuse(mut self, why: &LimitError) {
        // A client that reads nothing must not hold up the one who refuses it: the answer is small and goes
        // into the socket's buffer, or is lost.
        let _ = self.set_nonblocking(true);
        let _ = control::send(&mut self, &Response::Refused { why: why.refusal(), message: why.to_string() });
    }
}

/// Starts serving a connection: called with the connection and its ticket, which the server holds while
/// the connection counts against its user.
type Start<C> = dyn Fn(C, Ticket<C>) + Send + Sync;
type Clock = dyn Fn() -> Instant + Send + Sync;

/// Admits control connections by user, within [`Limits`]. Cheap to clone: clones share the counts.
pub struct Gate<C: Connection> {
    shared: Arc<Shared<C>>,
}

impl<C: Connection> Clone for Gate<C> {
    fn clone(&self) -> Self {
        Self { shared: Arc::clone(&self.shared) }
    }
}

impl<C: Connection> std::fmt::Debug for Gate<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate").field("limits", &self.shared.limits).finish_non_exhaustive()
    }
}

struct Shared<C: Connection> {
    limits: Limits,
    state: Mutex<State<C>>,
    /// Signalled when a new deadline appears, so the watcher never sleeps past it.
    changed: Condvar,
    start: Box<Start<C>>,
    clock: Box<Clock>,
}

struct State<C> {
    users: HashMap<u32, User<C>>,
    /// Names the next served connection.
    next_id: u64,
    /// Counts new deadlines, so the watcher knows whether one came while it was not looking.
    generation: u64,
}

struct User<C> {
    served: HashMap<u64, Served<C>>,
    /// In arrival order, so the first to time out is in front.
    waiting: VecDeque<Waiting<C>>,
}

impl<C> Default for User<C> {
    fn default() -> Self {
        Self { served: HashMap::new(), waiting: VecDeque::new() }
    }
}

struct Served<C> {
    /// Until its first request is read: when it must have come, and a handle to stop the reading then.
    watch: Option<(Instant, C)>,
    /// The deadline passed before the request came.
    expired: bool,
}

struct Waiting<C> {
    since: Instant,
    conn: C,
}

/// A served connection's place in its user's count; dropping it frees the place for the next waiting
/// connection of that user.
pub struct Ticket<C: Connection> {
    shared: Arc<Shared<C>>,
    uid: u32,
    id: u64,
}

impl<C: Connection> std::fmt::Debug for Ticket<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ticket").field("uid", &self.uid).field("id", &self.id).finish_non_exhaustive()
    }
}

/// What to do with connections once the lock is released: nothing of theirs blocks while it is held.
type Refused<C> = Vec<(C, LimitError)>;

impl<C: Connection> Gate<C> {
    /// A gate that calls `start` for every connection it serves (on the caller's thread: `start` should
    /// hand it to a thread of its own).
    pub fn new(limits: Limits, start: impl Fn(C, Ticket<C>) + Send + Sync + 'static) -> Self {
        Self::with_clock(limits, Instant::now, start)
    }

    /// [`Gate::new`] with another clock (tests).
    pub fn with_clock(
        limits: Limits,
        clock: impl Fn() -> Instant + Send + Sync + 'static,
        start: impl Fn(C, Ticket<C>) + Send + Sync + 'static,
    ) -> Self {
        let state = State { users: HashMap::new(), next_id: 0, generation: 0 };
        Self {
            shared: Arc::new(Shared {
                limits,
                state: Mutex::new(state),
                changed: Condvar::new(),
                start: Box::new(start),
                clock: Box::new(clock),
            }),
        }
    }

    /// A connection of `uid` arrives: it is served now, waits for a place, or is refused.
    pub fn arrive(&self, uid: u32, conn: C) {
        let shared = &self.shared;
        let limits = shared.limits;
        let now = (shared.clock)();
        let mut state = shared.lock();
        let user = state.users.entry(uid).or_default();
        if uid == ROOT || user.served.len() < limits.per_user {
            let ticket = shared.serve(&mut state, uid, conn, now);
            drop(state);
            if let Some((conn, ticket)) = ticket {
                (shared.start)(conn, ticket);
            }
        } else if user.waiting.len() < limits.waiting_per_user {
            user.waiting.push_back(Waiting { since: now, conn });
            state.generation += 1;
            shared.changed.notify_all();
        } else {
            let why = LimitError::TooMany {
                uid,
                served: user.served.len(),
                waiting: user.waiting.len(),
                per_user: limits.per_user,
            };
            drop(state);
            conn.refuse(&why);
        }
    }

    /// Ends what has run out of time: stops reading served connections whose first request has not come,
    /// and refuses connections that waited too long. Returns the next deadline, if any.
    pub fn expire(&self) -> Option<Instant> {
        self.expire_counting().0
    }

    /// [`Gate::expire`], and the generation of deadlines it saw.
    fn expire_counting(&self) -> (Option<Instant>, u64) {
        let shared = &self.shared;
        let limits = shared.limits;
        let now = (shared.clock)();
        let mut stop = Vec::new();
        let mut refused: Refused<C> = Vec::new();
        let mut next: Option<Instant> = None;
        let mut state = shared.lock();
        for (&uid, user) in &mut state.users {
            for served in user.served.values_mut() {
                match served.watch.take() {
                    Some((deadline, conn)) if deadline <= now => {
                        served.expired = true;
                        stop.push(conn);
                    }
                    Some((deadline, conn)) => {
                        next = Some(next.map_or(deadline, |n| n.min(deadline)));
                        served.watch = Some((deadline, conn));
                    }
                    None => {}
                }
            }
            while let Some(w) = user.waiting.front() {
                let deadline = w.since + limits.first_request;
                if deadline > now {
                    next = Some(next.map_or(deadline, |n| n.min(deadline)));
                    break;
                }
                let w = user.waiting.pop_front().expect("front exists");
                let secs = limits.first_request.as_secs();
                refused.push((w.conn, LimitError::Waited { uid, per_user: limits.per_user, secs }));
            }
        }
        state.users.retain(|_, u| !u.served.is_empty() || !u.waiting.is_empty());
        let generation = state.generation;
        drop(state);
        for conn in stop {
            conn.stop_reading();
        }
        for (conn, why) in refused {
            conn.refuse(&why);
        }
        (next, generation)
    }

    /// Runs [`Gate::expire`] whenever a deadline comes, on a thread of its own, for as long as the process.
    pub fn watch(&self) -> std::io::Result<JoinHandle<()>> {
        let gate = self.clone();
        std::thread::Builder::new().name("control-gate".into()).spawn(move || {
            loop {
                let (next, seen) = gate.expire_counting();
                let shared = &gate.shared;
                let mut state = shared.lock();
                while state.generation == seen {
                    let Some(next) = next else {
                        state = shared.changed.wait(state).expect("gate lock");
                        continue;
                    };
                    let left = next.saturating_duration_since((shared.clock)());
                    if left.is_zero() {
                        break;
                    }
                    state = shared.changed.wait_timeout(state, left).expect("gate lock").0;
                }
            }
        })
    }

    /// How many connections of `uid` are served and how many wait.
    pub fn count(&self, uid: u32) -> (usize, usize) {
        self.shared.lock().users.get(&uid).map_or((0, 0), |u| (u.served.len(), u.waiting.len()))
    }
}

impl<C: Connection> Shared<C> {
    fn lock(&self) -> MutexGuard<'_, State<C>> {
        self.state.lock().expect("gate lock")
    }

    /// Counts `conn` as served for `uid`, with its deadline; `None` if it cannot be watched (it is closed).
    fn serve(self: &Arc<Self>, state: &mut State<C>, uid: u32, conn: C, now: Instant) -> Option<(C, Ticket<C>)> {
        let watch = match conn.try_clone() {
            Ok(watch) => watch,
            Err(e) => {
                // Out of descriptors, most likely: closing this one is the one thing that helps.
                warn!(uid, error = %e, "cannot watch a control connection; closing it");
                return None;
            }
        };
        let id = state.next_id;
        state.next_id += 1;
        let deadline = now + self.limits.first_request;
        let user = state.users.entry(uid).or_default();
        user.served.insert(id, Served { watch: Some((deadline, watch)), expired: false });
        state.generation += 1;
        self.changed.notify_all();
        Some((conn, Ticket { shared: Arc::clone(self), uid, id }))
    }
}

impl<C: Connection> Ticket<C> {
    /// The user this connection counts for.
    pub fn uid(&self) -> u32 {
        self.uid
    }

    /// The first request has been read: from now on the connection is not timed (its answer, a migration
    /// for one, may take minutes). It still counts until the ticket is dropped.
    pub fn request_read(&self) {
        let mut state = self.shared.lock();
        if let Some(served) = state.users.get_mut(&self.uid).and_then(|u| u.served.get_mut(&self.id)) {
            served.watch = None;
        }
    }

    /// Why reading stopped, if the deadline for the first request stopped it: what to tell the client.
    pub fn expired(&self) -> Option<LimitError> {
        let state = self.shared.lock();
        let served = state.users.get(&self.uid)?.served.get(&self.id)?;
        served.expired.then_some(LimitError::NoRequest { uid: self.uid, secs: self.shared.limits.first_request.as_secs() })
    }
}

impl<C: Connection> Drop for Ticket<C> {
    fn drop(&mut self) {
        let shared = &self.shared;
        let now = (shared.clock)();
        let mut state = shared.lock();
        let Some(user) = state.users.get_mut(&self.uid) else { return };
        user.served.remove(&self.id);
        // The place goes to the longest waiting connection whose time has not run out; those whose time
        // has are refused on the way.
        let mut refused: Refused<C> = Vec::new();
        let mut next = None;
        while let Some(w) = user.waiting.pop_front() {
            if w.since + shared.limits.first_request > now {
                next = Some(w);
                break;
            }
            let (per_user, secs) = (shared.limits.per_user, shared.limits.first_request.as_secs());
            refused.push((w.conn, LimitError::Waited { uid: self.uid, per_user, secs }));
        }
        let started = next.and_then(|w| shared.serve(&mut state, self.uid, w.conn, now));
        if state.users.get(&self.uid).is_some_and(|u| u.served.is_empty() && u.waiting.is_empty()) {
            state.users.remove(&self.uid);
        }
        drop(state);
        for (conn, why) in refused {
            conn.refuse(&why);
        }
        if let Some((conn, ticket)) = started {
            (shared.start)(conn, ticket);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What happened to the fake connections, by number.
    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Event {
        Stopped(u32),
        Refused(u32, LimitError),
    }

    #[derive(Debug, Clone)]
    struct Fake {
        n: u32,
        events: Arc<Mutex<Vec<Event>>>,
    }

    impl Connection for Fake {
        fn try_clone(&self) -> std::io::Result<Self> {
            Ok(self.clone())
        }
        fn stop_reading(&self) {
            self.events.lock().unwrap().push(Event::Stopped(self.n));
        }
        fn refuse(self, why: &LimitError) {
            self.events.lock().unwrap().push(Event::Refused(self.n, why.clone()));
        }
    }

    /// The connections the gate started, by number, with their tickets.
    type Started = Arc<Mutex<Vec<(u32, Ticket<Fake>)>>>;

    /// A gate on a fake clock, with the connections it started and what happened to the others.
    struct Bench {
        gate: Gate<Fake>,
        now: Arc<Mutex<Instant>>,
        started: Started,
        events: Arc<Mutex<Vec<Event>>>,
        base: Instant,
    }

    const USER: u32 = 1000;

    impl Bench {
        fn new(per_user: usize, waiting_per_user: usize) -> Self {
            let base = Instant::now();
            let now = Arc::new(Mutex::new(base));
            let started = Arc::new(Mutex::new(Vec::new()));
            let limits = Limits { per_user, waiting_per_user, first_request: Duration::from_secs(5) };
            let clock = Arc::clone(&now);
            let into = Arc::clone(&started);
            let gate = Gate::with_clock(
                limits,
                move || *clock.lock().unwrap(),
                move |conn: Fake, ticket| into.lock().unwrap().push((conn.n, ticket)),
            );
            Self { gate, now, started, events: Arc::default(), base }
        }

        fn arrive(&self, uid: u32, n: u32) {
            self.gate.arrive(uid, Fake { n, events: Arc::clone(&self.events) });
        }

        fn at(&self, secs: u64) {
            *self.now.lock().unwrap() = self.base + Duration::from_secs(secs);
        }

        fn started(&self) -> Vec<u32> {
            self.started.lock().unwrap().iter().map(|(n, _)| *n).collect()
        }

        /// Ends connection `n` as its server would: drops its ticket.
        fn finish(&self, n: u32) {
            let ticket = {
                let mut started = self.started.lock().unwrap();
                let at = started.iter().position(|(m, _)| *m == n).unwrap();
                started.remove(at).1
            };
            drop(ticket);
        }

        fn ticket<T>(&self, n: u32, f: impl FnOnce(&Ticket<Fake>) -> T) -> T {
            let started = self.started.lock().unwrap();
            f(&started.iter().find(|(m, _)| *m == n).unwrap().1)
        }

        fn events(&self) -> Vec<Event> {
            std::mem::take(&mut *self.events.lock().unwrap())
        }
    }

    #[test]
    fn a_user_over_the_limit_waits_then_is_refused_in_words_and_others_are_served() {
        let b = Bench::new(2, 2);
        for n in 0..5 {
            b.arrive(USER, n);
        }
        assert_eq!(b.started(), [0, 1]);
        assert_eq!(b.gate.count(USER), (2, 2));
        let events = b.events();
        assert_eq!(events, [Event::Refused(4, LimitError::TooMany { uid: USER, served: 2, waiting: 2, per_user: 2 })]);
        let Event::Refused(_, why) = &events[0] else { unreachable!() };
        assert_eq!(why.refusal(), Refusal::Busy);
        assert!(why.to_string().starts_with("uid 1000 already has 2 control connections"), "{why}");
        // Another user, and root however many, are served at once.
        b.arrive(1001, 10);
        for n in 20..30 {
            b.arrive(ROOT, n);
        }
        assert_eq!(b.started(), [0, 1, 10, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29]);
        assert_eq!(b.gate.count(ROOT), (10, 0));
        assert!(b.events().is_empty());
    }

    #[test]
    fn a_freed_place_goes_to_the_longest_waiting_connection() {
        let b = Bench::new(1, 4);
        for n in 0..3 {
            b.arrive(USER, n);
        }
        assert_eq!(b.started(), [0]);
        // A job session leaves the count once its request is read.
        b.ticket(0, Ticket::request_read);
        b.finish(0);
        assert_eq!(b.started(), [1]);
        b.finish(1);
        assert_eq!(b.started(), [2]);
        b.finish(2);
        assert_eq!(b.gate.count(USER), (0, 0));
        assert!(b.events().is_empty());
    }

    #[test]
    fn a_connection_that_does_not_ask_in_time_stops_being_read_and_is_told_why() {
        let b = Bench::new(3, 3);
        b.arrive(USER, 0);
        b.at(2);
        b.arrive(USER, 1);
        b.arrive(USER, 2);
        // Connection 2 has asked: it is not timed any more, though its answer may take long.
        b.ticket(2, Ticket::request_read);
        assert_eq!(b.gate.expire(), Some(b.base + Duration::from_secs(5)));
        b.at(5);
        assert_eq!(b.gate.expire(), Some(b.base + Duration::from_secs(7)));
        assert_eq!(b.events(), [Event::Stopped(0)]);
        let why = b.ticket(0, Ticket::expired).expect("expired");
        assert_eq!(why, LimitError::NoRequest { uid: USER, secs: 5 });
        assert_eq!(why.refusal(), Refusal::BadRequest);
        assert_eq!(b.ticket(1, Ticket::expired), None);
        b.at(60);
        assert_eq!(b.gate.expire(), None);
        assert_eq!(b.events(), [Event::Stopped(1)]);
        assert_eq!(b.ticket(2, Ticket::expired), None, "a request being answered is never cut off");
        // Stopped connections count until their server lets them go.
        assert_eq!(b.gate.count(USER), (3, 0));
    }

    #[test]
    fn a_waiting_connection_is_refused_when_its_time_runs_out_and_a_late_place_skips_it() {
        let b = Bench::new(1, 4);
        b.arrive(USER, 0);
        b.at(1);
        b.arrive(USER, 1);
        b.at(3);
        b.arrive(USER, 2);
        b.ticket(0, Ticket::request_read);
        b.at(6);
        // Connection 1's wait is over; a place freed now goes to connection 2, which still has time, with a
        // whole first-request time of its own.
        b.finish(0);
        assert_eq!(b.started(), [2]);
        assert_eq!(b.gate.expire(), Some(b.base + Duration::from_secs(11)));
        assert_eq!(b.events(), [Event::Refused(1, LimitError::Waited { uid: USER, per_user: 1, secs: 5 })]);
        b.at(11);
        b.gate.expire();
        assert_eq!(b.events(), [Event::Stopped(2)]);
    }

    #[test]
    fn limits_follow_the_configuration() {
        let l = Limits::new(32);
        assert_eq!((l.per_user, l.waiting_per_user, l.first_request), (32, 256, FIRST_REQUEST));
        assert_eq!(Limits::new(0).per_user, 1);
    }

    /// Real sockets and the real clock: the watcher ends an idle connection, whose server then refuses it
    /// in words; a reader blocked on a stopped connection wakes up; a refused client reads why.
    #[test]
    fn idle_unix_connections_are_ended_by_the_watcher_and_told_why() {
        let limits = Limits { per_user: 1, waiting_per_user: 0, first_request: Duration::from_millis(50) };
        let gate = Gate::new(limits, |mut server: UnixStream, ticket: Ticket<UnixStream>| {
            std::thread::spawn(move || {
                // What migd's server does: read the first request; if the deadline stopped the reading, say so.
                let got = control::recv::<control::Request>(&mut server);
                assert!(matches!(got, Err(control::ControlError::Closed)), "{got:?}");
                let why = ticket.expired().expect("the deadline stopped the reading");
                server.refuse(&why);
            });
        });
        gate.watch().unwrap();
        let (mut idle, server) = UnixStream::pair().unwrap();
        gate.arrive(USER, server);
        // One place: the next connection of the same user is refused at once.
        let (mut second, server) = UnixStream::pair().unwrap();
        gate.arrive(USER, server);
        for (client, why) in [(&mut second, Refusal::Busy), (&mut idle, Refusal::BadRequest)] {
            match control::recv::<Response>(client).unwrap() {
                Response::Refused { why: got, message } => {
                    assert_eq!(got, why, "{message}");
                    assert!(message.contains("uid 1000"), "{message}");
                }
                other => panic!("not refused: {other:?}"),
            }
        }
        assert!(matches!(control::recv::<Response>(&mut idle), Err(control::ControlError::Closed)));
    }
}
