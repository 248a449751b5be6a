//! Migratability check. (being written)
