//! `baileys-store history`: a session's audit trail, event by event — what
//! changed, when, through which request — never a value.

use crate::Config;
use crate::connect_tool;
use bstore_log::EventLog;

/// Which events `history` lists: those that changed keys of a type (and
/// one id), or the creds (`ty` = `creds`). A session's deletion changes
/// every key, so it always matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    /// A key type, or `creds`.
    pub ty: String,
    /// One key id of that type.
    pub id: Option<String>,
}

impl Filter {
    fn matches(&self, event: &bstore_domain::Event) -> bool {
        use bstore_domain::Change;
        match &event.change {
            Change::SessionDeleted => true,
            Change::CredsPut { .. } => self.ty == "creds",
            // A restore sets the creds and changes keys: it matches either.
            Change::Restored { .. } if self.ty == "creds" => true,
            Change::KeysChanged { .. } | Change::Restored { .. } => event
                .touched_keys()
                .into_iter()
                .any(|(ty, id)| ty.as_str() == self.ty && self.id.as_deref().is_none_or(|want| id.as_str() == want)),
        }
    }
}

/// Prints a session's audit history as JSON lines: sequence, time, request
/// id, the predecessor the event was appended after (`prev`), and which keys
/// were written or deleted — never a value. A restore (`kind` `restored`)
/// also names the point it put the session back to (`to_seq`, and `to_ms`
/// when the operator gave a time). An event refused as not where it
/// was written carries `refused`.
pub async fn run(cfg: Config, key: bstore_domain::SessionKey, only: Option<Filter>) -> anyhow::Result<()> {
    use bstore_domain::Change;
    let (client, codec) = connect_tool(&cfg).await?;
    let log = EventLog::open(client, cfg.stream.clone(), codec).await?;
    if let Some(e) = log.data_key_state(&key).await?.erased {
        // The replay starts at the marker: what came before is unreadable.
        println!("{}", serde_json::json!({ "erased": { "before_seq": e.marker, "at_ms": e.at_ms } }));
    }
    if let Some(cut) = log.data_key_state(&key).await?.cut {
        // The audit retention dropped what came before; a base snapshot
        // stands for it.
        println!("{}", serde_json::json!({ "retained_from_seq": cut + 1 }));
    }
    log.replay_checked(&key, 0, |seq, replayed| {
        // An event that is not where it was written is listed, marked
        // `refused` with the reason; it was not applied.
        let (event, refused) = match replayed {
            bstore_log::Replayed::Fits(event) => (event, None),
            bstore_log::Replayed::Refused(event, why) => (event, Some(why.to_string())),
        };
        if let Some(only) = &only
            && !only.matches(&event)
        {
            return;
        }
        let mut line = serde_json::json!({ "seq": seq, "at_ms": event.at_ms, "kind": event.kind(), "rid": event.rid, "prev": event.prev });
        if let Some(why) = refused {
            line["refused"] = why.into();
        }
        match &event.change {
            Change::CredsPut { creds } => line["creds_bytes"] = creds.len().into(),
            Change::KeysChanged { keys, patched } | Change::Restored { keys, patched, .. } => {
                // A restore names the point it put the session back to, and
                // the creds it left (`null`: none).
                if let Change::Restored { to_seq, to_ms, creds, .. } = &event.change {
                    line["to_seq"] = (*to_seq).into();
                    line["to_ms"] = (*to_ms).into();
                    line["creds_bytes"] = creds.as_ref().map(|c| c.len()).into();
                }
                let mut types = serde_json::Map::new();
                for (ty, ids) in keys {
                    let set: Vec<&str> = ids.iter().filter(|(_, v)| v.is_some()).map(|(id, _)| id.as_str()).collect();
                    let deleted: Vec<&str> = ids.iter().filter(|(_, v)| v.is_none()).map(|(id, _)| id.as_str()).collect();
                    types.insert(ty.to_string(), serde_json::json!({ "set": set, "deleted": deleted }));
                }
                // Patched values were written too, recorded as a delta.
                for (ty, ids) in patched {
                    let entry = types.entry(ty.to_string()).or_insert_with(|| serde_json::json!({ "set": [], "deleted": [] }));
                    entry["patched"] = ids.keys().map(|id| id.as_str()).collect::<Vec<_>>().into();
                }
                line["keys"] = types.into();
            }
            Change::SessionDeleted => {}
        }
        println!("{line}");
    })
    .await?;
    Ok(())
}
