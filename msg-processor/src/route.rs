//! Where a message goes and when it is finished: the delivery rules, without I/O.
//!
//! A message is delivered in rounds. Each round looks the user up, sends the message to
//! every node that holds one of the user's (matching) connections and has not answered yet,
//! and reads the answers. Rules:
//!
//! - `delivered` / `duplicate` from a node: that node is done, the message counts as delivered.
//! - `stored` (or `not_connected` from an older node): that node is done (its registry
//!   record was stale). The message gets one more lookup in case the user just moved; with
//!   no new node it is finished: it is in the user's history, for their next resume.
//! - `invalid`: the node will never take it: dead-letter (unless another node took it).
//! - node unreachable (connect error, timeout, 5xx, 401): try again next round, after a
//!   backoff, with a fresh lookup: the user may have reconnected elsewhere. After the last
//!   round a message that reached nobody is finished as stored: it was appended to the
//!   user's history before the first round, and their clients resume from there.
//!
//! One request per node carries that node's messages in their partition order, and a node
//! applies a request's items in order, so each user's messages keep their order.

use std::collections::BTreeSet;

use push_lib::{Envelope, Outcome};
use push_registry::Record;

/// How a message ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Final {
    /// At least one node took it (now or earlier, as a duplicate).
    Delivered,
    /// No node took it live: it is in the user's history, sent when their clients resume.
    Stored,
    /// Past its TTL before it could be delivered.
    Expired,
    /// Malformed, refused by the node, or undeliverable after every retry.
    DeadLetter(String),
}

/// What a message needs after a round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Another round: `backoff` when a node was unreachable (wait before retrying).
    Again {
        /// Wait before the next round.
        backoff: bool,
    },
    /// Finished.
    Done(Final),
}

/// One message's progress through the rounds.
#[derive(Debug)]
pub struct Delivery {
    /// The message.
    pub env: Envelope,
    /// Its per-user ID, from the history append.
    pub id: Option<u64>,
    /// Its size on the wire (the record's bytes): bounds its share of a deliver request.
    pub wire_len: usize,
    /// Its `consume` span (open until its outcome; disabled when tracing is off): the parent
    /// of its lookup, append and deliver spans.
    pub span: tracing::Span,
    /// Nodes (`node_addr`) that answered delivered, duplicate or not connected.
    answered: BTreeSet<String>,
    delivered: bool,
    invalid: Option<String>,
    /// The last unreachable node's error, this round.
    unreachable: Option<String>,
    not_connected: bool,
    /// Whether a not-connected answer already earned a fresh lookup.
    relooked: bool,
}

impl Delivery {
    /// A message about to get its first round; `wire_len` is its record's size.
    pub fn new(env: Envelope, wire_len: usize) -> Self {
        Self {
            env,
            id: None,
            wire_len,
            span: tracing::Span::none(),
            answered: BTreeSet::new(),
            delivered: false,
            invalid: None,
            unreachable: None,
            not_connected: false,
            relooked: false,
        }
    }

    /// Whether any node has taken the message.
    pub fn delivered(&self) -> bool {
        self.delivered
    }

    /// The nodes to send to this round, given the user's live registry records: every node
    /// that holds a matching connection (the addressed device, or any when none is) and has
    /// not answered yet. Empty means nothing left to try.
    pub fn targets(&self, records: &[Record]) -> Vec<String> {
        let mut nodes: Vec<String> = records
            .iter()
            .filter(|r| self.env.device.is_none() || r.device == self.env.device)
            .map(|r| r.node_addr.clone())
            .filter(|addr| !self.answered.contains(addr))
            .collect();
        nodes.sort();
        nodes.dedup();
        nodes
    }

    /// Records a node's answer, or (`Err`) why it could not be reached.
    pub fn apply(&mut self, node: &str, answer: Result<&Outcome, &str>) {
        match answer {
            Ok(Outcome::Delivered { .. } | Outcome::Duplicate) => {
                self.delivered = true;
                self.answered.insert(node.to_owned());
            }
            Ok(Outcome::NotConnected | Outcome::Stored { .. }) => {
                self.not_connected = true;
                self.answered.insert(node.to_owned());
            }
            Ok(Outcome::Invalid { reason }) => {
                self.invalid = Some(reason.clone());
                self.answered.insert(node.to_owned());
            }
            Err(e) => self.unreachable = Some(e.to_owned()),
        }
    }

    /// Decides after a round. `had_targets`: whether this round sent anywhere;
    /// `last_round`: no further round is allowed.
    pub fn next(&mut self, had_targets: bool, last_round: bool) -> Next {
        let unreachable = self.unreachable.take();
        let not_connected = std::mem::take(&mut self.not_connected);
        if let Some(reason) = &self.invalid {
            if !self.delivered {
                return Next::Done(Final::DeadLetter(format!("invalid: {reason}")));
            }
        }
        if !had_targets {
            return Next::Done(if self.delivered {
                Final::Delivered
            } else {
                Final::Stored
            });
        }
        if let Some(e) = unreachable {
            if !last_round {
                return Next::Again { backoff: true };
            }
            // Another of the user's nodes took it, or nobody did: either way the unreachable
            // node's clients reconnect elsewhere and resume from the history, which holds it.
            if !self.delivered {
                tracing::debug!(user = %self.env.user, error = %e, "node unreachable to the end; message kept for resume");
            }
            return Next::Done(if self.delivered {
                Final::Delivered
            } else {
                Final::Stored
            });
        }
        if not_connected && !self.delivered && !self.relooked && !last_round {
            self.relooked = true;
            return Next::Again { backoff: false };
        }
        Next::Done(if self.delivered {
            Final::Delivered
        } else {
            Final::Stored
        })
    }
}

/// Splits `idxs` (indexes into `deliveries`) into consecutive requests of at most
/// `max_items` messages and, unless one message alone is larger, `max_bytes` bytes.
pub fn chunks(
    idxs: &[usize],
    deliveries: impl Fn(usize) -> usize,
    max_items: usize,
    max_bytes: usize,
) -> Vec<&[usize]> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, &ix) in idxs.iter().enumerate() {
        let len = deliveries(ix);
        if i > start && (i - start >= max_items || bytes + len > max_bytes) {
            out.push(&idxs[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += len;
    }
    if start < idxs.len() {
        out.push(&idxs[start..]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(node: &str, device: Option<&str>) -> Record {
        Record {
            user: "u".into(),
            device: device.map(Into::into),
            node_id: node.into(),
            node_addr: node.into(),
            conn_id: format!("{node}-{device:?}"),
            connected_at: 1,
        }
    }

    fn delivered() -> Outcome {
        Outcome::Delivered {
            id: Some(1),
            connections: 1,
        }
    }

    #[test]
    fn one_target_per_node_and_only_the_addressed_device() {
        let recs = [
            rec("a", Some("p")),
            rec("a", Some("t")),
            rec("b", Some("t")),
        ];
        let d = Delivery::new(Envelope::new("u", "x"), 0);
        assert_eq!(d.targets(&recs), ["a", "b"]);
        let d = Delivery::new(Envelope::new("u", "x").device("p"), 0);
        assert_eq!(d.targets(&recs), ["a"]);
    }

    #[test]
    fn requests_are_bounded_by_items_and_bytes() {
        let idxs: Vec<usize> = (0..7).collect();
        let size = |i: usize| if i == 3 { 500 } else { 10 };
        let got = chunks(&idxs, size, 3, 100);
        assert_eq!(got, vec![&[0, 1, 2][..], &[3], &[4, 5, 6]]);
        assert_eq!(chunks(&idxs, |_| 1, 10, 100), vec![&idxs[..]]);
        assert!(chunks(&[], |_| 1, 10, 100).is_empty());
    }

    #[test]
    fn delivered_in_one_round() {
        let mut d = Delivery::new(Envelope::new("u", "x"), 0);
        d.apply("a", Ok(&delivered()));
        assert_eq!(d.next(true, false), Next::Done(Final::Delivered));
    }

    #[test]
    fn no_record_means_stored() {
        let mut d = Delivery::new(Envelope::new("u", "x"), 0);
        assert_eq!(d.next(false, false), Next::Done(Final::Stored));
    }

    #[test]
    fn unreachable_retries_with_backoff_then_follows_the_user() {
        let mut d = Delivery::new(Envelope::new("u", "x"), 0);
        d.apply("a", Err("refused"));
        assert_eq!(d.next(true, false), Next::Again { backoff: true });
        // Next round: the user re-registered on b.
        assert_eq!(d.targets(&[rec("b", None)]), ["b"]);
        d.apply("b", Ok(&Outcome::Duplicate));
        assert_eq!(d.next(true, false), Next::Done(Final::Delivered));
    }

    #[test]
    fn unreachable_to_the_end_is_left_to_resume() {
        let mut d = Delivery::new(Envelope::new("u", "x"), 0);
        d.apply("a", Err("refused"));
        assert_eq!(d.next(true, true), Next::Done(Final::Stored));
    }

    #[test]
    fn not_connected_gets_one_fresh_lookup() {
        let mut d = Delivery::new(Envelope::new("u", "x"), 0);
        d.apply("a", Ok(&Outcome::NotConnected));
        assert_eq!(d.next(true, false), Next::Again { backoff: false });
        // The same stale record again: a is excluded, nothing left.
        assert!(d.targets(&[rec("a", None)]).is_empty());
        assert_eq!(d.next(false, false), Next::Done(Final::Stored));
    }

    #[test]
    fn invalid_is_dead_lettered_unless_delivered_elsewhere() {
        let mut d = Delivery::new(Envelope::new("u", "x"), 0);
        d.apply(
            "a",
            Ok(&Outcome::Invalid {
                reason: "too big".into(),
            }),
        );
        assert_eq!(
            d.next(true, false),
            Next::Done(Final::DeadLetter("invalid: too big".into()))
        );
    }
}
