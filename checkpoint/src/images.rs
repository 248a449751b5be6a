//! Private image directories. (being written)
