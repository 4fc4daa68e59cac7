//! The resolver: every `--loader` name is resolved at start, whenever a name is added, and every
//! `resolve_interval`; each address a name resolves to is one replica.

use std::{sync::Arc, time::Duration};

use tokio::sync::{mpsc, watch};

use super::connection::{Connector, Event};

/// Resolves the names in `names_rx` now, whenever they change, and every `interval`, until the
/// pool goes away.
pub(crate) async fn resolve_forever(
    connector: Arc<dyn Connector>,
    mut names_rx: watch::Receiver<Vec<String>>,
    interval: Duration,
    events_tx: mpsc::Sender<Event>,
) {
    loop {
        let names = names_rx.borrow_and_update().clone();
        for (spec, name) in names.iter().enumerate() {
            match connector.resolve(name).await {
                Ok(addrs) => {
                    if events_tx.send(Event::Resolved { spec, addrs }).await.is_err() {
                        return;
                    }
                }
                // A name that does not resolve yet (a service still starting) keeps its last
                // answer; the unavailable timeout catches one that never does.
                Err(error) => tracing::debug!(loader = %name, %error, "cannot resolve loader name"),
            }
        }
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            changed = names_rx.changed() => if changed.is_err() { return },
        }
    }
}
