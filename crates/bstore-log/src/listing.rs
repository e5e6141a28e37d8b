//! Whole-stream reads for the operator's tools: which sessions the log
//! holds, and every sealed payload in stream order.

use async_nats::jetstream::consumer;
use bstore_domain::SessionKey;
use futures_util::StreamExt;

use crate::{EventLog, LogError, unavailable};

impl EventLog {
    /// The sessions with at least one message in the log — of `tenant`
    /// only, when given — in order.
    pub async fn sessions(&self, tenant: Option<&str>) -> Result<Vec<SessionKey>, LogError> {
        let stream = self.js.get_stream_no_info(&self.cfg.stream).await.map_err(unavailable)?;
        let filter = match tenant {
            Some(t) => format!("{}.{t}.*", self.cfg.subject_prefix),
            None => format!("{}.>", self.cfg.subject_prefix),
        };
        let mut subjects = stream.info_with_subjects(filter).await.map_err(unavailable)?;
        let mut out = Vec::new();
        while let Some(item) = subjects.next().await {
            let (subject, _) = item.map_err(unavailable)?;
            match self.session_of(&subject) {
                Some(key) => out.push(key),
                None => tracing::warn!(%subject, "a subject in the event stream names no session"),
            }
        }
        out.sort();
        Ok(out)
    }

    /// Calls `f` with every message's sealed payload, in stream order,
    /// through one ordered consumer over the whole stream (deleted as soon
    /// as it is read out). Nothing is opened or checked.
    pub async fn scan_raw(&self, mut f: impl FnMut(&[u8])) -> Result<(), LogError> {
        let mut stream = self.js.get_stream(&self.cfg.stream).await.map_err(unavailable)?;
        if stream.info().await.map_err(unavailable)?.state.messages == 0 {
            return Ok(());
        }
        let consumer = stream
            .create_consumer(consumer::pull::OrderedConfig { deliver_policy: consumer::DeliverPolicy::All, ..Default::default() })
            .await
            .map_err(unavailable)?;
        let name = consumer.cached_info().name.clone();
        let result = async {
            let mut messages = consumer.messages().await.map_err(unavailable)?;
            loop {
                let msg = tokio::time::timeout(self.cfg.request_timeout, messages.next())
                    .await
                    .map_err(|_| LogError::Unavailable("reading the event stream stalled".into()))?
                    .ok_or_else(|| LogError::Unavailable("the event stream ended early".into()))?
                    .map_err(unavailable)?;
                f(&msg.payload);
                if msg.info().map_err(unavailable)?.pending == 0 {
                    return Ok(());
                }
            }
        }
        .await;
        let _ = stream.delete_consumer(&name).await;
        result
    }

    /// Deletes the durable consumer `name` if it exists (a projection
    /// rebuilt from scratch).
    pub async fn delete_durable(&self, name: &str) -> Result<(), LogError> {
        let stream = self.js.get_stream_no_info(&self.cfg.stream).await.map_err(unavailable)?;
        let _ = stream.delete_consumer(name).await;
        Ok(())
    }

    /// The stream's last sequence.
    pub async fn stream_last_seq(&self) -> Result<u64, LogError> {
        let mut stream = self.js.get_stream(&self.cfg.stream).await.map_err(unavailable)?;
        Ok(stream.info().await.map_err(unavailable)?.state.last_sequence)
    }
}
