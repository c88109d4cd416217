//! The two client transports, named the same way in URLs, metric labels, receipts and
//! command lines.

use serde::{Deserialize, Serialize};

/// The transport of one client connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// WebSocket on `/ws`.
    Ws,
    /// Server-Sent Events on `/sse`.
    Sse,
}

impl Transport {
    /// Both transports, in [`Transport::index`] order.
    pub const ALL: [Transport; 2] = [Transport::Ws, Transport::Sse];

    /// The name on the command line, in reports, receipts and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ws => "ws",
            Self::Sse => "sse",
        }
    }

    /// Index into per-transport arrays (metrics, counters).
    pub fn index(self) -> usize {
        match self {
            Self::Ws => 0,
            Self::Sse => 1,
        }
    }

    /// The client-port path that opens this transport.
    pub fn path(self) -> &'static str {
        match self {
            Self::Ws => "/ws",
            Self::Sse => "/sse",
        }
    }
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_agree_everywhere() {
        for t in Transport::ALL {
            let json = serde_json::to_string(&t).unwrap();
            assert_eq!(json, format!("\"{}\"", t.as_str()));
            assert_eq!(serde_json::from_str::<Transport>(&json).unwrap(), t);
            assert_eq!(Transport::ALL[t.index()], t);
            assert_eq!(t.path(), format!("/{t}"));
        }
    }
}
