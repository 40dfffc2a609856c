//! Migrations: the log's topics and the document projections' indexes, declared in
//! `migrations/*.toml`, applied once.
//!
//! Files are applied in name order (`0001_event_log.toml`, `0002_...`). Applying a
//! file creates its topics, or checks that existing ones have the declared
//! partition count, and then records the file's id and checksum in the ledger topic
//! `{prefix}migrations`. A recorded file that changed afterwards is an error: add a
//! new file instead. Topic names in files are logical (`events`); the configured
//! prefix is prepended (`refold.events`).
//!
//! `[[indexes]]` declare the index of a document projection: its mapped fields
//! (`text`, `keyword`, `long`, `double`, `boolean`) and Elasticsearch settings.
//! Each generation's index is created from it when the generation starts (at first
//! start, and at every replay), so a change takes a new file and a version bump of
//! the projection; a later file's declaration of a projection replaces an earlier
//! one ([`index_specs`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use tracing::info;

use crate::log::{Created, EventLog, ProduceRecord, Record, TopicSpec, scan};
use crate::projection::def::RESERVED_PREFIX;
use crate::projection::store::doc::{FieldType, IndexSpec, Specs};

/// Logical names of the topics refold itself needs.
pub const EVENTS: &str = "events";
pub const STREAM_HEADS: &str = "stream-heads";
const LEDGER: &str = "migrations";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MigrationFile {
    #[serde(default)]
    #[allow(dead_code)]
    description: Option<String>,
    #[serde(default)]
    topics: Vec<TopicSpec>,
    #[serde(default)]
    indexes: Vec<IndexDecl>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct IndexDecl {
    projection: String,
    #[serde(default)]
    fields: BTreeMap<String, FieldType>,
    #[serde(default)]
    settings: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Clone)]
pub struct Migration {
    pub id: String,
    pub path: PathBuf,
    pub checksum: String,
    /// Topics with their logical names.
    pub topics: Vec<TopicSpec>,
    /// Document projection → its index.
    pub indexes: Vec<(String, IndexSpec)>,
}

/// The index declaration of every document projection: the last file's wins.
pub fn index_specs(migrations: &[Migration]) -> Specs {
    migrations
        .iter()
        .flat_map(|m| m.indexes.iter().cloned())
        .collect()
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Applied {
    id: String,
    checksum: String,
    applied_at: String,
}

/// What `refold migrate` did.
#[derive(Debug, Default)]
pub struct Report {
    pub applied: Vec<String>,
    pub already: Vec<String>,
    pub topics_created: Vec<String>,
}

/// Loads and validates every migration file under `dir`, in order.
pub fn load(dir: &Path) -> anyhow::Result<Vec<Migration>> {
    let entries = std::fs::read_dir(dir).with_context(|| {
        format!(
            "cannot read the migrations directory {} (set --migrations DIR)",
            dir.display()
        )
    })?;
    let mut paths: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    paths.sort();
    let mut out = Vec::new();
    for path in paths {
        let id = path
            .file_stem()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        if !id
            .split('_')
            .next()
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        {
            bail!(
                "{}: migration file names start with a number, like 0001_event_log.toml",
                path.display()
            );
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let file: MigrationFile =
            toml::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        for t in &file.topics {
            if t.name.is_empty()
                || !t
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
            {
                bail!(
                    "{}: topic name {:?} must use [A-Za-z0-9._-]",
                    path.display(),
                    t.name
                );
            }
            if t.partitions == 0 {
                bail!(
                    "{}: topic {} needs at least one partition",
                    path.display(),
                    t.name
                );
            }
        }
        let mut indexes = Vec::new();
        for ix in file.indexes {
            let bad = ix
                .fields
                .keys()
                .find(|f| f.is_empty() || f.starts_with(RESERVED_PREFIX) || f.contains('.'));
            if let Some(f) = bad {
                bail!(
                    "{}: index of {}: field name {f:?} is empty, has a `.`, or starts with the reserved `{RESERVED_PREFIX}`",
                    path.display(),
                    ix.projection
                );
            }
            let spec = IndexSpec {
                fields: ix.fields,
                settings: ix.settings,
            };
            indexes.push((ix.projection, spec));
        }
        out.push(Migration {
            id,
            path,
            checksum: format!("{:016x}", fnv1a(text.as_bytes())),
            topics: file.topics,
            indexes,
        });
    }
    if out.is_empty() {
        bail!(
            "no migrations in {}: expected files like 0001_event_log.toml",
            dir.display()
        );
    }
    Ok(out)
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

fn ledger_spec(prefix: &str) -> TopicSpec {
    TopicSpec {
        name: format!("{prefix}{LEDGER}"),
        partitions: 1,
        replication_factor: 1,
        config: [("cleanup.policy".to_owned(), "compact".to_owned())].into(),
    }
}

async fn read_ledger(
    log: &dyn EventLog,
    prefix: &str,
) -> anyhow::Result<Option<BTreeMap<String, Applied>>> {
    let ledger = ledger_spec(prefix).name;
    if log.describe_topic(&ledger).await?.is_none() {
        return Ok(None);
    }
    let end = log.end_offsets(&ledger).await?[0];
    let mut applied = BTreeMap::new();
    scan(log, &ledger, 0, 0, end, |r| {
        if let Some(v) = r.record.value {
            let a: Applied = serde_json::from_slice(&v)
                .map_err(|e| crate::log::LogError::Other(format!("bad ledger record: {e}")))?;
            applied.insert(a.id.clone(), a);
        }
        Ok(())
    })
    .await?;
    Ok(Some(applied))
}

fn check_unchanged(m: &Migration, a: &Applied) -> anyhow::Result<()> {
    if a.checksum != m.checksum {
        bail!(
            "{} changed after it was applied (on {}); migrations are append-only: put the change in a new file",
            m.path.display(),
            a.applied_at
        );
    }
    Ok(())
}

/// Applies what is pending; idempotent.
pub async fn migrate(
    log: &dyn EventLog,
    migrations: &[Migration],
    prefix: &str,
) -> anyhow::Result<Report> {
    let mut report = Report::default();
    let ledger = ledger_spec(prefix);
    if log.create_topic(&ledger).await? == Created::Created {
        report.topics_created.push(ledger.name.clone());
        wait_for_topic(log, &ledger).await?;
    }
    let applied = read_ledger(log, prefix).await?.unwrap_or_default();
    for m in migrations {
        if let Some(a) = applied.get(&m.id) {
            check_unchanged(m, a)?;
            report.already.push(m.id.clone());
            continue;
        }
        for t in &m.topics {
            let spec = TopicSpec {
                name: format!("{prefix}{}", t.name),
                ..t.clone()
            };
            if log.create_topic(&spec).await? == Created::Created {
                report.topics_created.push(spec.name.clone());
            }
            let info = wait_for_topic(log, &spec).await?;
            if info != spec.partitions {
                bail!(
                    "topic {} exists with {info} partitions but {} declares {}; partitions cannot change under a live log (streams would move)",
                    spec.name,
                    m.path.display(),
                    spec.partitions
                );
            }
        }
        let record = Applied {
            id: m.id.clone(),
            checksum: m.checksum.clone(),
            applied_at: crate::event::now_rfc3339(),
        };
        log.append(vec![ProduceRecord {
            topic: ledger.name.clone(),
            partition: 0,
            record: Record {
                key: m.id.clone(),
                value: Some(serde_json::to_vec(&record)?),
                headers: vec![],
                timestamp_ms: 0,
            },
        }])
        .await?;
        info!(migration = %m.id, "migration applied");
        report.applied.push(m.id.clone());
    }
    Ok(report)
}

/// New topics can take a moment to show up in a broker's metadata.
async fn wait_for_topic(log: &dyn EventLog, spec: &TopicSpec) -> anyhow::Result<u32> {
    for _ in 0..50 {
        if let Some(info) = log.describe_topic(&spec.name).await? {
            return Ok(info.partitions);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!(
        "topic {} was created but does not appear in the log's metadata",
        spec.name
    )
}

/// Fails unless every migration is applied and unchanged (what `serve` checks).
pub async fn check(
    log: &dyn EventLog,
    migrations: &[Migration],
    prefix: &str,
) -> anyhow::Result<()> {
    let applied = read_ledger(log, prefix).await?.unwrap_or_default();
    let mut pending = Vec::new();
    for m in migrations {
        match applied.get(&m.id) {
            Some(a) => check_unchanged(m, a)?,
            None => pending.push(m.id.as_str()),
        }
    }
    if !pending.is_empty() {
        bail!(
            "the {} log is not migrated (pending: {}); run `refold migrate` with the same backend flags, or start with --auto-migrate",
            log.backend(),
            pending.join(", ")
        );
    }
    for name in [EVENTS, STREAM_HEADS] {
        if !migrations
            .iter()
            .flat_map(|m| &m.topics)
            .any(|t| t.name == name)
        {
            bail!("no migration declares the {name:?} topic that refold needs");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_migrations_load_and_bad_files_are_refused() {
        let ms = load(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("migrations")
                .as_path(),
        )
        .unwrap();
        assert!(
            ms.iter()
                .flat_map(|m| &m.topics)
                .any(|t| t.name == EVENTS && t.is_compacted())
        );
        let specs = index_specs(&ms);
        assert_eq!(specs["posts"].fields["title"], FieldType::Text);
        assert_eq!(specs["users"].fields["tribes"], FieldType::Keyword);
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("0002_ix.toml"),
            "[[indexes]]\nprojection = \"p\"\nfields = { title = \"txt\" }\n",
        )
        .unwrap();
        let err = load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("0002_ix.toml") && err.contains("txt"), "{err}");
        std::fs::remove_file(dir.path().join("0002_ix.toml")).unwrap();
        std::fs::write(
            dir.path().join("0001_x.toml"),
            "[[topics]]\nname = \"a\"\npartitions = 1\nbogus = 2\n",
        )
        .unwrap();
        let err = load(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("0001_x.toml") && err.contains("bogus") && err.contains("line 4"),
            "{err}"
        );
        std::fs::write(dir.path().join("0001_x.toml"), "").unwrap();
        std::fs::write(dir.path().join("x.toml"), "").unwrap();
        assert!(
            load(dir.path())
                .unwrap_err()
                .to_string()
                .contains("start with a number")
        );
    }
}
