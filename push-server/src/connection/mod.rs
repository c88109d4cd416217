//! One client connection: the handshake, then the driver loop that moves bytes between the
//! socket and the connection's [`ConnHandle`].
//!
//! Memory is the design constraint here (see docs/BENCHMARKS.md). An idle connection holds
//! no task: once its queue is written, its reader holds no partial frame and it was written
//! no message for a second, the driver parks it (park.rs) and ends. A parked connection is
//! its socket, its handle and its registration guard in a reactor shared by many, which
//! writes heartbeats and reads pongs with the same code as the driver, and hands the
//! connection back to a new driver task when a message arrives, a write blocks, a frame
//! arrives in parts, or the connection ends.
//! While a task drives it:
//! - the handshake runs in a boxed future that is freed before the connection goes idle,
//!   so its request buffer and parsing state are not part of the long-lived task;
//! - reads go into a per-worker-thread scratch buffer; only an incomplete frame is copied
//!   into the connection ([`WsReader`]);
//! - writes go straight from the shared encoded frame to the socket; only a frame the
//!   kernel did not take whole stays queued;
//! - timers are not per connection: the sweeper (sweeper.rs) looks at each connection when
//!   its `next_due` passes and wakes it through the handle.
//!
//! Submodules, lowest first (this file, the driver, is on top):
//!
//! | module | role |
//! |---|---|
//! | `refusal` | a refusal: status, code, message, the metric it counts under; writing it |
//! | `io` | socket helpers: read a request head, write a response, wait for the FIN |
//! | `admission` | pure policy: request head + peer address + `now` → admitted or a refusal |
//! | `ack` | `POST /ack`: acknowledgements of SSE clients |
//! | `resume` | what a resuming client is owed, from the history |
//! | `register` | an admitted client's place, hub and registry entries, RAII guards |
//! | `handshake` | one socket's handshake: source checks, head, then `/ack` or admission |
//! | `park` | idle connections without a task: one reactor (an epoll set) per runtime worker |

mod ack;
mod admission;
mod handshake;
mod io;
mod park;
mod refusal;
mod register;
mod resume;

use std::cell::RefCell;
use std::io::{ErrorKind, IoSlice, Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::{Buf, Bytes};
use socket2::SockRef;
use tokio::net::TcpStream;

use crate::hub::{ConnHandle, Next, Outbound, Transport};
use crate::lifecycle::{DisconnectReason, Policy};
use crate::metrics as m;
use crate::protocol::message::{self, ClientMessage, ServerMessage};
use crate::protocol::ws::{self, close_code, Message, WsReader};
use crate::receipts::Ack;
use crate::state::Shared;
use handshake::handshake;
use io::wait_eof;
use park::Parked;
pub(crate) use park::Parking;
use register::Registered;

/// Size of the per-worker read buffer. One read takes up to this much; a larger message
/// arrives over several reads and is assembled in the connection's reader.
const SCRATCH_LEN: usize = 16 * 1024;

/// Reads per wake-up before yielding, so one busy client cannot starve the others on its
/// worker thread. 8 × 16 KiB covers any message up to the default size limit.
const MAX_READS_PER_WAKE: usize = 8;

/// How long a connection that was written a message stays a task after it, before it may
/// park (`--park-idle`). A connection that gets messages often would otherwise go back and
/// forth between its task and the reactor, and each message would cost a hand-over between
/// threads (3–4 µs of CPU more per message in `bench peers-push`, docs/BENCHMARKS.md). The
/// heartbeat is what looks again: a connection parks at its first heartbeat after this much
/// quiet.
const QUIET_BEFORE_PARK: crate::lifecycle::Millis = 1_000;

/// How long the server waits, after answering a client's close, for the client to close
/// TCP first (so the client, not the server, holds TIME_WAIT).
///
/// Why short: clients that close eagerly (most libraries, the load generator) send their
/// FIN one round trip after the close reply, well within this; clients that follow RFC 6455
/// 7.1.1 (browsers, the Autobahn suite) wait for the server to close TCP, and must not be
/// kept waiting: Autobahn fails a server that has not closed within 0.5 s in its UTF-8
/// cases (this was 2 s). A client further than 200 ms away leaves TIME_WAIT on the server.
const CLOSE_LINGER: Duration = Duration::from_millis(200);

thread_local! {
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; SCRATCH_LEN].into_boxed_slice());
}

/// A nonblocking client socket as the driver uses it: tokio's while a task drives the
/// connection, the standard library's while it is parked, so that writing the queue and
/// reading frames are one code for both.
trait Socket {
    fn try_read(&self, buf: &mut [u8]) -> std::io::Result<usize>;
    fn try_write(&self, buf: &[u8]) -> std::io::Result<usize>;
    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> std::io::Result<usize>;
}

impl Socket for TcpStream {
    fn try_read(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        TcpStream::try_read(self, buf)
    }

    fn try_write(&self, buf: &[u8]) -> std::io::Result<usize> {
        TcpStream::try_write(self, buf)
    }

    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> std::io::Result<usize> {
        TcpStream::try_write_vectored(self, bufs)
    }
}

/// A parked connection's socket: nonblocking (tokio set it so), so these return
/// `WouldBlock` instead of waiting.
impl Socket for std::net::TcpStream {
    fn try_read(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        (&*self).read(buf)
    }

    fn try_write(&self, buf: &[u8]) -> std::io::Result<usize> {
        (&*self).write(buf)
    }

    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> std::io::Result<usize> {
        (&*self).write_vectored(bufs)
    }
}

/// Serves one accepted socket to the end (or until it is parked).
pub(crate) async fn serve(
    stream: TcpStream,
    remote: SocketAddr,
    shared: Arc<Shared>,
    parking: Parking,
) {
    // Boxed, and owning the socket until it hands it back, so that the handshake's state is
    // freed when it ends and this future is the driver's size, not the sum of both.
    let accepted = Box::pin(async move {
        let accepted = handshake(&stream, remote, &shared).await?;
        let guard = accepted.guard;
        let mut reader = WsReader::default();
        let end = if accepted.leftover.is_empty() {
            None
        } else {
            on_bytes(
                &accepted.leftover,
                &mut reader,
                &guard.handle,
                &guard.shared,
            )
        };
        Some((stream, guard, reader, end))
    })
    .await;
    if let Some((stream, guard, reader, end)) = accepted {
        drive(stream, guard, reader, end, parking, false, false).await;
    }
}

/// What the driver loop ended with.
enum Outcome {
    End(End),
    /// Idle: parked with this waker registered on the handle.
    Park(Arc<park::ParkWake>),
}

/// The driver loop: writes what is queued, reads what the client sends, until the
/// connection ends (then closes it) or goes idle (then parks it, if parking is on).
/// `end` is how it already ended, if it did (its replies are still written first).
/// `resumed`: the socket comes from the parked set, just registered with tokio; `busy`: it
/// was unparked because it got a message (more may follow: it stays a task for a while).
///
/// Not an `async fn`: its arguments would be stored twice in the future (as arguments,
/// then as locals); an `async move` block keeps one copy, and this future lives as long as
/// the connection is not parked (504 bytes against 664 in a debug build).
#[allow(clippy::manual_async_fn)]
fn drive(
    stream: TcpStream,
    guard: Registered,
    mut reader: WsReader,
    mut end: Option<End>,
    parking: Parking,
    resumed: bool,
    busy: bool,
) -> impl std::future::Future<Output = ()> + Send {
    async move {
        if resumed {
            // tokio knows a socket it was just given as neither readable nor writable until
            // its next look at epoll, and its `try_write` does not write before then: a
            // close frame written at once would be lost. Wait for that look (or, if the
            // client does not read, for as long as a close waits for its FIN).
            let _ = Box::pin(tokio::time::timeout(CLOSE_LINGER, stream.writable())).await;
        }
        let handle = &guard.handle;
        let shared = &guard.shared;
        // Parked only when idle and no message was written for `QUIET_BEFORE_PARK`.
        let mut busy_until = if busy {
            shared.now() + QUIET_BEFORE_PARK
        } else {
            0
        };
        let outcome = loop {
            if let Some(mut end) = end.take() {
                // Replies to what the client sent before its close or its error (pongs, echoes)
                // go out first, as far as the socket takes them now (RFC 6455 5.5.1: data may
                // precede a close frame). A frame left half-written leaves no room for a close
                // frame after it: then the socket is just closed.
                if let Flush::Blocked | Flush::Failed = flush(&stream, handle, shared, &mut false) {
                    end.close = None;
                    end.server_initiated = false;
                }
                break Outcome::End(end);
            }
            let mut wrote_message = false;
            let blocked = match flush(&stream, handle, shared, &mut wrote_message) {
                Flush::Idle => false,
                Flush::Blocked => true,
                Flush::Close(reason) => break Outcome::End(End::server(reason)),
                Flush::Failed => break Outcome::End(End::io()),
            };
            if wrote_message && parking.is_on() {
                busy_until = shared.now() + QUIET_BEFORE_PARK;
            }
            if !blocked && reader.is_idle() && parking.is_on() && shared.now() >= busy_until {
                match parking.prepare(handle) {
                    Some(wake) => break Outcome::Park(wake),
                    // Woken since the flush: there is more to write.
                    None => continue,
                }
            }
            // One poll_fn instead of `select!` over three futures: the readiness of the socket
            // and the handle's wake are polled in place, so the task carries no future state
            // for them (this halved the task's size).
            let event = std::future::poll_fn(|cx| {
                if handle.poll_woken(cx).is_ready() {
                    return Poll::Ready(Event::Woken);
                }
                match stream.poll_read_ready(cx) {
                    Poll::Ready(Ok(())) => return Poll::Ready(Event::Readable),
                    Poll::Ready(Err(_)) => return Poll::Ready(Event::Failed),
                    Poll::Pending => {}
                }
                if blocked {
                    match stream.poll_write_ready(cx) {
                        Poll::Ready(Ok(())) => return Poll::Ready(Event::Woken),
                        Poll::Ready(Err(_)) => return Poll::Ready(Event::Failed),
                        Poll::Pending => {}
                    }
                }
                Poll::Pending
            })
            .await;
            end = match event {
                Event::Woken => None,
                Event::Readable => on_readable(&stream, &mut reader, handle, shared).0,
                Event::Failed => Some(End::io()),
            };
        };
        match outcome {
            Outcome::Park(wake) => match stream.into_std() {
                Ok(stream) => parking.park(Parked::new(stream, guard, wake)),
                Err(_) => guard.set_reason(DisconnectReason::IoError),
            },
            Outcome::End(end) => {
                // Boxed: the close path's timer and buffers are needed once, not for the whole
                // life.
                Box::pin(finish(&stream, handle, end)).await;
                guard.set_reason(end.reason);
            }
        }
    }
}

/// How a connection ended.
#[derive(Debug, Clone, Copy)]
struct End {
    reason: DisconnectReason,
    /// WebSocket close frame to send: code and reason text.
    close: Option<(u16, &'static str)>,
    /// The client sent a close frame: answer it, then wait for its FIN.
    client_close_frame: bool,
    /// The server decided to close (send the reason's close frame, then FIN).
    server_initiated: bool,
}

impl End {
    fn io() -> Self {
        Self {
            reason: DisconnectReason::IoError,
            close: None,
            client_close_frame: false,
            server_initiated: false,
        }
    }

    fn server(reason: DisconnectReason) -> Self {
        Self {
            reason,
            close: None,
            client_close_frame: false,
            server_initiated: true,
        }
    }

    fn protocol(code: u16, text: &'static str) -> Self {
        Self {
            reason: DisconnectReason::ProtocolError,
            close: Some((code, text)),
            client_close_frame: false,
            server_initiated: true,
        }
    }

    fn client(handle: &ConnHandle, close_frame: Option<u16>) -> Self {
        let st = handle.state();
        Self {
            reason: Policy::client_close_reason(&st.clock, st.superseded),
            close: close_frame.map(|c| (c, "")),
            client_close_frame: close_frame.is_some(),
            server_initiated: false,
        }
    }
}

enum Event {
    Woken,
    Readable,
    Failed,
}

enum Flush {
    Idle,
    Blocked,
    Close(DisconnectReason),
    Failed,
}

/// Frames handed to one `writev` at most. A connection with several frames queued (a
/// burst to one user, or a busy worker that reached it late) sends them in one system call
/// instead of one each: on loopback a call's fixed cost is most of a small frame's
/// (docs/BENCHMARKS.md, "The floor"). 16 frames of a typical size fit well within a socket
/// buffer, so a partial write stays rare.
const FRAMES_PER_WRITE: usize = 16;

thread_local! {
    /// The frames of one `writev`, reused by every connection on the worker (a flush never
    /// awaits, so no two use it at once; it is always left empty).
    static GATHER: RefCell<Vec<Outbound>> = const { RefCell::new(Vec::new()) };
}

/// Writes queued frames until the queue is empty or the socket would block, up to
/// [`FRAMES_PER_WRITE`] per system call. Sets `wrote_message` if one of the frames written
/// whole was a message (not a heartbeat or another control frame).
fn flush(
    stream: &impl Socket,
    handle: &ConnHandle,
    shared: &Shared,
    wrote_message: &mut bool,
) -> Flush {
    GATHER.with(|gather| {
        let mut frames = gather.borrow_mut();
        let result = flush_with(stream, handle, shared, &mut frames, wrote_message);
        // Frames left here after a failed write were not written: dropping them settles
        // their fates as dropped, as the queue's would.
        frames.clear();
        result
    })
}

fn flush_with(
    stream: &impl Socket,
    handle: &ConnHandle,
    shared: &Shared,
    frames: &mut Vec<Outbound>,
    wrote_message: &mut bool,
) -> Flush {
    loop {
        match handle.next_outbound() {
            Next::Idle => return Flush::Idle,
            Next::Close(reason) => return Flush::Close(reason),
            Next::Frame(out) => frames.push(out),
        }
        // What is queued behind it goes in the same call; a close request stays in the
        // queue's state, for the next round.
        while frames.len() < FRAMES_PER_WRITE {
            match handle.next_outbound() {
                Next::Frame(out) => frames.push(out),
                Next::Idle | Next::Close(_) => break,
            }
        }
        for out in frames.iter_mut() {
            if let Some(spans) = out.trace.as_deref_mut() {
                spans.writing();
            }
        }
        let written = if let [one] = frames.as_slice() {
            stream.try_write(&one.bytes)
        } else {
            let mut slices = [IoSlice::new(&[]); FRAMES_PER_WRITE];
            for (slice, out) in slices.iter_mut().zip(frames.iter()) {
                *slice = IoSlice::new(&out.bytes);
            }
            stream.try_write_vectored(&slices[..frames.len()])
        };
        let mut n = match written {
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => 0,
            Err(_) => return Flush::Failed,
        };
        let mut rest = frames.drain(..);
        for mut out in rest.by_ref() {
            if n >= out.bytes.len() {
                n -= out.bytes.len();
                *wrote_message |= out.is_message();
                if let Some(received) = out.received_at {
                    let t = handle.transport.index();
                    shared.hot.delivered[t].increment(1);
                    shared.hot.latency.record(received.elapsed().as_secs_f64());
                }
                out.written();
                continue;
            }
            // The socket is full: this frame's unwritten part and every frame after it go
            // back to the front of the queue, in their order.
            out.bytes.advance(n);
            out.partial |= n > 0;
            for later in rest.rev() {
                handle.requeue_front(later);
            }
            handle.requeue_front(out);
            return Flush::Blocked;
        }
    }
}

/// Reads what the socket has, into the worker's scratch buffer. Returns how the
/// connection ended, if it did, and whether the socket may hold more (the reads per wake
/// ran out before it was emptied).
fn on_readable(
    stream: &impl Socket,
    reader: &mut WsReader,
    handle: &Arc<ConnHandle>,
    shared: &Shared,
) -> (Option<End>, bool) {
    SCRATCH.with(|scratch| {
        let mut buf = scratch.borrow_mut();
        let mut heard = false;
        let mut end = None;
        let mut more = true;
        for _ in 0..MAX_READS_PER_WAKE {
            match stream.try_read(&mut buf) {
                Ok(0) => {
                    end = Some(End::client(handle, None));
                    more = false;
                    break;
                }
                Ok(n) => {
                    heard = true;
                    if handle.transport == Transport::Ws {
                        end = on_bytes(&buf[..n], reader, handle, shared);
                    }
                    // SSE clients have nothing to say after their request; what they send
                    // is read and dropped so it cannot pile up.
                    if end.is_some() || n < buf.len() {
                        more = false;
                        break;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    more = false;
                    break;
                }
                Err(_) => {
                    end = Some(End::io());
                    more = false;
                    break;
                }
            }
        }
        if heard {
            handle.state().clock.last_heard = shared.now();
        }
        (end, more)
    })
}

/// Feeds client bytes to the frame reader and acts on each message.
fn on_bytes(
    data: &[u8],
    reader: &mut WsReader,
    handle: &Arc<ConnHandle>,
    shared: &Shared,
) -> Option<End> {
    let mut end = None;
    let result = reader.feed(data, shared.config.max_message_bytes, |msg| {
        if end.is_some() {
            return;
        }
        match msg {
            Message::Text(text) if echo_mode(shared) => reply(
                handle,
                shared,
                ws::encode_frame(ws::OpCode::Text, text.as_bytes()),
            ),
            Message::Binary(data) if echo_mode(shared) => {
                reply(handle, shared, ws::encode_frame(ws::OpCode::Binary, &data));
            }
            Message::Text(text) => match message::parse_client_message(&text) {
                Ok(ClientMessage::Ack { id }) => {
                    metrics::counter!(m::ACKS).increment(1);
                    match handle.admit_ack(id, shared.now(), shared.config.ack_rate) {
                        Ok(slot) => {
                            shared.receipts.ack(Ack {
                                user: handle.user.clone(),
                                device: handle.device.clone(),
                                transport: Transport::Ws,
                                id,
                                at_ms: push_registry::now_ms(),
                                slot: Some(slot),
                                span: shared.receipts.traces.receipt_span(&handle.user, id),
                            });
                        }
                        Err(why) => {
                            metrics::counter!(m::RECEIPTS_DROPPED, "reason" => why.as_str())
                                .increment(1);
                        }
                    }
                }
                Ok(ClientMessage::Ping) => reply(handle, shared, message::pong_frame()),
                Err(e) => {
                    metrics::counter!(m::BAD_CLIENT_MESSAGES, "kind" => "unparsable").increment(1);
                    let detail = e.to_string();
                    let err = ServerMessage::Error {
                        code: "bad_message",
                        message: &detail,
                    };
                    reply(handle, shared, err.ws_frame());
                }
            },
            Message::Binary(_) => {
                metrics::counter!(m::BAD_CLIENT_MESSAGES, "kind" => "binary").increment(1);
                let err = ServerMessage::Error {
                    code: "binary_unsupported",
                    message: "client messages are JSON text frames",
                };
                reply(handle, shared, err.ws_frame());
            }
            Message::Ping(payload) => {
                reply(handle, shared, ws::encode_frame(ws::OpCode::Pong, &payload));
            }
            Message::Pong => {}
            Message::Close(code, _) => {
                // Echo the client's code (RFC 6455 5.5.1); 1005 (no code) is answered with 1000.
                end = Some(End::client(
                    handle,
                    Some(code.unwrap_or(close_code::NORMAL)),
                ));
            }
        }
    });
    match result {
        Ok(()) => end,
        Err(e) => {
            let text = match e {
                ws::FrameError::TooBig { .. } => "message too big",
                ws::FrameError::Utf8 => "invalid UTF-8",
                ws::FrameError::Protocol(what) => what,
            };
            Some(End::protocol(e.close_code(), text))
        }
    }
}

/// Autobahn's echo mode (feature `autobahn-echo`, test-only): data messages go back to the
/// client and no `hello` is sent; everything else is this driver as in production.
#[cfg(feature = "autobahn-echo")]
fn echo_mode(shared: &Shared) -> bool {
    shared.config.echo
}

#[cfg(not(feature = "autobahn-echo"))]
const fn echo_mode(_: &Shared) -> bool {
    false
}

fn reply(handle: &ConnHandle, shared: &Shared, bytes: Bytes) {
    handle.enqueue(Outbound::control(bytes), shared.limits);
}

/// Ends the connection the way `end` says: answer or send a close frame, then let whoever
/// should close TCP first do so.
async fn finish(stream: &TcpStream, handle: &ConnHandle, end: End) {
    let ws = handle.transport == Transport::Ws;
    if ws {
        let frame = match end.close {
            Some((code, text)) => Some(ws::close_frame(code, text)),
            None if end.server_initiated => close_frame_for(end.reason),
            None => None,
        };
        // Not after the rest of a partly written frame is dropped: the client would read
        // the close frame's bytes as that frame's tail.
        let frame = frame.filter(|_| handle.state().may_write_close());
        if let Some(frame) = frame {
            // Best effort: a slow consumer's buffer may be full; it is closed regardless.
            let _ = stream.try_write(&frame);
        }
    }
    if end.client_close_frame {
        // The client started the close handshake: let it close TCP first.
        let _ = tokio::time::timeout(CLOSE_LINGER, wait_eof(stream)).await;
    } else if end.server_initiated {
        let _ = SockRef::from(stream).shutdown(std::net::Shutdown::Write);
    }
}

/// The close frame for a server-initiated close of `reason`, if one is sent.
fn close_frame_for(reason: crate::lifecycle::DisconnectReason) -> Option<Bytes> {
    use crate::lifecycle::DisconnectReason as R;
    let (code, text) = match reason {
        R::ForcedAfterGrace => (ws::close_code::RECONNECT_TIMEOUT, "reconnect grace expired"),
        R::HeartbeatTimeout => (ws::close_code::HEARTBEAT_TIMEOUT, "heartbeat timeout"),
        R::SlowConsumer => (ws::close_code::SLOW_CONSUMER, "slow consumer"),
        R::Drain => (ws::close_code::GOING_AWAY, "node shutting down"),
        _ => return None,
    };
    Some(ws::close_frame(code, text))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    /// The per-connection task is the largest per-connection allocation. Keep it small: see
    /// the table in docs/BENCHMARKS.md (a 2.8 KB future cost 3.4 KiB per connection).
    #[tokio::test]
    async fn connection_future_stays_small() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = TcpStream::connect(addr).await.unwrap();
        let (server_side, remote) = listener.accept().await.unwrap();
        let server = crate::Server::start(Config::local_test("0123456789abcdef0123"))
            .await
            .unwrap();
        let fut = serve(
            server_side,
            remote,
            server.shared().clone(),
            Parking::start(true),
        );
        let size = std::mem::size_of_val(&fut);
        eprintln!("connection future: {size} bytes");
        assert!(size <= 512, "connection future is {size} bytes");
        drop(client);
    }
}
