//! One conformance suite for the event-log port, run against every adapter:
//! the embedded log (redb) and Kafka (tansu, started by scripts/test.sh).

mod common;

use std::sync::Arc;
use std::time::Duration;

use refold::log::embedded::EmbeddedLog;
use refold::log::kafka::KafkaLog;
use refold::log::{Created, EventLog, ProduceRecord, READ_BATCH_BYTES, Record, TopicSpec, scan};

fn spec(name: &str, partitions: u32, compact: bool) -> TopicSpec {
    let mut config = std::collections::BTreeMap::new();
    if compact {
        config.insert("cleanup.policy".into(), "compact".into());
    }
    TopicSpec {
        name: name.into(),
        partitions,
        replication_factor: 1,
        config,
    }
}

fn rec(topic: &str, partition: u32, key: &str, value: &str) -> ProduceRecord {
    ProduceRecord {
        topic: topic.into(),
        partition,
        record: Record {
            key: key.into(),
            value: Some(value.as_bytes().to_vec()),
            headers: vec![("type".into(), b"Test".to_vec())],
            timestamp_ms: 1_700_000_000_000,
        },
    }
}

async fn read_all(log: &dyn EventLog, topic: &str, partition: u32) -> Vec<(u64, String, String)> {
    let end = log.end_offsets(topic).await.unwrap()[partition as usize];
    let mut out = Vec::new();
    scan(log, topic, partition, 0, end, |r| {
        out.push((
            r.offset,
            r.record.key.clone(),
            String::from_utf8(r.record.value.clone().unwrap()).unwrap(),
        ));
        Ok(())
    })
    .await
    .unwrap();
    out
}

async fn conformance(log: Arc<dyn EventLog>, prefix: &str) {
    let topic = format!("{prefix}.events");

    // Topics: created once, described with their partition count.
    assert_eq!(log.describe_topic(&topic).await.unwrap(), None);
    assert_eq!(
        log.create_topic(&spec(&topic, 3, true)).await.unwrap(),
        Created::Created
    );
    assert_eq!(
        log.create_topic(&spec(&topic, 3, true)).await.unwrap(),
        Created::AlreadyExists
    );
    let info = common::eventually(10, "topic metadata", || {
        let log = log.clone();
        let topic = topic.clone();
        async move { log.describe_topic(&topic).await.unwrap() }
    })
    .await;
    assert_eq!(info.partitions, 3);
    assert_eq!(log.end_offsets(&topic).await.unwrap(), vec![0, 0, 0]);

    // Appends: offsets from 0, one by one per partition, in input order.
    let offsets = log
        .append(vec![
            rec(&topic, 0, "a/1", "A1"),
            rec(&topic, 1, "b/1", "B1"),
            rec(&topic, 0, "a/2", "A2"),
        ])
        .await
        .unwrap();
    assert_eq!(offsets, vec![0, 0, 1]);
    let offsets = log.append(vec![rec(&topic, 0, "a/3", "A3")]).await.unwrap();
    assert_eq!(offsets, vec![2]);
    assert_eq!(log.end_offsets(&topic).await.unwrap(), vec![3, 1, 0]);

    // Reads: everything back, in order, with keys, values and headers.
    assert_eq!(
        read_all(&*log, &topic, 0).await,
        vec![
            (0, "a/1".into(), "A1".into()),
            (1, "a/2".into(), "A2".into()),
            (2, "a/3".into(), "A3".into())
        ]
    );
    let mut reader = log.reader(&topic, 0, 1).await.unwrap();
    let batch = reader.next(1, Duration::from_secs(5)).await.unwrap();
    assert_eq!(batch.records.len(), 1);
    assert_eq!(batch.records[0].offset, 1);
    assert_eq!(batch.records[0].record.header("type"), Some(&b"Test"[..]));
    assert_eq!(batch.records[0].record.timestamp_ms, 1_700_000_000_000);
    assert_eq!(batch.next_offset, 2);

    // A reader at the end waits, and sees a record appended while it waits.
    let mut tail = log.reader(&topic, 1, 1).await.unwrap();
    let empty = tail.next(10, Duration::from_millis(300)).await.unwrap();
    assert!(empty.records.is_empty());
    let writer = log.clone();
    let t = topic.clone();
    let appender = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        writer.append(vec![rec(&t, 1, "b/2", "B2")]).await.unwrap()
    });
    let mut seen = Vec::new();
    for _ in 0..50 {
        seen.extend(
            tail.next(10, Duration::from_millis(500))
                .await
                .unwrap()
                .records,
        );
        if !seen.is_empty() {
            break;
        }
    }
    assert_eq!(appender.await.unwrap(), vec![1]);
    assert_eq!(seen.len(), 1);
    assert_eq!((seen[0].offset, seen[0].record.key.as_str()), (1, "b/2"));

    // Compacted topics keep the newest record per key; unique keys keep everything.
    let heads = format!("{prefix}.heads");
    log.create_topic(&spec(&heads, 1, true)).await.unwrap();
    common::eventually(10, "heads topic", || {
        let log = log.clone();
        let heads = heads.clone();
        async move { log.describe_topic(&heads).await.unwrap() }
    })
    .await;
    log.append(vec![
        rec(&heads, 0, "s", "v1"),
        rec(&heads, 0, "t", "w1"),
        rec(&heads, 0, "s", "v2"),
    ])
    .await
    .unwrap();
    let all = read_all(&*log, &heads, 0).await;
    let newest_s = all.iter().rev().find(|(_, k, _)| k == "s").unwrap();
    assert_eq!(newest_s.2, "v2");
    assert!(all.iter().any(|(_, k, v)| k == "t" && v == "w1"));
    assert!(all.windows(2).all(|w| w[0].0 < w[1].0), "offsets increase");
    assert_eq!(log.end_offsets(&heads).await.unwrap(), vec![3]);

    // Tombstones are records without a value.
    let mut tomb = rec(&heads, 0, "t", "");
    tomb.record.value = None;
    log.append(vec![tomb]).await.unwrap();
    let end = log.end_offsets(&heads).await.unwrap()[0];
    let mut last = None;
    scan(&*log, &heads, 0, 0, end, |r| {
        last = Some(r);
        Ok(())
    })
    .await
    .unwrap();
    let last = last.unwrap();
    assert_eq!(
        (last.record.key.as_str(), last.record.value.as_ref()),
        ("t", None)
    );

    // A thousand records in one append keep their order.
    let many: Vec<_> = (0..1000)
        .map(|i| rec(&topic, 2, &format!("c/{i}"), &i.to_string()))
        .collect();
    let offsets = log.append(many).await.unwrap();
    assert_eq!(offsets, (0..1000).collect::<Vec<u64>>());
    let back = read_all(&*log, &topic, 2).await;
    assert_eq!(back.len(), 1000);
    assert!(
        back.iter()
            .enumerate()
            .all(|(i, (o, _, v))| *o == i as u64 && *v == i.to_string())
    );

    // A read stops once it holds READ_BATCH_BYTES (I9: a projection batch of
    // large events stays bounded), and the next read goes on from there.
    let big = format!("{prefix}.big");
    log.create_topic(&spec(&big, 1, false)).await.unwrap();
    let size = READ_BATCH_BYTES * 2 / 5;
    let records: Vec<_> = (0..6)
        .map(|i| rec(&big, 0, &format!("b/{i}"), &i.to_string().repeat(size)))
        .collect();
    log.append(records).await.unwrap();
    let mut reader = log.reader(&big, 0, 0).await.unwrap();
    let mut offsets = Vec::new();
    while offsets.len() < 6 {
        let batch = reader.next(1000, Duration::from_secs(10)).await.unwrap();
        let bytes: usize = batch.records.iter().map(|r| r.record.size()).sum();
        assert!(
            !batch.records.is_empty() && bytes < READ_BATCH_BYTES + size + 100,
            "{} records of {bytes} bytes in one read",
            batch.records.len()
        );
        offsets.extend(batch.records.iter().map(|r| r.offset));
    }
    assert_eq!(offsets, (0..6).collect::<Vec<u64>>());
}

#[tokio::test]
async fn embedded_log_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(EmbeddedLog::open(dir.path()).unwrap());
    conformance(log, "conf").await;
}

#[tokio::test]
async fn embedded_log_keeps_records_across_reopen_and_refuses_a_second_process() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = EmbeddedLog::open(dir.path()).unwrap();
        log.create_topic(&spec("x", 2, false)).await.unwrap();
        log.append(vec![rec("x", 1, "k", "v")]).await.unwrap();
        let err = EmbeddedLog::open(dir.path())
            .err()
            .expect("second open must fail")
            .to_string();
        assert!(err.contains("in use by another refold process"), "{err}");
    }
    let log = EmbeddedLog::open(dir.path()).unwrap();
    assert_eq!(log.end_offsets("x").await.unwrap(), vec![0, 1]);
    assert_eq!(
        read_all(&log, "x", 1).await,
        vec![(0, "k".into(), "v".into())]
    );
    assert!(
        log.append(vec![rec("x", 2, "k", "v")]).await.is_err(),
        "partition out of range"
    );
    assert!(
        log.append(vec![rec("nope", 0, "k", "v")]).await.is_err(),
        "unknown topic"
    );
}

#[tokio::test]
async fn kafka_log_conforms() {
    let log = Arc::new(KafkaLog::new(&common::kafka_brokers(), Duration::from_secs(10)).unwrap());
    conformance(log, &common::unique("conf")).await;
}
