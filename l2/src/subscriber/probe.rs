//! Probes: proof that what a master published before a probe has reached this subscriber.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::oneshot;

use super::{Event, Subscriber};
use crate::error::{Error, Result};

/// Signs a probe: given the payload built so far (a random nonce), returns the bytes appended
/// to it (a tag). A returning probe must match the published bytes exactly, so a probe
/// published by anyone without the signer's key never counts. See
/// [`Subscriber::listen_for_probes_signed`].
pub type ProbeSigner = Arc<dyn Fn(&[u8]) -> Vec<u8> + Send + Sync>;

/// The probes this subscriber published and waits for, by payload.
pub(super) struct Probes {
    /// Channels with the probe handler on them, and how their probes are signed.
    pub(super) channels: Mutex<HashMap<String, Option<ProbeSigner>>>,
    pub(super) waiting: Mutex<HashMap<Vec<u8>, oneshot::Sender<()>>>,
}

/// A probe payload: `probe:` and 128 random bits from the OS (in hex), so nobody can publish
/// one before seeing it; then the signer's tag, if any.
fn probe_payload(signer: Option<&ProbeSigner>) -> Vec<u8> {
    let mut nonce = [0u8; 16];
    if getrandom::fill(&mut nonce).is_err() {
        // No OS generator (never on the platforms we run on): fastrand, seeded per process,
        // is unique but not unpredictable.
        nonce = fastrand::u128(..).to_le_bytes();
    }
    let mut payload = b"probe:".to_vec();
    for b in nonce {
        payload.extend_from_slice(format!("{b:02x}").as_bytes());
    }
    if let Some(sign) = signer {
        let tag = sign(&payload);
        payload.push(b':');
        payload.extend_from_slice(&tag);
    }
    payload
}

impl Probes {
    fn arrived(&self, payload: &[u8]) {
        let waiter = self.waiting.lock().remove(payload);
        if let Some(waiter) = waiter {
            let _ = waiter.send(());
        }
    }
}

/// One probe round's waiters, removed when the round ends however it ends.
struct Pending<'a> {
    probes: &'a Probes,
    payloads: Vec<Vec<u8>>,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        let mut waiting = self.probes.waiting.lock();
        for p in &self.payloads {
            waiting.remove(p);
        }
    }
}

impl Subscriber {
    /// Subscribes to `channel` for [`Subscriber::probe`]. The channel should be this
    /// subscriber's alone (nobody else publishes on it or listens to it). Each probe carries
    /// 128 random bits, so nobody can publish one before it is published; to make probes
    /// worthless to anyone without a key too, use [`Subscriber::listen_for_probes_signed`].
    ///
    /// # Errors
    /// As [`Subscriber::listen`].
    pub async fn listen_for_probes(&self, channel: &str) -> Result<()> {
        self.probes_on(channel, None).await
    }

    /// As [`Subscriber::listen_for_probes`], and every probe on `channel` carries the tag
    /// `signer` makes for its random payload. A probe comes back only when the bytes match
    /// exactly what was published, so forged probes never count. The first call for a
    /// channel decides how its probes are signed.
    ///
    /// # Errors
    /// As [`Subscriber::listen`].
    pub async fn listen_for_probes_signed(&self, channel: &str, signer: ProbeSigner) -> Result<()> {
        self.probes_on(channel, Some(signer)).await
    }

    async fn probes_on(&self, channel: &str, signer: Option<ProbeSigner>) -> Result<()> {
        let probes = Arc::clone(&self.inner.probes);
        {
            let mut channels = probes.channels.lock();
            if channels.contains_key(channel) {
                return Ok(());
            }
            channels.insert(channel.to_string(), signer);
        }
        let handler = {
            let probes = Arc::clone(&probes);
            move |event: &Event<'_>| {
                if let Event::Message { payload, .. } = event {
                    probes.arrived(payload);
                }
            }
        };
        let subscribed = self.listen(channel, handler).await;
        if subscribed.is_err() {
            probes.channels.lock().remove(channel);
        }
        subscribed
    }

    /// Proves that pub/sub messages reach this subscriber in time, end to end: publishes a
    /// probe on `channel` (made ready with [`Subscriber::listen_for_probes`]) through every
    /// master — on one server, through the server — and waits until each has come back on
    /// this connection. Pub/sub keeps order along each path (a server to its subscribers; on
    /// a cluster, a master's bus link to the node this subscriber is on), so a probe's return
    /// means everything that master published before it has arrived here. Returns how long
    /// the slowest took.
    ///
    /// The heartbeat ([`Subscriber::run_id`]) proves only that this connection answers; a
    /// probe also covers the cluster bus between masters and this node, and a server slow to
    /// write to its subscribers.
    ///
    /// # Errors
    /// [`Error::Timeout`] when a probe has not come back within `timeout`; [`Error::Config`]
    /// if `channel` was not made ready; as the connection's commands otherwise.
    pub async fn probe(&self, channel: &str, timeout: Duration) -> Result<Duration> {
        let probes = &self.inner.probes;
        let Some(signer) = probes.channels.lock().get(channel).cloned() else {
            return Err(Error::Config(format!(
                "probe: call listen_for_probes({channel:?}) first"
            )));
        };
        // A round that straddles a move could return on the new node before the handlers
        // hear of the move (and the messages it may have lost): it proves nothing.
        let connection_before = (
            self.inner.active.load(Ordering::SeqCst),
            self.inner.moves.load(Ordering::SeqCst),
        );
        let start = tokio::time::Instant::now();
        let deadline = start + timeout;
        let late = || Error::Timeout {
            op: "pub/sub probe",
            after: timeout,
        };
        let conn = &self.inner.conn;
        let masters: Vec<Option<(String, u16)>> = if conn.is_cluster() {
            tokio::time::timeout_at(deadline, conn.masters())
                .await
                .map_err(|_| late())??
                .into_iter()
                .map(Some)
                .collect()
        } else {
            vec![None]
        };
        // Whatever happens to this round (done, late, cancelled), its waiters go with it.
        let mut pending = Pending {
            probes,
            payloads: Vec::with_capacity(masters.len()),
        };
        let mut arrivals = Vec::with_capacity(masters.len());
        let mut sends = Vec::with_capacity(masters.len());
        for master in masters {
            let payload = probe_payload(signer.as_ref());
            let (tx, rx) = oneshot::channel();
            probes.waiting.lock().insert(payload.clone(), tx);
            arrivals.push(rx);
            let mut cmd = redis::cmd("PUBLISH");
            cmd.arg(channel).arg(&payload);
            pending.payloads.push(payload);
            sends.push(async move {
                let _: i64 = match &master {
                    Some(node) => conn.query_node("probe publish", node, cmd).await?,
                    None => conn.query("probe publish", &cmd).await?,
                };
                Ok::<(), Error>(())
            });
        }
        let round = async {
            for sent in futures_util::future::join_all(sends).await {
                sent?;
            }
            for arrival in arrivals {
                arrival
                    .await
                    .map_err(|_| Error::SubscriberChanged { op: "probe" })?;
            }
            Ok::<(), Error>(())
        };
        let outcome = match tokio::time::timeout_at(deadline, round).await {
            Ok(Ok(()))
                if connection_before
                    != (
                        self.inner.active.load(Ordering::SeqCst),
                        self.inner.moves.load(Ordering::SeqCst),
                    ) =>
            {
                Err(Error::SubscriberChanged { op: "probe" })
            }
            Ok(Ok(())) => Ok(start.elapsed()),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(late()),
        };
        drop(pending);
        outcome
    }
}
