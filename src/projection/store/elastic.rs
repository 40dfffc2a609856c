//! The Elasticsearch document store. (Being written: see the port in [`super::doc`].)

use super::doc::Specs;

pub struct ElasticStore {
    #[allow(dead_code)]
    specs: Specs,
}

impl ElasticStore {
    pub async fn connect(_url: &str, _namespace: &str, specs: Specs) -> anyhow::Result<Self> {
        anyhow::bail!(
            "the Elasticsearch store is not written yet ({} specs)",
            specs.len()
        )
    }
}
