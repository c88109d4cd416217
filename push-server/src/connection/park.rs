//! Parked connections: idle connections without a task of their own.
//!
//! A task per idle connection costs its tokio task (512 bytes: tokio aligns a task to 128)
//! and tokio's registration of its socket (256), half of what an idle connection cost in
//! all (docs/BENCHMARKS.md, "Where an idle connection's bytes go"). So when the driver has
//! written everything and its frame reader holds nothing, it parks the connection and ends:
//! the socket, the handle and the registration guard go to a reactor, a thread per runtime
//! worker, that holds every connection parked there in one map and their sockets in one
//! epoll set (mio), and waits in `epoll_wait` for them and for its inbox. The reactor:
//! - on a wake of the handle (a heartbeat, a `reconnect`, a message, a close request),
//!   writes what is queued with the driver's own `flush`;
//! - on a readable socket, reads with the driver's own `on_readable` (a pong, a ping, the
//!   client's FIN);
//! - hands the connection to a new driver task when it needs one: a message was written
//!   (more may follow: the driver keeps it until it has been quiet for a while, see
//!   `QUIET_BEFORE_PARK`), a write that blocks, a frame that arrived in parts, reads that
//!   did not empty the socket, or the end of the connection (its close runs in the driver,
//!   as for any connection).
//!
//! A thread, not a task: tokio offers no safe way to wait on another epoll instance from a
//! task (`AsyncFd` over a raw descriptor needs `unsafe`, which this workspace forbids),
//! and a thread that blocks in `epoll_wait` costs nothing while nothing happens. It enters
//! the runtime, so the drivers it starts are ordinary tasks.
//!
//! A parked connection costs its entry in the map and one small waker (~100 bytes) instead
//! of the task and the registration (768). Heartbeats and their pongs are handled in place,
//! with no task started; a connection that gets messages often stays a task, so that its
//! messages cost no hand-over between threads.
//!
//! No wake is lost on the way in: the driver registers the reactor's waker on the handle
//! and checks for a wake since its last flush before it parks (`prepare`); the reactor
//! writes the queue once more when the connection arrives, and reads a socket that became
//! readable meanwhile because adding it to the epoll set reports readiness it already has.

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll as TaskPoll, Wake, Waker};

use mio::unix::SourceFd;
use mio::{Events, Interest, Token};
use tokio::net::TcpStream;

use super::register::Registered;
use super::{drive, flush, on_readable, End, Flush};
use crate::hub::ConnHandle;
use crate::lifecycle::DisconnectReason;
use crate::metrics as m;
use crate::protocol::ws::WsReader;

/// Epoll events taken per `epoll_wait`.
const EVENTS: usize = 1024;

/// The reactor's own token in its epoll set: its inbox's waker (connection IDs start at 1).
const INBOX: Token = Token(usize::MAX);

/// Where drivers park their connections: each reactor's inbox (`None`: parking is off,
/// and every connection keeps its task). Cheap to clone.
#[derive(Clone, Debug, Default)]
pub(crate) struct Parking(Option<Arc<Reactors>>);

/// The inboxes of a node's reactors. Dropped with the last [`Parking`]: each reactor is
/// then told to end once its parked connections are gone.
#[derive(Debug)]
pub(crate) struct Reactors(Box<[Arc<Inbox>]>);

impl Drop for Reactors {
    fn drop(&mut self) {
        for inbox in self.0.iter() {
            let _ = inbox.waker.wake();
        }
    }
}

/// What a reactor is told, and the eventfd that wakes it from `epoll_wait`.
#[derive(Debug)]
struct Inbox {
    cmds: Mutex<Vec<Cmd>>,
    waker: mio::Waker,
}

impl Inbox {
    fn send(&self, cmd: Cmd) {
        let was_empty = {
            let mut cmds = self.cmds.lock().unwrap_or_else(|e| e.into_inner());
            cmds.push(cmd);
            cmds.len() == 1
        };
        // One wake-up per batch: the reactor takes the whole inbox when it wakes.
        if was_empty {
            let _ = self.waker.wake();
        }
    }
}

/// A connection handed to a reactor.
pub(super) struct Parked {
    stream: std::net::TcpStream,
    guard: Registered,
    wake: Arc<ParkWake>,
}

impl Parked {
    pub(super) fn new(stream: std::net::TcpStream, guard: Registered, wake: Arc<ParkWake>) -> Self {
        Self {
            stream,
            guard,
            wake,
        }
    }
}

enum Cmd {
    /// A driver parks this connection.
    Park(Parked),
    /// The handle of this connection was woken (something to write, or to close).
    Wake(u64),
}

impl std::fmt::Debug for Cmd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Park(p) => write!(f, "Park({})", p.guard.handle.id),
            Self::Wake(id) => write!(f, "Wake({id})"),
        }
    }
}

/// The waker a parked connection's handle holds: tells its reactor which connection woke.
pub(super) struct ParkWake {
    id: u64,
    inbox: Arc<Inbox>,
}

impl Wake for ParkWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.inbox.send(Cmd::Wake(self.id));
    }
}

impl Parking {
    /// Starts one reactor per runtime worker (`on`), or none: then no connection parks.
    /// Must be called within the runtime. If a reactor cannot start (no epoll instance, no
    /// thread), parking is off, with a warning.
    pub(crate) fn start(on: bool) -> Self {
        if !on {
            return Self(None);
        }
        match Self::try_start() {
            Ok(parking) => parking,
            Err(e) => {
                tracing::warn!(error = %e, "idle connections will not be parked");
                Self(None)
            }
        }
    }

    fn try_start() -> std::io::Result<Self> {
        let runtime = tokio::runtime::Handle::current();
        let workers = runtime.metrics().num_workers().max(1);
        let mut inboxes = Vec::with_capacity(workers);
        let mut polls = Vec::with_capacity(workers);
        for _ in 0..workers {
            let poll = mio::Poll::new()?;
            let waker = mio::Waker::new(poll.registry(), INBOX)?;
            inboxes.push(Arc::new(Inbox {
                cmds: Mutex::new(Vec::new()),
                waker,
            }));
            polls.push(poll);
        }
        let reactors = Arc::new(Reactors(inboxes.into()));
        // The spans and logs of the node's threads go to the starting thread's subscriber:
        // the global one in the binary; a test's per-service one where several nodes and
        // services share a process (data-tools/traces/tests/push_path.rs).
        let dispatch = tracing::dispatcher::get_default(|d| d.clone());
        for (i, poll) in polls.into_iter().enumerate() {
            let reactor = Reactor {
                poll,
                inbox: reactors.0[i].clone(),
                parked: HashMap::new(),
                parking: Arc::downgrade(&reactors),
            };
            let runtime = runtime.clone();
            let dispatch = dispatch.clone();
            std::thread::Builder::new()
                .name(format!("push-parked-{i}"))
                .spawn(move || {
                    // Drivers it starts are tasks of the node's runtime, and the node's
                    // clock reads the runtime's time.
                    let _entered = runtime.enter();
                    let _traced = tracing::dispatcher::set_default(&dispatch);
                    reactor.run();
                })?;
        }
        Ok(Self(Some(reactors)))
    }

    /// Whether idle connections are parked.
    pub(super) fn is_on(&self) -> bool {
        self.0.is_some()
    }

    fn inbox(&self, id: u64) -> Option<&Arc<Inbox>> {
        let inboxes = &self.0.as_deref()?.0;
        inboxes.get((id % inboxes.len() as u64) as usize)
    }

    /// Registers the reactor's waker on `handle` and checks it was not woken since the
    /// driver last looked: `Some` (park it, with this waker), or `None` (woken: flush again).
    pub(super) fn prepare(&self, handle: &ConnHandle) -> Option<Arc<ParkWake>> {
        let inbox = self.inbox(handle.id)?.clone();
        let wake = Arc::new(ParkWake {
            id: handle.id,
            inbox,
        });
        let waker = Waker::from(wake.clone());
        match handle.poll_woken(&mut Context::from_waker(&waker)) {
            TaskPoll::Pending => Some(wake),
            TaskPoll::Ready(()) => None,
        }
    }

    /// Hands a connection to its reactor.
    pub(super) fn park(&self, parked: Parked) {
        match self.inbox(parked.guard.handle.id) {
            Some(inbox) => inbox.send(Cmd::Park(parked)),
            None => parked.guard.set_reason(DisconnectReason::Drain),
        }
    }
}

/// One reactor: the connections parked on it and their sockets' epoll set.
struct Reactor {
    poll: mio::Poll,
    inbox: Arc<Inbox>,
    parked: HashMap<u64, Parked>,
    /// For the drivers it starts (weak: the reactor ends once the node dropped it and no
    /// connection is parked here).
    parking: Weak<Reactors>,
}

impl Reactor {
    fn run(mut self) {
        let mut events = Events::with_capacity(EVENTS);
        let mut cmds = Vec::new();
        loop {
            if let Err(e) = self.poll.poll(&mut events, None) {
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                tracing::error!(error = %e, "parked connections' epoll set failed");
                break;
            }
            for event in events.iter() {
                if event.token() != INBOX {
                    self.on_readable(event.token().0 as u64);
                }
            }
            std::mem::swap(
                &mut cmds,
                &mut *self.inbox.cmds.lock().unwrap_or_else(|e| e.into_inner()),
            );
            for cmd in cmds.drain(..) {
                match cmd {
                    Cmd::Park(p) => self.arrive(p),
                    Cmd::Wake(id) => self.on_wake(id),
                }
            }
            if self.parked.is_empty() && self.parking.strong_count() == 0 {
                break;
            }
        }
        // The epoll set failed with connections still parked: they close as the map drops.
        metrics::gauge!(m::CONNECTIONS_PARKED).decrement(self.parked.len() as f64);
        for (_, p) in self.parked.drain() {
            p.guard.shared.parked.fetch_sub(1, Ordering::AcqRel);
            p.guard.set_reason(DisconnectReason::IoError);
        }
    }

    /// A connection a driver parked: into the epoll set and the map, then its queue is
    /// written once more (a wake between the driver's check and now found no entry).
    fn arrive(&mut self, p: Parked) {
        let id = p.guard.handle.id;
        let fd = p.stream.as_raw_fd();
        let registered = self.poll.registry().register(
            &mut SourceFd(&fd),
            Token(id as usize),
            Interest::READABLE,
        );
        if let Err(e) = registered {
            // Out of kernel memory for the epoll set: the connection is closed; its client
            // reconnects.
            tracing::warn!(conn = id, error = %e, "could not park a connection");
            return p.guard.set_reason(DisconnectReason::IoError);
        }
        p.guard.shared.parked.fetch_add(1, Ordering::AcqRel);
        self.parked.insert(id, p);
        metrics::gauge!(m::CONNECTIONS_PARKED).increment(1.0);
        self.on_wake(id);
    }

    /// Writes what is queued for a parked connection, until nothing is and no wake came
    /// meanwhile; a connection that needs its driver gets one.
    fn on_wake(&mut self, id: u64) {
        let Some(p) = self.parked.get(&id) else {
            // Not parked here (any more): its driver sees the wake itself.
            return;
        };
        let handle = &p.guard.handle;
        let waker = Waker::from(p.wake.clone());
        let mut cx = Context::from_waker(&waker);
        let mut wrote_message = false;
        let end = loop {
            match flush(&p.stream, handle, &p.guard.shared, &mut wrote_message) {
                Flush::Idle if wrote_message => break None,
                Flush::Idle => {
                    if handle.poll_woken(&mut cx).is_pending() {
                        return;
                    }
                }
                Flush::Blocked => break None,
                Flush::Close(reason) => break Some(End::server(reason)),
                Flush::Failed => break Some(End::io()),
            }
        };
        // A message was written here: more may follow, and a task writes them cheaper
        // than the hand-over to this thread each would cost.
        self.unpark(id, WsReader::default(), end, wrote_message);
    }

    /// Reads what a parked connection's client sent: control frames and acks are handled
    /// here; a frame in parts, a socket not emptied or the end go to a driver.
    fn on_readable(&mut self, id: u64) {
        let Some(p) = self.parked.get(&id) else {
            return;
        };
        let mut reader = WsReader::default();
        let (end, more) = on_readable(&p.stream, &mut reader, &p.guard.handle, &p.guard.shared);
        if end.is_some() || more || !reader.is_idle() {
            return self.unpark(id, reader, end, false);
        }
        // Replies (a pong, an error) were queued: written now rather than on their wake.
        self.on_wake(id);
    }

    /// Takes a connection out of the set and starts a driver for it.
    fn unpark(&mut self, id: u64, reader: WsReader, end: Option<End>, busy: bool) {
        let Some(p) = self.parked.remove(&id) else {
            return;
        };
        shrink_if_sparse(&mut self.parked);
        metrics::gauge!(m::CONNECTIONS_PARKED).decrement(1.0);
        p.guard.shared.parked.fetch_sub(1, Ordering::AcqRel);
        let fd = p.stream.as_raw_fd();
        let _ = self.poll.registry().deregister(&mut SourceFd(&fd));
        let Parked {
            stream,
            guard,
            wake,
        } = p;
        drop(wake);
        match TcpStream::from_std(stream) {
            Ok(stream) => {
                let parking = Parking(self.parking.upgrade());
                tokio::spawn(drive(stream, guard, reader, end, parking, true, busy));
            }
            Err(e) => {
                tracing::warn!(conn = id, error = %e, "could not resume a parked connection");
                guard.set_reason(DisconnectReason::IoError);
            }
        }
    }
}

/// Gives back a map's room once it is three quarters empty, so that a reactor that held a
/// node's peak (say 17,000 parked connections, ~1 MB of table) does not keep it for the
/// process's life. Shrinks to twice what is left: a map that grows again does not rehash at
/// once, and each shrink follows at least as many removals as the entries it moves.
fn shrink_if_sparse<K: std::hash::Hash + Eq, V>(map: &mut HashMap<K, V>) {
    if map.capacity() > 1024 && map.len() < map.capacity() / 4 {
        map.shrink_to(map.len() * 2);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_map_left_three_quarters_empty_gives_its_room_back() {
        let mut map: HashMap<u64, [u8; 64]> = (0..100_000).map(|k| (k, [0; 64])).collect();
        let peak = map.capacity();
        for k in 0..99_000 {
            map.remove(&k);
            shrink_if_sparse(&mut map);
        }
        assert_eq!(map.len(), 1_000);
        assert!(map.capacity() < peak / 16, "{} of {peak}", map.capacity());
        assert!((0..100_000).all(|k| map.contains_key(&k) == (k >= 99_000)));
        // A map still a quarter full or more keeps its room: no rehash on every removal.
        let mut busy: HashMap<u64, u8> = (0..100_000).map(|k| (k, 0)).collect();
        let peak = busy.capacity();
        for k in 0..60_000 {
            busy.remove(&k);
            shrink_if_sparse(&mut busy);
        }
        // (Removals that leave a tombstone lower `capacity()` without a rehash.)
        assert!(busy.capacity() >= peak / 2, "{} of {peak}", busy.capacity());
    }
}
