//! Socket helpers of the handshake and the close: read a request head, write all of a
//! response, wait for the client's FIN.

use std::io::ErrorKind;

use tokio::net::TcpStream;

use crate::protocol::http::{self, HeadError, RequestHead};

/// Why no request head was read.
pub(super) enum ReadHeadError {
    /// The bytes are not a request head, or too many.
    Head(HeadError),
    /// The client closed or the socket failed first.
    Closed,
}

/// Reads a request head of at most `max` bytes; returns it and the bytes after it.
pub(super) async fn read_head(
    stream: &TcpStream,
    max: usize,
) -> Result<(RequestHead, Vec<u8>), ReadHeadError> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    loop {
        stream.readable().await.map_err(|_| ReadHeadError::Closed)?;
        match stream.try_read(&mut chunk) {
            Ok(0) => return Err(ReadHeadError::Closed),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => continue,
            Err(_) => return Err(ReadHeadError::Closed),
        }
        if let Some((head, used)) =
            http::parse_request_head(&buf, max).map_err(ReadHeadError::Head)?
        {
            return Ok((head, buf.split_off(used)));
        }
    }
}

/// Writes all of `data`, waiting for room.
pub(super) async fn write_all(stream: &TcpStream, mut data: &[u8]) -> std::io::Result<()> {
    while !data.is_empty() {
        stream.writable().await?;
        match stream.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads and drops what the client still sends until it closes.
pub(super) async fn wait_eof(stream: &TcpStream) {
    let mut buf = [0u8; 64];
    loop {
        if stream.readable().await.is_err() {
            return;
        }
        match stream.try_read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(_) => return,
        }
    }
}
