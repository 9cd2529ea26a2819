//! The in-process bus of the embedded default: no history, ids from a per-user counter.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use super::{Bus, BusError, Delivery, DeliverySink, Outgoing};
use async_trait::async_trait;

pub struct MemoryBus {
    state: Mutex<State>,
    deliveries: Arc<dyn DeliverySink>,
}

#[derive(Default)]
struct State {
    subscribed: HashSet<Arc<str>>,
    /// Last id per user; counted for every message, subscribed or not, so ids only grow.
    last_id: HashMap<Arc<str>, u64>,
}

impl MemoryBus {
    /// A bus that delivers into `deliveries`.
    pub fn new(deliveries: Arc<dyn DeliverySink>) -> Self {
        MemoryBus {
            state: Mutex::new(State::default()),
            deliveries,
        }
    }
}

#[async_trait]
impl Bus for MemoryBus {
    async fn publish(&self, batch: &[Outgoing]) -> Result<(), BusError> {
        let ready: Vec<Delivery> = {
            let mut state = self.state.lock().map_err(|_| BusError::Closed)?;
            let mut ready = Vec::new();
            for msg in batch {
                let seq = state.last_id.entry(msg.user.clone()).or_insert(0);
                *seq += 1;
                let id = *seq;
                if state.subscribed.contains(&msg.user) {
                    ready.push(Delivery {
                        user: msg.user.clone(),
                        id: Arc::from(id.to_string()),
                        payload: msg.payload.clone(),
                    });
                }
            }
            ready
        };
        for delivery in ready {
            // The hub never blocks: a connection that cannot keep up is evicted there.
            self.deliveries.deliver(delivery);
        }
        Ok(())
    }

    async fn subscribe(&self, user: &Arc<str>) -> Result<(), BusError> {
        let mut state = self.state.lock().map_err(|_| BusError::Closed)?;
        state.subscribed.insert(user.clone());
        Ok(())
    }

    async fn unsubscribe(&self, user: &Arc<str>) -> Result<(), BusError> {
        let mut state = self.state.lock().map_err(|_| BusError::Closed)?;
        state.subscribed.remove(user);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[tokio::test]
    async fn delivers_only_to_subscribed_users_with_increasing_ids() {
        let (tx, mut rx) = tokio::sync::mpsc::channel(16);
        let bus = MemoryBus::new(Arc::new(tx));
        let alice: Arc<str> = Arc::from("alice");
        let bob: Arc<str> = Arc::from("bob");
        bus.subscribe(&alice).await.unwrap();
        let batch = [
            Outgoing::new(alice.clone(), Bytes::from_static(b"1")),
            Outgoing::new(bob.clone(), Bytes::from_static(b"x")),
            Outgoing::new(alice.clone(), Bytes::from_static(b"2")),
        ];
        bus.publish(&batch).await.unwrap();
        let a = rx.recv().await.unwrap();
        let b = rx.recv().await.unwrap();
        assert_eq!(
            (&*a.user, &*a.id, &a.payload[..]),
            ("alice", "1", &b"1"[..])
        );
        assert_eq!(
            (&*b.user, &*b.id, &b.payload[..]),
            ("alice", "2", &b"2"[..])
        );
        assert!(rx.try_recv().is_err(), "bob is not subscribed");
        bus.unsubscribe(&alice).await.unwrap();
        bus.publish(&batch).await.unwrap();
        assert!(rx.try_recv().is_err());
    }
}
