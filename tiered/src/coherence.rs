//! How a cache acts on the invalidation bus: evictions from other nodes, clears and gaps.

use std::sync::{Arc, Weak};

use invalidation::{Bus, Event};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::cache::{Inner, bump};

/// Registers `inner` as the consumer of `channel`. Holds it weakly, so a bus shared with
/// other caches does not keep this one alive.
pub(crate) async fn listen<V>(inner: &Arc<Inner<V>>, bus: &Bus, channel: &str) -> l2::Result<()>
where
    V: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
{
    let weak: Weak<Inner<V>> = Arc::downgrade(inner);
    bus.listen(
        channel,
        Arc::new(move |event: Event| {
            let weak = weak.clone();
            Box::pin(async move {
                if let Some(inner) = weak.upgrade() {
                    apply(&inner, event).await;
                }
            })
        }),
    )
    .await
}

async fn apply<V>(inner: &Inner<V>, event: Event)
where
    V: Serialize + DeserializeOwned + Clone + Send + Sync + 'static,
{
    let own = inner.publisher.origin();
    let c = &inner.counters;
    match event {
        Event::Evict(evictions) => {
            for e in evictions {
                // Our own announcement: our L1 already holds what we wrote.
                if e.origin == own {
                    continue;
                }
                // A fill in flight may carry the value from before this change.
                inner.detach_below(&e.key, e.version);
                inner.writes.announced(&e.key, e.version);
                if let Some(entry) = inner.l1.get(e.key.as_str())
                    && entry.write_version() >= e.version
                {
                    bump(&c.invalidations_ignored);
                    continue;
                }
                inner.l1.invalidate(e.key.as_str());
                bump(&c.invalidations_received);
            }
        }
        Event::ClearNamespace { origin } | Event::ClearAll { origin } => {
            if origin != own {
                inner.invalidate_local();
                bump(&c.invalidations_received);
            }
        }
        Event::Gap(_) => {
            inner.invalidate_local();
            bump(&c.gaps);
        }
        _ => inner.invalidate_local(),
    }
}
