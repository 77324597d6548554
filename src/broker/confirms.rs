//! Publisher confirms whose returns are paired with their own publish.
//!
//! A mandatory publish that reaches no queue comes back as a `basic.return`, then is
//! confirmed like any other. AMQP's return names no publish (it has no delivery tag),
//! and one `multiple` confirm often covers several publishes: lapin hands the return to
//! whichever pending confirm it completes first, in hash order. Trusting that pairing
//! would answer "stored" for an event the broker dropped, and "unroutable" for one it
//! holds.
//!
//! So the channel's confirms are tracked together, by [`ConfirmChannel`]. A return is filed
//! under what identifies its publish (exchange, routing key, message id, body length),
//! and each publish, once confirmed, looks for its own return there. lapin gives a
//! return to a confirm it completes after the return arrived, and the owner's confirm
//! is completed after that too: so by the time a publish sees its confirm, the confirm
//! carrying its return is complete as well. Whoever first sees a confirm complete
//! files the returns of every complete confirm on the channel before any is judged.

use std::collections::HashMap;
use std::future::Future;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use lapin::message::BasicReturnMessage;
use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Channel, Confirmation, PublisherConfirm};

use super::PublishError;

/// Returns filed for a publish not (yet) tracked are kept this long, then dropped.
const RETURN_KEPT: Duration = Duration::from_secs(60);
/// Filed returns beyond which the old ones are dropped.
const RETURNS_BEFORE_PRUNE: usize = 1024;

/// A confirm-mode channel whose every publish is tracked, so each return is paired
/// with its own publish. The channel and its tracker are made and replaced together.
#[derive(Clone)]
pub struct ConfirmChannel {
    channel: Channel,
    confirms: Confirms,
}

impl ConfirmChannel {
    /// Wraps `channel`, already in confirm mode, with a fresh tracker.
    pub fn new(channel: Channel) -> Self {
        Self {
            channel,
            confirms: Confirms::default(),
        }
    }

    /// The channel itself (status, close).
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Publishes `body` to `exchange` with `routing_key`, mandatory: unroutable must
    /// come back as a failure, not vanish. `Ok` once written to the socket, with the
    /// broker's answer to wait for.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<Tracked, lapin::Error> {
        let key = PublishKey::new(
            exchange,
            routing_key,
            properties.message_id().as_ref().map(|id| id.as_str()),
            body.len(),
        );
        let confirm = self
            .channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                body,
                properties,
            )
            .await?;
        Ok(self.confirms.track(key, confirm))
    }
}

/// What identifies a publish in its return: a hash of its exchange, routing key,
/// message id and body length. Two publishes alike in all four are the same event to
/// the same place, so which of them the broker stored makes no difference.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
struct PublishKey(u64);

impl PublishKey {
    /// The key of a publish of `body_len` bytes with `message_id` to `exchange` with
    /// `routing_key`.
    fn new(exchange: &str, routing_key: &str, message_id: Option<&str>, body_len: usize) -> Self {
        // SipHash with fixed keys: the same input always gives the same key.
        let mut h = DefaultHasher::new();
        (exchange, routing_key, message_id, body_len).hash(&mut h);
        Self(h.finish())
    }

    fn of_return(r: &BasicReturnMessage) -> Self {
        let d = &r.delivery;
        Self::new(
            d.exchange.as_str(),
            d.routing_key.as_str(),
            d.properties.message_id().as_ref().map(|m| m.as_str()),
            d.data.len(),
        )
    }
}

/// The confirms in flight on one confirm-mode channel. Every publish on the channel
/// must be tracked here, or a return of its could be taken for another's.
#[derive(Clone, Default)]
struct Confirms(Arc<Mutex<Ledger>>);

impl Confirms {
    /// Tracks `confirm`, the confirm of the publish identified by `key`. The answer:
    /// `Ok` only when the broker confirmed it and did not return it.
    fn track(&self, key: PublishKey, confirm: PublisherConfirm) -> Tracked {
        let mut ledger = self.lock();
        let slot = ledger.next;
        ledger.next += 1;
        ledger.waiting.insert(
            slot,
            Waiting {
                key,
                confirm: Some(confirm),
                outcome: None,
                waker: Waker::noop().clone(),
                orphan: false,
            },
        );
        Tracked {
            confirms: self.clone(),
            slot,
            done: false,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Ledger> {
        // The ledger stays consistent even if a holder panicked: every update is whole.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Default)]
struct Ledger {
    next: u64,
    waiting: HashMap<u64, Waiting>,
    /// Returns not yet claimed by their publish: how many, and when the last came.
    returned: HashMap<PublishKey, Returned>,
}

struct Waiting {
    key: PublishKey,
    /// The confirm, until it completes.
    confirm: Option<PublisherConfirm>,
    /// What it completed with, once it did (any return it carried already filed).
    outcome: Option<Result<Confirmation, lapin::Error>>,
    /// The waiter's waker, so polling on its behalf keeps it the one woken.
    waker: Waker,
    /// Its waiter gave up (a timeout): kept until complete, for the return it may carry.
    orphan: bool,
}

struct Returned {
    count: u32,
    code: u16,
    text: String,
    at: Instant,
}

impl Ledger {
    /// Takes in every confirm that has completed, filing the returns they carry; then
    /// drops the complete ones nobody waits for, claiming their own returns.
    fn harvest(&mut self) {
        let mut filed = Vec::new();
        for w in self.waiting.values_mut() {
            if let Some(confirm) = w.confirm.as_mut() {
                let mut cx = Context::from_waker(&w.waker);
                if let Poll::Ready(outcome) = Pin::new(confirm).poll(&mut cx) {
                    w.confirm = None;
                    w.outcome = Some(outcome);
                    // Its waiter must hear of it from here. lapin stores a confirm's
                    // answer, then wakes the waiter through the answer's listener; taken
                    // in between, the answer's listener is dropped with the wake-up
                    // unsent, and the waiter slept until its publish timeout.
                    w.waker.wake_by_ref();
                }
            }
            if let Some(Ok(Confirmation::Ack(r) | Confirmation::Nack(r))) = &mut w.outcome
                && let Some(r) = r.take()
            {
                filed.push(r);
            }
        }
        let now = Instant::now();
        for r in filed {
            let e = self
                .returned
                .entry(PublishKey::of_return(&r))
                .or_insert_with(|| Returned {
                    count: 0,
                    code: r.reply_code,
                    text: r.reply_text.to_string(),
                    at: now,
                });
            e.count += 1;
            e.at = now;
        }
        let gone: Vec<(u64, PublishKey)> = self
            .waiting
            .iter()
            .filter(|(_, w)| w.orphan && w.outcome.is_some())
            .map(|(slot, w)| (*slot, w.key))
            .collect();
        for (slot, key) in gone {
            self.waiting.remove(&slot);
            self.claim(key);
        }
        if self.returned.len() > RETURNS_BEFORE_PRUNE {
            self.returned.retain(|_, r| now - r.at < RETURN_KEPT);
        }
    }

    /// Takes one return filed under `key`, if there is one.
    fn claim(&mut self, key: PublishKey) -> Option<(u16, String)> {
        let r = self.returned.get_mut(&key)?;
        r.count -= 1;
        let found = (r.code, r.text.clone());
        if r.count == 0 {
            self.returned.remove(&key);
        }
        Some(found)
    }

    /// The answer for a publish whose confirm completed with `outcome`.
    fn verdict(
        &mut self,
        key: PublishKey,
        outcome: Result<Confirmation, lapin::Error>,
    ) -> Result<(), PublishError> {
        match outcome {
            Err(e) => Err(PublishError::Broker(e)),
            Ok(Confirmation::Ack(_) | Confirmation::Nack(_))
                if let Some((code, text)) = self.claim(key) =>
            {
                Err(PublishError::Unroutable { code, text })
            }
            Ok(Confirmation::Ack(_)) => Ok(()),
            Ok(Confirmation::Nack(_)) => Err(PublishError::Nacked),
            Ok(Confirmation::NotRequested) => Err(PublishError::NotConfirmMode),
        }
    }
}

/// A tracked publish's answer. Dropping it unanswered leaves its confirm tracked until
/// it completes, so a return it carries for another publish still reaches that one.
pub struct Tracked {
    confirms: Confirms,
    slot: u64,
    done: bool,
}

impl Future for Tracked {
    type Output = Result<(), PublishError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(Err(PublishError::Broker(
                lapin::ErrorKind::FutureCompleted.into(),
            )));
        }
        let mut ledger = this.confirms.lock();
        let w = ledger
            .waiting
            .get_mut(&this.slot)
            .expect("a tracked publish stays in the ledger until answered");
        if w.outcome.is_none() {
            if !w.waker.will_wake(cx.waker()) {
                w.waker = cx.waker().clone();
            }
            let confirm = w
                .confirm
                .as_mut()
                .expect("no outcome yet, so still a confirm");
            let Poll::Ready(outcome) = Pin::new(confirm).poll(cx) else {
                return Poll::Pending;
            };
            w.confirm = None;
            w.outcome = Some(outcome);
            // Complete now: the harvest files the returns of every complete confirm,
            // this one's among them, before any is judged.
            ledger.harvest();
        }
        let w = ledger
            .waiting
            .remove(&this.slot)
            .expect("a tracked publish stays in the ledger until answered");
        let outcome = w.outcome.expect("harvested after completing");
        this.done = true;
        Poll::Ready(ledger.verdict(w.key, outcome))
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut ledger = self.confirms.lock();
        let complete = match ledger.waiting.get_mut(&self.slot) {
            Some(w) => {
                w.orphan = true;
                w.waker = Waker::noop().clone();
                w.outcome.is_some()
            }
            None => return,
        };
        if complete {
            // Its return, if filed, is its own: nobody else may take it.
            let key = ledger.waiting.remove(&self.slot).map(|w| w.key);
            if let Some(key) = key {
                ledger.claim(key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_depends_on_every_part_and_on_nothing_else() {
        let k = PublishKey::new("x", "q", Some("ev-1"), 10);
        assert_eq!(k, PublishKey::new("x", "q", Some("ev-1"), 10));
        assert_ne!(k, PublishKey::new("", "q", Some("ev-1"), 10));
        assert_ne!(k, PublishKey::new("x", "r", Some("ev-1"), 10));
        assert_ne!(k, PublishKey::new("x", "q", Some("ev-2"), 10));
        assert_ne!(k, PublishKey::new("x", "q", None, 10));
        assert_ne!(k, PublishKey::new("x", "q", Some("ev-1"), 11));
    }

    #[test]
    fn a_filed_return_is_claimed_once_per_copy() {
        let mut l = Ledger::default();
        let k = PublishKey::new("", "q", Some("a"), 1);
        l.returned.insert(
            k,
            Returned {
                count: 2,
                code: 312,
                text: "NO_ROUTE".into(),
                at: Instant::now(),
            },
        );
        let other = PublishKey::new("", "q", Some("b"), 1);
        assert!(l.verdict(other, Ok(Confirmation::Ack(None))).is_ok());
        for _ in 0..2 {
            assert!(matches!(
                l.verdict(k, Ok(Confirmation::Ack(None))),
                Err(PublishError::Unroutable { code: 312, .. })
            ));
        }
        assert!(l.verdict(k, Ok(Confirmation::Ack(None))).is_ok());
        assert!(matches!(
            l.verdict(k, Ok(Confirmation::Nack(None))),
            Err(PublishError::Nacked)
        ));
    }
}
