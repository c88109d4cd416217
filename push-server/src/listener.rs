//! The client port: socket options and the accept loop.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};
use tokio::net::{TcpListener, TcpStream};

use crate::connection;
use crate::metrics as m;
use crate::state::Shared;

/// Binds the client port with socket2, so that `SO_REUSEPORT` and the backlog can be set.
pub(crate) fn bind(
    addr: SocketAddr,
    reuse_port: bool,
    backlog: u32,
) -> std::io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    // A restarted node must be able to bind while its old connections sit in TIME_WAIT.
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(i32::try_from(backlog).unwrap_or(i32::MAX))?;
    TcpListener::from_std(socket.into())
}

/// Options for every accepted client socket.
fn configure(stream: &TcpStream) {
    // Frames are written whole; Nagle would only add latency to a push.
    let _ = stream.set_nodelay(true);
    // Keepalive finds dead SSE peers (which never send) and half-open sockets after the
    // network drops, at no cost while the peer is alive.
    let keepalive = TcpKeepalive::new()
        .with_time(Duration::from_secs(60))
        .with_interval(Duration::from_secs(10))
        .with_retries(3);
    let _ = SockRef::from(stream).set_tcp_keepalive(&keepalive);
}

/// Accepts client connections until the task is aborted. Each connection's task checks
/// its source (connect rate, handshakes in progress) first, before it reads a byte
/// (`connection::handshake`), so a refused source holds no shared handshake slot.
pub(crate) async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let parking = connection::Parking::start(shared.config.park_idle);
    loop {
        match listener.accept().await {
            Ok((stream, remote)) => {
                configure(&stream);
                tokio::spawn(connection::serve(
                    stream,
                    remote,
                    shared.clone(),
                    parking.clone(),
                ));
            }
            Err(e) => {
                metrics::counter!(m::ACCEPT_ERRORS).increment(1);
                // EMFILE/ENFILE: out of file descriptors. The pending connection stays in the
                // backlog; back off instead of spinning on the same error.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
