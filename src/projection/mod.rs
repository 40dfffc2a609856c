//! Projections: definitions ([`def`]), the pure fold ([`fold`]), the read-model
//! stores ([`store`]), the engine that runs them ([`engine`]) and the built-in
//! stream history ([`history`]).

pub mod def;
pub mod engine;
pub mod fold;
pub mod history;
pub mod store;
