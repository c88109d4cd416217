//! A ZeroMQ PUSH socket, the least of it that Pushpin's publish input needs: ZMTP 3.0 over
//! TCP, NULL security, single-part messages, one peer (Pushpin's `push_in_spec`, a PULL
//! socket on 127.0.0.1:5560).
//!
//! Written here rather than taken from a crate: `zmq` binds libzmq (its headers or a
//! from-source build in CI), and `zeromq` (pure Rust) brings its own async runtime glue and
//! a dozen dependencies, for what is a 64-byte greeting, one command and a length-prefixed
//! frame per message (RFC 23/ZMTP, <https://rfc.zeromq.org/spec/23/>). The wire format is
//! built and read by the functions at the top ([`greeting`], [`ready`], [`frame`],
//! [`check_greeting`], [`read_command`]), tested without sockets; [`Push`] drives them.

use anyhow::{bail, Context as _};
use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Length of a ZMTP 3.0 greeting.
pub const GREETING_LEN: usize = 64;

/// Largest command the peer may send during the handshake (its READY carries a few short
/// properties; a bigger one means this is not a ZMTP peer).
const MAX_COMMAND: usize = 4096;

/// Our greeting: signature, version 3.0, mechanism `NULL`, as-server 0, filler.
pub fn greeting() -> [u8; GREETING_LEN] {
    let mut g = [0u8; GREETING_LEN];
    g[0] = 0xFF;
    g[9] = 0x7F;
    g[10] = 3; // version major
    g[11] = 0; // version minor
    g[12..16].copy_from_slice(b"NULL");
    g
}

/// Checks the peer's greeting: the signature, version 3 or later, mechanism `NULL`.
pub fn check_greeting(g: &[u8; GREETING_LEN]) -> anyhow::Result<()> {
    if g[0] != 0xFF || g[9] != 0x7F {
        bail!("not a ZMTP peer (bad greeting signature)");
    }
    if g[10] < 3 {
        bail!("ZMTP version {}.{}, 3.0 or later needed", g[10], g[11]);
    }
    let mechanism = &g[12..32];
    if !mechanism.starts_with(b"NULL") || mechanism[4..].iter().any(|&b| b != 0) {
        bail!(
            "security mechanism {:?}, NULL needed",
            String::from_utf8_lossy(mechanism).trim_end_matches('\0')
        );
    }
    Ok(())
}

/// The READY command announcing `socket_type` (`PUSH`).
pub fn ready(socket_type: &str) -> Vec<u8> {
    let mut body = Vec::new();
    body.push(5);
    body.extend_from_slice(b"READY");
    body.push(11);
    body.extend_from_slice(b"Socket-Type");
    body.extend_from_slice(&(socket_type.len() as u32).to_be_bytes());
    body.extend_from_slice(socket_type.as_bytes());
    let mut out = vec![0x04, body.len() as u8];
    out.extend_from_slice(&body);
    out
}

/// One single-part message: flags (0 = last part, short; 2 = last part, long) and size.
pub fn frame(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 9);
    match u8::try_from(body.len()) {
        Ok(short) => out.extend_from_slice(&[0x00, short]),
        Err(_) => {
            out.push(0x02);
            out.extend_from_slice(&(body.len() as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(body);
    out
}

/// A command read whole from the front of `buf`: `(name, its data, bytes used)`, or `None`
/// while it is incomplete.
pub fn read_command(buf: &[u8]) -> anyhow::Result<Option<(String, Vec<u8>, usize)>> {
    let Some(&flags) = buf.first() else {
        return Ok(None);
    };
    if flags & 0x04 == 0 {
        bail!("expected a command, got a message frame (flags {flags:#04x})");
    }
    let (size, head) = if flags & 0x02 == 0 {
        let Some(&s) = buf.get(1) else {
            return Ok(None);
        };
        (usize::from(s), 2)
    } else {
        let Some(s) = buf.get(1..9) else {
            return Ok(None);
        };
        let size = u64::from_be_bytes(s.try_into().expect("8 bytes"));
        (usize::try_from(size).unwrap_or(usize::MAX), 9)
    };
    if size > MAX_COMMAND {
        bail!("command of {size} bytes (at most {MAX_COMMAND})");
    }
    let Some(body) = buf.get(head..head + size) else {
        return Ok(None);
    };
    let Some((&name_len, rest)) = body.split_first() else {
        bail!("empty command");
    };
    let name = rest
        .get(..usize::from(name_len))
        .context("command name longer than the command")?;
    let data = rest[usize::from(name_len)..].to_vec();
    Ok(Some((
        String::from_utf8_lossy(name).into_owned(),
        data,
        head + size,
    )))
}

/// A connected PUSH socket to one PULL peer.
#[derive(Debug)]
pub struct Push {
    stream: TcpStream,
}

impl Push {
    /// Connects and completes the handshake (greetings, then READY both ways).
    pub async fn connect(addr: SocketAddr) -> anyhow::Result<Self> {
        let mut stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connect {addr}"))?;
        // Messages are small and each is due at its scheduled time: no Nagle.
        stream.set_nodelay(true)?;
        stream.write_all(&greeting()).await?;
        let mut theirs = [0u8; GREETING_LEN];
        stream
            .read_exact(&mut theirs)
            .await
            .context("reading the ZMTP greeting")?;
        check_greeting(&theirs)?;
        stream.write_all(&ready("PUSH")).await?;
        let mut buf = Vec::with_capacity(256);
        let (name, _, _) = loop {
            if let Some(command) = read_command(&buf)? {
                break command;
            }
            if buf.len() > MAX_COMMAND + 9 || stream.read_buf(&mut buf).await? == 0 {
                bail!("{addr} closed during the ZMTP handshake");
            }
        };
        match name.as_str() {
            "READY" => Ok(Self { stream }),
            "ERROR" => bail!("{addr} refused the ZMTP handshake"),
            other => bail!("{addr} sent {other:?} where READY was expected"),
        }
    }

    /// Sends one single-part message.
    pub async fn send(&mut self, body: &[u8]) -> anyhow::Result<()> {
        self.stream.write_all(&frame(body)).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greeting_is_zmtp_3_null_and_checks_itself() {
        let g = greeting();
        assert_eq!((g[0], g[9], g[10]), (0xFF, 0x7F, 3));
        assert_eq!(&g[12..17], b"NULL\0");
        check_greeting(&g).expect("our own greeting is valid");
        let mut plain = g;
        plain[12..17].copy_from_slice(b"PLAIN");
        assert!(check_greeting(&plain).is_err());
        let mut old = g;
        old[10] = 2;
        assert!(check_greeting(&old).is_err());
    }

    #[test]
    fn ready_reads_back_as_a_command() {
        let r = ready("PUSH");
        let (name, data, used) = read_command(&r).expect("parses").expect("whole");
        assert_eq!((name.as_str(), used), ("READY", r.len()));
        assert_eq!(data, b"\x0bSocket-Type\x00\x00\x00\x04PUSH");
        assert_eq!(read_command(&r[..r.len() - 1]).expect("parses"), None);
        assert!(read_command(&frame(b"x")).is_err());
    }

    #[test]
    fn frames_are_short_up_to_255_bytes_then_long() {
        assert_eq!(frame(b"hi"), b"\x00\x02hi");
        let long = frame(&[7u8; 256]);
        assert_eq!(&long[..9], &[0x02, 0, 0, 0, 0, 0, 0, 1, 0]);
        assert_eq!(long.len(), 9 + 256);
    }
}
