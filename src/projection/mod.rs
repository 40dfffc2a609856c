//! Projections: definitions ([`def`]), the pure fold ([`fold`]), the read-model
//! stores ([`store`]) and the engine that runs them ([`engine`]).

pub mod def;
pub mod engine;
pub mod fold;
pub mod store;
