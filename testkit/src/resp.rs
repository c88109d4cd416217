//! Just enough RESP2 for the harness: encode a command, read one reply.

use std::io::{self, BufRead};

/// One RESP2 reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `+OK`
    Simple(String),
    /// `-ERR ...`
    Error(String),
    /// `:1`
    Int(i64),
    /// `$3\r\nfoo` (`None` for the null bulk string)
    Bulk(Option<String>),
    /// `*2 ...` (`None` for the null array)
    Array(Option<Vec<Reply>>),
}

/// Encodes a command as a RESP array of bulk strings.
pub fn encode(args: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out
}

fn bad(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// Reads one reply.
pub fn read_reply(r: &mut impl BufRead) -> io::Result<Reply> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    let line = line.trim_end_matches("\r\n");
    let (kind, rest) = line.split_at(line.len().min(1));
    let int = || {
        rest.parse::<i64>()
            .map_err(|e| bad(format!("{line:?}: {e}")))
    };
    match kind {
        "+" => Ok(Reply::Simple(rest.to_string())),
        "-" => Ok(Reply::Error(rest.to_string())),
        ":" => Ok(Reply::Int(int()?)),
        "$" => {
            let Ok(len) = usize::try_from(int()?) else {
                return Ok(Reply::Bulk(None));
            };
            let mut buf = vec![0; len + 2];
            r.read_exact(&mut buf)?;
            buf.truncate(len);
            Ok(Reply::Bulk(Some(
                String::from_utf8_lossy(&buf).into_owned(),
            )))
        }
        "*" => {
            let Ok(len) = usize::try_from(int()?) else {
                return Ok(Reply::Array(None));
            };
            (0..len)
                .map(|_| read_reply(r))
                .collect::<io::Result<Vec<_>>>()
                .map(|v| Reply::Array(Some(v)))
        }
        _ => Err(bad(format!("unexpected RESP line {line:?}"))),
    }
}
