//! The admin port itself: the accept loop, the `--admin-max-connections` limit, and HTTP/1.1
//! on hyper with a header timeout. Each request goes to the router (mod.rs).

use std::convert::Infallible;
use std::sync::Arc;

use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::metrics as m;
use crate::state::Shared;

/// Answer to a connection over `--admin-max-connections`, written before closing it.
const TOO_MANY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\nConnection: close\r\nContent-Length: 73\r\n\r\n{\"error\":\"too_many_connections\",\"message\":\"admin port connection limit\"}\n";

/// Serves the admin port until the task is aborted.
pub(crate) async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let sec = &shared.config.admin_security;
    let slots = Arc::new(tokio::sync::Semaphore::new(sec.admin_max_connections));
    let header_timeout = sec.admin_header_timeout;
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            metrics::counter!(m::ADMIN_REFUSED, "reason" => "too_many_connections").increment(1);
            // Answered on a task of its own, bounded in time, so a full port still accepts
            // (and refuses) quickly and a refused peer that does not read costs nothing.
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
                let mut stream = stream;
                let answer = async {
                    stream.write_all(TOO_MANY).await?;
                    stream.shutdown().await?;
                    // Read (a little of) what the peer sent before closing: closing with
                    // unread input sends a reset, which can discard the answer at the peer.
                    let mut sink = [0u8; 4096];
                    let mut left = 64 * 1024;
                    while left > 0 {
                        match stream.read(&mut sink).await? {
                            0 => break,
                            n => left -= n.min(left),
                        }
                    }
                    Ok::<_, std::io::Error>(())
                };
                let _ = tokio::time::timeout(std::time::Duration::from_secs(1), answer).await;
            });
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let service = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(super::handle(req, &shared).await) }
            });
            // A header timeout keeps a stalled or slowloris admin client from holding a
            // connection for ever (bodies have theirs in read_body); keep-alive serves the
            // message processor's steady stream.
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(header_timeout)
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "admin connection ended with an error");
            }
        });
    }
}
