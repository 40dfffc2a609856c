//! The built-in stream history: a document projection of every event (keyed by
//! event id, fields `stream`, `version`, `type`, `id`, `recorded_at`, `data`,
//! `metadata`), which serves `GET /streams/{stream}/events?from=N&limit=M` with a
//! filter on `stream`, a range on `version` and a sort by `version`. It runs like
//! any projection (status, replay, `after=TOKEN`) on the document store, and
//! `--stream-history false` switches it off.

use std::collections::BTreeMap;
use std::path::Path;

use super::def::{self, Definition};
use super::store::doc::{FieldType, IndexSpec};

pub const NAME: &str = "stream_history";

/// Where the definition claims to come from: replays re-read it from here.
pub const FILE: &str = "<built-in>/stream_history.toml";

const SOURCE: &str = include_str!("history.toml");

/// The built-in definition.
pub fn definition() -> Definition {
    def::parse(Path::new(FILE), SOURCE).expect("the built-in stream history definition is valid")
}

/// Its index: exact fields for the filter, range and sort; `data` and `metadata`
/// are kept but not indexed (their shapes differ from event type to event type).
pub fn spec() -> IndexSpec {
    IndexSpec {
        fields: BTreeMap::from([
            ("stream".to_string(), FieldType::Keyword),
            ("version".to_string(), FieldType::Long),
            ("type".to_string(), FieldType::Keyword),
            ("id".to_string(), FieldType::Keyword),
            ("recorded_at".to_string(), FieldType::Keyword),
        ]),
        settings: serde_json::Map::from_iter([(
            "number_of_shards".to_string(),
            serde_json::Value::from(1),
        )]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_in_definition_takes_every_event_type() {
        let d = definition();
        assert_eq!(d.name, NAME);
        assert!(d.handles("PostLiked") && d.handles("AnythingElse"));
        assert_eq!(d.store, def::StoreKind::Elasticsearch);
    }
}
