//! [`PushClient`]: one API over both transports.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use serde_json::Value;
use tracing::Instrument as _;

use crate::direct::{DeliverConfig, DirectTransport, Outcome};
use crate::envelope::{Envelope, MessageId};
use crate::error::Result;
use crate::kafka::{KafkaAck, KafkaConfig, KafkaTransport};
use crate::receipt::{DeliveryReceipt, ReceiptListener};
use std::sync::Arc;

/// Per-message options of [`PushClient::send`].
#[derive(Debug, Clone, Default)]
pub struct SendOptions {
    /// Only this device of the user.
    pub device: Option<String>,
    /// Drop the message if it cannot be delivered within this time of its creation.
    pub ttl: Option<Duration>,
    /// Collapse key (see [`Envelope::collapse_key`]).
    pub collapse_key: Option<String>,
    /// W3C `traceparent` of the calling span.
    pub traceparent: Option<String>,
    /// A caller-chosen message ID (e.g. an idempotency key); generated when `None`.
    pub id: Option<MessageId>,
}

impl SendOptions {
    /// Builds the envelope these options describe.
    pub fn envelope(&self, user: impl Into<String>, data: impl Into<Value>) -> Envelope {
        let mut env = Envelope::new(user, data);
        env.device = self.device.clone();
        env.ttl_ms = self
            .ttl
            .map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX));
        env.collapse_key = self.collapse_key.clone();
        env.traceparent = self.traceparent.clone();
        if let Some(id) = &self.id {
            env.id = id.clone();
        }
        env
    }

    /// Continues the trace of an incoming request: `header` looks up its headers by
    /// lower-case name (W3C `traceparent`, else B3 `b3`, else `x-b3-traceid`/`x-b3-spanid`/
    /// `x-b3-sampled`); the context found becomes [`Self::traceparent`]. A missing or bad
    /// header leaves it unset (the send then starts a trace of its own).
    pub fn trace_headers<'a>(mut self, header: impl Fn(&str) -> Option<&'a str>) -> Self {
        self.traceparent = telemetry::propagation::extract(header).map(|c| c.traceparent());
        self
    }
}

/// Opens the send's span under the envelope's `traceparent` (the caller's), and writes back
/// the context to pass on: the span's own when tracing is on, else the caller's unchanged.
fn stamp_trace(env: &mut Envelope, span: &tracing::Span) {
    let incoming = env
        .traceparent
        .as_deref()
        .and_then(|t| telemetry::propagation::parse_traceparent(t).ok());
    if let Some(parent) = &incoming {
        telemetry::otel::set_parent(span, parent);
    }
    if let Some(out) = telemetry::otel::outgoing(span, incoming.as_ref()) {
        env.traceparent = Some(out.traceparent());
    }
}

/// What a successful send means depends on the transport.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Accepted {
    /// Kafka acknowledged the record: it will be delivered at least once while the user is
    /// connected (or dead-lettered), by the message processors.
    Queued(KafkaAck),
    /// The node answered for the message.
    Direct(Outcome),
}

/// The answer to a send: the message ID (what clients will see as `mid`) and how it went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    /// The envelope's message ID.
    pub id: MessageId,
    /// What the transport did with it.
    pub accepted: Accepted,
}

/// A send in flight: resolves when the transport has answered.
pub type PendingSend = Pin<Box<dyn Future<Output = Result<Receipt>> + Send>>;

#[derive(Debug, Clone)]
enum Transport {
    Kafka(KafkaTransport, Arc<Receipts>),
    Direct(DirectTransport),
}

/// The Kafka side of receipts: started on the first [`PushClient::send_and_wait_receipt`].
#[derive(Debug)]
struct Receipts {
    config: KafkaConfig,
    listener: tokio::sync::OnceCell<ReceiptListener>,
}

/// Pushes to users by user ID. Cheap to clone; clones share the producer or HTTP pool.
#[derive(Debug, Clone)]
pub struct PushClient {
    transport: Transport,
}

impl PushClient {
    /// Through Kafka: decoupled from delivery, survives node and processor restarts.
    pub fn kafka(config: &KafkaConfig) -> Result<Self> {
        Ok(Self {
            transport: Transport::Kafka(
                KafkaTransport::new(config)?,
                Arc::new(Receipts {
                    config: config.clone(),
                    listener: tokio::sync::OnceCell::new(),
                }),
            ),
        })
    }

    /// Straight to one push-server node's admin port (`http://host:port`), for small setups.
    pub fn direct(url: &str, config: &DeliverConfig) -> Result<Self> {
        Ok(Self {
            transport: Transport::Direct(DirectTransport::new(url, config)?),
        })
    }

    /// Sends `data` (a JSON string is text; anything else is JSON) to `user`.
    pub async fn send(
        &self,
        user: &str,
        data: impl Into<Value>,
        options: &SendOptions,
    ) -> Result<Receipt> {
        self.send_envelope(options.envelope(user, data)).await
    }

    /// Sends a message and waits up to `timeout` for its delivery receipt: the first
    /// acknowledgement by one of the user's clients. Over Kafka the receipt comes back on the
    /// receipts topic (push-server's `--receipts-brokers`); the first call starts reading it.
    /// Direct: the node answers once a client acknowledged.
    ///
    /// [`Error::ReceiptTimeout`](crate::Error::ReceiptTimeout) when no client acknowledged
    /// in time: the message was still accepted, and is kept for the user's next resume.
    pub async fn send_and_wait_receipt(
        &self,
        user: &str,
        data: impl Into<Value>,
        options: &SendOptions,
        timeout: Duration,
    ) -> Result<DeliveryReceipt> {
        let env = options.envelope(user, data);
        match &self.transport {
            Transport::Direct(d) => d.send_and_wait_receipt(&env, timeout).await,
            Transport::Kafka(k, r) => {
                let listener = r
                    .listener
                    .get_or_try_init(|| ReceiptListener::start(&r.config, &r.config.receipts_topic))
                    .await?;
                env.validate()?;
                let mid = env.id.as_str().to_owned();
                let waiting = listener.wait(&mid);
                let sent = async {
                    k.enqueue(&env).await?.await?;
                    Ok::<_, crate::Error>(())
                };
                let result = tokio::time::timeout(timeout, async {
                    sent.await?;
                    waiting.await.map_err(|_| crate::Error::Canceled)
                })
                .await;
                match result {
                    Ok(r) => r,
                    Err(_) => {
                        listener.forget(&mid);
                        Err(crate::Error::ReceiptTimeout {
                            id: env.id.clone(),
                            waited: timeout,
                        })
                    }
                }
            }
        }
    }

    /// Sends a prepared envelope and waits for the transport's answer.
    pub async fn send_envelope(&self, env: Envelope) -> Result<Receipt> {
        self.enqueue(env).await?.await
    }

    /// Hands the envelope to the transport and returns a future of its answer. Calls made one
    /// after another keep their order per user, so a caller can have many sends in flight
    /// (enqueue in order, await later) without reordering a user's messages.
    ///
    /// Kafka: waits only while librdkafka's local queue is full. Direct: performs the request
    /// (the returned future is then ready).
    pub async fn enqueue(&self, mut env: Envelope) -> Result<PendingSend> {
        // No span at all when export is off: a library's sends cost nothing extra then.
        let span = if telemetry::otel::is_on() {
            tracing::info_span!("push send", user = %env.user)
        } else {
            tracing::Span::none()
        };
        stamp_trace(&mut env, &span);
        self.enqueue_stamped(env).instrument(span).await
    }

    async fn enqueue_stamped(&self, env: Envelope) -> Result<PendingSend> {
        let id = env.id.clone();
        match &self.transport {
            Transport::Kafka(k, _) => {
                let ack = k.enqueue(&env).await?;
                Ok(Box::pin(async move {
                    Ok(Receipt {
                        id,
                        accepted: Accepted::Queued(ack.await?),
                    })
                }))
            }
            Transport::Direct(d) => {
                let outcome = d
                    .send_batch(std::slice::from_ref(&env))
                    .await?
                    .pop()
                    .expect("one outcome per envelope");
                Ok(Box::pin(std::future::ready(Ok(Receipt {
                    id,
                    accepted: Accepted::Direct(outcome),
                }))))
            }
        }
    }

    /// Sends many envelopes; one result per envelope, in order. Kafka: all are enqueued
    /// first (in order), then the acknowledgements awaited together. Direct: one request per
    /// 10,000 envelopes; a failed request fails each of its envelopes.
    pub async fn send_batch(&self, mut envs: Vec<Envelope>) -> Vec<Result<Receipt>> {
        match &self.transport {
            Transport::Kafka(..) => {
                let mut pending = Vec::with_capacity(envs.len());
                for env in envs {
                    pending.push(self.enqueue(env).await);
                }
                let mut out = Vec::with_capacity(pending.len());
                for p in pending {
                    out.push(match p {
                        Ok(fut) => fut.await,
                        Err(e) => Err(e),
                    });
                }
                out
            }
            Transport::Direct(d) => {
                if let Some(bad) = envs.iter().position(|e| e.validate().is_err()) {
                    // One invalid envelope would make the node refuse the whole request:
                    // send none, and say per envelope why.
                    return envs
                        .iter()
                        .map(|env| match env.validate() {
                            Err(e) => Err(e.into()),
                            Ok(()) => Err(crate::Error::NotSent(format!(
                                "envelope {bad} of the batch is invalid"
                            ))),
                        })
                        .collect();
                }
                let span = if telemetry::otel::is_on() {
                    tracing::info_span!("push send batch", messages = envs.len())
                } else {
                    tracing::Span::none()
                };
                for env in &mut envs {
                    stamp_trace(env, &span);
                }
                let mut out = Vec::with_capacity(envs.len());
                for chunk in envs.chunks(crate::direct::MAX_ITEMS_PER_REQUEST) {
                    match d.send_batch(chunk).instrument(span.clone()).await {
                        Ok(outcomes) => out.extend(chunk.iter().zip(outcomes).map(|(e, o)| {
                            Ok(Receipt {
                                id: e.id.clone(),
                                accepted: Accepted::Direct(o),
                            })
                        })),
                        Err(e) => out.extend(chunk.iter().map(|_| Err(e.replicate()))),
                    }
                }
                out
            }
        }
    }

    /// Kafka: blocks until every enqueued record is acknowledged or failed, at most
    /// `timeout` (call before exiting; it blocks the thread, so use `spawn_blocking` on a
    /// busy runtime). Direct: nothing to flush.
    pub fn flush(&self, timeout: Duration) -> Result<()> {
        match &self.transport {
            Transport::Kafka(k, _) => k.flush(timeout),
            Transport::Direct(_) => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const W3C: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn w3c_and_b3_request_headers_become_the_traceparent() {
        let w3c = SendOptions::default().trace_headers(|h| (h == "traceparent").then_some(W3C));
        assert_eq!(w3c.traceparent.as_deref(), Some(W3C));
        let b3 = SendOptions::default().trace_headers(|h| match h {
            "x-b3-traceid" => Some("4bf92f3577b34da6a3ce929d0e0e4736"),
            "x-b3-spanid" => Some("00f067aa0ba902b7"),
            "x-b3-sampled" => Some("1"),
            _ => None,
        });
        assert_eq!(b3.traceparent.as_deref(), Some(W3C));
        let single = SendOptions::default().trace_headers(|h| {
            (h == "b3").then_some("4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1")
        });
        assert_eq!(single.traceparent.as_deref(), Some(W3C));
        let bad = SendOptions::default().trace_headers(|h| (h == "traceparent").then_some("00-zz"));
        assert_eq!(bad.traceparent, None);
    }

    #[test]
    fn with_tracing_off_the_callers_traceparent_is_passed_on_unchanged() {
        let mut env = SendOptions {
            traceparent: Some(W3C.into()),
            ..SendOptions::default()
        }
        .envelope("u", "x");
        stamp_trace(&mut env, &tracing::info_span!("push send"));
        assert_eq!(env.traceparent.as_deref(), Some(W3C));
        let mut untraced = Envelope::new("u", "x");
        stamp_trace(&mut untraced, &tracing::info_span!("push send"));
        assert_eq!(untraced.traceparent, None);
    }
}
