//! Position tokens: where an append landed, for read-your-writes (I10).
//!
//! A token lists, per partition of the events topic, the offset of the last record
//! it covers: `"0:15,2:7"`. Clients treat it as opaque; a query passing it as
//! `after` waits until the projection has applied those offsets.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Position(BTreeMap<u32, u64>);

impl Position {
    pub fn at(partition: u32, offset: u64) -> Self {
        let mut p = Self::default();
        p.include(partition, offset);
        p
    }

    /// Extends the token to cover `offset` in `partition`.
    pub fn include(&mut self, partition: u32, offset: u64) {
        let e = self.0.entry(partition).or_insert(offset);
        *e = (*e).max(offset);
    }

    pub fn merge(&mut self, other: &Position) {
        for (&p, &o) in &other.0 {
            self.include(p, o);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `(partition, last offset covered)` pairs.
    pub fn entries(&self) -> impl Iterator<Item = (u32, u64)> + '_ {
        self.0.iter().map(|(&p, &o)| (p, o))
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (p, o)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{p}:{o}")?;
        }
        Ok(())
    }
}

impl FromStr for Position {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut pos = Position::default();
        for part in s.split(',').filter(|p| !p.is_empty()) {
            let (p, o) = part
                .split_once(':')
                .and_then(|(p, o)| Some((p.parse().ok()?, o.parse().ok()?)))
                .ok_or_else(|| {
                    format!("invalid position token {s:?}: expected PARTITION:OFFSET,...")
                })?;
            pos.include(p, o);
        }
        if pos.is_empty() {
            return Err(format!("invalid position token {s:?}: empty"));
        }
        Ok(pos)
    }
}

impl serde::Serialize for Position {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_merge() {
        let mut a = Position::at(2, 7);
        a.merge(&Position::at(0, 15));
        a.include(2, 3);
        assert_eq!(a.to_string(), "0:15,2:7");
        assert_eq!("0:15,2:7".parse::<Position>().unwrap(), a);
        assert!("x".parse::<Position>().is_err());
        assert!("".parse::<Position>().is_err());
        assert!("0:-1".parse::<Position>().is_err());
    }
}
