//! The embedded document store. (Being written: see the port in [`super::doc`].)

use std::path::Path;

use super::doc::Specs;

pub struct EmbeddedDocs {
    #[allow(dead_code)]
    specs: Specs,
}

impl EmbeddedDocs {
    pub fn open(_data_dir: &Path, specs: Specs) -> anyhow::Result<Self> {
        anyhow::bail!(
            "the embedded document store is not written yet ({} specs)",
            specs.len()
        )
    }
}

// Placeholder impls until the adapter lands (replaced by the adapter's branch).
#[async_trait::async_trait]
impl super::Store for EmbeddedDocs {
    fn backend(&self) -> &'static str {
        "unwritten"
    }
    async fn meta(&self, _: &str) -> super::StoreResult<super::Meta> {
        Err(super::StoreError::Other("unwritten".into()))
    }
    async fn put_meta(&self, _: &str, _: &super::Meta) -> super::StoreResult<()> {
        Err(super::StoreError::Other("unwritten".into()))
    }
    async fn session(
        &self,
        _: &super::GenRef,
        _: u32,
    ) -> super::StoreResult<Box<dyn super::Session>> {
        Err(super::StoreError::Other("unwritten".into()))
    }
    async fn checkpoints(&self, _: &super::GenRef, _: u32) -> super::StoreResult<Vec<Option<u64>>> {
        Err(super::StoreError::Other("unwritten".into()))
    }
    async fn view(
        &self,
        _: &super::GenRef,
        _: &super::Schema,
        _: &str,
    ) -> super::StoreResult<Option<serde_json::Map<String, serde_json::Value>>> {
        Err(super::StoreError::Other("unwritten".into()))
    }
    async fn dead_letters(
        &self,
        _: &super::GenRef,
        _: usize,
    ) -> super::StoreResult<(u64, Vec<crate::projection::fold::DeadLetter>)> {
        Err(super::StoreError::Other("unwritten".into()))
    }
    async fn drop_generation(&self, _: &super::GenRef) -> super::StoreResult<()> {
        Err(super::StoreError::Other("unwritten".into()))
    }
    async fn generations(&self, _: &str) -> super::StoreResult<std::collections::BTreeSet<u64>> {
        Err(super::StoreError::Other("unwritten".into()))
    }
}

#[async_trait::async_trait]
impl super::doc::DocStore for EmbeddedDocs {
    async fn search(
        &self,
        _: &super::GenRef,
        _: &super::doc::Search,
    ) -> super::StoreResult<super::doc::Page> {
        Err(super::StoreError::Other("unwritten".into()))
    }
}
